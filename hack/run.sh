#!/usr/bin/env bash
# `make run`: the whole thing on this machine.
# - With a reachable cluster (KUBECONFIG or ~/.kube/config), uses it. Otherwise starts the
#   local control plane (etcd + kube-apiserver, CRDs installed), kubeconfig in .dev/kubeconfig.
# - Writes dev certificates to certs/ (once), starts the webhook on 127.0.0.1:9443 (admin on
#   127.0.0.1:8080), registers it as manifests/webhook.yaml does (every namespace but
#   kube-system and cape-system; only requests that need an address), applies a sample IPPool and
#   ElfMachineTemplate, and prints the commands that create a machine and show its IP.
# - Only the apiserver may send reviews: the local control plane presents a client certificate
#   and a token to webhooks (hack/controlplane/cluster.sh), and the webhook runs with
#   --auth-mode=enforce accepting them. On a cluster of your own the apiserver's credentials
#   are unknown here: warn mode (set CAPE_STATIC_IP_AUTH_* to change it).
# - Ctrl-C unregisters the webhook and stops everything it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
LISTEN=${CAPE_STATIC_IP_LISTEN:-127.0.0.1:9443}
ADMIN=${CAPE_STATIC_IP_ADMIN_LISTEN:-127.0.0.1:8080}
WEBHOOK_NAME=cape-static-ip-dev

mapfile -t bins < <(bash hack/controlplane/build.sh --print)
KUBECTL=$(printf '%s\n' "${bins[@]}" | grep '/kubectl$')

started_cluster=0
k() { "$KUBECTL" "$@"; }
if [[ -n "${KUBECONFIG:-}" || -f "$HOME/.kube/config" ]] && k version --request-timeout=5s >/dev/null 2>&1; then
  echo "using the cluster of ${KUBECONFIG:-$HOME/.kube/config}"
else
  echo "no reachable cluster: starting the local control plane"
  mkdir -p .dev
  bash hack/controlplane/cluster.sh down .dev/cluster >/dev/null 2>&1 || true
  bash hack/controlplane/cluster.sh up .dev/cluster --crds cape-v1.8.1 --crds metal3-v1.13.2 --crds capi-v1.14.0
  cp .dev/cluster/kubeconfig .dev/kubeconfig
  export KUBECONFIG=$ROOT/.dev/kubeconfig
  started_cluster=1
fi
if [[ $started_cluster == 1 ]]; then
  export CAPE_STATIC_IP_AUTH_MODE=${CAPE_STATIC_IP_AUTH_MODE:-enforce}
  export CAPE_STATIC_IP_AUTH_CLIENT_CA_FILE=${CAPE_STATIC_IP_AUTH_CLIENT_CA_FILE:-$ROOT/.dev/cluster/caller-ca.crt}
  export CAPE_STATIC_IP_AUTH_TOKEN_REVIEW=${CAPE_STATIC_IP_AUTH_TOKEN_REVIEW:-true}
  export CAPE_STATIC_IP_AUTH_ALLOWED_USERS=${CAPE_STATIC_IP_AUTH_ALLOWED_USERS:-kube-apiserver-kubelet-client,cape-static-ip-apiserver}
else
  export CAPE_STATIC_IP_AUTH_MODE=${CAPE_STATIC_IP_AUTH_MODE:-warn}
  echo "caller authentication: ${CAPE_STATIC_IP_AUTH_MODE} (your apiserver's webhook credentials are not known here; README: Who may call the webhook)"
fi

echo "building cape-static-ip..."
# Built the way `make test` builds it (`cargo test` unifies the features of the test-only
# dependencies into every crate it compiles; a plain `cargo build` would compile most of the
# dependency tree a second time with other features): after `make test` this is a no-op, and
# after an edit it recompiles only this crate. The test build also carries the test-only fault
# points (cargo feature `fault-points`, armed only by an environment variable that `make run`
# never sets); release builds (`make release`, `make image`) never do.
cargo test --quiet --no-run --test controlplane
BIN=$ROOT/target/debug/cape-static-ip
[[ -f certs/tls.crt && -f certs/tls.key && -f certs/ca.crt ]] || "$BIN" certs --out certs

pid=""
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "stopping: unregistering the webhook"
  k delete mutatingwebhookconfiguration "$WEBHOOK_NAME" --ignore-not-found --request-timeout=5s >/dev/null 2>&1 || true
  [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  if [[ $started_cluster == 1 ]]; then
    bash hack/controlplane/cluster.sh down .dev/cluster || true
  fi
}
trap cleanup INT TERM EXIT

"$BIN" serve --listen "$LISTEN" --admin-listen "$ADMIN" \
  --tls-cert-file certs/tls.crt --tls-key-file certs/tls.key --shutdown-delay 0s &
pid=$!
for _ in $(seq 1 100); do
  curl -fsS "http://$ADMIN/readyz" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { echo "the webhook exited" >&2; exit 1; }
  sleep 0.1
done

# The registration is manifests/webhook.yaml itself (its matchConditions included), with the
# local URL and CA instead of the Service and cert-manager's annotation; rendered by kubectl's
# kustomize. An apiserver before 1.28 has no matchConditions: they are left out there.
CA=$(base64 -w0 < certs/ca.crt)
mkdir -p .dev/webhook
cp manifests/webhook.yaml .dev/webhook/webhook.yaml
minor=$(k version -o json 2>/dev/null | tr -d ' \n' | sed -n 's/.*"serverVersion":{[^}]*"minor":"\([0-9]*\).*/\1/p')
drop_conditions=""
if [[ -n "$minor" && "$minor" -lt 28 ]]; then
  echo "apiserver 1.$minor has no matchConditions: the webhook is called for every CREATE and UPDATE"
  drop_conditions="- {op: remove, path: /webhooks/0/matchConditions}"
fi
cat > .dev/webhook/kustomization.yaml <<YAML
resources:
  - webhook.yaml
patches:
  - target: {kind: MutatingWebhookConfiguration, name: cape-static-ip}
    patch: |-
      - {op: replace, path: /metadata/name, value: $WEBHOOK_NAME}
      - {op: remove, path: /metadata/annotations}
      - {op: replace, path: /webhooks/0/clientConfig, value: {url: "https://$LISTEN/mutate-elfmachine", caBundle: "$CA"}}
      $drop_conditions
YAML
k kustomize .dev/webhook | k apply -f - >/dev/null
k apply -f manifests/samples/ippool.yaml -f manifests/samples/elfmachinetemplate.yaml >/dev/null

cat <<MSG

cape-static-ip is running (webhook https://$LISTEN, admin http://$ADMIN). In another shell:

  export KUBECONFIG=${KUBECONFIG:-$HOME/.kube/config}
  $KUBECTL apply -f manifests/samples/elfmachine.yaml
  $KUBECTL get elfmachine demo-md-0-8f7qk-x2b9m -o jsonpath='{.spec.network.devices[0].ipAddrs}{"\n"}'

Ctrl-C stops everything this started.
MSG
wait "$pid"
