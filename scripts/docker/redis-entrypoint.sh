#!/bin/sh
# `redis-server ARGS...` gets --protected-mode no first (as in the official image); anything
# else runs as given.
set -eu
if [ "${1:-}" = redis-server ]; then
  shift
  set -- redis-server --protected-mode no "$@"
fi
exec "$@"
