#!/usr/bin/env bash
# Builds the pinned Helm from its Go module (helm.sh/helm/v3) and caches it
# under the user's cache directory keyed by version, like the control plane
# (e2e/controlplane/build.sh). Prints the path of the binary on stdout;
# everything else goes to stderr.
#
# `go install module@version` works here because Helm's go.mod has no replace
# directives (unlike k8s.io/kubernetes, which needs the wrapper module of
# e2e/controlplane). The version string `helm version` prints is set the way
# Helm's own Makefile sets it.
set -euo pipefail
version="${KUBE_FIM_HELM_VERSION:-v3.17.3}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/kube-fim"
out="$cache/helm/$version"
bin="$out/helm"
# The binary is trusted when it reports the pinned version and was built by this
# script (a stamp of the script's digest sits beside it).
stamp="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)"
if [[ -x "$bin" && "$(cat "$out/.built-by" 2>/dev/null)" == "$stamp" ]] \
  && [[ "$("$bin" version --template '{{.Version}}' 2>/dev/null)" == "$version" ]]; then
  echo "$bin"
  exit 0
fi
command -v go >/dev/null || { echo "helm/build.sh: the Go toolchain is required (go not on PATH)" >&2; exit 1; }
mkdir -p "$out"
# Go's build and module caches are shared with the control plane build.
export GOCACHE="${GOCACHE:-$cache/go-build}"
export GOMODCACHE="${GOMODCACHE:-$cache/go-mod}"
export CGO_ENABLED=0
# go install must not see the workspace's or the caller's module settings.
export GOFLAGS="" GOWORK=off
# Like Helm's Makefile: the Kubernetes version `helm template` and `helm lint`
# assume without a cluster is the one of the client-go Helm is built with
# (v0.32.x means 1.32); otherwise it is v1.20, and a chart requiring a recent
# kubeVersion fails to render.
gomod="$(cd / && go mod download -json "helm.sh/helm/v3@$version" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
client_go="$(awk '$1=="k8s.io/client-go" {print $2}' "$gomod" | head -n1)"
[[ "$client_go" =~ ^v0\.([0-9]+)\. ]] || { echo "helm/build.sh: no k8s.io/client-go version in $gomod" >&2; exit 1; }
k8s_minor="${BASH_REMATCH[1]}"
tmp="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "building helm $version into $out (cold build: a few minutes on 2 cores)" >&2
start=$(date +%s)
(cd "$tmp" && GOBIN="$tmp" go install -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$version -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
    -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$k8s_minor \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$k8s_minor" \
  "helm.sh/helm/v3/cmd/helm@$version")
mv "$tmp/helm" "$bin"
echo "$stamp" >"$out/.built-by"
echo "helm built in $(( $(date +%s) - start ))s" >&2
echo "$bin"
