#!/usr/bin/env bash
# Runs the farebox demo in the foreground: the reference balance service on 127.0.0.1:8081,
# the echo upstream on 127.0.0.1:8082, and Envoy (listener 127.0.0.1:10000, admin
# 127.0.0.1:9901) with envoy/envoy.yaml. Stops the services when Envoy exits or on Ctrl-C.
# Use `make run`, which builds everything first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bin="${CARGO_TARGET_DIR:-target}/debug"
for b in farebox-balance farebox-echo; do
    [[ -x "$bin/$b" ]] || { echo "run-demo: $bin/$b missing; run \`make run\`" >&2; exit 1; }
done
[[ -f build/farebox.wasm ]] || { echo "run-demo: build/farebox.wasm missing; run \`make run\`" >&2; exit 1; }
mkdir -p build

. scripts/demo-procs.sh

"$bin/farebox-balance" --listen 127.0.0.1:8081 --db build/demo.sqlite \
    --admin-token demo-admin --seed-demo &
pids+=("$!")
"$bin/farebox-echo" --listen 127.0.0.1:8082 &
pids+=("$!")

echo "run-demo: balance service (admin token demo-admin) on 127.0.0.1:8081, echo on 127.0.0.1:8082"
echo "run-demo: Envoy on 127.0.0.1:10000 (admin 127.0.0.1:9901); Ctrl-C stops everything"

# Envoy runs in the background and the script waits for it, so that Ctrl-C or a SIGTERM
# to this script is handled at once (scripts/demo-procs.sh stops Envoy and the services).
if [[ -z "${ENVOY:-}" ]] && command -v func-e >/dev/null 2>&1; then
    func-e run -c envoy/envoy.yaml --disable-hot-restart &
else
    "${ENVOY_BIN:-${ENVOY:-.venv/bin/envoy}}" -c envoy/envoy.yaml --disable-hot-restart &
fi
wait_for_envoy run-demo "the services"
