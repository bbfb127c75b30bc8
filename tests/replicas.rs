//! The balance service replicated, end to end: two `farebox-balance` replicas share one
//! PostgreSQL ledger behind the `balance` cluster of `envoy/envoy-replicas.yaml`
//! (round-robin, retries on the other replica, outlier detection), with two Envoys in
//! front, each with the real filter.
//!
//! - 2,000 requests over 64 connections on a 500-unit account, in authorize and in lease
//!   mode: exactly 500 served, and the ledger exact;
//! - one replica SIGKILLed mid-load: the other keeps serving, every served request is
//!   charged exactly once (the request ids the upstream saw are the ledger's charges);
//! - PostgreSQL restarted mid-load (a private server of the test's own, never the shared
//!   one): closed mode answers 503 while it is down, nothing is charged twice, and the
//!   replicas recover by themselves;
//! - an unreachable database or a bad URL at start: a clear error without the password and
//!   a non-zero exit within seconds.
//!
//! Each test uses a database of its own (`fb_<random>`, dropped afterwards, also on
//! failure). Without a PostgreSQL server (`$FAREBOX_TEST_DATABASE_URL`, else
//! 127.0.0.1:5432) the PostgreSQL tests are skipped with one line; with
//! `FAREBOX_REQUIRE_POSTGRES=1` (as in CI) they fail instead.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::postgres::{PrivateServer, Server, TestDatabase};
use common::*;
use serde_json::{json, Value};

const ACCOUNT: &str = "acct-replicas";
const KEY: &str = "fbk-replicas-5eed";
/// How long the ledger may take to settle after a load (undo refunds are retried with
/// backoff for about a minute; lease settles every settle_interval_ms).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);

fn ledger(db: &TestDatabase) -> BalanceOpts {
    BalanceOpts {
        database_url: Some(db.url.clone()),
        extra_args: vec!["--quiet".into(), "--lease-ttl-ms".into(), "5000".into()],
        ..BalanceOpts::default()
    }
}

/// envoy/envoy-replicas.yaml's timeouts, each three times longer: the per-try timeout
/// (0.6 s), the route's budget (1.9 s) and the filter's (2 s) are sized for a release
/// build; here debug builds of the service share two cores with 64 connections, two
/// Envoys and PostgreSQL (and, on a developer's machine, whatever else runs), and calls on
/// the one hot account row queue past 0.6 s now and then. The money properties checked
/// here do not depend on the timeouts; tests/envoy_configs.rs runs the file as it is.
const SLOW_MACHINE_TIMEOUTS: &[(&str, &str)] = &[
    ("per_try_timeout: 0.6s", "per_try_timeout: 1.8s"),
    ("timeout: 1.9s", "timeout: 5.7s"),
];

fn start_stack(label: &str, db: &TestDatabase, mode: &str) -> ReplicaStack {
    ReplicaStack::start(
        label,
        &ledger(db),
        &plugin(mode),
        2,
        1,
        SLOW_MACHINE_TIMEOUTS,
    )
}

/// The plugin config of envoy/envoy-replicas.yaml, in `mode`.
fn plugin(mode: &str) -> Value {
    let mut c = envoy_plugin_config("envoy-replicas.yaml");
    c["timeout_ms"] = json!(6000);
    if mode == "lease" {
        c["mode"] = json!("lease");
        c["lease_want"] = json!(100);
        c["settle_interval_ms"] = json!(200);
    }
    c
}

fn num(v: &Value, field: &str) -> i64 {
    v[field]
        .as_i64()
        .unwrap_or_else(|| panic!("no integer {field} in {v}"))
}

/// initial + topups = balance + reserved + charged: no unit made or lost.
fn assert_ledger_balances(acct: &Value) {
    assert_eq!(
        num(acct, "initial_balance") + num(acct, "topups"),
        num(acct, "balance") + num(acct, "reserved") + num(acct, "charged"),
        "the ledger does not balance: {acct}"
    );
}

fn statuses(answers: &[Timed]) -> BTreeMap<u16, usize> {
    let mut out = BTreeMap::new();
    for a in answers {
        *out.entry(a.response.status).or_insert(0) += 1;
    }
    out
}

