# A stand-in for the official redis image, for hosts that reach no image registry (used by
# scripts/compose-smoke): Debian's Redis on the local base image. Like the official image it
# turns protected mode off when started as `redis-server ARGS...`, so that the other
# containers of the compose network can connect.

ARG BASE_IMAGE=python:3.11.13-slim-bookworm
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
# The user first, with the official image's ids (999), so that USER below can be numeric.
# DL3008 (pin apt versions): a local test stand-in; the suite's version is what the base has.
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 redis \
    && useradd --system --uid 999 --gid redis --home-dir /var/lib/redis --shell /bin/sh redis \
    && apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*

COPY redis-entrypoint.sh /usr/local/bin/redis-entrypoint
USER 999:999
WORKDIR /var/lib/redis
EXPOSE 6379
HEALTHCHECK --interval=5s --timeout=3s --retries=10 CMD ["redis-cli", "ping"]
ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]
CMD ["redis-server"]
