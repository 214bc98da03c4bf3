# Stand-in for python:3.11-slim: Debian bookworm's Python 3.11 in a virtualenv first on PATH, so
# `python`, `pip` and what pip installs behave as in the public image (pip may install there).
ARG BASE
FROM ${BASE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /usr/local/python \
 && /usr/local/python/bin/pip install -q --upgrade pip
ENV PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8
CMD ["python3"]