/// The request id the upstream saw for a served request (Envoy's x-request-id, which the
/// filter charges under).
fn served_request_id(resp: &Response) -> String {
    let ids = echoed_header_values(resp, "x-request-id");
    assert_eq!(ids.len(), 1, "one x-request-id upstream: {}", resp.dump());
    ids[0].clone()
}

/// Every request the upstream served is charged exactly once, and nothing else is:
/// the request ids of the 200s are exactly the ledger's charged request ids, each once.
/// Waits (bounded) for the filter's undo refunds of failed calls to land first.
fn assert_served_equals_charged(stack: &ReplicaStack, answers: &[Timed]) -> Value {
    let served: Vec<String> = answers
        .iter()
        .filter(|a| a.response.status == 200)
        .map(|a| served_request_id(&a.response))
        .collect();
    let served_set: BTreeSet<String> = served.iter().cloned().collect();
    assert_eq!(served_set.len(), served.len(), "a request id served twice");

    let mut charged: Vec<String> = Vec::new();
    let mut all_rows = 0;
    let settled = wait_until(SETTLE_TIMEOUT, || {
        let rows = stack.admin().charges(ACCOUNT);
        all_rows = rows.len();
        charged = rows
            .iter()
            .filter(|c| c["status"] == "charged")
            .map(|c| c["request_id"].as_str().unwrap_or_default().to_string())
            .collect();
        charged.len() == served.len()
    });
    let charged_set: BTreeSet<String> = charged.iter().cloned().collect();
    assert_eq!(
        charged_set.len(),
        charged.len(),
        "a request id is charged twice"
    );
    assert!(
        settled,
        "{} requests served but {} charged ({all_rows} charge rows) after {SETTLE_TIMEOUT:?}",
        served.len(),
        charged.len()
    );
    assert_eq!(
        served_set, charged_set,
        "the served request ids are exactly the charged ones"
    );
    let acct = stack.admin().account(ACCOUNT);
    assert_ledger_balances(&acct);
    assert_eq!(num(&acct, "charged"), served.len() as i64, "{acct}");
    acct
}

/// The retry/outlier side of each Envoy's balance clusters (non-zero counters), for
/// failure messages and the log: why a call failed (retry overflow, per-try timeouts,
/// ejections).
fn balance_cluster_stats(stack: &ReplicaStack) -> String {
    let mut out = String::new();
    for (i, e) in stack.envoys.iter().enumerate() {
        let picked: Vec<String> = e
            .stats()
            .into_iter()
            .filter(|(n, v)| {
                *v > 0
                    && n.starts_with("cluster.balance_replicas.")
                    && [
                        "retry",
                        "timeout",
                        "eject",
                        "connect_fail",
                        "overflow",
                        "rq_5",
                        "pending_failure",
                        "health_check.failure",
                    ]
                    .iter()
                    .any(|k| n.contains(k))
            })
            .map(|(n, v)| format!("{}={v}", &n["cluster.balance_replicas.".len()..]))
            .collect();
        out.push_str(&format!("\n  envoy {i}: {}", picked.join(" ")));
    }
    out
}

/// The load tests run one at a time: each already puts 64 connections, two Envoys and two
/// replicas on the machine's two cores, and a second one at the same time only measures
/// the machine (calls queue on the hot account row past the per-try timeout). Taken
/// before anything is started; a failed test does not poison it for the others.
static ONE_LOAD_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_load_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_LOAD_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn shared_database() -> Option<TestDatabase> {
    Server::shared().map(|s| s.create_database())
}

// ---------------------------------------------------------------------------------------
// Exact money over two replicas and two gateways
// ---------------------------------------------------------------------------------------

