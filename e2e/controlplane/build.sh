#!/usr/bin/env bash
# Builds the pinned control plane (etcd + kube-apiserver + kube-controller-manager,
# one multi-call binary) from Go modules, and caches it under the user's cache
# directory keyed by the Kubernetes version and a digest of this module's sources.
# Prints the path of the binary on stdout; everything else goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
k8s_version="$(awk '$1=="k8s.io/kubernetes" && $2 ~ /^v/ {print $2} $1=="require" && $2=="k8s.io/kubernetes" {print $3}' "$here/go.mod" | head -n1)"
[[ -n "$k8s_version" ]] || { echo "build.sh: no k8s.io/kubernetes version in $here/go.mod" >&2; exit 1; }
key="$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" | sha256sum | cut -c1-12)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/kube-fim"
out="$cache/controlplane/$k8s_version-$key"
bin="$out/kube-fim-controlplane"
if [[ -x "$bin" ]]; then
  echo "$bin"
  exit 0
fi
command -v go >/dev/null || { echo "build.sh: the Go toolchain is required (go not on PATH)" >&2; exit 1; }
mkdir -p "$out"
# Go's own build cache and module cache live beside the binary cache so a CI
# machine that keeps ~/.cache keeps all three.
export GOCACHE="${GOCACHE:-$cache/go-build}"
export GOMODCACHE="${GOMODCACHE:-$cache/go-mod}"
export GOFLAGS="${GOFLAGS:-} -mod=mod"
export CGO_ENABLED=0
echo "building control plane $k8s_version into $out (cold build: many minutes on 2 cores)" >&2
start=$(date +%s)
(cd "$here" && go build -trimpath \
  -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$k8s_version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$k8s_version" | cut -d. -f2) -X main.kubernetesVersion=$k8s_version" \
  -o "$bin.tmp" .)
mv "$bin.tmp" "$bin"
echo "control plane built in $(( $(date +%s) - start ))s" >&2
echo "$bin"
