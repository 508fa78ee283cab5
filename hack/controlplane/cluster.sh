#!/usr/bin/env bash
# A throwaway Kubernetes control plane (etcd + kube-apiserver, no controller-manager, no
# scheduler) on 127.0.0.1 with free random ports, for tests and `make cluster`.
#
#   cluster.sh up DIR [--crds SUBDIR]... [--watch PID]
#       Starts etcd and kube-apiserver with their data, certs and logs in DIR, installs the CRDs
#       of each tests/crds/SUBDIR (default: the "current" set), and writes
#         DIR/kubeconfig          admin (group system:masters)
#         DIR/webhook.kubeconfig  user `webhook`, no groups, no RBAC (for least-privilege tests)
#         DIR/env                 KUBECONFIG APISERVER_URL ADMIN_TOKEN WEBHOOK_TOKEN ETCD_PID APISERVER_PID
#                                 CALLER_TOKEN CALLER_CA_FILE CALLER_CERT_FILE CALLER_KEY_FILE
#       The apiserver presents credentials to every admission webhook it calls, as a
#       kubeadm-style control plane can be configured to (README, "Who may call the webhook"):
#       --admission-control-config-file DIR/admission.yaml names DIR/webhook-callers.kubeconfig,
#       whose user `*` holds both a client certificate (CN kube-apiserver-kubelet-client, signed
#       by DIR/caller-ca.crt) and a bearer token (user cape-static-ip-apiserver in tokens.csv).
#       --watch PID: a detached watchdog stops both processes once PID has exited.
#   cluster.sh down DIR
#       Stops what `up DIR` started (SIGTERM, then SIGKILL). Idempotent. Leaves DIR in place.
#   cluster.sh kill DIR etcd|apiserver
#       SIGKILLs one process of the cluster (fault tests) and waits until it is gone.
#   cluster.sh start DIR etcd|apiserver
#       Starts it again on the same ports with the same data, certificates and flags, and waits
#       until it is ready; the kubeconfigs stay valid.
#
# Several clusters (different DIRs) can run at once.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CRD_ROOT="$(cd "$HERE/../../tests/crds" && pwd)"
DEFAULT_CRDS=(cape-v1.8.1 metal3-v1.13.2 capi-v1.14.0)

die() { echo "cluster.sh: $*" >&2; exit 1; }

