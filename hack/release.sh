#!/usr/bin/env bash
# Renders, deploys and releases the manifests in manifests/ (a kustomize base).
#
#   hack/release.sh version          the crate version from Cargo.toml
#   hack/release.sh render IMAGE     the rendered manifests with the image set to IMAGE (stdout)
#   hack/release.sh deploy IMAGE     kubectl apply them (server-side) to the current cluster
#   hack/release.sh release [IMAGE]  write out/components.yaml (image default cape-static-ip:vVERSION)
#                                    and out/metadata.yaml (clusterctl provider metadata)
#
# components.yaml is what `clusterctl init --ipam cape-static-ip` installs; it carries the
# clusterctl variable CAPE_STATIC_IP_DEFAULT_POOL_NAMESPACE (--default-pool-namespace, default
# cape-system). The image is set with clusterctl's image override (`images:` in its config).
#
# kubectl (with its built-in kustomize): $KUBECTL, else `kubectl` on PATH, else the pinned one
# built by hack/controlplane/build.sh. OUT (default out) is the release directory.
# INSTALL_NAMESPACE (default cape-system; `make deploy NAMESPACE=...`) renders for another
# namespace (manifests/components/follow-namespace).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-out}"

die() { echo "release.sh: $*" >&2; exit 1; }

kubectl_bin() {
  if [[ -n "${KUBECTL:-}" ]]; then
    echo "$KUBECTL"
  elif command -v kubectl >/dev/null 2>&1; then
    command -v kubectl
  else
    bash hack/controlplane/build.sh --print | grep '/kubectl$'
  fi
}

version() {
  # `version = "..."` of the [package] table (dependencies may have their own).
  local v
  v=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -1)
  [[ -n "$v" ]] || die "no [package] version in Cargo.toml"
  echo "$v"
}

# Splits IMAGE into kustomize's newName and newTag/digest, as docker reads a reference:
# a ':' after the last '/' starts the tag (so registry:5000/name keeps its port).
kustomize_image() {
  local img=$1 name tag="" digest=""
  if [[ "$img" == *@* ]]; then
    name=${img%%@*}; digest=${img#*@}
  else
    name=$img
    local last=${img##*/}
    if [[ "$last" == *:* ]]; then
      tag=${last##*:}; name=${img%:*}
    fi
  fi
  [[ -n "$name" ]] || die "bad image reference '$img'"
  echo "  - name: cape-static-ip"
  echo "    newName: $name"
  [[ -n "$tag" ]] && echo "    newTag: \"$tag\""
  [[ -n "$digest" ]] && echo "    digest: $digest"
  return 0
}

# render IMAGE: the base through a throwaway overlay that only replaces the image.
render() {
  local img=${1:?render needs an image} kubectl overlay rendered
  # A reference without tag or digest means :latest (kustomize would keep the base's tag).
  [[ "$img" == *@* || "${img##*/}" == *:* ]] || img="$img:latest"
  kubectl=$(kubectl_bin)
  overlay=$(mktemp -d "$ROOT/target/.render.XXXXXX" 2>/dev/null || { mkdir -p "$ROOT/target"; mktemp -d "$ROOT/target/.render.XXXXXX"; })
  # shellcheck disable=SC2064
  trap "rm -rf '$overlay'" RETURN EXIT
  {
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "resources:"
    echo "  - ../../manifests"
    if [[ -n "${INSTALL_NAMESPACE:-}" && "$INSTALL_NAMESPACE" != cape-system ]]; then
      # Components run before an overlay's own namespace: name it in a component first.
      mkdir -p "$overlay/namespace"
      printf 'apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\nnamespace: %s\n' \
        "$INSTALL_NAMESPACE" >"$overlay/namespace/kustomization.yaml"
      echo "components:"
      echo "  - namespace"
      echo "  - ../../manifests/components/follow-namespace"
    fi
    echo "images:"
    kustomize_image "$img"
  } >"$overlay/kustomization.yaml"
  rendered=$("$kubectl" kustomize "$overlay")
  grep -qxF "        image: $img" <<<"$rendered" || die "rendered manifests do not use image $img"
  printf '%s\n' "$rendered"
}

deploy() {
  local img=${1:?deploy needs an image} kubectl
  kubectl=$(kubectl_bin)
  render "$img" | "$kubectl" apply --server-side --field-manager=cape-static-ip-deploy -f -
}

# clusterctl_variables: rendered manifests (stdin) -> the same with clusterctl variables
# `${NAME:=default}` in place of the values users set at install time (stdout). Each must be
# found exactly once, so that a change to the manifests cannot silently drop a variable.
# The image is not a variable: clusterctl parses images before substituting (`--describe`,
# `--raw` would fail on `${...}`); its own image override (`images:` in clusterctl.yaml) sets it.
clusterctl_variables() {
  local rendered n
  rendered=$(cat)
  [[ "$rendered" != *'${'* ]] || die "the rendered manifests already contain '\${', which clusterctl would read as a variable"
  n=$(grep -cE -- '^ +- --default-pool-namespace=[a-z0-9-]+$' <<<"$rendered" || true)
  [[ "$n" == 1 ]] || die "expected one '- --default-pool-namespace=NS' argument in the rendered manifests, found $n"
  awk '
    /^ +- --default-pool-namespace=[a-z0-9-]+$/ {
      sub(/--default-pool-namespace=/, "--default-pool-namespace=${CAPE_STATIC_IP_DEFAULT_POOL_NAMESPACE:=")
      $0 = $0 "}"
    }
    { print }' <<<"$rendered"
}

release() {
  local v major minor img
  v=$(version)
  img=${1:-cape-static-ip:v$v}
  IFS=. read -r major minor _ <<<"$v"
  mkdir -p "$OUT"
  render "$img" | clusterctl_variables >"$OUT/components.yaml.tmp"
  mv -f "$OUT/components.yaml.tmp" "$OUT/components.yaml"
  cat >"$OUT/metadata.yaml" <<META
# clusterctl provider metadata for cape-static-ip v$v.
apiVersion: clusterctl.cluster.x-k8s.io/v1alpha3
kind: Metadata
releaseSeries:
  - major: $major
    minor: $minor
    contract: v1beta1
META
  echo "release.sh: wrote $OUT/components.yaml (image $img; clusterctl variable CAPE_STATIC_IP_DEFAULT_POOL_NAMESPACE) and $OUT/metadata.yaml" >&2
}

cmd=${1:-}
shift || true
case "$cmd" in
  version) version ;;
  render) render "$@" ;;
  deploy) deploy "$@" ;;
  release) release "$@" ;;
  *) sed -n '2,15p' "${BASH_SOURCE[0]}" >&2; exit 2 ;;
esac
