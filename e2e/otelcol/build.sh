#!/usr/bin/env bash
# Builds the export tests' OpenTelemetry Collector (an OTLP receiver and a file
# exporter, main.go) from the collector's Go modules pinned in go.mod, and
# caches it under the user's cache directory keyed by the collector version and
# a digest of this module's sources, like the control plane
# (e2e/controlplane/build.sh). Prints the path of the binary on stdout;
# everything else goes to stderr. The build is big: it runs at the lowest CPU
# priority, one package at a time.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version="$(awk '$1=="go.opentelemetry.io/collector/otelcol" {print $2}' "$here/go.mod" | head -n1)"
[[ -n "$version" ]] || { echo "otelcol/build.sh: no go.opentelemetry.io/collector/otelcol version in $here/go.mod" >&2; exit 1; }
key="$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" | sha256sum | cut -c1-12)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/kube-fim"
out="$cache/otelcol/$version-$key"
bin="$out/kube-fim-otelcol"
if [[ -x "$bin" ]]; then
  echo "$bin"
  exit 0
fi
command -v go >/dev/null || { echo "otelcol/build.sh: the Go toolchain is required (go not on PATH)" >&2; exit 1; }
mkdir -p "$out"
export GOCACHE="${GOCACHE:-$cache/go-build}"
export GOMODCACHE="${GOMODCACHE:-$cache/go-mod}"
export GOFLAGS="-p=1" GOWORK=off CGO_ENABLED=0
tmp="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "building the OpenTelemetry Collector $version into $out (cold build: many minutes on 2 cores)" >&2
start=$(date +%s)
(cd "$here" && nice -n 19 go build -trimpath -ldflags "-s -w" -o "$tmp/kube-fim-otelcol" .)
mv "$tmp/kube-fim-otelcol" "$bin"
echo "collector built in $(( $(date +%s) - start ))s" >&2
echo "$bin"