fn exactly_the_funded_units(mode: &str) {
    let _one = one_load_at_a_time();
    let Some(db) = shared_database() else { return };
    let stack = start_stack(&format!("replicas-{mode}"), &db, mode);
    stack.admin().create_account(ACCOUNT, KEY, 500);

    let t0 = Instant::now();
    let answers = LoadRun::start(
        &stack.addrs(),
        2000,
        64,
        "GET",
        "/v1/data",
        &[("x-api-key", KEY)],
    )
    .join();
    let took = t0.elapsed();
    let counts = statuses(&answers);
    let others: Vec<String> = answers
        .iter()
        .filter(|a| a.response.status != 200 && a.response.status != 402)
        .map(|a| a.response.dump())
        .take(3)
        .collect();
    assert!(
        others.is_empty(),
        "{mode}: unexpected answers {counts:?}: {others:?}{}",
        balance_cluster_stats(&stack)
    );
    assert_eq!(
        (counts.get(&200).copied(), counts.get(&402).copied()),
        (Some(500), Some(1500)),
        "{mode}: exactly the funded units are served"
    );

    let calls = stack.authorize_calls();
    let stats: Vec<Value> = stack.replicas.iter().map(BalanceService::stats).collect();
    let acct = if mode == "lease" {
        let mut acct = Value::Null;
        let ok = wait_until(SETTLE_TIMEOUT, || {
            acct = stack.admin().account(ACCOUNT);
            num(&acct, "reserved") == 0
        });
        assert!(ok, "lease: every lease settles: {acct}");
        let lease_calls: Vec<u64> = stats
            .iter()
            .map(|s| s["lease_calls"].as_u64().unwrap())
            .collect();
        assert!(
            lease_calls.iter().all(|&c| c > 0),
            "both replicas granted leases: {lease_calls:?}"
        );
        eprintln!("lease mode: lease calls per replica {lease_calls:?}");
        acct
    } else {
        assert!(
            calls.iter().all(|&c| c > 0),
            "both replicas answered authorizes: {calls:?}"
        );
        assert_served_equals_charged(&stack, &answers)
    };
    assert_ledger_balances(&acct);
    assert_eq!(
        (num(&acct, "balance"), num(&acct, "charged")),
        (0, 500),
        "{mode}: {acct}"
    );
    eprintln!(
        "{mode}: 2000 requests over 64 connections and 2 Envoys in {took:?}: {counts:?}; \
         authorize calls per replica {calls:?}; ledger {acct}"
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn authorize_mode_serves_exactly_the_funded_units_over_two_replicas() {
    exactly_the_funded_units("authorize");
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn lease_mode_serves_exactly_the_funded_units_over_two_replicas() {
    exactly_the_funded_units("lease");
}

// ---------------------------------------------------------------------------------------
// A replica killed mid-load
// ---------------------------------------------------------------------------------------

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn a_replica_killed_mid_load_loses_and_doubles_no_charge() {
    let _one = one_load_at_a_time();
    let Some(db) = shared_database() else { return };
    let mut stack = start_stack("replicas-kill", &db, "authorize");
    stack.admin().create_account(ACCOUNT, KEY, 1_000_000);

    let run = LoadRun::start(
        &stack.addrs(),
        2000,
        64,
        "GET",
        "/v1/data",
        &[("x-api-key", KEY)],
    );
    assert!(
        wait_until(Duration::from_secs(60), || run.completed() >= 500),
        "the load did not get going: {} answers",
        run.completed()
    );
    let a_before = stack.replicas[0].authorize_calls();
    stack.replicas[1].stop(); // SIGKILL
    let killed_at = Instant::now();
    let answers = run.join();
    let counts = statuses(&answers);
    let after_kill = answers
        .iter()
        .filter(|a| a.sent >= killed_at && a.response.status == 200)
        .count();
    let a_after = stack.replicas[0].authorize_calls();
    let unexpected: Vec<String> = answers
        .iter()
        .filter(|a| a.response.status != 200 && a.response.status != 503)
        .map(|a| a.response.dump())
        .take(3)
        .collect();
    let refused = counts.get(&503).copied().unwrap_or(0);
    eprintln!(
        "replica killed mid-load: {counts:?}; {after_kill} served after the kill; replica A \
         answered {} authorizes after it",
        a_after - a_before
    );
    assert!(
        unexpected.is_empty(),
        "unexpected answers ({counts:?}): {unexpected:?}"
    );
    // Envoy retries the calls the dead replica dropped on the other one (a retry of a call
    // that did commit is answered as a replay), so clients hardly see the kill: a 503 is
    // only a call whose retries were all refused (the retry budget) or failed. Each of
    // those was undone, which assert_served_equals_charged checks.
    assert!(
        refused <= 100,
        "at most 5% of the requests may fail while a replica dies: {counts:?}{}",
        balance_cluster_stats(&stack)
    );
    assert!(
        after_kill >= 100,
        "the surviving replica keeps serving: {after_kill} served after the kill"
    );
    assert!(
        a_after > a_before,
        "replica A answered the calls after the kill"
    );
    let acct = assert_served_equals_charged(&stack, &answers);
    assert_eq!(num(&acct, "balance"), 1_000_000 - num(&acct, "charged"));
}

// ---------------------------------------------------------------------------------------
// PostgreSQL restarted mid-load
// ---------------------------------------------------------------------------------------

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn postgres_restarted_mid_load_fails_closed_and_recovers() {
    let _one = one_load_at_a_time();
    // A private server: the shared one is never restarted (other tests use it).
    let Some(mut pg) = PrivateServer::start("restart") else {
        return;
    };
    let db = pg.server().create_database();
    let stack = start_stack("replicas-pg-restart", &db, "authorize");
    stack.admin().create_account(ACCOUNT, KEY, 1_000_000);
    let pids: Vec<Option<u32>> = stack.replicas.iter().map(BalanceService::pid).collect();

    let run = LoadRun::start(
        &stack.addrs(),
        20_000,
        32,
        "GET",
        "/v1/data",
        &[("x-api-key", KEY)],
    );
    let start = Instant::now();
    assert!(
        wait_until(Duration::from_secs(60), || run.count_since(200, start)
            >= 300),
        "the load did not get going"
    );

    pg.stop_now();
    let down_at = Instant::now();
    // Closed mode: the filter answers 503 while the ledger is unreachable.
    let saw_503 = wait_until(Duration::from_secs(30), || {
        run.count_since(503, down_at) >= 300
    });
    let up_requested_at = Instant::now();
    let down_for = up_requested_at - down_at;
    pg.start_again();
    let up_at = Instant::now();
    assert!(saw_503, "no 503s while PostgreSQL was down");

    // The replicas reconnect by themselves: requests are served again.
    let recovered = wait_until(Duration::from_secs(30), || {
        run.count_since(200, up_at) >= 300
    });
    run.stop();
    let answers = run.join();
    assert!(
        recovered,
        "the replicas did not recover after PostgreSQL came back"
    );
    let recovery = answers
        .iter()
        .filter(|a| a.response.status == 200 && a.sent >= up_at)
        .map(|a| a.answered - up_at)
        .min()
        .expect("a request sent after the restart was served");
    let counts = statuses(&answers);
    let served_while_down = answers
        .iter()
        .filter(|a| a.response.status == 200 && a.sent >= down_at && a.answered <= up_requested_at)
        .count();
    let refused_while_down = answers
        .iter()
        .filter(|a| a.response.status == 503 && a.answered >= down_at && a.answered <= up_at)
        .count();
    eprintln!(
        "PostgreSQL restarted mid-load: {counts:?}; down for {down_for:?}, 503s while down \
         {refused_while_down}, first request served {recovery:?} after PostgreSQL was back"
    );
    let unexpected: Vec<String> = answers
        .iter()
        .filter(|a| a.response.status != 200 && a.response.status != 503)
        .map(|a| a.response.dump())
        .take(3)
        .collect();
    assert!(
        unexpected.is_empty(),
        "answers other than 200/503: {unexpected:?}"
    );
    assert_eq!(
        served_while_down, 0,
        "a request sent while the ledger was down was served"
    );
    for a in answers.iter().filter(|a| a.response.status == 503).take(20) {
        let body = a.response.json();
        assert_eq!(body["status"], json!(503), "a problem document: {body}");
    }
    assert_served_equals_charged(&stack, &answers);
    // Without a restart of their own.
    let now: Vec<Option<u32>> = stack.replicas.iter().map(BalanceService::pid).collect();
    assert_eq!(pids, now, "the replicas were not restarted");
}

// ---------------------------------------------------------------------------------------
// Start-up failures
// ---------------------------------------------------------------------------------------

const PASSWORD: &str = "s3cret-Pa55word";
/// The longest a refused start may take (connect timeout of a few seconds, and a slow
/// machine).
const START_FAILURE_DEADLINE: Duration = Duration::from_secs(20);

/// Runs `farebox-balance ARGS…` expecting it to refuse to start: returns what it printed
/// and how long it took; fails if it is still running after the deadline or exits 0.
fn refused_start(label: &str, args: &[&str]) -> (String, Duration) {
    let dir = TempDir::new(label);
    let mut cmd = Command::new(service_bin("farebox-balance"));
    cmd.args(args)
        .env_remove("FAREBOX_BALANCE_DATABASE_URL")
        .env_remove("FAREBOX_BALANCE_DB");
    let t0 = Instant::now();
    let mut proc = Proc::spawn("farebox-balance", cmd, &dir.join("balance.log"));
    let status = proc.wait_timeout(START_FAILURE_DEADLINE);
    let took = t0.elapsed();
    let log = proc.log();
    let status = status.unwrap_or_else(|| {
        panic!("{label}: still running after {START_FAILURE_DEADLINE:?} (a hang); log:\n{log}")
    });
    assert!(!status.success(), "{label}: exited 0; log:\n{log}");
    assert!(
        !log.contains(PASSWORD),
        "{label}: the password is in the output:\n{log}"
    );
    eprintln!(
        "{label}: {status} after {took:?}: {}",
        log.lines().next().unwrap_or_default()
    );
    (log, took)
}

/// A loopback listener that accepts connections and never says a word (a database that
/// hangs); closed with the guard.
struct SilentListener {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SilentListener {
    fn start() -> SilentListener {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(true);
                        let mut buf = [0u8; 1024];
                        let _ = conn.read(&mut buf);
                        held.push(conn);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        SilentListener { addr, stop }
    }
}

impl Drop for SilentListener {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn an_unreachable_database_at_start_is_a_clear_error_not_a_hang() {
    // Nothing listens there.
    let closed = closed_port_addr();
    let url = format!(
        "postgres://farebox:{PASSWORD}@127.0.0.1:{}/farebox",
        closed.port()
    );
    for (label, args) in [
        (
            "serve",
            vec!["--listen", "127.0.0.1:0", "--database-url", &url],
        ),
        ("migrate", vec!["migrate", "--database-url", &url]),
    ] {
        let (log, _) = refused_start(&format!("unreachable-{label}"), &args);
        assert!(
            log.contains(&closed.port().to_string()),
            "{label}: the error names the address that failed:\n{log}"
        );
    }

    // Something listens there but never answers: a connect timeout, not a hang.
    let silent = SilentListener::start();
    let url = format!(
        "postgres://farebox:{PASSWORD}@127.0.0.1:{}/farebox",
        silent.addr.port()
    );
    let (log, took) = refused_start(
        "silent-database",
        &["--listen", "127.0.0.1:0", "--database-url", &url],
    );
    assert!(
        log.contains(&silent.addr.port().to_string()),
        "the error names the address that failed:\n{log}"
    );
    eprintln!("a database that never answers: refused after {took:?}");
}

#[test]
fn a_bad_database_url_at_start_is_a_clear_error() {
    let bad_port = format!("postgres://farebox:{PASSWORD}@127.0.0.1:notaport/farebox");
    let unknown_scheme = format!("mysql://farebox:{PASSWORD}@127.0.0.1:3306/farebox");
    for (label, url) in [
        ("bad-port", bad_port.as_str()),
        ("unknown-scheme", unknown_scheme.as_str()),
        ("empty", ""),
    ] {
        let (log, took) = refused_start(
            &format!("bad-url-{label}"),
            &["--listen", "127.0.0.1:0", "--database-url", url],
        );
        let first = log.lines().next().unwrap_or_default().to_ascii_lowercase();
        assert!(
            first.contains("database-url") || first.contains("url"),
            "{label}: the first line names the flag or the URL:\n{log}"
        );
        assert!(
            took < Duration::from_secs(5),
            "{label}: a bad URL is refused at once, took {took:?}"
        );
    }
}
