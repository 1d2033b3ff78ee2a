#!/usr/bin/env bash
# Installs what `make test` and `make demo` need and a fresh Debian/Ubuntu machine
# lacks: the Debian packages of the test tiers (Prometheus for the scrape and
# alert tests; containerd, runc, the CNI plugins, iptables, conntrack, umoci,
# skopeo, busybox, bindfs and strip (binutils) for the real node; rsyslog and its TLS driver as
# the export tests' syslog receiver; rpm and rpmbuild to make the rpm databases of
# the package-verification tests), and clippy/rustfmt. Checks that the
# toolchains it cannot install (Go, cargo, kubectl) are there.
# Installing packages needs root; without it the script says what to install.
set -euo pipefail

# command:package. A package is installed when its command is missing.
wanted=(
  curl:curl openssl:openssl python3:python3 make:make
  prometheus:prometheus promtool:prometheus
  containerd:containerd ctr:containerd runc:runc
  /usr/lib/cni/bridge:containernetworking-plugins
  iptables:iptables ip6tables:iptables conntrack:conntrack ip:iproute2
  umoci:umoci skopeo:skopeo /bin/busybox:busybox-static bindfs:bindfs
  rsyslogd:rsyslog /usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so:rsyslog-gnutls
  rpm:rpm rpmbuild:rpm md5sum:coreutils strip:binutils
)
missing=()
for entry in "${wanted[@]}"; do
  cmd="${entry%%:*}"
  if [[ "$cmd" == /* ]]; then [[ -x "$cmd" ]] && continue; else command -v "$cmd" >/dev/null && continue; fi
  missing+=("${entry#*:}")
done
if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  if [[ "$(id -u)" != 0 ]]; then
    echo "deps: missing Debian packages: ${missing[*]}" >&2
    echo "deps: run as root (or: sudo apt-get install ${missing[*]}) and try again" >&2
    exit 1
  fi
  echo "deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  # --no-install-recommends: containerd must not pull in docker's daemon, and the
  # node's containerd is started by the test, never as a system service.
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >&2
  # Debian starts the packaged containerd; the tests run their own instance.
  if command -v systemctl >/dev/null && systemctl is-active -q containerd 2>/dev/null; then
    systemctl disable --now containerd >/dev/null 2>&1 || true
  fi
fi
command -v go >/dev/null || { echo "deps: the Go toolchain (1.24 or newer) is required to build the control plane" >&2; exit 1; }
command -v cargo >/dev/null || { echo "deps: cargo is required" >&2; exit 1; }
command -v kubectl >/dev/null || { echo "deps: kubectl is required" >&2; exit 1; }
if ! rustup component list --installed 2>/dev/null | grep -q '^clippy' \
  || ! rustup component list --installed 2>/dev/null | grep -q '^rustfmt'; then
  rustup component add clippy rustfmt >&2
fi
