#!/usr/bin/env bash
# A real Kubernetes node next to the local control plane: containerd + runc,
# bridge CNI, kubelet, kube-scheduler and kube-proxy (the last three from the
# control plane's multi-call binary), running the images of e2e/node/images.sh.
#
#   node.sh run DIR -- CMD...   guard the network, start the control plane and the
#                               node, run CMD, then take everything down and check
#                               that nothing is left (even on failure)
#   node.sh can-run             exit 0 if this machine can run a node (root, cgroups,
#                               the packages of `make deps`), else say why on stderr
#   node.sh check-clean DIR     list what a node left behind; exit 1 if anything
#
# CMD sees KUBECONFIG (admin), KUBE_FIM_NODE_NAME, KUBE_FIM_NODE_DIR,
# KUBE_FIM_NODE_ROOT (an rshared bind mount standing for the node's /),
# KUBE_FIM_NODE_IMAGES (the OCI layouts of the images), KUBE_FIM_NODE_TAG (their
# tag), KUBE_FIM_NODE_STATE (a host directory for the agents' state) and
# KUBE_FIM_NODE_CONTAINERD (the node's containerd socket, for `ctr`).
#
# Network rules: all traffic stays on the machine. The node's and the API
# server's address sits on an interface of its own (a bridge without ports: the
# kernels here have no dummy driver), pods live on their own bridge, an
# `unreachable` route covers the Service CIDR before anything starts (kube-proxy
# DNATs before routing, so Services work and nothing leaks without it), and a
# forward guard drops pod traffic to or from anything but the pod bridge. Nothing
# binds to the machine's own addresses.
#
# Environment: KUBE_FIM_NODE_BINDIR (default $CARGO_TARGET_DIR/release, else
# ./target/release; `make e2e-node` passes the debug build's directory) holds
# kube-fim-agent and kube-fim-operator for the images.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$here/$(basename "${BASH_SOURCE[0]}")"
root="$(cd "$here/../.." && pwd)"

NODE_NAME=kube-fim-node
NODE_IF=kfim-node0          # holds NODE_IP; a bridge with no ports, standing in for a dummy
NODE_IP=10.111.0.1
POD_BRIDGE=kfim-cni0
POD_CIDR=10.112.0.0/24
SERVICE_CIDR=10.0.0.0/24    # e2e/controlplane/controlplane.sh --service-cluster-ip-range
GUARD=KFIM-GUARD
TAG=local
# The sysctls the kubelet and the bridge plugin change; restored on the way down.
SYSCTLS=(net.ipv4.ip_forward vm.overcommit_memory kernel.panic kernel.panic_on_oops)
# Paths outside DIR that the kubelet and containerd write to.
OUTSIDE=(/var/log/containers /var/log/pods /var/lib/kubelet /run/containerd /var/lib/cni /var/run/netns /etc/cni)
LOCK=/run/kube-fim-node.lock

log() { echo "node: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  sed -n '2,31p' "$self" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

cmd_can_run() {
  [[ "$(id -u)" == 0 ]] || { echo "not root" >&2; return 1; }
  [[ -d /sys/fs/cgroup/memory || -f /sys/fs/cgroup/cgroup.controllers ]] || { echo "no cgroups" >&2; return 1; }
  local t
  for t in containerd ctr runc iptables ip6tables ip umoci skopeo go mount; do
    command -v "$t" >/dev/null || { echo "$t missing (make deps)" >&2; return 1; }
  done
  [[ -x /usr/lib/cni/bridge ]] || { echo "CNI plugins missing (make deps)" >&2; return 1; }
  grep -qw overlay /proc/filesystems || { echo "no overlayfs" >&2; return 1; }
  ip link add kfim-probe0 type bridge 2>/dev/null || { echo "cannot create network interfaces" >&2; return 1; }
  ip link del kfim-probe0
}

# wait_for DESCRIPTION SECONDS COMMAND...
wait_for() {
  local what="$1" secs="$2"; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s) < deadline )) || { log "$what: not ready after ${secs}s"; return 1; }
    sleep 0.3
  done
  log "$what ready"
}

# ---------------------------------------------------------------- network guard

