#!/usr/bin/env bash
# The demo paid with x402 for real, in the foreground: a fresh anvil chain on
# 127.0.0.1:8545 (no fork), the project's EIP-3009 test token deployed on it, the x402
# facilitator (@x402/core + @x402/evm) on 127.0.0.1:4021, the reference balance service
# settling through it on 127.0.0.1:8081, the echo upstream on 127.0.0.1:8082, and Envoy
# on 127.0.0.1:10000. Stops everything, by PID, when Envoy exits or on Ctrl-C.
# Use `make run-x402`, which builds and installs everything first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bin="${CARGO_TARGET_DIR:-target}/debug"
x402=tests/x402
# The platform's anvil binary itself (.bin/anvil is a Node wrapper whose child a kill
# by PID would leave running).
anvil=$(ls "$x402"/node_modules/@foundry-rs/anvil-*/bin/anvil 2>/dev/null | head -1)
for f in "$bin/farebox-balance" "$bin/farebox-echo" build/farebox.wasm "$anvil"; do
    [[ -e "$f" ]] || { echo "run-x402: $f missing; run \`make run-x402\`" >&2; exit 1; }
done
mkdir -p build

. scripts/demo-procs.sh

"$anvil" --host 127.0.0.1 --port 8545 --chain-id 31337 --silent &
pids+=("$!")
(cd "$x402" && exec node stack.mjs --rpc http://127.0.0.1:8545 --facilitator-port 4021) > build/x402-stack.json &
pids+=("$!")
for _ in $(seq 1 600); do
    [[ -s build/x402-stack.json ]] && break
    sleep 0.2
done
[[ -s build/x402-stack.json ]] || { echo "run-x402: the chain and facilitator did not start" >&2; exit 1; }
field() { python3 -c 'import json,sys; print(json.load(open("build/x402-stack.json"))[sys.argv[1]])' "$1"; }

rm -f build/x402-demo.sqlite*
"$bin/farebox-balance" --listen 127.0.0.1:8081 --db build/x402-demo.sqlite \
    --admin-token demo-admin --seed-demo \
    --x402-pay-to "$(field payee)" --x402-network "$(field network)" \
    --x402-asset "$(field token)" --x402-amount-per-unit 1000 \
    --x402-asset-name "$(field token_name)" --x402-asset-version "$(field token_version)" \
    --x402-facilitator-url "$(field facilitator_url)" --x402-facilitator-timeout-ms 10000 \
    --x402-rpc-url "$(field rpc)" &
pids+=("$!")
"$bin/farebox-echo" --listen 127.0.0.1:8082 &
pids+=("$!")

# The demo's Envoy config, with time for a settlement on chain and its reconciliation
# (a verify, two settles and a chain read of at most 10 s each, and the ledger) and
# anonymous payers.
sed -e 's/"timeout_ms": 500,/"timeout_ms": 45000, "anonymous": true,/' envoy/envoy.yaml > build/envoy-x402.yaml

cat <<MSG
run-x402: chain $(field rpc) (eip155:31337), token $(field token), facilitator $(field facilitator_url)
run-x402: payer $(field payer) holds $(field funded) units; payee $(field payee)
run-x402: Envoy on 127.0.0.1:10000; each request costs 1 unit = 1000 token units. Pay with:
  cd $x402 && X402_ALLOWED_ASSET=eip155:31337,$(field token),10000 \\
    node client.mjs pay http://127.0.0.1:10000/v1/data $(field payer_key)
run-x402: or with the Payment scheme (pympp, its evm method):
  tests/mpp/.venv/bin/python tests/mpp/client.py pay http://127.0.0.1:10000/v1/data \\
    $(field payer_key) $(field token) 31337 "$(field token_name)" $(field token_version) 0.01
run-x402: Ctrl-C stops everything
MSG

"${ENVOY_BIN:-${ENVOY:-.venv/bin/envoy}}" -c build/envoy-x402.yaml --disable-hot-restart &
wait_for_envoy run-x402 "the rest"
