# kube-fim — the two commands are `make demo` and `make test`; see README.md.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
CONTROLPLANE := e2e/controlplane/controlplane.sh
# Where `make e2e` keeps its throw-away control plane (etcd data, certificates, logs).
E2E_DIR ?= $(CURDIR)/target/e2e-controlplane
DEMO_DIR ?= $(CURDIR)/target/demo
# Where `make scale` keeps its throw-away control plane.
SCALE_DIR ?= $(CURDIR)/target/scale-controlplane
# Where `make e2e-node` keeps its control plane and node (certificates, containerd, kubelet).
NODE_DIR ?= $(CURDIR)/target/e2e-node

.PHONY: help
help: ## Show the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

.PHONY: demo
demo: deps controlplane helm build release ## Run kube-fim end to end: the chart on a local real node (or local processes)
	@e2e/demo.sh "$(DEMO_DIR)"

.PHONY: release
release: ## Release build of the agent and the operator (the binaries of the local images)
	$(CARGO) build --release -p kube-fim-agent -p kube-fim-operator --bins

.PHONY: build
build: ## Build every binary (debug)
	$(CARGO) build --workspace --bins

.PHONY: lint
lint: fmt-check clippy layers ## fmt-check, clippy and the agent's module layers

.PHONY: test
test: deps fmt-check clippy layers deny unit e2e e2e-node ## Everything CI runs: fmt, clippy, cargo deny, unit, integration and real-node tests

.PHONY: deps
deps: ## Install the Debian packages and Rust components the tests need (root; says what is missing otherwise)
	@e2e/deps.sh

.PHONY: fmt-check
fmt-check: ## cargo fmt --check
	$(CARGO) fmt --all -- --check

.PHONY: fmt
fmt: ## Format the code
	$(CARGO) fmt --all

.PHONY: clippy
clippy: ## cargo clippy, warnings are errors
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p kube-fim-e2e --test scale --test node -- -D warnings

.PHONY: deny
deny: ## cargo deny: licences, banned and duplicate crates, sources (crates.io only); installs the pinned cargo-deny
	"$$(e2e/deny/install.sh)" deny --locked check licenses bans sources

.PHONY: advisories
advisories: ## cargo deny's RustSec advisory check: not in `make test`, the advisory database is a git repository this machine cannot fetch
	@echo "advisories: the RustSec advisory database is fetched from a git host; this machine reaches package registries only, so 'make test' cannot run it. Run this target where that host is reachable." >&2
	"$$(e2e/deny/install.sh)" deny --locked check advisories

.PHONY: layers
layers: ## Fail when a module of the agent imports one of a higher layer
	node-agent/layers.sh

.PHONY: unit
unit: ## Unit tests and single-node tests (no control plane needed)
	$(CARGO) test --workspace --exclude kube-fim-e2e

.PHONY: e2e
e2e: controlplane helm ## Integration tests against a fresh local control plane
	$(CARGO) build --workspace --bins
	$(CARGO) test -p kube-fim-e2e --no-run
	rm -rf "$(E2E_DIR)"
	$(CONTROLPLANE) run "$(E2E_DIR)" -- $(CARGO) test -p kube-fim-e2e

# The real-node tier's images hold the debug binaries `make e2e` built (debug
# information stripped): the same code as a release, without a second
# profile of every dependency to compile (~9 min cold on 2 cores). `make demo`
# and `make bench` use the release build. NODE_BINDIR=... to test others.
NODE_BINDIR ?= $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/debug

.PHONY: e2e-node
e2e-node: deps controlplane helm build ## Real-node tests: the chart's images as pods under a real kubelet (root)
	$(CARGO) test -p kube-fim-e2e --test node --test node_drift --no-run
	rm -rf "$(NODE_DIR)"
	# Container drift with its writers runs on the same node and install, after the rest.
	KUBE_FIM_NODE_BINDIR="$(NODE_BINDIR)" e2e/node/node.sh run "$(NODE_DIR)" -- sh -c '$(CARGO) test -p kube-fim-e2e --test node -- --skip upgrade_from_the_previous_chart && $(CARGO) test -p kube-fim-e2e --test node_drift'
	# The upgrade scenario installs the previous chart: it needs a node of its own.
	rm -rf "$(NODE_DIR)"
	KUBE_FIM_NODE_BINDIR="$(NODE_BINDIR)" e2e/node/node.sh run "$(NODE_DIR)" -- $(CARGO) test -p kube-fim-e2e --test node upgrade_from_the_previous_chart

.PHONY: crds
crds: ## Regenerate the CRD YAML in crds/ from the Rust types
	$(CARGO) run -q -p kube-fim-crds --bin crdgen

.PHONY: crds-check
crds-check: ## Fail if the committed CRD YAML is stale
	$(CARGO) test -q -p kube-fim-crds --lib committed_crd_yaml

.PHONY: controlplane
controlplane: ## Build (or find in the cache) the pinned etcd + kube-apiserver + kube-controller-manager
	@e2e/controlplane/build.sh >/dev/null

.PHONY: up
up: controlplane ## Start a local control plane in the background (KUBECONFIG=target/dev/kubeconfig)
	$(CONTROLPLANE) start "$(CURDIR)/target/dev"

.PHONY: down
down: ## Stop the background control plane
	$(CONTROLPLANE) stop "$(CURDIR)/target/dev"

.PHONY: bench
bench: ## Speed and memory of the agent against b3sum and AIDE
	node-agent/bench/bench.sh

.PHONY: bench-fingerprints
bench-fingerprints: ## What SHA-256 beside BLAKE3 costs per changed file and per scan (BENCH_TREE, default /usr/bin)
	$(CARGO) run --release --manifest-path node-agent/bench/fingerprints/Cargo.toml

.PHONY: scale
scale: controlplane ## SCALE_NODES (100) simulated nodes with real agents on one API server: apply→Ready, a change storm, API server and operator load
	$(CARGO) build --workspace --bins
	$(CARGO) test -p kube-fim-e2e --test scale --no-run
	rm -rf "$(SCALE_DIR)"
	$(CONTROLPLANE) run "$(SCALE_DIR)" -- $(CARGO) test -p kube-fim-e2e --test scale

.PHONY: helm
helm: ## Build (or find in the cache) the pinned Helm the chart tests use
	@e2e/helm/build.sh >/dev/null

.PHONY: manifests
manifests: helm ## Sync the chart's CRDs from crds/ and regenerate manifests/ from the chart
	charts/render-manifests.sh

.PHONY: alerts
alerts: ## promtool check and unit tests of the alert rules (installs promtool if missing)
	charts/kube-fim/rules/test.sh
