//! Test harness: starts the real binaries on 127.0.0.1:0 and talks to them
//! with a tiny blocking HTTP/1.1 client.
#![allow(dead_code)]

use serde_json::Value;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub const ADMIN: &str = "test-admin-token";

/// The backend the service tests run against: SQLite (default) or, with
/// `FAREBOX_TEST_BACKEND=postgres`, PostgreSQL at `FAREBOX_TEST_DATABASE_URL`
/// (default `postgres://postgres@127.0.0.1:5432/test`), one fresh database
/// per test. (`make test-postgres` runs the suite that way.)
pub fn postgres_base() -> Option<String> {
    match std::env::var("FAREBOX_TEST_BACKEND").as_deref() {
        Ok("postgres") => Some(
            std::env::var("FAREBOX_TEST_DATABASE_URL")
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned()),
        ),
        Ok("sqlite") | Ok("") | Err(_) => None,
        Ok(other) => panic!("FAREBOX_TEST_BACKEND={other:?}: expected sqlite or postgres"),
    }
}

/// `base` with its database name replaced by `db`.
pub fn with_database(base: &str, db: &str) -> String {
    let (scheme, rest) = base.split_once("://").expect("a postgres:// URL");
    let (authority, query) = match rest.split_once('/') {
        Some((a, tail)) => (a, tail.split_once('?').map(|(_, q)| q)),
        None => (
            rest.split('?').next().unwrap_or(rest),
            rest.split_once('?').map(|(_, q)| q),
        ),
    };
    match query {
        Some(q) => format!("{scheme}://{authority}/{db}?{q}"),
        None => format!("{scheme}://{authority}/{db}"),
    }
}

/// A PostgreSQL database created for one test and dropped on drop (also
/// when the test fails).
pub struct PgDatabase {
    base: String,
    pub name: String,
    pub url: String,
}