# A port that was free a moment ago (the kernel picks it); callers retry on a clash.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# stop_pid PIDFILE: SIGTERM, then SIGKILL after 5 s; only if the process still belongs to DIR
# (guards against a recycled pid).
stop_pid() {
  local file=$1 pid
  [[ -f "$file" ]] || return 0
  pid=$(<"$file")
  if [[ -n "$pid" ]] && grep -qaF "$DIR" "/proc/$pid/cmdline" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

down() {
  stop_pid "$DIR/watchdog.pid"
  stop_pid "$DIR/apiserver.pid"
  stop_pid "$DIR/etcd.pid"
}

on_failure() {
  local f
  for f in "$DIR"/etcd.log "$DIR"/apiserver.log; do
    [[ -f "$f" ]] && { echo "----- tail of $f" >&2; tail -n 30 "$f" >&2; }
  done
  down
}

# start_etcd: returns non-zero if etcd exits or is not healthy within 20 s.
# ETCD_CLIENT_PORT and ETCD_PEER_PORT, when set, are used instead of free ones (a restart).
start_etcd() {
  local client=${ETCD_CLIENT_PORT:-} peer=${ETCD_PEER_PORT:-}
  [[ -n "$client" ]] || client=$(free_port)
  [[ -n "$peer" ]] || peer=$(free_port)
  ETCD_CLIENT_PORT=$client ETCD_PEER_PORT=$peer
  ETCD_URL="http://127.0.0.1:$client"
  setsid "$ETCD" --name default --data-dir "$DIR/etcd" \
    --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "default=http://127.0.0.1:$peer" \
    --unsafe-no-fsync --log-level warn >"$DIR/etcd.log" 2>&1 </dev/null &
  ETCD_PID=$!
  echo "$ETCD_PID" >"$DIR/etcd.pid"
  for _ in $(seq 200); do
    kill -0 "$ETCD_PID" 2>/dev/null || return 1
    curl -sf "$ETCD_URL/health" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

# start_apiserver: returns non-zero if it exits or /readyz is not ok within 90 s.
# APISERVER_PORT, when set, is used instead of a free port (a restart).
start_apiserver() {
  PORT=${APISERVER_PORT:-}
  [[ -n "$PORT" ]] || PORT=$(free_port)
  APISERVER_URL="https://127.0.0.1:$PORT"
  setsid "$APISERVER" --etcd-servers "$ETCD_URL" --cert-dir "$DIR/certs" \
    --secure-port "$PORT" --bind-address 127.0.0.1 --advertise-address 127.0.0.1 \
    --service-cluster-ip-range 10.0.0.0/24 --authorization-mode RBAC \
    --token-auth-file "$DIR/tokens.csv" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$DIR/sa.key" --service-account-signing-key-file "$DIR/sa.key" \
    --disable-admission-plugins ServiceAccount \
    --admission-control-config-file "$DIR/admission.yaml" \
    >"$DIR/apiserver.log" 2>&1 </dev/null &
  APISERVER_PID=$!
  echo "$APISERVER_PID" >"$DIR/apiserver.pid"
  for _ in $(seq 900); do
    kill -0 "$APISERVER_PID" 2>/dev/null || return 1
    curl -ksf -H "Authorization: Bearer $ADMIN_TOKEN" "$APISERVER_URL/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

# write_kubeconfig FILE USER TOKEN
write_kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: $APISERVER_URL
    # The self-signed CA kube-apiserver generated in its --cert-dir (last block of apiserver.crt).
    certificate-authority-data: $CA_DATA
users:
- name: $2
  user:
    token: $3
contexts:
- name: local
  context: {cluster: local, user: $2}
current-context: local
EOF
}

# The credentials the apiserver presents to admission webhooks: a client certificate from a CA
# of its own (as kubeadm's apiserver-kubelet-client.crt, signed by the cluster CA) and a token.
write_caller_credentials() {
  local ext="$DIR/caller.ext"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=cape-static-ip-test-caller-ca" -keyout "$DIR/caller-ca.key" -out "$DIR/caller-ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/O=kubeadm:cluster-admins/CN=kube-apiserver-kubelet-client" \
    -keyout "$DIR/caller.key" -out "$DIR/caller.csr" 2>/dev/null
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' >"$ext"
  openssl x509 -req -in "$DIR/caller.csr" -CA "$DIR/caller-ca.crt" -CAkey "$DIR/caller-ca.key" \
    -set_serial "0x$(openssl rand -hex 8)" -days 30 -extfile "$ext" -out "$DIR/caller.crt" 2>/dev/null
  rm -f "$DIR/caller.csr" "$ext"
  cat >"$DIR/webhook-callers.kubeconfig" <<EOF
# Credentials kube-apiserver presents to admission webhooks, chosen by the webhook's host[:port];
# '*' matches every webhook.
apiVersion: v1
kind: Config
users:
- name: '*'
  user:
    client-certificate: $DIR/caller.crt
    client-key: $DIR/caller.key
    token: $CALLER_TOKEN
EOF
  cat >"$DIR/admission.yaml" <<EOF
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: MutatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: $DIR/webhook-callers.kubeconfig
- name: ValidatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: $DIR/webhook-callers.kubeconfig
EOF
}

up() {
  local t0 crds=() watch="" i
  t0=$(date +%s.%N)
  while [[ $# -gt 0 ]]; do
    case $1 in
      --crds) crds+=("$2"); shift 2 ;;
      --watch) watch=$2; shift 2 ;;
      *) die "unknown argument: $1" ;;
    esac
  done
  [[ ${#crds[@]} -gt 0 ]] || crds=("${DEFAULT_CRDS[@]}")
  for i in "${crds[@]}"; do [[ -d "$CRD_ROOT/$i" ]] || die "no CRD folder tests/crds/$i"; done
  if [[ -f "$DIR/apiserver.pid" ]] && grep -qaF "$DIR" "/proc/$(<"$DIR/apiserver.pid")/cmdline" 2>/dev/null; then
    die "$DIR already has a running cluster (cluster.sh down $DIR)"
  fi

  bash "$HERE/build.sh"
  mapfile -t bins < <(bash "$HERE/build.sh" --print)
  APISERVER=${bins[0]} KUBECTL=${bins[1]} ETCD=${bins[2]}

  # From here on, any failure prints the logs and stops what was started.
  trap 'rc=$?; [[ $rc == 0 ]] || on_failure' EXIT
  mkdir -p "$DIR"
  rm -rf "$DIR/etcd" "$DIR/certs" "$DIR"/*.log
  ADMIN_TOKEN=$(openssl rand -hex 24)
  WEBHOOK_TOKEN=$(openssl rand -hex 24)
  CALLER_TOKEN=$(openssl rand -hex 24)
  printf '%s,admin,admin-uid,"system:masters"\n%s,webhook,webhook-uid\n%s,cape-static-ip-apiserver,caller-uid\n' \
    "$ADMIN_TOKEN" "$WEBHOOK_TOKEN" "$CALLER_TOKEN" >"$DIR/tokens.csv"
  write_caller_credentials
  openssl genrsa -out "$DIR/sa.key" 2048 2>/dev/null

  # Ports are picked free but not reserved: retry a start that fails (e.g. a port clash).
  for i in 1 2 3; do start_etcd && break; stop_pid "$DIR/etcd.pid"; rm -rf "$DIR/etcd"
    unset ETCD_CLIENT_PORT ETCD_PEER_PORT
    [[ $i == 3 ]] && die "etcd did not start"; echo "etcd failed to start, retrying" >&2; done
  for i in 1 2 3; do start_apiserver && break; stop_pid "$DIR/apiserver.pid"
    [[ $i == 3 ]] && die "kube-apiserver did not become ready"; echo "kube-apiserver failed to start, retrying" >&2; done

  # apiserver.crt = serving cert followed by the CA that signed it: trust only the CA.
  CA_DATA=$(awk '/BEGIN CERTIFICATE/{n++; buf=""} {buf=buf $0 "\n"} /END CERTIFICATE/{last=buf} END{printf "%s", last}' \
    "$DIR/certs/apiserver.crt" | base64 -w0)
  write_kubeconfig "$DIR/kubeconfig" admin "$ADMIN_TOKEN"
  write_kubeconfig "$DIR/webhook.kubeconfig" webhook "$WEBHOOK_TOKEN"
  cat >"$DIR/env" <<EOF
export KUBECONFIG=$DIR/kubeconfig
export APISERVER_URL=$APISERVER_URL
export ADMIN_TOKEN=$ADMIN_TOKEN
export WEBHOOK_TOKEN=$WEBHOOK_TOKEN
export ETCD_PID=$ETCD_PID
export APISERVER_PID=$APISERVER_PID
export CALLER_TOKEN=$CALLER_TOKEN
export CALLER_CA_FILE=$DIR/caller-ca.crt
export CALLER_CERT_FILE=$DIR/caller.crt
export CALLER_KEY_FILE=$DIR/caller.key
export ETCD_URL=$ETCD_URL
export ETCD_CLIENT_PORT=$ETCD_CLIENT_PORT
export ETCD_PEER_PORT=$ETCD_PEER_PORT
export APISERVER_PORT=$PORT
EOF

  if [[ -n "$watch" ]]; then
    # Watchdog: once PID is gone, stop etcd and the apiserver (it removes nothing); their
    # pids are read from DIR at that moment (`start` may have restarted them).
    # Its own command line names DIR, so `down` can recognise it.
    setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done
      a=$(cat "$2/apiserver.pid" 2>/dev/null); e=$(cat "$2/etcd.pid" 2>/dev/null)
      kill -TERM $a $e 2>/dev/null
      for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 $a 2>/dev/null || kill -0 $e 2>/dev/null || exit 0; sleep 0.3; done
      kill -KILL $a $e 2>/dev/null; true' \
      watchdog "$watch" "$DIR" >/dev/null 2>&1 </dev/null &
    echo $! >"$DIR/watchdog.pid"
  fi

  # CRDs: server-side apply (no last-applied annotation, which large CRDs overflow), then wait
  # until Established and until their resources are actually served.
  local k=("$KUBECTL" --kubeconfig "$DIR/kubeconfig" --cache-dir "$DIR/kubectl-cache") files=() names
  for i in "${crds[@]}"; do files+=(-f "$CRD_ROOT/$i"); done
  "${k[@]}" apply --server-side "${files[@]}" >/dev/null
  "${k[@]}" wait --for condition=established --timeout 60s "${files[@]}" >/dev/null
  # customresourcedefinition.apiextensions.k8s.io/<plural>.<group>,... -> <plural>.<group>,...
  names=$("${k[@]}" get "${files[@]}" -o name | sed 's|^[^/]*/||' | paste -sd, -)
  for i in $(seq 100); do
    "${k[@]}" get "$names" -A >/dev/null 2>&1 && break
    [[ $i == 100 ]] && die "CRDs established but not served: $names"
    sleep 0.1
  done

  trap - EXIT
  echo "control plane ready in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s:" \
    "$APISERVER_URL (KUBECONFIG=$DIR/kubeconfig)"
}

# kill_one etcd|apiserver: SIGKILL, then wait until the process is gone.
kill_one() {
  local file="$DIR/$1.pid" pid
  [[ -f "$file" ]] || die "no $file"
  pid=$(<"$file")
  grep -qaF "$DIR" "/proc/$pid/cmdline" 2>/dev/null || die "$1 (pid $pid) is not running"
  kill -KILL "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
  die "$1 (pid $pid) survived SIGKILL"
}

# start_one etcd|apiserver: again, on the ports, data and certificates that `up` chose.
start_one() {
  # shellcheck disable=SC1091
  source "$DIR/env"
  mapfile -t bins < <(bash "$HERE/build.sh" --print)
  APISERVER=${bins[0]} ETCD=${bins[2]}
  case $1 in
    etcd) start_etcd || die "etcd did not start again (see $DIR/etcd.log)"
      sed -i "s/^export ETCD_PID=.*/export ETCD_PID=$ETCD_PID/" "$DIR/env" ;;
    apiserver) start_apiserver || die "kube-apiserver did not become ready again (see $DIR/apiserver.log)"
      sed -i "s/^export APISERVER_PID=.*/export APISERVER_PID=$APISERVER_PID/" "$DIR/env" ;;
    *) die "unknown process: $1" ;;
  esac
}

[[ $# -ge 2 ]] || die "usage: cluster.sh up DIR [--crds SUBDIR]... [--watch PID] | cluster.sh down DIR | cluster.sh kill|start DIR etcd|apiserver"
cmd=$1 DIR=$2
shift 2
case $cmd in
  up) mkdir -p "$DIR"; DIR="$(cd "$DIR" && pwd)"; up "$@" ;;
  down) [[ -d "$DIR" ]] || exit 0; DIR="$(cd "$DIR" && pwd)"; down ;;
  kill) DIR="$(cd "$DIR" && pwd)"; kill_one "${1:?etcd or apiserver}" ;;
  start) DIR="$(cd "$DIR" && pwd)"; start_one "${1:?etcd or apiserver}" ;;
  *) die "unknown command: $cmd" ;;
esac
