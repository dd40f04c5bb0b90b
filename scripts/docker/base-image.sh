#!/usr/bin/env bash
# Make (or reuse) a Debian base image with Python 3.11 for builds on a host that reaches no
# image registry: debootstrap (Debian packages only) + `docker import`. Prints the image's tag.
#
# The image stands in for python:3.11-slim-bookworm: `python3.11`/`python3` with venv, CA
# certificates, and the host's extra CA certificates (a TLS-inspecting egress proxy) and
# http(s) package indexes (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL or pip's config), so that pip
# and apt inside builds reach PyPI and Debian the way the host does. The tag carries a hash
# of everything that goes in, so a changed CA or package list makes a new image; an existing
# one is reused (debootstrap takes minutes, the check a second).
set -euo pipefail

SUITE="${GPUFLEET_BASE_SUITE:-bookworm}"
MIRROR="${GPUFLEET_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES="python3,python3-venv,ca-certificates"
REPO_NAME="gpufleet-local/debian-python"
# Bump when the recipe below changes in a way the hash cannot see.
RECIPE=1

# The host's package index settings (environment first, then pip's configuration), http(s)
# URLs only: a file:// index on the host's disk means nothing inside a build.
pip_index() {  # pip_index index-url|extra-index-url
  local env_name value
  env_name="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  value="${!env_name:-}"
  if [ -z "$value" ] && command -v pip >/dev/null 2>&1; then
    value="$(pip config get "global.$1" 2>/dev/null || true)"
  fi
  # shellcheck disable=SC2086  # a space-separated list, one URL a line
  printf '%s\n' $value | grep -E '^https?://' | xargs || true
}

extra_cas() {
  find /usr/local/share/ca-certificates -type f -name '*.crt' 2>/dev/null | sort
}

key() {
  {
    echo "$SUITE $MIRROR $PACKAGES $RECIPE"
    local indexes
    indexes="$(pip_index index-url) $(pip_index extra-index-url)"
    [ "$indexes" = " " ] || echo "indexes $indexes"
    extra_cas | while read -r crt; do sha256sum "$crt"; done
  } | sha256sum | cut -c1-12
}

tag="${REPO_NAME}:${SUITE}-$(key)"
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi

echo "making base image $tag with debootstrap (a few minutes)" >&2
work="$(mktemp -d /var/tmp/gpufleet-base.XXXXXX)"
trap 'rm -rf --one-file-system "$work"' EXIT
rootfs="$work/rootfs"

nice -n 19 debootstrap --variant=minbase --include="$PACKAGES" \
  --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
  "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  exit 1
}

# The host's extra CAs (if any) join the image's trust store.
while read -r crt; do
  [ -n "$crt" ] && cp "$crt" "$rootfs/usr/local/share/ca-certificates/"
done < <(extra_cas)
# (its rehash step warns about the bundle file itself: harmless)
chroot "$rootfs" update-ca-certificates >/dev/null 2>&1

# What python:*-slim images also leave out: apt lists, caches, docs, man pages.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*

bundle=/etc/ssl/certs/ca-certificates.crt
changes=()
index="$(pip_index index-url)"
extra="$(pip_index extra-index-url)"
[ -n "$index" ] && changes+=(--change "ENV PIP_INDEX_URL=$index")
[ -n "$extra" ] && changes+=(--change "ENV PIP_EXTRA_INDEX_URL=\"$extra\"")
tar -C "$rootfs" --numeric-owner -c . | docker import "${changes[@]}" \
  --change "ENV LANG=C.UTF-8" \
  --change "ENV PIP_CERT=$bundle SSL_CERT_FILE=$bundle REQUESTS_CA_BUNDLE=$bundle" \
  --change "ENV PIP_DEFAULT_TIMEOUT=180" \
  --change 'CMD ["python3"]' \
  --message "debootstrap $SUITE ($PACKAGES) + host CAs, made by scripts/docker/base-image.sh" \
  - "$tag" >/dev/null
echo "$tag"
