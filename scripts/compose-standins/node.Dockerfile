# Stand-in for node:20-slim: Debian bookworm's Node.js and npm.
ARG BASE
FROM ${BASE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null \
 && rm -rf /var/lib/apt/lists/*
CMD ["node"]
