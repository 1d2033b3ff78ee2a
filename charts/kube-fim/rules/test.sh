#!/usr/bin/env bash
# Checks the alert rules and runs their unit tests with promtool. promtool comes
# with Debian's `prometheus` package, installed here when missing (as root, as
# in CI; .ci/run installs it too). The e2e suite runs the same checks
# (e2e/tests/alerts.rs, e2e/tests/chart.rs).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if ! command -v promtool >/dev/null; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "rules/test.sh: installing Debian's prometheus package for promtool" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq prometheus >&2
  else
    echo "rules/test.sh: promtool is missing: apt-get install prometheus (as root)" >&2
    exit 1
  fi
fi
promtool check rules "$here/kube-fim-alerts.yaml"
cd "$here/tests"
promtool test rules ./*.yaml
