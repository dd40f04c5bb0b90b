#!/usr/bin/env bash
# Install what scripts/compose-smoke needs on a Debian host, once: Debian's Docker engine
# (docker.io), debootstrap, and Docker Compose v2 (>= 2.24, for the CPU override's `!reset`).
#
# Debian bookworm's docker-compose is v1, which cannot read `!reset`, so Compose comes from
# Debian trixie's docker-compose package (a Go binary; it needs only libc6). The .deb is fetched
# with a private apt configuration (its own sources list, lists and cache in a temporary
# folder) and installed with dpkg: the host's apt sources and lists stay as they were.
set -euo pipefail

COMPOSE_SUITE="${GPUFLEET_COMPOSE_SUITE:-trixie}"
MIRROR="${GPUFLEET_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

compose_ok() {
  local version
  version="$(docker compose version --short 2>/dev/null)" || return 1
  # 2.24 or newer (`!reset`); the Debian version may carry a suffix such as 2.26.1-4.
  version="${version#v}"
  [ "$(printf '%s\n2.24\n' "${version%%-*}" | sort -V | head -n 1)" = 2.24 ]
}

if [ "$(id -u)" != 0 ]; then
  echo "install-engine: run as root (apt-get, dpkg)" >&2
  exit 1
fi

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-engine: apt-get install ${missing[*]}" >&2
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! compose_ok; then
  echo "install-engine: Docker Compose v2 from Debian $COMPOSE_SUITE" >&2
  private="$(mktemp -d /var/tmp/gpufleet-apt.XXXXXX)"
  trap 'rm -rf "$private"' EXIT
  mkdir -p "$private/lists/partial" "$private/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $COMPOSE_SUITE main" \
    >"$private/sources.list"
  apt_private=(
    -o "Dir::Etc::SourceList=$private/sources.list"
    -o "Dir::Etc::SourceParts=$private/none"
    -o "Dir::State::Lists=$private/lists"
    -o "Dir::Cache=$private/cache"
    -o "Debug::NoLocking=1"
    -o "APT::Sandbox::User=root"
  )
  apt-get "${apt_private[@]}" update -q
  (cd "$private" && apt-get "${apt_private[@]}" download docker-compose)
  dpkg -i "$private"/docker-compose_*.deb
fi

docker compose version