impl PgDatabase {
    pub fn create(base: &str, tag: &str) -> PgDatabase {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(12)
            .collect();
        let name = format!(
            "fb_{tag}_{}_{}_{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
        .to_ascii_lowercase();
        let mut c = postgres::Client::connect(base, postgres::NoTls).unwrap_or_else(|e| {
            panic!("PostgreSQL at {base} (FAREBOX_TEST_DATABASE_URL) does not answer: {e}")
        });
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("CREATE DATABASE");
        PgDatabase {
            url: with_database(base, &name),
            base: base.to_owned(),
            name,
        }
    }

    /// Every row of every table as text (to check what is stored).
    pub fn dump(&self) -> String {
        let mut c = postgres::Client::connect(&self.url, postgres::NoTls).expect("connect");
        let mut out = String::new();
        for table in ["accounts", "keys", "charges", "topups", "leases", "usages"] {
            for row in c
                .query(&format!("SELECT t::text FROM {table} t"), &[])
                .expect("dump")
            {
                out.push_str(row.get::<_, &str>(0));
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.base, postgres::NoTls) {
            let _ = c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// A temporary directory removed on drop; under the PostgreSQL backend it
/// also owns the test's database.
pub struct TempDir(pub PathBuf, pub Option<PgDatabase>);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "farebox-balance-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let pg = postgres_base().map(|base| PgDatabase::create(&base, tag));
        TempDir(dir, pg)
    }

    /// The `--database-url` of this test's ledger.
    pub fn database_url(&self) -> String {
        match &self.1 {
            Some(pg) => pg.url.clone(),
            None => format!("sqlite:{}", self.path("ledger.sqlite").display()),
        }
    }

    /// Everything the ledger stored, as bytes (the SQLite files, or a text
    /// dump of the PostgreSQL tables).
    pub fn stored_bytes(&self) -> Vec<u8> {
        match &self.1 {
            Some(pg) => pg.dump().into_bytes(),
            None => {
                let mut bytes = Vec::new();
                for name in ["ledger.sqlite", "ledger.sqlite-wal"] {
                    bytes.extend(std::fs::read(self.path(name)).unwrap_or_default());
                }
                bytes
            }
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running child process; killed (SIGKILL) and reaped on drop, so it dies
/// even when a test fails.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `bin` with `args`, stderr to `log`, and waits for the
    /// `<name> listening on ADDR` line on stdout.
    pub fn spawn(bin: &str, name: &str, args: &[&str], log: &Path) -> Proc {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(File::create(log).expect("create log")));
        // Keep the environment fallbacks of the developer's shell out of tests.
        for (k, _) in std::env::vars() {
            if k.starts_with("FAREBOX_BALANCE_") || k.starts_with("FAREBOX_ECHO_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd.spawn().expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let prefix = format!("{name} listening on ");
        let Some(addr) = line.trim_end().strip_prefix(&prefix) else {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{name} did not start: stdout {line:?}, stderr:\n{log}");
        };
        let addr: SocketAddr = addr.parse().expect("address in the listening line");
        assert!(addr.ip().is_loopback());
        assert_ne!(addr.port(), 0);
        Proc {
            child,
            addr,
            log: log.to_owned(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit; returns whether it exited 0.
    pub fn terminate(mut self) -> bool {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(sent, "kill -TERM failed");
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        false // Drop kills it.
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A farebox-balance child with its own temporary database.
pub struct Balance {
    pub proc: Proc,
    pub dir: TempDir,
}

impl Balance {
    pub fn start(extra: &[&str]) -> Balance {
        let dir = TempDir::new("bal");
        let proc = Self::start_on(&dir, extra);
        Balance { proc, dir }
    }

    /// Starts a service on the database in `dir` (reused across restarts).
    pub fn start_on(dir: &TempDir, extra: &[&str]) -> Proc {
        let url = dir.database_url();
        let mut args = vec!["--listen", "127.0.0.1:0", "--database-url", &url];
        args.extend_from_slice(extra);
        Proc::spawn(
            env!("CARGO_BIN_EXE_farebox-balance"),
            "farebox-balance",
            &args,
            &dir.path("stderr.log"),
        )
    }

    pub fn addr(&self) -> SocketAddr {
        self.proc.addr
    }
}

/// The workspace's one HTTP client (testkit); `Resp` is its answer.
#[allow(unused_imports)]
pub use testkit::http::{Conn, Response as Resp};
#[allow(unused_imports)]
pub use testkit::wait_until;

/// One request on a fresh connection (`connection: close`).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
    testkit::http::http(
        addr,
        method,
        path,
        headers,
        body.unwrap_or_default().as_bytes(),
    )
}

pub fn post_json(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &Value) -> Resp {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    request(addr, "POST", path, &h, Some(&body.to_string()))
}

// ------------------------------------------------------------ contract helpers

pub fn authorize(addr: SocketAddr, key: &str, cost: u64, request_id: &str) -> Resp {
    post_json(
        addr,
        "/v1/authorize",
        &[("x-request-id", request_id)],
        &serde_json::json!({
            "account": key,
            "cost": cost,
            "route": "test-route",
            "method": "GET",
            "path": "/things?x=1",
            "request_id": request_id,
        }),
    )
}

pub fn refund(addr: SocketAddr, key: &str, cost: u64, request_id: &str, status: u16) -> Resp {
    post_json(
        addr,
        "/v1/refund",
        &[("x-request-id", request_id)],
        &serde_json::json!({
            "request_id": request_id,
            "account": key,
            "cost": cost,
            "status": status,
        }),
    )
}

pub fn lease(addr: SocketAddr, key: &str, want: u64, min: u64, request_id: &str) -> Resp {
    lease_as(addr, key, want, min, request_id, "envoy-test-1")
}

/// A lease call from `holder` (one Envoy process of a fleet).
pub fn lease_as(
    addr: SocketAddr,
    key: &str,
    want: u64,
    min: u64,
    request_id: &str,
    holder: &str,
) -> Resp {
    post_json(
        addr,
        "/v1/leases",
        &[("x-request-id", request_id)],
        &serde_json::json!({
            "account": key,
            "want": want,
            "min": min,
            "request_id": request_id,
            "holder": holder,
        }),
    )
}

/// A granted lease's id (asserts the 200).
pub fn lease_id(addr: SocketAddr, key: &str, want: u64, min: u64, request_id: &str) -> String {
    let r = lease(addr, key, want, min, request_id);
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["lease_id"].as_str().expect("lease_id").to_owned()
}

pub fn settle(addr: SocketAddr, lease_id: &str, used: u64, is_final: bool) -> Resp {
    post_json(
        addr,
        &format!("/v1/leases/{lease_id}/settle"),
        &[],
        &serde_json::json!({"used": used, "final": is_final}),
    )
}

/// A settle numbered `seq`.
pub fn settle_seq(addr: SocketAddr, lease_id: &str, used: u64, is_final: bool, seq: u64) -> Resp {
    post_json(
        addr,
        &format!("/v1/leases/{lease_id}/settle"),
        &[],
        &serde_json::json!({"used": used, "final": is_final, "seq": seq}),
    )
}

/// `POST /v1/leases/{lease_id}/refund`.
pub fn lease_refund(
    addr: SocketAddr,
    lease_id: &str,
    request_id: &str,
    units: u64,
    status: u16,
) -> Resp {
    post_json(
        addr,
        &format!("/v1/leases/{lease_id}/refund"),
        &[("x-request-id", request_id)],
        &serde_json::json!({"request_id": request_id, "units": units, "status": status}),
    )
}

pub fn cancel(addr: SocketAddr, request_id: &str) -> Resp {
    post_json(
        addr,
        "/v1/leases/cancel",
        &[("x-request-id", request_id)],
        &serde_json::json!({"request_id": request_id}),
    )
}

/// Checks `initial_balance + topups = balance + reserved + charged` and that
/// the totals agree exactly with the charge and lease lists (read until no
/// lease changed state around the account read). Returns the account.
pub fn check_ledger(addr: SocketAddr, id: &str) -> Value {
    let list = |what: &str| -> Vec<Value> {
        let r = admin_get(addr, &format!("/admin/accounts/{id}/{what}"));
        assert_eq!(r.status, 200, "{r:?}");
        r.json().as_array().expect("a list").clone()
    };
    let (acct, charges, leases) = (0..20)
        .find_map(|_| {
            let before = list("leases");
            let acct = account(addr, id);
            let charges = list("charges");
            let after = list("leases");
            (before == after).then_some((acct, charges, after))
        })
        .expect("lease list never stable");
    let int = |k: &str| acct[k].as_i64().unwrap_or_else(|| panic!("{k}: {acct}"));
    assert!(int("balance") >= 0, "{acct}");
    assert_eq!(
        int("initial_balance") + int("topups"),
        int("balance") + int("reserved") + int("charged"),
        "{acct}"
    );
    let sum = |rows: &[Value], key: &str, filter: &dyn Fn(&Value) -> bool| -> i64 {
        rows.iter()
            .filter(|r| filter(r))
            .map(|r| r[key].as_i64().expect("integer"))
            .sum()
    };
    let charged =
        sum(&charges, "cost", &|c| c["status"] == "charged") + sum(&leases, "charged", &|_| true);
    assert_eq!(charged, int("charged"), "{acct}");
    assert_eq!(
        sum(&charges, "cost", &|c| c["status"] == "refunded") + sum(&leases, "refunded", &|_| true),
        int("refunded"),
        "{acct}"
    );
    assert_eq!(
        sum(&leases, "granted", &|l| l["state"] == "open"),
        int("reserved"),
        "{acct}"
    );
    assert_eq!(leases.len() as i64, int("leases"));
    for l in &leases {
        let (g, u, c, rf, pending) = (
            l["granted"].as_i64().expect("granted"),
            l["used"].as_i64().expect("used"),
            l["charged"].as_i64().expect("charged"),
            l["refunded"].as_i64().expect("refunded"),
            l["refund_pending"].as_i64().expect("refund_pending"),
        );
        assert!(0 <= u && u <= g && 0 <= c && 0 <= rf && c + rf <= g, "{l}");
        assert!(0 <= pending && pending <= g, "{l}");
        let state = l["state"].as_str().expect("state");
        if state != "open" {
            assert_eq!(pending, 0, "{l}");
        }
        match state {
            "open" | "cancelled" => assert_eq!((c, rf), (0, 0), "{l}"),
            // Lease refunds come out of the reported use.
            "settled" => assert_eq!(c + rf, u, "{l}"),
            "expired" => {}
            other => panic!("unexpected state {other}: {l}"),
        }
    }
    acct
}

/// A service with the admin API and the demo accounts, plus `extra` flags.
pub fn seeded(extra: &[&str]) -> Balance {
    let mut args = vec!["--admin-token", ADMIN, "--seed-demo"];
    args.extend_from_slice(extra);
    Balance::start(&args)
}

/// A xorshift64 generator: deterministic pseudo-random numbers for load tests.
pub fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

pub fn admin_auth() -> String {
    format!("Bearer {ADMIN}")
}

pub fn admin_get(addr: SocketAddr, path: &str) -> Resp {
    let auth = admin_auth();
    request(addr, "GET", path, &[("authorization", &auth)], None)
}

pub fn admin_post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    let auth = admin_auth();
    post_json(addr, path, &[("authorization", &auth)], body)
}

pub fn create_account(addr: SocketAddr, id: &str, key: &str, balance: i64) -> Resp {
    admin_post(
        addr,
        "/admin/accounts",
        &serde_json::json!({"account_id": id, "key": key, "balance": balance, "disabled": false}),
    )
}

pub fn account(addr: SocketAddr, id: &str) -> Value {
    let r = admin_get(addr, &format!("/admin/accounts/{id}"));
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}
