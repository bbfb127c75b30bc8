//! PostgreSQL for the end-to-end tests: the shared server (a database of each test's own,
//! created and dropped), and a private server a test may stop and start (never the
//! machine's shared one, which other tests use at the same time).
//!
//! Where the shared server is: `$FAREBOX_TEST_DATABASE_URL`, else
//! `postgres://postgres@127.0.0.1:5432/test` (trust authentication, as on the project's
//! machines and CI). When none answers, a PostgreSQL test is skipped with one line on the
//! terminal; with `FAREBOX_REQUIRE_POSTGRES=1` (`.ci/run` sets it) it fails instead.

use std::fs;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use super::{closed_port_addr, tail, TempDir};

pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// How long a connection attempt of the harness may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a missing PostgreSQL must fail the test instead of skipping it.
pub fn required() -> bool {
    std::env::var("FAREBOX_REQUIRE_POSTGRES").is_ok_and(|v| v == "1" || v == "true")
}

/// The shared server's URL: `$FAREBOX_TEST_DATABASE_URL` or [`DEFAULT_URL`].
pub fn server_url() -> String {
    std::env::var("FAREBOX_TEST_DATABASE_URL")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_URL.to_string())
}

/// `url` with its password (if any) replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (userinfo, host) = match rest.rsplit_once('@') {
        Some((u, h)) => (u, h),
        None => return url.to_string(),
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// `url` with its database name replaced by `db` (query string kept).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

fn connect(url: &str) -> Result<postgres::Client, String> {
    let mut config: postgres::Config = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    config.connect_timeout(CONNECT_TIMEOUT);
    config.connect(postgres::NoTls).map_err(|e| format!("{e}"))
}

/// Says, once per test binary and on the terminal itself (libtest hides what a passing
/// test prints), that the PostgreSQL tests were skipped and how to run them.
fn say_skipped(why: &str) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let exe = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        // Cargo names a test binary `<file>-<hash>`.
        let exe = match exe.rsplit_once('-') {
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => {
                format!("tests/{name}.rs")
            }
            _ => exe,
        };
        let line = format!(
            "SKIPPED the PostgreSQL tests of {exe}: {why}; start a server at {DEFAULT_URL} \
             (or set FAREBOX_TEST_DATABASE_URL) to run them; FAREBOX_REQUIRE_POSTGRES=1 makes \
             this a failure\n"
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
    });
}

/// Skips (returns None, after one line on the terminal) or, when PostgreSQL is required,
/// fails the test.
fn unavailable<T>(why: &str) -> Option<T> {
    assert!(
        !required(),
        "FAREBOX_REQUIRE_POSTGRES=1 but {why}; start PostgreSQL or set FAREBOX_TEST_DATABASE_URL"
    );
    say_skipped(why);
    None
}

/// A PostgreSQL server that answers, as the superuser-ish URL the harness creates
/// databases with.
#[derive(Clone, Debug)]
pub struct Server {
    pub url: String,
}

impl Server {
    /// The shared server, or None when there is none (see the module docs).
    pub fn shared() -> Option<Server> {
        let url = server_url();
        match connect(&url) {
            Ok(_) => Some(Server { url }),
            Err(e) => unavailable(&format!("no PostgreSQL answers at {} ({e})", redact(&url))),
        }
    }

    /// A new, empty database `fb_<random>` of this server, dropped with the guard.
    pub fn create_database(&self) -> TestDatabase {
        let name = format!("fb_{}", random_suffix());
        let mut client = connect(&self.url).unwrap_or_else(|e| {
            panic!(
                "[harness] connecting to {} to create a database: {e}",
                redact(&self.url)
            )
        });
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("[harness] CREATE DATABASE {name}: {e}"));
        TestDatabase {
            url: with_database(&self.url, &name),
            admin_url: self.url.clone(),
            name,
        }
    }
}

fn random_suffix() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:016x}", h.finish())
}

/// A database of one test. Dropped (`WITH (FORCE)`: the services' pools may still hold
/// connections) when the guard goes, also when the test fails.
pub struct TestDatabase {
    pub name: String,
    /// The URL the services connect with.
    pub url: String,
    admin_url: String,
}

