#!/usr/bin/env bash
# Builds (once per machine) the local control plane used by the tests and `make cluster`:
#   $CACHE/k8s-v1.34.4/{kube-apiserver,kubectl}  from k8s.io/kubernetes (wrapper module ./kube-apiserver)
#   $CACHE/etcd-v3.6.4/etcd                       from go.etcd.io/etcd/server/v3 (wrapper module ./etcd)
# CACHE defaults to ~/.cache/cape-static-ip (override with CAPE_CACHE_DIR).
# Idempotent and quiet when everything is cached. Only network use: the Go module proxy.
# Prints the cache directory's binaries on stdout with --print (for scripts).
#
# Optional, never built by default: `build.sh --metal3` builds (once: ~1.5 min on 2 idle cores,
# 7 min measured on a busy machine) only
#   $CACHE/metal3-ipam-v1.13.2/ip-address-manager  from github.com/metal3-io/ip-address-manager
#                                                  (wrapper module ./metal3)
# and prints its path on stdout (tests/common/metal3.rs calls this).
# Likewise `build.sh --promtool` and `build.sh --clusterctl` (each built once, then cached; the
# path printed on stdout):
#   $CACHE/promtool-v0.316.0/promtool      from github.com/prometheus/prometheus (wrapper module
#                                          ./promtool; 12 min measured on 2 busy cores): checks and
#                                          unit-tests manifests/monitoring/'s alerting rules
#   $CACHE/clusterctl-v1.14.2/clusterctl   from sigs.k8s.io/cluster-api (wrapper module
#                                          ./clusterctl; 5 min measured on 2 busy cores): renders `make release` as
#                                          clusterctl installs it
#   $CACHE/k8s-v1.34.4/kube-controller-manager  from k8s.io/kubernetes (the same wrapper module as
#                                          kube-apiserver, `build.sh --controller-manager`; 1.5 min
#                                          with kube-apiserver's build cache warm, 8.5 min measured
#                                          on 2 busy cores): tests start only the controllers they
#                                          need (tests/common/controllers.rs)
set -euo pipefail

K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.4
METAL3_VERSION=v1.13.2
PROMTOOL_VERSION=v0.316.0
CLUSTERCTL_VERSION=v1.14.2
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${CAPE_CACHE_DIR:-$HOME/.cache/cape-static-ip}"
K8S_DIR="$CACHE/k8s-$K8S_VERSION"
ETCD_DIR="$CACHE/etcd-$ETCD_VERSION"
METAL3_DIR="$CACHE/metal3-ipam-$METAL3_VERSION"

K8S_LDFLAGS="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
-X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=34 \
-X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"

all_cached() {
  [[ -x "$K8S_DIR/kube-apiserver" && -x "$K8S_DIR/kubectl" && -x "$ETCD_DIR/etcd" ]]
}

# build OUT MODULE_DIR PACKAGE LDFLAGS DESCRIPTION DURATION
# Builds into OUT.tmp.<pid> and renames into place, so an interrupted build never leaves a
# broken binary at OUT.
build() {
  local out=$1 mod=$2 pkg=$3 ldflags=$4 what=$5 duration=$6
  [[ -x "$out" ]] && return 0
  echo "building $what from the Go module proxy (first run on this machine, $duration)..." >&2
  local start=$SECONDS tmp="$out.tmp.$$"
  mkdir -p "$(dirname "$out")"
  CGO_ENABLED=0 go -C "$mod" build -o "$tmp" -ldflags "$ldflags" "$pkg"
  mv -f "$tmp" "$out"
  echo "built $out in $((SECONDS - start))s" >&2
}

