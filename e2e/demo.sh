#!/usr/bin/env bash
# `make demo`: kube-fim end to end on the embedded local control plane, no
# cluster needed.
#
# Where this machine can run a node (root, cgroups, the packages of `make deps`),
# e2e/node/node.sh starts the control plane and a real node next to it
# (containerd, kubelet, kube-scheduler, kube-proxy); the demo installs the chart
# with `helm install` and the locally built images, applies the sample policy,
# and the agent runs as a DaemonSet pod on that node. A change under the node's
# root directory then shows up in `kubectl get fc`.
#
# Elsewhere it says so in one line and runs the operator and two agents as local
# processes standing for two nodes (each with its own host root directory and a
# Node object) against the control plane alone.
#
# On a terminal it then keeps running (use the printed KUBECONFIG to look
# around); Ctrl-C stops everything.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '\033[2m$ %s\033[0m\n' "$*"; "$@"; }

if [[ "${1:-}" != --inside* ]]; then
  dir="${1:-$root/target/demo}"
  rm -rf "$dir"
  mkdir -p "$dir"
  if why="$("$root/e2e/node/node.sh" can-run 2>&1)"; then
    exec "$root/e2e/node/node.sh" run "$dir" -- "$root/e2e/demo.sh" --inside-node "$dir"
  fi
  echo "demo: this machine cannot run a Kubernetes node ($why); the agents run as local processes instead"
  exec "$root/e2e/controlplane/controlplane.sh" run "$dir" -- "$root/e2e/demo.sh" --inside "$dir"
fi
dir="$2"

if [[ "$1" == --inside-node ]]; then
  cd "$root"
  h="$KUBE_FIM_NODE_ROOT"
  step "A real node: kubelet, containerd, kube-scheduler, kube-proxy"
  show kubectl get nodes -o wide
  mkdir -p "$h/etc/ssh" "$h/etc/sudoers.d" "$h/var/lib/kubelet"
  printf 'root:x:0:0:root:/root:/bin/bash\n' >"$h/etc/passwd"
  printf 'root:*:19000:0:99999:7:::\n' >"$h/etc/shadow"; chmod 640 "$h/etc/shadow"
  printf 'PermitRootLogin no\n' >"$h/etc/ssh/sshd_config"
  printf 'multi on\n' >"$h/etc/host.conf"
  printf 'kind: KubeletConfiguration\n' >"$h/var/lib/kubelet/config.yaml"
  echo "  the node's / for the agent: $h"

  step "helm install the chart with the locally built images"
  kubectl create namespace kube-fim >/dev/null
  kubectl label namespace kube-fim pod-security.kubernetes.io/enforce=privileged >/dev/null
  helm="$("$root/e2e/helm/build.sh")"
  export HELM_CACHE_HOME="$dir/helm/cache" HELM_CONFIG_HOME="$dir/helm/config" HELM_DATA_HOME="$dir/helm/data"
  show "$helm" install kube-fim charts/kube-fim --namespace kube-fim \
    --set operator.image.repository=localhost/kube-fim/kube-fim-operator \
    --set agent.image.repository=localhost/kube-fim/kube-fim-agent \
    --set operator.image.tag="$KUBE_FIM_NODE_TAG" --set agent.image.tag="$KUBE_FIM_NODE_TAG" \
    --set operator.image.pullPolicy=Never --set agent.image.pullPolicy=Never \
    --set agent.hostRoot="$h" --set agent.stateDir="$KUBE_FIM_NODE_STATE" >/dev/null
  kubectl rollout status deployment/kube-fim-operator -n kube-fim --timeout=120s
  show kubectl get pods -n kube-fim -o wide

  step "Apply the sample policy: the operator creates the agent DaemonSet"
  show kubectl apply -f examples/policy.yaml
  for _ in $(seq 1 120); do
    kubectl get daemonset kube-fim-agent -n kube-fim >/dev/null 2>&1 && break
    sleep 0.5
  done
  kubectl rollout status daemonset/kube-fim-agent -n kube-fim --timeout=120s
  show kubectl get daemonset -n kube-fim
  printf 'waiting for the agent to build its baseline'
  for _ in $(seq 1 120); do
    [[ "$(kubectl get fip node-baseline -o jsonpath='{.status.nodesReady}' 2>/dev/null)" == 1 ]] && break
    printf '.'; sleep 0.5
  done
  echo
  show kubectl get fip

  step "On $KUBE_FIM_NODE_NAME: edit sshd_config, add a .conf, remove host.conf, chmod shadow"
  show sh -c "echo 'PermitRootLogin yes' > '$h/etc/ssh/sshd_config'"
  show sh -c "echo 'evil=1' > '$h/etc/backdoor.conf'"
  show rm "$h/etc/host.conf"
  show chmod 644 "$h/etc/shadow"
  printf 'waiting for the changes to reach the API server'
  for _ in $(seq 1 60); do
    [[ "$(kubectl get filechanges -o name 2>/dev/null | wc -l)" -ge 4 ]] && break
    printf '.'; sleep 0.5
  done
  echo

  step "What a user sees"
  show kubectl get fc
  show kubectl get events -A --field-selector reason=FileModified
  for _ in $(seq 1 30); do
    [[ "$(kubectl get fip node-baseline -o jsonpath='{.status.changesLast24h}')" -ge 4 ]] && break
    sleep 0.5
  done
  show kubectl get fip
  if [[ -t 0 ]]; then
    step "Still running: export KUBECONFIG=$KUBECONFIG — edit files under $h and watch kubectl get fc -w. Ctrl-C stops everything."
    while sleep 3600; do :; done
  fi
  exit 0
