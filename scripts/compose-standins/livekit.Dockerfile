# Stand-in for livekit/livekit-server: the LiveKit server binary the set-up builds from its Go
# module (scripts/stack.sh), with wget for the health check (the public image is Alpine's).
ARG BASE
FROM ${BASE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wget >/dev/null \
 && rm -rf /var/lib/apt/lists/*
COPY livekit-server /livekit-server
EXPOSE 7880 7881 7882/udp
ENTRYPOINT ["/livekit-server"]
