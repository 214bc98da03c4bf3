# One image for every callflow process (web, listener, worker, beat, flower) and `callflow migrate`.
# docker-compose.yml picks the process with `command:`, exactly as the Procfile runs it.
#
# Base images are build arguments (a registry mirror, an air-gapped copy, or the local stand-ins of
# scripts/compose-check.sh): docker build --build-arg PYTHON_IMAGE=... --build-arg NODE_IMAGE=...
ARG PYTHON_IMAGE=python:3.11-slim
ARG NODE_IMAGE=node:20-slim

# The /demo page's script: livekit-client bundled with esbuild (built here, never committed).
FROM ${NODE_IMAGE} AS demo
WORKDIR /demo
COPY web/demo/package.json web/demo/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY web/demo/src ./src
RUN npm run build

FROM ${PYTHON_IMAGE}

# PYTHONPATH: the checkout's packages come first, so `callflow migrate` finds
# /app/supabase/migrations (an installed copy would look beside site-packages instead).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app

COPY pyproject.toml README.md ./
COPY config ./config
COPY orchestration ./orchestration
COPY workers ./workers
COPY supabase ./supabase
COPY web/demo/index.html ./web/demo/index.html
COPY --from=demo /demo/dist ./web/demo/dist
COPY Procfile ./

RUN pip install . \
 && rm -rf build callflow.egg-info \
 && useradd --system --uid 10001 --home-dir /app callflow \
 && mkdir -p /app/.local/outbox \
 && chown -R callflow /app/.local

USER callflow
EXPOSE 8000 5555
CMD ["uvicorn", "workers.web.app:app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