# metal3's IPAM controller: its own lock, so that it never holds up a test that only needs the
# control plane. Its release is not in the checksum database (HARNESS.md): GONOSUMDB, and the
# hashes come from the wrapper's committed go.sum.
if [[ "${1:-}" == "--metal3" ]]; then
  out="$METAL3_DIR/ip-address-manager"
  if [[ ! -x "$out" ]]; then
    mkdir -p "$METAL3_DIR"
    exec 8>"$CACHE/.build-metal3.lock"
    flock -n 8 || { echo "waiting for another build.sh --metal3 to finish ($CACHE)..." >&2; flock 8; }
    trap 'rm -f "$METAL3_DIR"/*.tmp.$$' EXIT
    GONOSUMDB=github.com/metal3-io \
      build "$out" "$HERE/metal3" github.com/metal3-io/ip-address-manager "-s -w" \
      "metal3 ip-address-manager $METAL3_VERSION" "~1.5 min"
  fi
  printf '%s\n' "$out"
  exit 0
fi

# build_tool NAME OUT MODULE_DIR PACKAGE LDFLAGS DESCRIPTION DURATION: an optional tool, under its
# own lock (a test that needs only the control plane never waits for it); prints OUT.
build_tool() {
  local name=$1 out=$2
  if [[ ! -x "$out" ]]; then
    mkdir -p "$(dirname "$out")"
    exec 7>"$CACHE/.build-$name.lock"
    flock -n 7 || { echo "waiting for another build.sh --$name to finish ($CACHE)..." >&2; flock 7; }
    trap "rm -f '$out.tmp.$$'" EXIT
    build "$out" "${@:3}"
  fi
  printf '%s\n' "$out"
}

case "${1:-}" in
  --promtool)
    build_tool promtool "$CACHE/promtool-$PROMTOOL_VERSION/promtool" "$HERE/promtool" \
      github.com/prometheus/prometheus/cmd/promtool \
      "-s -w -X github.com/prometheus/common/version.Version=${PROMTOOL_VERSION#v}" \
      "promtool (prometheus $PROMTOOL_VERSION)" "~7-12 min"
    exit 0 ;;
  --clusterctl)
    build_tool clusterctl "$CACHE/clusterctl-$CLUSTERCTL_VERSION/clusterctl" "$HERE/clusterctl" \
      sigs.k8s.io/cluster-api/cmd/clusterctl \
      "-s -w -X sigs.k8s.io/cluster-api/version.gitVersion=$CLUSTERCTL_VERSION \
-X sigs.k8s.io/cluster-api/version.gitMajor=1 -X sigs.k8s.io/cluster-api/version.gitMinor=14" \
      "clusterctl $CLUSTERCTL_VERSION" "~2-5 min"
    exit 0 ;;
  --controller-manager)
    build_tool controller-manager "$K8S_DIR/kube-controller-manager" "$HERE/kube-apiserver" \
      k8s.io/kubernetes/cmd/kube-controller-manager "$K8S_LDFLAGS" \
      "kube-controller-manager $K8S_VERSION" "~1.5-9 min"
    exit 0 ;;
esac

if ! all_cached; then
  mkdir -p "$CACHE"
  # One builder at a time (two test binaries or `make` targets may call us concurrently);
  # the others wait here, then find the binaries cached.
  exec 9>"$CACHE/.build.lock"
  flock -n 9 || { echo "waiting for another build.sh to finish ($CACHE)..." >&2; flock 9; }
  trap 'rm -f "$K8S_DIR"/*.tmp.$$ "$ETCD_DIR"/*.tmp.$$' EXIT
  # kubectl after kube-apiserver: same module and flags, so it reuses most of the build cache.
  build "$K8S_DIR/kube-apiserver" "$HERE/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver \
    "$K8S_LDFLAGS" "kube-apiserver $K8S_VERSION" "~3 min"
  build "$K8S_DIR/kubectl" "$HERE/kube-apiserver" k8s.io/kubernetes/cmd/kubectl \
    "$K8S_LDFLAGS" "kubectl $K8S_VERSION" "~1.5 min"
  build "$ETCD_DIR/etcd" "$HERE/etcd" go.etcd.io/etcd/server/v3 "-s -w" "etcd $ETCD_VERSION" "~1 min"
fi

if [[ "${1:-}" == "--print" ]]; then
  printf '%s\n' "$K8S_DIR/kube-apiserver" "$K8S_DIR/kubectl" "$ETCD_DIR/etcd"
fi