net_up() {
  local d="$1"
  # Before anything starts: Service IPs never route anywhere.
  ip route add unreachable "$SERVICE_CIDR"
  echo "$SERVICE_CIDR" >"$d/node/route"
  ip link add "$NODE_IF" type bridge
  ip addr add "$NODE_IP/32" dev "$NODE_IF"
  ip link set "$NODE_IF" up
  local ipt
  for ipt in iptables ip6tables; do
    "$ipt" -w -N "$GUARD"
    "$ipt" -w -I FORWARD 1 -j "$GUARD"
  done
  # Pods talk to each other on their bridge and to local addresses (INPUT);
  # anything forwarded off the bridge is dropped.
  iptables -w -A "$GUARD" -s "$POD_CIDR" ! -o "$POD_BRIDGE" -j DROP
  iptables -w -A "$GUARD" -d "$POD_CIDR" ! -i "$POD_BRIDGE" -j DROP
  ip6tables -w -A "$GUARD" -i "$POD_BRIDGE" -j DROP
  ip6tables -w -A "$GUARD" -o "$POD_BRIDGE" -j DROP
}

# Removes every KUBE-*, CNI-* and KFIM-* chain (and the rules jumping to them)
# in both families.
iptables_clean() {
  local ipt table rule chain
  for ipt in iptables ip6tables; do
    for table in filter nat mangle raw; do
      "$ipt" -w -t "$table" -S >/dev/null 2>&1 || continue
      # Rules in any chain that jump to one of ours.
      while IFS= read -r rule; do
        [[ -n "$rule" ]] || continue
        eval "\"$ipt\" -w -t $table ${rule/-A /-D }" 2>/dev/null || true
      done < <("$ipt" -w -t "$table" -S | grep -E '^-A ' | grep -E -- '-j (KUBE-|CNI-|KFIM-)' | grep -vE '^-A (KUBE-|CNI-|KFIM-)' || true)
      for chain in $("$ipt" -w -t "$table" -S | awk '$1=="-N" && $2 ~ /^(KUBE-|CNI-|KFIM-)/ {print $2}'); do
        "$ipt" -w -t "$table" -F "$chain" 2>/dev/null || true
      done
      for chain in $("$ipt" -w -t "$table" -S | awk '$1=="-N" && $2 ~ /^(KUBE-|CNI-|KFIM-)/ {print $2}'); do
        "$ipt" -w -t "$table" -X "$chain" 2>/dev/null || true
      done
    done
  done
}

net_down() {
  local d="$1"
  ip link del "$POD_BRIDGE" 2>/dev/null || true
  ip link del "$NODE_IF" 2>/dev/null || true
  [[ -f "$d/node/route" ]] && ip route del unreachable "$SERVICE_CIDR" 2>/dev/null || true
  rm -f "$d/node/route"
  iptables_clean
}

# ---------------------------------------------------------------- certificates

# client_kubeconfig DIR NAME CN [O]: a kubeconfig with a client certificate of
# the control plane's CA.
client_kubeconfig() {
  local d="$1" name="$2" cn="$3" org="${4:-}"
  local pki="$d/pki" subj="/CN=$cn"
  [[ -n "$org" ]] && subj="/O=$org/CN=$cn"
  openssl req -newkey rsa:2048 -nodes -keyout "$d/node/pki/$name.key" -out "$d/node/pki/$name.csr" \
    -subj "$subj" 2>/dev/null
  openssl x509 -req -in "$d/node/pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -out "$d/node/pki/$name.crt" -days 30 -extfile "$pki/client.ext" 2>/dev/null
  chmod 600 "$d/node/pki/$name.key"
  cat >"$d/node/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://$NODE_IP:$(cat "$d/run/apiserver.port")
    certificate-authority: $pki/ca.crt
users:
- name: $cn
  user:
    client-certificate: $d/node/pki/$name.crt
    client-key: $d/node/pki/$name.key
contexts:
- name: local
  context: {cluster: local, user: "$cn"}
current-context: local
EOF
}

# ---------------------------------------------------------------- processes

# start NAME COMMAND...: logs to DIR/node/logs/NAME.log, pid in DIR/node/run/NAME.pid.
start() {
  local name="$1"; shift
  setsid "$@" >>"$ND/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$ND/run/$name.pid"
  disown $! 2>/dev/null || true
}

