# Sourced by the demo scripts (run-demo.sh, run-x402-demo.sh): the processes a demo starts
# are kept in `pids` and stopped by PID when the script exits, on Ctrl-C or on SIGTERM; the
# demo's Envoy runs in the background and the script waits for it, so that a signal is
# handled at once.

pids=()
cleanup() {
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for_envoy NAME WHAT: Envoy was just started with `&`; wait for it, then exit with its
# status (the EXIT trap stops the rest).
wait_for_envoy() {
    local envoy_pid=$! status=0
    pids=("$envoy_pid" "${pids[@]}")
    wait "$envoy_pid" || status=$?
    echo "$1: Envoy exited (status $status); stopping $2"
    exit "$status"
}
