#!/usr/bin/env bash
# Idempotent set-up shared by scripts/run and scripts/test: local services and the virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."

start_services() {
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
  fi
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  fi
  for _ in $(seq 1 30); do
    if pg_isready -q -h 127.0.0.1 -p 5432 && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
      return 0
    fi
    sleep 1
  done
  echo "PostgreSQL or Redis did not come up" >&2
  return 1
}

install_venv() {
  local extras="$1"
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  .venv/bin/pip install -q --upgrade pip
  # Pinned first and alone: any other torch spec may pull a multi-GB CUDA build.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[${extras}]"
}

ensure_database() {
  local url="${GPUFLEET_DATABASE_URL:-postgresql+psycopg://postgres@localhost:5432/gpufleet}"
  local name="${url##*/}"
  name="${name%%\?*}"
  if ! psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='${name}'" | grep -q 1; then
    psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE \"${name}\""
  fi
}