stop() {
  local name="$1" pidfile="$ND/run/$1.pid" pid i
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

# ---------------------------------------------------------------- node up

node_up() {
  local d="$1"
  ND="$d/node"
  local bin; bin="$(cat "$d/run/binary")"
  local sock="$ND/containerd/containerd.sock"
  mkdir -p "$ND/pki" "$ND/logs" "$ND/run" "$ND/cni/net.d" "$ND/containerd" "$ND/kubelet" "$ND/root" "$ND/state"

  # The directory standing for the node's root: an rshared bind mount of its
  # own, so HostToContainer mount propagation is real (`/` is private here).
  mount --bind "$ND/root" "$ND/root"
  mount --make-rshared "$ND/root"
  # The node's procfs inside it, as a host's `/` has one: the agent reads
  # the host's mount table and the containers' (container drift) there.
  mkdir -p "$ND/root/proc"
  mount -t proc proc "$ND/root/proc"

  client_kubeconfig "$d" kubelet "system:node:$NODE_NAME" system:nodes
  # The kubelet's serving certificate: the API server checks it against the CA.
  openssl req -newkey rsa:2048 -nodes -keyout "$ND/pki/kubelet-serving.key" -out "$ND/pki/kubelet-serving.csr" \
    -subj "/O=system:nodes/CN=system:node:$NODE_NAME" 2>/dev/null
  printf 'subjectAltName=IP:%s,DNS:%s\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n' \
    "$NODE_IP" "$NODE_NAME" >"$ND/pki/serving.ext"
  openssl x509 -req -in "$ND/pki/kubelet-serving.csr" -CA "$d/pki/ca.crt" -CAkey "$d/pki/ca.key" -CAcreateserial \
    -out "$ND/pki/kubelet-serving.crt" -days 30 -extfile "$ND/pki/serving.ext" 2>/dev/null
  client_kubeconfig "$d" scheduler system:kube-scheduler
  client_kubeconfig "$d" proxy system:kube-proxy
  # What kubeadm grants the API server's kubelet client (logs, exec).
  kubectl create clusterrolebinding kube-fim-local-apiserver-kubelet \
    --clusterrole=system:kubelet-api-admin --user=kube-apiserver-kubelet-client >/dev/null

  log "building images"
  "$here/images.sh" "$IMAGES" "$BINDIR"

  cat >"$ND/cni/net.d/10-kube-fim.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "kube-fim",
  "plugins": [{
    "type": "bridge",
    "bridge": "$POD_BRIDGE",
    "isGateway": true,
    "ipMasq": false,
    "hairpinMode": true,
    "ipam": {
      "type": "host-local",
      "ranges": [[{"subnet": "$POD_CIDR"}]],
      "routes": [{"dst": "0.0.0.0/0"}],
      "dataDir": "$ND/cni/ipam"
    }
  }]
}
EOF
  cat >"$ND/containerd/config.toml" <<EOF
version = 2
# Inside the node's root, where a node keeps it (/var/lib/containerd): the
# containers' writable layers are then host paths the agent can read.
root = "$ND/root/var/lib/containerd"
state = "$ND/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$ND/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/kube-fim/pause:$TAG"
  # These machines lack CAP_SYS_RESOURCE: without this every sandbox fails.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$ND/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$ND/cni/net.d"
EOF
  start containerd containerd --config "$ND/containerd/config.toml"
  wait_for containerd 30 ctr -a "$sock" version || die "containerd did not start (log: $ND/logs/containerd.log)"
  local image
  for image in pause busybox kube-fim-agent kube-fim-operator; do
    ctr -a "$sock" -n k8s.io images import "$IMAGES/$image.tar" >/dev/null
  done

  printf 'nameserver 127.0.0.1\n' >"$ND/resolv.conf"
  cat >"$ND/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $d/pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $ND/pki/kubelet-serving.crt
tlsPrivateKeyFile: $ND/pki/kubelet-serving.key
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$sock
imageServiceEndpoint: unix://$sock
podLogsDir: $ND/pod-logs
resolvConf: $ND/resolv.conf
serializeImagePulls: false
registerNode: true
nodeStatusUpdateFrequency: 4s
evictionHard: {memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 30
EOF
  start kubelet "$bin" kubelet --config="$ND/kubelet/config.yaml" --kubeconfig="$ND/kubelet.kubeconfig" \
    --root-dir="$ND/kubelet" --cert-dir="$ND/kubelet/pki" --hostname-override="$NODE_NAME" \
    --node-ip="$NODE_IP" --v=1
  start kube-scheduler "$bin" kube-scheduler --kubeconfig="$ND/scheduler.kubeconfig" \
    --leader-elect=false --secure-port=0 --v=1
  cat >"$ND/proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $ND/proxy.kubeconfig}
mode: iptables
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: ""
metricsBindAddress: ""
clusterCIDR: $POD_CIDR
nodePortAddresses: ["$NODE_IP/32"]
iptables: {localhostNodePorts: false}
# Leave the machine's conntrack settings alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  start kube-proxy "$bin" kube-proxy --config="$ND/proxy.yaml" --v=1
  wait_for "node $NODE_NAME Ready" 120 \
    kubectl wait --for=condition=Ready --timeout=2s "node/$NODE_NAME" \
    || { tail -n 30 "$ND/logs/kubelet.log" >&2; die "the kubelet did not get Ready (log: $ND/logs/kubelet.log)"; }
  echo "$NODE_NAME" >"$ND/run/up"
}

# ---------------------------------------------------------------- node down

node_down() {
  local d="$1"
  ND="$d/node"
  local sock="$ND/containerd/containerd.sock" bin
  bin="$(cat "$d/run/binary" 2>/dev/null || true)"
  # Pods first, while the kubelet and CNI run, so their networks are torn down.
  if [[ -f "$ND/run/kube-scheduler.pid" ]]; then
    stop kube-scheduler
    kubectl delete daemonsets,deployments,replicasets,statefulsets,jobs --all -A --wait=false >/dev/null 2>&1 || true
    kubectl delete pods --all -A --grace-period=2 --timeout=40s >/dev/null 2>&1 || true
    local i
    for i in $(seq 1 60); do
      [[ -z "$(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null)" ]] && break
      sleep 0.5
    done
  fi
  stop kubelet
  stop kube-proxy
  [[ -n "$bin" && -f "$ND/proxy.yaml" ]] && "$bin" kube-proxy --cleanup --config="$ND/proxy.yaml" >>"$ND/logs/kube-proxy.log" 2>&1 || true
  # Whatever still runs: kill the tasks, then containerd, then its shims.
  local id
  for id in $(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
    ctr -a "$sock" -n k8s.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
  done
  stop containerd
  local pid
  for pid in $(cat "$ND"/containerd/state/io.containerd.runtime.v2.task/*/*/shim.pid 2>/dev/null || true); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  # Containers whose shim is gone leave their processes in the pod cgroups.
  local cg
  for cg in $(find /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/k8s.io -name cgroup.procs 2>/dev/null || true); do
    for pid in $(cat "$cg" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  done
  sleep 0.3
  # Mounts: everything under DIR (deepest first) and the pods' network namespaces.
  local m
  for _ in 1 2 3; do
    for m in $(awk -v d="$d/" '{gsub(/\\040/," ",$5)} index($5, d)==1 || $5 ~ /^\/(var\/)?run\/netns\/cni-/ {print $5}' /proc/self/mountinfo | sort -r); do
      umount -l "$m" 2>/dev/null || true
    done
  done
  umount -l "$ND/root" 2>/dev/null || true
  rm -f /var/run/netns/cni-* 2>/dev/null || true
  # Cgroups the kubelet and runc made (deepest first).
  for cg in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/k8s.io /sys/fs/cgroup/kubepods /sys/fs/cgroup/k8s.io; do
    [[ -d "$cg" ]] && find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  # Paths outside DIR that did not exist before.
  local p
  for p in "${OUTSIDE[@]}"; do
    [[ -e "$p" ]] && ! grep -qxF "$p" "$ND/preexisting" 2>/dev/null && rm -rf "$p"
  done
  # Sysctls as they were.
  local line
  while IFS='=' read -r key value; do
    [[ -n "$key" ]] && sysctl -qw "$key=$value" >/dev/null 2>&1 || true
  done <"$ND/sysctls" 2>/dev/null || true
  rm -f "$ND/run/up"
}

# ---------------------------------------------------------------- check

cmd_check_clean() {
  local d; d="$(cd "$1" && pwd)"
  local nd="$d/node" left=()
  local p ancestors=" " a=$$
  while [[ "$a" -gt 1 ]]; do
    ancestors+="$a "
    a="$(awk '/^PPid:/ {print $2}' "/proc/$a/status" 2>/dev/null || echo 0)"
  done
  for p in $(pgrep -f "$d/" || true); do
    [[ "$ancestors" == *" $p "* || "$p" == "$BASHPID" ]] && continue
    left+=("process $p: $(tr '\0' ' ' </proc/"$p"/cmdline 2>/dev/null | cut -c1-120)")
  done
  while IFS= read -r m; do left+=("mount $m"); done < <(awk -v d="$d/" 'index($5, d)==1 || $5 ~ /netns\/cni-/ {print $5}' /proc/self/mountinfo)
  compgen -G '/var/run/netns/cni-*' >/dev/null && left+=("netns $(ls /var/run/netns)")
  local i
  for i in "$NODE_IF" "$POD_BRIDGE"; do
    ip link show "$i" >/dev/null 2>&1 && left+=("interface $i")
  done
  ip -o link show type veth 2>/dev/null | grep -q "master $POD_BRIDGE" && left+=("veth on $POD_BRIDGE")
  ip route show type unreachable | grep -q "^unreachable $SERVICE_CIDR" && left+=("route unreachable $SERVICE_CIDR")
  local ipt chain
  for ipt in iptables ip6tables; do
    for chain in $("$ipt"-save 2>/dev/null | awk '/^:(KUBE-|CNI-|KFIM-)/ {sub(/^:/, "", $1); print $1}'); do
      left+=("$ipt chain $chain")
    done
  done
  for i in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods /sys/fs/cgroup/*/k8s.io; do
    [[ -d "$i" ]] && left+=("cgroup $i")
  done
  for p in "${OUTSIDE[@]}"; do
    [[ -e "$p" ]] && ! grep -qxF "$p" "$nd/preexisting" 2>/dev/null && left+=("path $p")
  done
  if [[ -f "$nd/sysctls" ]]; then
    local key value now
    while IFS='=' read -r key value; do
      now="$(sysctl -n "$key")"
      [[ "$now" == "$value" ]] || left+=("sysctl $key=$now (was $value)")
    done <"$nd/sysctls"
  fi
  if ((${#left[@]})); then
    log "left behind after the node went down:"
    printf '  %s\n' "${left[@]}" >&2
    return 1
  fi
  log "nothing left behind (processes, mounts, netns, interfaces, routes, iptables chains, cgroups, paths, sysctls)"
}

# ---------------------------------------------------------------- run

# Inside the control plane's `run`: the node, CMD, the node down.
cmd_inside() {
  local d="$1"; shift
  [[ "${1:-}" == "--" ]] && shift
  INSIDE_DIR="$d"
  trap 'node_down "$INSIDE_DIR"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local start; start=$(date +%s)
  node_up "$d"
  log "node $NODE_NAME up in $(( $(date +%s) - start ))s"
  KUBE_FIM_NODE_NAME="$NODE_NAME" KUBE_FIM_NODE_DIR="$d/node" KUBE_FIM_NODE_ROOT="$d/node/root" \
    KUBE_FIM_NODE_IMAGES="$IMAGES/oci" KUBE_FIM_NODE_TAG="$TAG" KUBE_FIM_NODE_STATE="$d/node/state" \
    KUBE_FIM_NODE_CONTAINERD="$d/node/containerd/containerd.sock" \
    "$@"
}

cmd_run() {
  local d="$1"; shift
  [[ "${1:-}" == "--" ]] && shift
  (( $# > 0 )) || usage
  local why
  why="$(cmd_can_run 2>&1)" || die "this machine cannot run a node: $why"
  mkdir -p "$d/node"
  d="$(cd "$d" && pwd)"
  exec 9>"$LOCK"
  flock -n 9 || die "another node runs on this machine ($LOCK)"
  # What exists before: the way down removes only what the node added.
  : >"$d/node/preexisting"
  local p
  for p in "${OUTSIDE[@]}"; do [[ -e "$p" ]] && echo "$p" >>"$d/node/preexisting"; done
  : >"$d/node/sysctls"
  for p in "${SYSCTLS[@]}"; do echo "$p=$(sysctl -n "$p")" >>"$d/node/sysctls"; done
  [[ -n "$(iptables-save 2>/dev/null | grep -E '^:(KUBE-|CNI-|KFIM-)')" ]] \
    && die "KUBE-/CNI-/KFIM- iptables chains already exist: another Kubernetes node runs here"
  RUN_DIR="$d"
  trap 'node_down "$RUN_DIR" 2>/dev/null || true; net_down "$RUN_DIR"; cmd_check_clean "$RUN_DIR" || rc=1; exit "${rc:-0}"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  net_up "$d"
  rc=0
  KUBE_FIM_APISERVER_ADDRESS="$NODE_IP" "$root/e2e/controlplane/controlplane.sh" run "$d" -- \
    "$self" inside "$d" -- "$@" || rc=$?
  return "$rc"
}

target="${CARGO_TARGET_DIR:-$root/target}"
BINDIR="${KUBE_FIM_NODE_BINDIR:-$target/release}"
# Built images are cached (keyed by their binaries' digests).
IMAGES="${XDG_CACHE_HOME:-$HOME/.cache}/kube-fim/node-images"

main() {
  local cmd="${1:-}"; shift || true
  case "$cmd" in
    can-run) cmd_can_run ;;
    run) [[ -n "${1:-}" ]] || usage; cmd_run "$@" ;;
    inside) cmd_inside "$@" ;;
    check-clean) [[ -n "${1:-}" ]] || usage; cmd_check_clean "$1" ;;
    *) usage ;;
  esac
}

main "$@"
