#!/usr/bin/env bash
# The agent's modules in layers: a module may use the modules below it, never
# one above it. Fails (exit 1) listing every import against the layers.
#
# Usage: node-agent/layers.sh   (from anywhere; bash, grep, sed and awk only)
#
# An arrow is any `crate::<module>` path outside a comment, in a `use` or
# inline; the arrows within one module do not count. `main.rs` is the top:
# it reaches the library as `kube_fim_agent::`, and nothing imports it.
set -euo pipefail

src="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/src"

# Bottom to top. Modules on one line are one layer (they may use each other).
LAYERS=(
	"sys"
	"paths"
	"budget"
	"telemetry"
	"hostfs"
	"mounts"
	"packages"
	"plan"
	"baseline"
	"engine"
	"attribution"
	"served"
	"containers"
	# The context holds the delivery queue; the reporting tasks take the context.
	"context report"
	"monitor"
	"cluster"
)

# Upward arrows known today, "from -> to" by top-level module. Each is a
# change to make, not a layering: delete its line once the code is fixed.
EXCEPTIONS=(
)

declare -A rank
for i in "${!LAYERS[@]}"; do
	for m in ${LAYERS[$i]}; do
		rank[$m]=$i
	done
done
declare -A allowed
for e in "${EXCEPTIONS[@]}"; do
	allowed[$e]=1
done

status=0
declare -A used
while IFS=$'\t' read -r file line from to; do
	[[ $from == "$to" || $from == lib || $from == main ]] && continue
	# The mocked API server of the in-process tests: test code only.
	[[ $to == fixtures || $from == fixtures ]] && continue
	if [[ -z ${rank[$from]+x} ]]; then
		echo "layers.sh: module '$from' ($file) is in no layer: add it to LAYERS" >&2
		status=1
		continue
	fi
	if [[ -z ${rank[$to]+x} ]]; then
		echo "layers.sh: $file:$line uses crate::$to, which is in no layer" >&2
		status=1
		continue
	fi
	if ((rank[$to] > rank[$from])); then
		if [[ -n ${allowed["$from -> $to"]+x} ]]; then
			used["$from -> $to"]=1
		else
			echo "$file:$line: $from uses $to, a higher layer" >&2
			status=1
		fi
	fi
done < <(
	cd "$src"
	# file, line, importing module, imported module: one arrow per line.
	grep -rnE --include='*.rs' 'crate::' . |
		awk -F: '{
			file = substr($1, 3); line = $2
			text = $0; sub(/^[^:]*:[^:]*:/, "", text)
			if (text ~ /^[ \t]*\/\//) next
			from = file; sub(/\/.*/, "", from); sub(/\.rs$/, "", from)
			# crate::{a, b::c} names several modules at once.
			while (match(text, /crate::\{[^}]*\}/)) {
				group = substr(text, RSTART + 8, RLENGTH - 9)
				n = split(group, parts, ",")
				for (i = 1; i <= n; i++) {
					to = parts[i]; gsub(/^[ \t]+/, "", to); sub(/[^a-z_].*/, "", to)
					if (to != "") print file "\t" line "\t" from "\t" to
				}
				text = substr(text, RSTART + RLENGTH)
			}
			while (match(text, /crate::[a-z_]+/)) {
				to = substr(text, RSTART + 7, RLENGTH - 7)
				print file "\t" line "\t" from "\t" to
				text = substr(text, RSTART + RLENGTH)
			}
		}'
)

for e in "${EXCEPTIONS[@]}"; do
	[[ -n ${used[$e]+x} ]] || echo "layers.sh: the exception '$e' is no longer needed: delete it" >&2
done
if ((status == 0)); then
	echo "layers.sh: no import against the layers (${#EXCEPTIONS[@]} known exceptions)"
fi
exit "$status"
