# A stand-in for the official postgres image, for hosts that reach no image registry (used by
# scripts/compose-smoke): Debian's PostgreSQL on the local base image, initialised the way the
# official image does it from POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB.

ARG BASE_IMAGE=python:3.11.13-slim-bookworm
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
# The user first, with the official image's ids (999), so that USER below can be numeric.
# DL3008 (pin apt versions): a local test stand-in; the suite's version is what the base has.
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 postgres \
    && useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql --shell /bin/sh postgres \
    && apt-get update \
    && apt-get install -y --no-install-recommends postgresql \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "$(ls -d /usr/lib/postgresql/*/bin)" /usr/local/lib/postgresql-bin \
    && mkdir -p /var/lib/postgresql/data \
    && chown postgres:postgres /var/lib/postgresql/data \
    && chmod 700 /var/lib/postgresql/data

ENV PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
USER 999:999
EXPOSE 5432
HEALTHCHECK --interval=5s --timeout=5s --retries=10 CMD ["pg_isready", "-q"]
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]
