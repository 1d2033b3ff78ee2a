#!/usr/bin/env bash
# Installs the pinned cargo-deny from crates.io and caches it under the user's
# cache directory keyed by version, like the control plane and Helm
# (e2e/controlplane/build.sh, e2e/helm/build.sh). Prints the path of the
# binary on stdout; everything else goes to stderr.
#
# Built from source with `cargo install --locked` because crates.io is the
# only place binaries can come from here (no prebuilt release downloads).
set -euo pipefail
version="${KUBE_FIM_CARGO_DENY_VERSION:-0.20.2}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/kube-fim"
root="$cache/cargo-deny/$version"
bin="$root/bin/cargo-deny"
if [[ -x "$bin" ]] && [[ "$("$bin" --version 2>/dev/null)" == "cargo-deny $version" ]]; then
  echo "$bin"
  exit 0
fi
echo "installing cargo-deny $version into $root (cold build: 10-20 minutes on 2 cores)" >&2
start=$(date +%s)
# A target directory of its own: the workspace's (CARGO_TARGET_DIR) must not
# get cargo-deny's dependency tree, and a half-built install must not be found.
tmp="$(mktemp -d "${TMPDIR:-/tmp}/cargo-deny-build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
CARGO_TARGET_DIR="$tmp/target" cargo install --locked --quiet cargo-deny --version "=$version" --root "$tmp/root" >&2
mkdir -p "$root/bin"
mv "$tmp/root/bin/cargo-deny" "$bin"
echo "cargo-deny built in $(( $(date +%s) - start ))s" >&2
echo "$bin"
