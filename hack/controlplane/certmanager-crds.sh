#!/usr/bin/env bash
# Prints the directory holding cert-manager's CRDs (deploy/crds/ of the Go module
# github.com/cert-manager/cert-manager), downloading the module through the Go module proxy on
# first use. The module cache (`go env GOMODCACHE`, outside the repository) is the cache: later
# calls are quiet and take well under a second.
#
# cert-manager's controllers cannot be built here (their Go modules are not all served), but the
# CRDs can: tests/certmanager.rs installs them on the test control plane to prove that the
# manifests' Issuers and Certificates are accepted by the real schemas.
#
# Usage: certmanager-crds.sh            -> prints e.g. /root/go/pkg/mod/github.com/cert-manager/cert-manager@v1.21.2/deploy/crds
set -euo pipefail

# The newest v1.21 the proxy serves (`go list -m -versions github.com/cert-manager/cert-manager`).
CERT_MANAGER_VERSION="${CERT_MANAGER_VERSION:-v1.21.2}"
MODULE=github.com/cert-manager/cert-manager

# Outside any main module, so that no go.mod/go.work of the caller's directory is consulted.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

if ! json="$(GOFLAGS=-mod=mod GOWORK=off go mod download -json "$MODULE@$CERT_MANAGER_VERSION")"; then
  printf '%s\n' "$json" >&2
  echo "certmanager-crds.sh: downloading $MODULE@$CERT_MANAGER_VERSION failed" >&2
  exit 1
fi
dir="$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
if [[ -z "$dir" || ! -d "$dir/deploy/crds" ]]; then
  printf '%s\n' "$json" >&2
  echo "certmanager-crds.sh: no deploy/crds in $MODULE@$CERT_MANAGER_VERSION (Dir: ${dir:-none})" >&2
  exit 1
fi
printf '%s\n' "$dir/deploy/crds"
