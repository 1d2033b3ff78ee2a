#!/usr/bin/env bash
# The local Kubernetes control plane kube-fim tests and demos run against:
# etcd + kube-apiserver + kube-controller-manager, built from Go modules by
# build.sh (pinned, cached), listening on loopback only, with generated
# certificates, RBAC on and service-account token signing.
#
#   controlplane.sh start DIR            start in the background; DIR/kubeconfig is the admin login
#   controlplane.sh stop DIR             stop everything started in DIR
#   controlplane.sh run DIR -- CMD...    start, run CMD with KUBECONFIG set, always stop (even on failure)
#   controlplane.sh apiserver-stop DIR   stop only kube-apiserver (outage tests)
#   controlplane.sh apiserver-start DIR  start it again on the same port and certificates
#   controlplane.sh env DIR              print the environment a client needs (eval-able)
#
# CMD under `run` sees KUBECONFIG, KUBE_FIM_CONTROLPLANE_DIR and
# KUBE_FIM_CONTROLPLANE (this script), so tests can stop and restart the API server.
#
# KUBE_FIM_APISERVER_ADDRESS (default 127.0.0.1) is the one address the API server
# listens on and advertises. e2e/node/node.sh sets it to an address of a dummy
# interface that pods can reach; the `kubernetes` Service then gets it as its
# endpoint. The API server authorizes kubelets (Node authorizer, NodeRestriction)
# and reaches them with a client certificate of the local CA.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$here/$(basename "${BASH_SOURCE[0]}")"

log() { echo "controlplane: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  sed -n '2,16p' "$self" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_for DESCRIPTION SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local what="$1" secs="$2"; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    if (( $(date +%s) >= deadline )); then
      return 1
    fi
    sleep 0.2
  done
  log "$what ready"
}

