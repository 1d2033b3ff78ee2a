#!/usr/bin/env bash
# kube-fim-agent benchmark (`make bench`): on one generated host tree, measured
# side by side in one run:
#   - kube-fim-agent baseline / check   vs   b3sum over the same files   vs   aide --init / --check
#     (wall time, peak RSS from /usr/bin/time -v, ratios);
#   - real-time detection latency of `watch` (write -> change line), p50/p99;
#   - idle CPU of `watch` over 5 s (utime+stime from /proc/PID/stat).
#
# Environment: BENCH_FILES (default 100000), BENCH_DIR (default: a temporary
# directory, removed at the end), BENCH_LATENCY_N (default 100),
# BENCH_DEBOUNCE (the policy's debounce for the latency run, default 100ms),
# CARGO_TARGET_DIR (default target).
#
# Fairness: the agent hashes on one thread (BLAKE3 with SIMD), so the primary
# comparisons are single-threaded: b3sum --num-threads 1 in one xargs stream,
# and aide --workers=1. A parallel b3sum (xargs -P nproc) is shown for
# reference. Everything runs on a warm page cache (the tree was just written).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
files="${BENCH_FILES:-100000}"
latency_n="${BENCH_LATENCY_N:-100}"
debounce="${BENCH_DEBOUNCE:-100ms}"
target="${CARGO_TARGET_DIR:-$repo/target}"
bin="$target/release/kube-fim-agent"

echo "== building the release binary"
(cd "$repo" && cargo build --release -q -p kube-fim-agent)

need=()
command -v b3sum >/dev/null || need+=(b3sum)
command -v aide >/dev/null || need+=(aide)
[ -x /usr/bin/time ] || need+=(time)
if [ "${#need[@]}" -gt 0 ]; then
    echo "== installing ${need[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ -n "${BENCH_DIR:-}" ]; then
    work="$BENCH_DIR"
    mkdir -p "$work"
else
    work="$(mktemp -d /tmp/kube-fim-bench.XXXXXX)"
    trap 'rm -rf "$work"' EXIT
fi
root="$work/root"
if [ ! -d "$root/data" ]; then
    echo "== generating the host tree"
    python3 "$here/measure.py" tree "$root" "$files"
fi
nfiles=$(find "$root/data" -type f | wc -l)
bytes=$(du -sb "$root/data" | cut -f1)

cat >"$work/policy.yaml" <<EOF
apiVersion: fim.kube-fim.io/v1alpha1
kind: FileIntegrityPolicy
metadata:
  name: bench
spec:
  debounce: $debounce
  paths:
    - name: data
      path: /data
      recursive: true
EOF

# AIDE with the attributes the agent's `full` profile compares: permissions,
# inode, owner, group, size, mtime, link target, file type, ACLs and xattrs,
# plus a content hash. Debian's aide 0.18 has no BLAKE3 (nor BLAKE2); sha256
# is its fastest strong hash here (SHA-NI).
cat >"$work/aide.conf" <<EOF
database_in=file:$work/aide.db
database_out=file:$work/aide.db.new
gzip_dbout=no
report_url=file:$work/aide.report
FIM = p+i+u+g+s+m+l+ftype+acl+xattrs+sha256
$root/data FIM
EOF

# measure NAME COMMAND...: wall seconds and peak RSS (KiB) of the command and
# its children, from GNU time; the command's exit status is kept in $status.
declare -A wall rss
measure() {
    local name="$1"
    shift
    local out="$work/time.$name"
    set +e
    /usr/bin/time -v -o "$out" "$@" >"$work/out.$name" 2>"$work/err.$name"
    status=$?
    set -e
    local elapsed
    elapsed=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$out")
    wall[$name]=$(awk -F: '{ s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; printf "%.2f", s }' <<<"$elapsed")
    rss[$name]=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$out")
    printf '  %-22s %8.2f s  %8d KiB peak RSS  (exit %d)\n' "$name" "${wall[$name]}" "${rss[$name]}" "$status"
}

state="$work/state"
rm -rf "$state" "$work"/aide.db*
echo "== $nfiles files, $((bytes / 1000000)) MB, $(nproc) cores"
echo "== kube-fim-agent (1 thread)"
measure agent-baseline "$bin" baseline --policy "$work/policy.yaml" --root "$root" --state "$state"
cat "$work/out.agent-baseline"
measure agent-check "$bin" check --policy "$work/policy.yaml" --root "$root" --state "$state"
echo "== b3sum over the same files"
measure b3sum-1thread sh -c "find '$root/data' -type f -print0 | xargs -0 b3sum --num-threads 1 >/dev/null"
measure b3sum-parallel sh -c "find '$root/data' -type f -print0 | xargs -0 -P $(nproc) -n 2000 b3sum >/dev/null"
echo "== aide (--workers=1)"
measure aide-init aide --config "$work/aide.conf" --workers=1 --init
mv "$work/aide.db.new" "$work/aide.db"
measure aide-check aide --config "$work/aide.conf" --workers=1 --check

echo "== real-time latency and idle CPU of watch (debounce $debounce, $latency_n writes)"
python3 "$here/measure.py" watch "$bin" "$work/policy.yaml" "$root" "$state" "$latency_n" | tee "$work/watch.txt"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
echo
echo "== summary ($nfiles files, $((bytes / 1000000)) MB)"
printf '%-10s %10s %10s %12s %12s %12s\n' "" "agent s" "b3sum-1t s" "agent/b3sum" "aide s" "aide/agent"
printf '%-10s %10s %10s %12s %12s %12s\n' baseline "${wall[agent-baseline]}" "${wall[b3sum-1thread]}" \
    "$(ratio "${wall[agent-baseline]}" "${wall[b3sum-1thread]}")" "${wall[aide-init]}" \
    "$(ratio "${wall[aide-init]}" "${wall[agent-baseline]}")"
printf '%-10s %10s %10s %12s %12s %12s\n' check "${wall[agent-check]}" "${wall[b3sum-1thread]}" \
    "$(ratio "${wall[agent-check]}" "${wall[b3sum-1thread]}")" "${wall[aide-check]}" \
    "$(ratio "${wall[aide-check]}" "${wall[agent-check]}")"
echo "b3sum parallel (xargs -P $(nproc)): ${wall[b3sum-parallel]} s"
echo "peak RSS MB: agent baseline $(mb "${rss[agent-baseline]}"), check $(mb "${rss[agent-check]}"), b3sum $(mb "${rss[b3sum-1thread]}"), aide init $(mb "${rss[aide-init]}"), check $(mb "${rss[aide-check]}")"
cat "$work/watch.txt"
echo "targets: agent/b3sum <= 1.2, aide/agent >= 5, agent RSS < 40 MB (100k files), p99 < 500 ms, idle CPU ~ 0"
