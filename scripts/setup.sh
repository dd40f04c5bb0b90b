#!/usr/bin/env bash
# Idempotent set-up shared by scripts/run and scripts/test: the virtualenv, and nothing else.
# No system services: `gpufleet up` and the test suite start PostgreSQL and Redis of their own
# (app/embedded.py). Needs only Python 3 (with its venv module).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# install_venv EXTRAS: create .venv and install the project with EXTRAS (comma-separated),
# unless pyproject.toml is unchanged since a previous install that already had them.
install_venv() {
  local extras="$1" stamp=".venv/.gpufleet-installed" hash have=""
  hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  # Two set-ups at once (two scripts/test side by side) take turns; the second finds it done.
  exec 9>".venv.lock"
  flock 9
  if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(head -n1 "$stamp")" = "$hash" ]; then
    have="$(tail -n +2 "$stamp")"
    local missing="" extra
    for extra in ${extras//,/ }; do
      grep -qx "$extra" <<<"$have" || missing=1
    done
    if [ -z "$missing" ]; then
      exec 9>&-
      return 0
    fi
  fi
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv || {
      echo "could not create .venv: install Python 3's venv module (e.g. apt-get install python3-venv)" >&2
      return 1
    }
  fi
  echo "installing gpufleet[${extras}] into .venv"
  .venv/bin/pip install -q --upgrade pip
  # Pinned first and alone: any other torch spec may pull a multi-GB CUDA build.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[${extras}]"
  { echo "$hash"; { echo "$have"; tr ',' '\n' <<<"$extras"; } | grep -v '^$' | sort -u; } >"$stamp"
  exec 9>&-
}