impl TestDatabase {
    /// A connection to this database, for the test's own checks.
    pub fn client(&self) -> postgres::Client {
        connect(&self.url)
            .unwrap_or_else(|e| panic!("[harness] connecting to {}: {e}", redact(&self.url)))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        match connect(&self.admin_url) {
            Ok(mut c) => {
                if let Err(e) = c.batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                )) {
                    eprintln!("[harness] could not drop database {}: {e}", self.name);
                }
            }
            Err(e) => eprintln!(
                "[harness] could not drop database {} (connecting: {e})",
                self.name
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// A private server
// ---------------------------------------------------------------------------------------

/// The directory with `initdb` and `pg_ctl`: `$FAREBOX_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian's layout), else the directory of `pg_ctl`
/// on PATH.
fn pg_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FAREBOX_PG_BIN").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|p| p.join("pg_ctl").is_file() && p.join("initdb").is_file())
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A PostgreSQL server of the test's own, on a free loopback port, its data in a
/// temporary directory: stopped (immediately) and removed with the guard, also when the
/// test fails. As root (PostgreSQL refuses to run as root) it runs as the `postgres` OS
/// user.
pub struct PrivateServer {
    bin: PathBuf,
    as_postgres: bool,
    /// Owned by the server's OS user: data/, the log, the socket.
    run_dir: PathBuf,
    pub port: u16,
    /// Admin URL (user postgres, trust authentication).
    pub url: String,
    running: bool,
    // Last: removed after the server is stopped.
    _dir: TempDir,
}

impl PrivateServer {
    /// Starts one, or None (skipped) when the PostgreSQL server programs are not installed.
    pub fn start(label: &str) -> Option<PrivateServer> {
        let Some(bin) = pg_bin_dir() else {
            return unavailable(
                "the PostgreSQL server programs (initdb, pg_ctl) are not installed \
                 (set FAREBOX_PG_BIN to their directory)",
            );
        };
        let dir = TempDir::new(&format!("pg-{label}"));
        let run_dir = dir.join("pg");
        fs::create_dir_all(&run_dir).expect("create the private PostgreSQL directory");
        let as_postgres = is_root();
        if as_postgres {
            run_checked(
                Command::new("chown").arg("postgres:postgres").arg(&run_dir),
                "chown the private PostgreSQL directory to postgres",
            );
        }
        let port = closed_port_addr().port();
        let mut server = PrivateServer {
            bin,
            as_postgres,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            port,
            run_dir,
            running: false,
            _dir: dir,
        };
        let data = server.data_dir();
        let mut initdb = server.command("initdb");
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run_checked(&mut initdb, "initdb of the private PostgreSQL");
        server.start_again();
        Some(server)
    }

    fn data_dir(&self) -> PathBuf {
        self.run_dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.run_dir.join("postgres.log")
    }

    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.stdin(Stdio::null()).env("LC_ALL", "C");
        cmd
    }

    /// Starts the server (again) on its port, and waits until it accepts connections.
    pub fn start_again(&mut self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=100",
            self.port,
            self.run_dir.display()
        );
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "60", "-o", &opts, "start"]);
        run_checked(&mut cmd, "pg_ctl start of the private PostgreSQL");
        self.running = true;
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = connect(&self.url) {
            assert!(
                Instant::now() < deadline,
                "[harness] the private PostgreSQL does not accept connections: {e}\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server at once (`-m immediate`: like a crash; it recovers from its WAL
    /// at the next start).
    pub fn stop_now(&mut self) {
        if !self.running {
            return;
        }
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", "60", "-m", "immediate", "stop"]);
        run_checked(&mut cmd, "pg_ctl stop of the private PostgreSQL");
        self.running = false;
    }

    /// This server as a [`Server`], to create test databases in.
    pub fn server(&self) -> Server {
        Server {
            url: self.url.clone(),
        }
    }

    pub fn log_tail(&self) -> String {
        let text = fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        tail(&text, 30)
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "[harness] ---- last lines of the private PostgreSQL log ----\n{}",
                self.log_tail()
            );
        }
        if self.running {
            let mut cmd = self.command("pg_ctl");
            cmd.arg("-D")
                .arg(self.data_dir())
                .args(["-w", "-t", "30", "-m", "immediate", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if !cmd.status().is_ok_and(|s| s.success()) {
                eprintln!(
                    "[harness] could not stop the private PostgreSQL in {}",
                    self.data_dir().display()
                );
            }
        }
        // The data directory goes even when the test failed (its log tail is printed
        // above); the rest of the temporary directory follows TempDir's rule.
        let _ = fs::remove_dir_all(&self.run_dir);
    }
}

fn run_checked(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("[harness] {what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "[harness] {what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
