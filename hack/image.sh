#!/usr/bin/env bash
# Builds the cape-static-ip runtime image (Dockerfile: FROM scratch + one static binary).
#
#   hack/image.sh              build the static binary, then the image $IMG
#   hack/image.sh --smoke      ... then run `/cape-static-ip --version` inside the image
#   hack/image.sh --smoke --no-build   only the smoke run, on an image built before
#
# IMG (default cape-static-ip:dev) names the image. The builder is docker when a docker daemon
# answers, else buildah (vfs storage, chroot isolation: works unprivileged in a container,
# no daemon); buildah is installed with apt-get when missing and we are root.
# BUILDER=docker|buildah forces one. No registry is needed: the image is FROM scratch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

IMG="${IMG:-cape-static-ip:dev}"
TARGET=x86_64-unknown-linux-gnu
BIN="target/$TARGET/release/cape-static-ip"
BUILDAH=(buildah --storage-driver vfs)

smoke=false
build=true
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=true ;;
    --no-build) build=false ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "image.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

log() { echo "image.sh: $*" >&2; }

pick_builder() {
  if [[ -n "${BUILDER:-}" ]]; then
    echo "$BUILDER"
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    echo docker
  else
    echo buildah
  fi
}

ensure_buildah() {
  command -v buildah >/dev/null 2>&1 && return 0
  if [[ $(id -u) -ne 0 ]]; then
    log "buildah is not installed and no docker daemon answers: install buildah (apt-get install buildah) or start docker"
    exit 1
  fi
  log "installing buildah with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah >/dev/null
}

build_binary() {
  # --target keeps build scripts and proc macros dynamically linked (RUSTFLAGS only reach the
  # target crates) and puts the static build in its own directory.
  log "building $BIN (static)"
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked --target "$TARGET" --bin cape-static-ip
  # With another CARGO_TARGET_DIR, bring the binary to where the Dockerfile expects it.
  local built="${CARGO_TARGET_DIR:-target}/$TARGET/release/cape-static-ip"
  if [[ ! "$built" -ef "$BIN" ]]; then
    mkdir -p "$(dirname "$BIN")"
    cp -f "$built" "$BIN"
  fi
  if command -v file >/dev/null 2>&1; then
    if ! file -L "$BIN" | grep -q 'static'; then
      log "$BIN is not statically linked: $(file -L "$BIN")"
      exit 1
    fi
  fi
}

image_size() {
  case "$1" in
    docker) echo "$(docker image inspect -f '{{.Size}}' "$IMG") bytes" ;;
    buildah) "${BUILDAH[@]}" images --format '{{.Size}}' "$IMG" ;;
  esac
}

build_image() {
  local builder=$1
  log "building image $IMG with $builder"
  case "$builder" in
    docker) docker build -t "$IMG" . ;;
    buildah) "${BUILDAH[@]}" bud --isolation chroot --layers=false -t "$IMG" . ;;
    *) log "unknown BUILDER $builder"; exit 2 ;;
  esac
  log "image $IMG: $(image_size "$builder"); binary $(stat -c %s "$BIN") bytes"
}

smoke_test() {
  local builder=$1 out
  log "smoke test: $IMG /cape-static-ip --version"
  case "$builder" in
    docker) out=$(docker run --rm "$IMG" --version) ;;
    buildah)
      local ctr
      ctr=$("${BUILDAH[@]}" from --pull=never "$IMG")
      # shellcheck disable=SC2064
      trap "\"\${BUILDAH[@]}\" rm '$ctr' >/dev/null 2>&1 || true" EXIT
      out=$("${BUILDAH[@]}" run --isolation chroot "$ctr" /cape-static-ip --version)
      ;;
  esac
  echo "$out"
  log "image $IMG: $(image_size "$builder")"
  if [[ "$out" != cape-static-ip\ * ]]; then
    log "unexpected --version output: $out"
    exit 1
  fi
}

builder=$(pick_builder)
[[ "$builder" == buildah ]] && ensure_buildah
if $build; then
  build_binary
  build_image "$builder"
fi
if $smoke; then
  smoke_test "$builder"
fi