fi
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

cd "$root"
for bin in kube-fim-operator kube-fim-agent; do
  [[ -x "$target/debug/$bin" ]] || { echo "demo: $target/debug/$bin missing (make demo builds it)" >&2; exit 1; }
done

step "Install the kube-fim CRDs and RBAC"
show kubectl apply --server-side -f crds/
kubectl wait --for=condition=Established --timeout=60s crd --all >/dev/null
show kubectl apply --server-side -f manifests/rbac.yaml

# A kubeconfig holding a token of a kube-fim ServiceAccount: the processes
# run with exactly the rights the RBAC gives them.
sa_kubeconfig() {
  local sa="$1" out="$dir/$1.kubeconfig" token server ca
  token="$(kubectl create token "$sa" -n kube-fim --duration=24h)"
  server="$(kubectl config view --raw -o jsonpath='{.clusters[0].cluster.server}')"
  ca="$(kubectl config view --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')"
  cat >"$out" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: $server, certificate-authority-data: $ca}}]
users: [{name: $sa, user: {token: $token}}]
contexts: [{name: local, context: {cluster: local, user: $sa}}]
current-context: local
EOF
  echo "$out"
}

step "Two nodes, each with a host root standing for its /"
for n in node-a node-b; do
  kubectl create -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata:
  name: demo-$n
  labels: {kubernetes.io/os: linux, kubernetes.io/hostname: demo-$n}
EOF
  h="$dir/nodes/demo-$n/root"
  mkdir -p "$h/etc/ssh" "$h/etc/sudoers.d" "$h/var/lib/kubelet" "$h/var/log"
  printf 'root:x:0:0:root:/root:/bin/bash\n' >"$h/etc/passwd"
  printf 'root:*:19000:0:99999:7:::\n' >"$h/etc/shadow"; chmod 640 "$h/etc/shadow"
  printf 'PermitRootLogin no\n' >"$h/etc/ssh/sshd_config"
  printf 'multi on\n' >"$h/etc/host.conf"
  printf 'nameserver 10.0.0.10\n' >"$h/etc/resolv.conf"
  printf 'kind: KubeletConfiguration\n' >"$h/var/lib/kubelet/config.yaml"
  echo "  demo-$n: host root $h"
done
show kubectl get nodes -L kubernetes.io/os

step "Start the operator and one agent per node (as their ServiceAccounts)"
op_kc="$(sa_kubeconfig kube-fim-operator)"
agent_kc="$(sa_kubeconfig kube-fim-agent)"
mkdir -p "$dir/logs"
KUBECONFIG="$op_kc" "$target/debug/kube-fim-operator" --namespace=kube-fim --metrics-addr=127.0.0.1:0 --resync=5s \
  --agent-image=kube-fim-agent:demo >"$dir/logs/operator.log" 2>&1 &
pids+=($!)
port=19101
for n in node-a node-b; do
  "$target/debug/kube-fim-agent" run --node-name="demo-$n" --root="$dir/nodes/demo-$n/root" \
    --state="$dir/nodes/demo-$n/state" --kubeconfig="$agent_kc" --metrics-addr="127.0.0.1:$port" \
    >"$dir/logs/agent-$n.log" 2>&1 &
  pids+=($!)
  echo "  agent on demo-$n: metrics on http://127.0.0.1:$port/metrics, log $dir/logs/agent-$n.log"
  port=$((port + 1))
done

step "Apply the sample policy"
show kubectl apply -f examples/policy.yaml
printf 'waiting for both agents to build their baseline'
for _ in $(seq 1 120); do
  ready="$(kubectl get fip node-baseline -o jsonpath='{.status.nodesReady}' 2>/dev/null || true)"
  [[ "$ready" == 2 ]] && break
  printf '.'; sleep 0.5
done
echo
show kubectl get fip
show kubectl get fileintegritynodes
show kubectl get daemonset -n kube-fim

step "On demo-node-a: edit sshd_config, add a .conf, remove host.conf, chmod shadow"
h="$dir/nodes/demo-node-a/root"
show sh -c "echo 'PermitRootLogin yes' > '$h/etc/ssh/sshd_config'"
show sh -c "echo 'evil=1' > '$h/etc/backdoor.conf'"
show rm "$h/etc/host.conf"
show chmod 644 "$h/etc/shadow"
printf 'waiting for the changes to reach the API server'
for _ in $(seq 1 60); do
  n="$(kubectl get filechanges -o name 2>/dev/null | wc -l)"
  [[ "$n" -ge 4 ]] && break
  printf '.'; sleep 0.5
done
echo

step "What a user sees"
show kubectl get filechanges
show kubectl get fc -o wide
show kubectl get fc -l fim.kube-fim.io/category=Modified,fim.kube-fim.io/node=demo-node-a
show kubectl get events -A --field-selector reason=FileModified
for _ in $(seq 1 30); do
  [[ "$(kubectl get fip node-baseline -o jsonpath='{.status.changesLast24h}')" -ge 4 ]] && break
  sleep 0.5
done
show kubectl get fip

step "A bad policy is refused by the API server, naming the field"
show kubectl apply -f examples/invalid/wildcard-not-last.yaml || true

if [[ -t 0 ]]; then
  step "Still running: export KUBECONFIG=$KUBECONFIG — edit files under $dir/nodes/*/root and watch kubectl get fc -w. Ctrl-C stops everything."
  while sleep 3600; do :; done
fi
