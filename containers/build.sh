#!/usr/bin/env bash
# Build the segflow image (CPU, or GPU with --gpu) with podman or docker, from the repository root.
#
#   containers/build.sh [--gpu] [--tag NAME] [--base IMAGE | --debian-base] [--fresh-base] [--report FILE]
#
# The base image (build argument BASE_IMAGE) is, in this order: --base IMAGE; the official
# python:3.11-slim-bookworm when the engine has it or can pull it; otherwise a local base made
# from Debian packages (debootstrap --variant=minbase bookworm with python3.11, venv, pip and
# CA certificates, imported as segflow-base:bookworm). --debian-base skips the pull attempt,
# --fresh-base rebuilds that Debian base even when it exists. Needs root for debootstrap.
#
# With podman the OCI runtime is runc (`--runtime runc`: the default runtime does not work on
# every machine) and builds use the host network (`--network host`).
# Prints the seconds spent on the base and on the image and the image size; --report FILE also
# writes them as JSON. Environment: ENGINE (podman|docker), DEBIAN_MIRROR, DEBIAN_SUITE, and
# PIP_CERT: a CA bundle that pip needs behind a TLS-intercepting proxy, passed to the build as
# the secret `pip-ca` (used by the pip step, not stored in the image).
set -euo pipefail
cd "$(dirname "$0")/.."

OFFICIAL_BASE=python:3.11-slim-bookworm
DEBIAN_BASE=segflow-base:bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' segflow/__init__.py)

gpu=0 tag="" base="" debian_base=0 fresh_base=0 report=""
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) gpu=1 ;;
    --tag) tag=$2; shift ;;
    --base) base=$2; shift ;;
    --debian-base) debian_base=1 ;;
    --fresh-base) fresh_base=1; debian_base=1 ;;
    --report) report=$2; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$gpu" = 1 ]; then
  dockerfile=containers/Dockerfile.gpu; tag=${tag:-segflow-gpu:$VERSION}
else
  dockerfile=containers/Dockerfile; tag=${tag:-segflow:$VERSION}
fi

ENGINE=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
engine=("$ENGINE")
build_args=()
if [ "$ENGINE" = podman ]; then
  engine+=(--runtime runc)
  build_args+=(--network host)
fi

if [ -n "${PIP_CERT:-}" ] && [ -s "$PIP_CERT" ]; then
  build_args+=(--secret "id=pip-ca,src=$PIP_CERT")
fi

log() { echo "[build.sh] $*" >&2; }

make_debian_base() {
  [ "$(id -u)" = 0 ] || { echo "build.sh: debootstrap needs root (or pass --base IMAGE)" >&2; exit 1; }
  command -v debootstrap >/dev/null || { echo "build.sh: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
  local root
  root=$(mktemp -d /var/tmp/segflow-base.XXXXXX)
  trap 'rm -rf "$root"' RETURN
  log "debootstrap $DEBIAN_SUITE from $DEBIAN_MIRROR into $root"
  debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-venv,python3-pip,ca-certificates \
    "$DEBIAN_SUITE" "$root" "$DEBIAN_MIRROR" > "$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
  rm -f "$root.log"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
  log "importing $DEBIAN_BASE"
  tar -C "$root" -c . | "${engine[@]}" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' - "$DEBIAN_BASE" > /dev/null
}

image_exists() { "${engine[@]}" image inspect "$1" > /dev/null 2>&1; }
image_id() { "${engine[@]}" image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }

# A rebuilt tag leaves the image it replaced behind untagged (about 4 GB for segflow): remove
# it, unless a container still uses it or another tag names it (then rmi refuses).
drop_replaced() {  # ID_BEFORE TAG
  local before=$1 after
  after=$(image_id "$2")
  [ -n "$before" ] && [ "$before" != "$after" ] || return 0
  if "${engine[@]}" rmi "$before" > /dev/null 2>&1; then
    log "removed the image $2 named before (${before:0:12})"
  else
    log "kept the image $2 named before (${before:0:12}): in use or tagged elsewhere"
  fi
}

start=$(date +%s)
base_seconds=0
if [ -z "$base" ]; then
  if [ "$debian_base" = 0 ] && { image_exists "$OFFICIAL_BASE" || timeout 60 "${engine[@]}" pull -q "docker.io/library/$OFFICIAL_BASE" > /dev/null 2>&1; }; then
    base=$OFFICIAL_BASE
  else
    [ "$debian_base" = 1 ] || log "$OFFICIAL_BASE is not available (no registry access?): using a base made from Debian packages"
    if [ "$fresh_base" = 1 ] || ! image_exists "$DEBIAN_BASE"; then
      base_before=$(image_id "$DEBIAN_BASE")
      make_debian_base
      drop_replaced "$base_before" "$DEBIAN_BASE"
    fi
    base=$DEBIAN_BASE
  fi
fi
base_seconds=$(( $(date +%s) - start ))
log "base image $base ($base_seconds s)"

start=$(date +%s)
log "building $tag from $dockerfile"
image_before=$(image_id "$tag")
"${engine[@]}" build "${build_args[@]}" --build-arg "BASE_IMAGE=$base" -t "$tag" -f "$dockerfile" .
drop_replaced "$image_before" "$tag"
image_seconds=$(( $(date +%s) - start ))
size=$("${engine[@]}" image inspect --format '{{.Size}}' "$tag")
log "built $tag: base $base_seconds s, image $image_seconds s, $((size / 1000000)) MB"
if [ -n "$report" ]; then
  printf '{"tag": "%s", "base": "%s", "base_seconds": %s, "image_seconds": %s, "bytes": %s}\n' \
    "$tag" "$base" "$base_seconds" "$image_seconds" "$size" > "$report"
fi
