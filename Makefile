# Every entry point of sidecert. `make help` lists them.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
CARGO ?= cargo
E2E := e2e/scripts

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

.PHONY: tools
tools: ## build the pinned etcd, kube-apiserver, kube-controller-manager, Pebble and helm into e2e/.cache
	e2e/tools/build.sh

.PHONY: build
build: ## build every binary (debug), as the local plane runs them
	$(CARGO) build --workspace --bins

.PHONY: fmt
fmt: ## format the code
	$(CARGO) fmt --all

.PHONY: lint
lint: ## rustfmt check and clippy with warnings denied
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: cluster-up
cluster-up: tools build ## start the local plane (idempotent); writes e2e/.state/kubeconfig and e2e/.state/env
	$(E2E)/cluster-up.sh

.PHONY: cluster-down
cluster-down: ## stop every process of the local plane
	$(E2E)/cluster-down.sh

.PHONY: test
test: lint tools build ## every test: unit, integration and end to end, on a local plane it starts and stops
	$(E2E)/with-plane.sh $(CARGO) test --workspace --no-fail-fast

.PHONY: unit
unit: ## only the tests that need no plane
	$(CARGO) test --workspace --lib --bins

.PHONY: bench
bench: tools build ## benchmarks (not tests): webhook vs nginx over TLS, sidecar vs lego against Pebble
	$(CARGO) bench -p sidecert-webhook
	e2e/bench/webhook.sh
	$(E2E)/with-plane.sh e2e/bench/sidecar.sh

.PHONY: demo
demo: tools build ## the local plane, sidecert, examples/ applied, until the certificate is issued
	$(E2E)/demo.sh

.PHONY: demo-down
demo-down: ## stop the demo and the local plane
	$(E2E)/cluster-down.sh
