#!/usr/bin/env bash
# prune-target.sh TARGET_DIR STAMP: delete the workspace's own build artifacts
# (binaries, test executables, libraries of kube-fim's crates) in TARGET_DIR
# that are older than STAMP. Dependencies are kept whatever their age: they
# are what a cached target directory is for.
set -euo pipefail
target="$1" stamp="$2"
[[ -d "$target" && -e "$stamp" ]] || exit 0
cd "$(dirname "${BASH_SOURCE[0]}")/.."
names="$(cargo metadata --no-deps --format-version 1 --offline 2>/dev/null | python3 -c '
import json, sys
meta = json.load(sys.stdin)
names = {t["name"].replace("-", "_") for p in meta["packages"] for t in p["targets"]}
print("|".join(sorted(names)))
')" || exit 0
[[ -n "$names" ]] || exit 0
for profile in debug release; do
  deps="$target/$profile/deps"
  [[ -d "$deps" ]] || continue
  find "$deps" -maxdepth 1 -type f ! -newer "$stamp" -printf '%f\n' \
    | { grep -E "^(lib)?($names)-[0-9a-f]{16}(\..*)?$" || true; } \
    | sed "s|^|$deps/|" | xargs -r rm -f
done
rm -rf "$target/debug/incremental" "$target/release/incremental"
