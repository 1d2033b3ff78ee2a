#!/usr/bin/env bash
# Builds the images the local test node runs, without Docker or a registry:
#   localhost/kube-fim/kube-fim-agent:local     (node-agent/Dockerfile's layout)
#   localhost/kube-fim/kube-fim-operator:local  (operator/Dockerfile's layout)
#   localhost/kube-fim/pause:local              (the pod sandbox, e2e/node/pause)
# each as an OCI layout OUT/oci/NAME (umoci) and a docker-archive OUT/NAME.tar
# (skopeo) that `ctr images import` takes.
#
#   images.sh OUT BINDIR     BINDIR holds kube-fim-agent and kube-fim-operator
#
# Same entrypoint, user, exposed port and binary path as the Dockerfiles (the
# real-node tests compare them). The Dockerfiles build static musl binaries on
# distroless/static; here the binaries are the workspace's glibc build (debug
# for `make e2e-node`, release for `make demo`),
# so the image carries the few shared libraries they load (ld.so, libc, libm,
# libgcc_s) plus distroless's /etc/passwd, /etc/group, /tmp and /home/nonroot.
# An image is rebuilt only when its binary changed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$1" bindir="$2"
tag=local
mkdir -p "$out/oci"
for tool in umoci skopeo go; do
  command -v "$tool" >/dev/null || { echo "images.sh: $tool is required (make deps)" >&2; exit 1; }
done

# base_rootfs DIR: the distroless-like skeleton.
base_rootfs() {
  local r="$1"
  mkdir -p "$r/etc" "$r/tmp" "$r/home/nonroot" "$r/root" "$r/usr/local/bin"
  chmod 1777 "$r/tmp"
  chmod 700 "$r/root"
  chown 65532:65532 "$r/home/nonroot"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$r/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$r/etc/group"
}

# copy_libs BINARY ROOTFS: the shared libraries BINARY loads, at the same paths.
copy_libs() {
  local bin="$1" r="$2" lib
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    mkdir -p "$r$(dirname "$lib")"
    cp -L "$lib" "$r$lib"
  done
}

# build NAME DIGEST_INPUT -- UMOCI_CONFIG_ARGS... ; fills the bundle via $fill.
build() {
  local name="$1" stamp_input="$2"; shift 2
  local stamp; stamp="$(printf '%s' "$stamp_input" | sha256sum | cut -c1-16)"
  if [[ -f "$out/$name.tar" && "$(cat "$out/$name.stamp" 2>/dev/null)" == "$stamp" ]]; then
    return 0
  fi
  local layout="$out/oci/$name" bundle="$out/bundle-$name"
  rm -rf "$layout" "$bundle" "$out/$name.tar" "$out/$name.stamp"
  umoci init --layout "$layout"
  umoci new --image "$layout:$tag"
  umoci unpack --image "$layout:$tag" "$bundle" >/dev/null
  "fill_$name" "$bundle/rootfs"
  umoci repack --image "$layout:$tag" "$bundle"
  umoci config --image "$layout:$tag" --author=kube-fim --os=linux --architecture=amd64 \
    --config.env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
  umoci gc --layout "$layout"
  rm -rf "$bundle"
  skopeo copy --quiet "oci:$layout:$tag" "docker-archive:$out/$name.tar:localhost/kube-fim/$name:$tag"
  echo "$stamp" >"$out/$name.stamp"
  echo "images.sh: built localhost/kube-fim/$name:$tag" >&2
}

fill_pause() {
  base_rootfs "$1"
  (cd "$here/pause" && CGO_ENABLED=0 GOFLAGS=-mod=mod \
    GOCACHE="${GOCACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-fim/go-build}" \
    go build -trimpath -ldflags "-s -w" -o "$1/pause" .)
}
# A workload to drift: a static busybox (e2e/deps.sh installs busybox-static)
# and a few image files for a container to change.
fill_busybox() {
  base_rootfs "$1"
  mkdir -p "$1/bin" "$1/usr/bin"
  install -m 0755 /bin/busybox "$1/bin/busybox"
  ln -s busybox "$1/bin/sh"
  printf 'welcome\n' >"$1/etc/motd"
  printf 'multi on\n' >"$1/etc/host.conf"
}
# install_bin NAME ROOTFS: the binary without its debug information (a debug
# build's is most of its size; symbols stay for backtraces).
install_bin() {
  install -d "$2/usr/local/bin"
  strip --strip-debug -o "$2/usr/local/bin/$1" "$bindir/$1"
  chmod 0755 "$2/usr/local/bin/$1"
  copy_libs "$bindir/$1" "$2"
}
fill_kube-fim-agent() {
  base_rootfs "$1"
  install_bin kube-fim-agent "$1"
}
fill_kube-fim-operator() {
  base_rootfs "$1"
  install_bin kube-fim-operator "$1"
}

build pause "$(cat "$here/pause/main.go" "$here/pause/go.mod")" \
  --config.entrypoint=/pause
build busybox "$(sha256sum /bin/busybox; declare -f fill_busybox base_rootfs)" \
  --config.entrypoint=/bin/busybox --config.cmd=sleep --config.cmd=36000
build kube-fim-agent "$(sha256sum "$bindir/kube-fim-agent")" \
  --config.entrypoint=/usr/local/bin/kube-fim-agent --config.exposedports=9101/tcp \
  --config.label=org.opencontainers.image.title=kube-fim-agent
build kube-fim-operator "$(sha256sum "$bindir/kube-fim-operator")" \
  --config.entrypoint=/usr/local/bin/kube-fim-operator --config.exposedports=8080/tcp \
  --config.user=65532:65532 \
  --config.label=org.opencontainers.image.title=kube-fim-operator