# A process is alive if its pidfile names a running process.
alive() {
  local pidfile="$1"
  [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

stop_process() {
  local dir="$1" name="$2" pidfile="$1/run/$2.pid"
  [[ -f "$pidfile" ]] || return 0
  local pid; pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name did not stop on SIGTERM; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pidfile"
}

# launch DIR NAME ARGS...: starts one component of the multi-call binary, logs to
# DIR/logs/NAME.log, records its pid in DIR/run/NAME.pid.
launch() {
  local dir="$1" name="$2"; shift 2
  local bin; bin="$(cat "$dir/run/binary")"
  if [[ "${KUBE_FIM_DETACH:-0}" == 1 ]]; then
    setsid "$bin" "$name" "$@" >>"$dir/logs/$name.log" 2>&1 </dev/null &
  else
    KUBE_FIM_PARENT_PID=$$ "$bin" "$name" "$@" >>"$dir/logs/$name.log" 2>&1 </dev/null &
  fi
  echo $! >"$dir/run/$name.pid"
  # The script tracks it by pidfile; no job-control noise when it is killed.
  disown $! 2>/dev/null || true
}

gen_pki() {
  local pki="$1/pki" address="$2"
  [[ -f "$pki/apiserver.crt" ]] && return 0
  command -v openssl >/dev/null || die "openssl is required"
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=kube-fim-local-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
      -subj "/CN=kube-apiserver" 2>/dev/null
    cat >apiserver.ext <<EOF
subjectAltName=IP:127.0.0.1,IP:$address,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth
keyUsage=digitalSignature,keyEncipherment
EOF
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out apiserver.crt -days 3650 -extfile apiserver.ext 2>/dev/null
    # The API server's login at the kubelets (logs, exec, port-forward).
    openssl req -newkey rsa:2048 -nodes -keyout kubelet-client.key -out kubelet-client.csr \
      -subj "/CN=kube-apiserver-kubelet-client" 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n' >client.ext
    openssl x509 -req -in kubelet-client.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out kubelet-client.crt -days 3650 -extfile client.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    chmod 600 ./*.key
  )
}

gen_tokens() {
  local dir="$1"
  [[ -f "$dir/pki/tokens.csv" ]] && return 0
  local admin kcm
  admin="$(openssl rand -hex 24)"
  kcm="$(openssl rand -hex 24)"
  printf '%s,kube-fim-admin,kube-fim-admin,"system:masters"\n%s,system:kube-controller-manager,system:kube-controller-manager\n' \
    "$admin" "$kcm" >"$dir/pki/tokens.csv"
  chmod 600 "$dir/pki/tokens.csv"
  echo "$admin" >"$dir/pki/admin.token"
  echo "$kcm" >"$dir/pki/kcm.token"
}

write_kubeconfig() {
  local dir="$1" file="$2" token="$3" user="$4"
  local port; port="$(cat "$dir/run/apiserver.port")"
  local address; address="$(cat "$dir/run/apiserver.address")"
  local ca; ca="$(base64 -w0 <"$dir/pki/ca.crt")"
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kube-fim-local
  cluster:
    server: https://$address:$port
    certificate-authority-data: $ca
users:
- name: $user
  user:
    token: $token
contexts:
- name: kube-fim-local
  context:
    cluster: kube-fim-local
    user: $user
current-context: kube-fim-local
EOF
  chmod 600 "$file"
}

start_etcd() {
  local dir="$1"
  local port peer
  port="$(cat "$dir/run/etcd.port")"
  peer="$(cat "$dir/run/etcd-peer.port")"
  launch "$dir" etcd \
    --name=kube-fim \
    --data-dir="$dir/etcd" \
    --listen-client-urls="http://127.0.0.1:$port" \
    --advertise-client-urls="http://127.0.0.1:$port" \
    --listen-peer-urls="http://127.0.0.1:$peer" \
    --initial-advertise-peer-urls="http://127.0.0.1:$peer" \
    --initial-cluster="kube-fim=http://127.0.0.1:$peer" \
    --listen-metrics-urls="" \
    --unsafe-no-fsync=true \
    --quota-backend-bytes=4294967296 \
    --log-level=warn
  wait_for etcd 60 curl -fsS "http://127.0.0.1:$port/health" \
    || { tail -n 30 "$dir/logs/etcd.log" >&2; die "etcd did not become healthy (log: $dir/logs/etcd.log)"; }
}

apiserver_ready() {
  local dir="$1"
  curl -fsS --cacert "$dir/pki/ca.crt" -H "Authorization: Bearer $(cat "$dir/pki/admin.token")" \
    "https://$(cat "$dir/run/apiserver.address"):$(cat "$dir/run/apiserver.port")/readyz"
}

start_apiserver() {
  local dir="$1"
  local pki="$dir/pki"
  local address; address="$(cat "$dir/run/apiserver.address")"
  # On loopback no pod can reach the API server: no endpoint for the
  # `kubernetes` Service (a loopback endpoint is invalid).
  local reconciler=lease
  [[ "$address" == 127.0.0.1 ]] && reconciler=none
  launch "$dir" kube-apiserver \
    --etcd-servers="http://127.0.0.1:$(cat "$dir/run/etcd.port")" \
    --bind-address="$address" \
    --advertise-address="$address" \
    --secure-port="$(cat "$dir/run/apiserver.port")" \
    --cert-dir="$pki" \
    --tls-cert-file="$pki/apiserver.crt" \
    --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --token-auth-file="$pki/tokens.csv" \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --kubelet-client-certificate="$pki/kubelet-client.crt" \
    --kubelet-client-key="$pki/kubelet-client.key" \
    --kubelet-certificate-authority="$pki/ca.crt" \
    --kubelet-preferred-address-types=InternalIP,Hostname \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$pki/sa.pub" \
    --service-account-signing-key-file="$pki/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --endpoint-reconciler-type="$reconciler" \
    --allow-privileged=true \
    --profiling=false \
    --v=1
  wait_for kube-apiserver 120 apiserver_ready "$dir" \
    || { tail -n 30 "$dir/logs/kube-apiserver.log" >&2; die "kube-apiserver did not become ready (log: $dir/logs/kube-apiserver.log)"; }
}

start_controller_manager() {
  local dir="$1"
  write_kubeconfig "$dir" "$dir/run/kcm.kubeconfig" "$(cat "$dir/pki/kcm.token")" system:kube-controller-manager
  launch "$dir" kube-controller-manager \
    --kubeconfig="$dir/run/kcm.kubeconfig" \
    --service-account-private-key-file="$dir/pki/sa.key" \
    --root-ca-file="$dir/pki/ca.crt" \
    --use-service-account-credentials=true \
    --leader-elect=false \
    --secure-port=0 \
    --controllers='*,-nodeipam,-cloud-node-lifecycle,-service,-route,-ttl,-bootstrapsigner,-tokencleaner' \
    --v=1
  # The service-account controller creating "default" shows the controller
  # manager is up and acting.
  wait_for kube-controller-manager 120 kubectl --kubeconfig "$dir/kubeconfig" get serviceaccount default -n default \
    || { tail -n 30 "$dir/logs/kube-controller-manager.log" >&2; die "kube-controller-manager did not start acting (log: $dir/logs/kube-controller-manager.log)"; }
}

cmd_start() {
  local dir="$1"
  mkdir -p "$dir/run" "$dir/logs"
  dir="$(cd "$dir" && pwd)"
  if alive "$dir/run/kube-apiserver.pid"; then
    die "a control plane is already running in $dir (stop it first)"
  fi
  command -v curl >/dev/null || die "curl is required"
  command -v python3 >/dev/null || die "python3 is required"
  command -v kubectl >/dev/null || die "kubectl is required"
  local bin; bin="$("$here/build.sh")"
  echo "$bin" >"$dir/run/binary"
  local address="${KUBE_FIM_APISERVER_ADDRESS:-127.0.0.1}"
  echo "$address" >"$dir/run/apiserver.address"
  gen_pki "$dir" "$address"
  gen_tokens "$dir"
  free_port >"$dir/run/etcd.port"
  free_port >"$dir/run/etcd-peer.port"
  free_port >"$dir/run/apiserver.port"
  write_kubeconfig "$dir" "$dir/kubeconfig" "$(cat "$dir/pki/admin.token")" kube-fim-admin
  local start; start=$(date +%s)
  start_etcd "$dir"
  start_apiserver "$dir"
  start_controller_manager "$dir"
  log "Kubernetes $("$bin" version) up in $(( $(date +%s) - start ))s at https://$address:$(cat "$dir/run/apiserver.port")"
  log "export KUBECONFIG=$dir/kubeconfig"
}

cmd_stop() {
  local dir="$1"
  [[ -d "$dir/run" ]] || return 0
  stop_process "$dir" kube-controller-manager
  stop_process "$dir" kube-apiserver
  stop_process "$dir" etcd
}

cmd_run() {
  local dir="$1"; shift
  [[ "${1:-}" == "--" ]] && shift
  (( $# > 0 )) || usage
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  run_dir="$dir"
  trap 'cmd_stop "$run_dir"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  KUBE_FIM_DETACH=0 cmd_start "$dir"
  local rc=0
  KUBECONFIG="$dir/kubeconfig" KUBE_FIM_CONTROLPLANE_DIR="$dir" KUBE_FIM_CONTROLPLANE="$self" \
    "$@" || rc=$?
  return "$rc"
}

main() {
  local cmd="${1:-}"; shift || true
  local dir="${1:-}"; [[ -n "$dir" ]] || usage
  shift
  case "$cmd" in
    start) KUBE_FIM_DETACH=1 cmd_start "$dir" ;;
    stop) cmd_stop "$dir" ;;
    run) cmd_run "$dir" "$@" ;;
    apiserver-stop) stop_process "$dir" kube-apiserver ;;
    apiserver-start)
      # Detach only if the rest of the control plane was started detached.
      KUBE_FIM_DETACH="${KUBE_FIM_DETACH:-1}" start_apiserver "$dir" ;;
    env)
      echo "export KUBECONFIG=$(cd "$dir" && pwd)/kubeconfig"
      echo "export KUBE_FIM_CONTROLPLANE_DIR=$(cd "$dir" && pwd)" ;;
    *) usage ;;
  esac
}

main "$@"
