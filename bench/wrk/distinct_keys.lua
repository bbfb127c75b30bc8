-- wrk script of the cache memory test: every request carries a new x-api-key value
-- (BENCH_KEY_PREFIX .. n), so each one is a distinct, unknown credential. After
-- BENCH_KEYS answers it prints "BENCH_KEYS_DONE" and stops sending; bench/run.py then
-- interrupts wrk (SIGINT), which prints its summary. Run it with one wrk thread.
local prefix = os.getenv("BENCH_KEY_PREFIX") or "bench-unknown-"
local limit = tonumber(os.getenv("BENCH_KEYS") or "100000")
local sent = 0
local answered = 0
local announced = false

request = function()
  sent = sent + 1
  -- Past the limit (only the requests still in flight), reuse the first keys.
  local n = ((sent - 1) % limit) + 1
  return wrk.format(nil, nil, { ["x-api-key"] = prefix .. n })
end

response = function(status, headers, body)
  answered = answered + 1
  if answered >= limit and not announced then
    announced = true
    io.write("BENCH_KEYS_DONE\n")
    io.flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  io.write(string.format('BENCH_RESULT {"requests": %d, "duration_us": %d, "status_errors": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout))
end
