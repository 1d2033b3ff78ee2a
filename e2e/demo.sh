#!/usr/bin/env bash
# `make demo`: kube-fim on the embedded local control plane, no cluster needed.
# Starts etcd + kube-apiserver + kube-controller-manager on loopback, installs the
# CRDs, applies the sample policy and shows what a user sees. On a terminal it then
# waits (use the printed KUBECONFIG to look around); Ctrl-C stops everything.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ "${1:-}" != "--inside" ]]; then
  dir="${1:-$root/target/demo}"
  rm -rf "$dir"
  exec "$root/e2e/controlplane/controlplane.sh" run "$dir" -- "$root/e2e/demo.sh" --inside
fi

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

cd "$root"
step "Install the kube-fim CRDs (what users apply)"
show kubectl apply --server-side -f crds/
kubectl wait --for=condition=Established --timeout=60s \
  crd/fileintegritypolicies.fim.kube-fim.io crd/filechanges.fim.kube-fim.io >/dev/null

step "Apply the sample policy"
show kubectl apply -f examples/policy.yaml
show kubectl get fip

step "A bad policy is refused by the API server, naming the field"
show kubectl apply -f examples/invalid/wildcard-not-last.yaml || true

if [[ -t 0 ]]; then
  step "The control plane stays up: export KUBECONFIG=$KUBECONFIG (Ctrl-C stops everything)"
  while sleep 3600; do :; done
fi
