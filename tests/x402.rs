//! x402 paid for real, on this machine: a fresh anvil chain (npm `@foundry-rs/anvil`),
//! the project's EIP-3009 test token (tests/x402/TestToken.sol, compiled with npm
//! `solc`), the x402 facilitator of `@x402/core` + `@x402/evm` on that chain, and the
//! official client (`@x402/fetch`) paying through Envoy, farebox and the reference
//! service. All of it is installed by `make x402-clients` into tests/x402/node_modules.
//! The Payment scheme (MPP) is paid on the same chain by its official client, pympp
//! with its `evm` method, installed by `make mpp-clients` into tests/mpp/.venv.
//! Each process is stopped by its PID when the test ends, also on failure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const PRICE_UNITS: u64 = 1;
const AMOUNT_PER_UNIT: u64 = 1000;
const KEYED_ACCOUNT: &str = "acct-x402-keyed";
const KEYED_KEY: &str = "fbk-x402-keyed-5eed";

/// tests/x402, if `make x402-clients` installed it and its anvil runs here.
fn x402_dir(test: &str) -> Option<PathBuf> {
    let dir = repo_root().join("tests/x402");
    let anvil = anvil_binary(&dir);
    let installed = ["@x402/fetch", "@x402/core", "@x402/evm", "solc", "viem"]
        .iter()
        .all(|p| {
            dir.join("node_modules")
                .join(p)
                .join("package.json")
                .exists()
        });
    let runs = Command::new(&anvil)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed || !runs {
        cannot_run(
            test,
            "tests/x402/node_modules (anvil, solc, @x402/*) is missing or anvil does not run (run `make x402-clients`)",
        );
        return None;
    }
    Some(dir)
}

/// The anvil binary itself, from the package for this platform: `.bin/anvil` is a Node
/// wrapper that starts it as a child, which a kill by PID of the wrapper would leave running.
fn anvil_binary(dir: &Path) -> PathBuf {
    let scope = dir.join("node_modules/@foundry-rs");
    std::fs::read_dir(&scope)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin/anvil"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| scope.join("anvil-PLATFORM/bin/anvil"))
}

/// Runs `node client.mjs ARGS`; its stdout is one JSON object. `allowed` is the
/// client's spend control (`NETWORK,TOKEN,MAX`): the only token it pays in.
fn client(dir: &Path, allowed: &str, args: &[&str]) -> Value {
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("client.mjs"))
        .args(args)
        .env("X402_ALLOWED_ASSET", allowed)
        .current_dir(dir);
    json_line(&format!("x402 client {args:?}"), &mut cmd)
}

/// Runs a client whose stdout is one JSON object.
fn json_line(what: &str, cmd: &mut Command) -> Value {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("start the {what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "{what}: not JSON: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// tests/mpp/.venv's Python, if `make mpp-clients` installed pympp (with its `evm` method).
fn mpp_python(test: &str) -> Option<PathBuf> {
    let py = repo_root().join("tests/mpp/.venv/bin/python");
    let imports = Command::new(&py)
        .args(["-c", "import mpp.methods.evm.client, eth_account"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !imports {
        cannot_run(
            test,
            "tests/mpp/.venv (pympp with its evm method) is missing (run `make mpp-clients`)",
        );
        return None;
    }
    Some(py)
}

/// Runs `python tests/mpp/client.py CMD URL KEY <the chain's token> ARGS`; one JSON line.
fn mpp_client(py: &Path, chain: &Chain, cmd: &str, url: &str, key: &str, extra: &[&str]) -> Value {
    let mut run = Command::new(py);
    run.arg(repo_root().join("tests/mpp/client.py"))
        .args([cmd, url, key])
        .args([
            chain.s("token"),
            chain.info["chain_id"].to_string(),
            chain.s("token_name"),
            chain.s("token_version"),
            "0.01".to_string(),
        ])
        .args(extra);
    json_line(&format!("pympp client {cmd}"), &mut run)
}

/// The reference service's flags for the chain's token, payee and facilitator.
fn x402_flags(chain: &Chain) -> Vec<String> {
    [
        "--x402-pay-to".to_string(),
        chain.s("payee"),
        "--x402-network".into(),
        chain.s("network"),
        "--x402-asset".into(),
        chain.s("token"),
        "--x402-amount-per-unit".into(),
        AMOUNT_PER_UNIT.to_string(),
        "--x402-asset-name".into(),
        chain.s("token_name"),
        "--x402-asset-version".into(),
        chain.s("token_version"),
        "--x402-facilitator-url".into(),
        chain.s("facilitator_url"),
    ]
    .to_vec()
}

/// The filter's config: anonymous callers are offered payments on /v1/data. Its
/// timeout covers the payment's verification and settlement (settled before the
/// request is served), reconciliation included.
fn paid_plugin() -> Value {
    let mut plugin = demo_plugin_config();
    plugin["anonymous"] = json!(true);
    plugin["timeout_ms"] = json!(30000);
    plugin["routes"] = json!([{"name": "data", "prefix": "/v1/data", "cost": PRICE_UNITS}]);
    assert_eq!(plugin["failure_mode"], "closed");
    plugin
}

struct Chain {
    _anvil: Proc,
    stack: Proc,
    info: Value,
    dir: PathBuf,
}

impl Chain {
    fn start(dir: &Path, tmp: &Path, extra: &[&str]) -> Chain {
        let rpc_addr = closed_port_addr();
        let mut cmd = Command::new(anvil_binary(dir));
        cmd.args(["--host", "127.0.0.1", "--port"])
            .arg(rpc_addr.port().to_string())
            .args(["--chain-id", "31337", "--silent"]);
        let anvil = Proc::spawn("anvil", cmd, &tmp.join("anvil.log"));
        assert!(
            wait_until(Duration::from_secs(30), || TcpStream::connect(rpc_addr)
                .is_ok()),
            "anvil did not listen on {rpc_addr}: {}",
            anvil.log_tail(20)
        );
        let mut cmd = Command::new("node");
        cmd.arg(dir.join("stack.mjs"))
            .args(["--rpc", &format!("http://{rpc_addr}")])
            .args(extra)
            .current_dir(dir);
        let stack = Proc::spawn("x402 stack", cmd, &tmp.join("stack.log"));
        let mut info = Value::Null;
        let ready = wait_until(Duration::from_secs(180), || {
            info = stack
                .log()
                .lines()
                .find(|l| l.starts_with('{'))
                .and_then(|l| serde_json::from_str(l).ok())
                .unwrap_or(Value::Null);
            !info.is_null()
        });
        assert!(
            ready,
            "the x402 stack did not start: {}",
            stack.log_tail(30)
        );
        Chain {
            _anvil: anvil,
            stack,
            info,
            dir: dir.to_path_buf(),
        }
    }

    fn s(&self, k: &str) -> String {
        self.info[k]
            .as_str()
            .unwrap_or_else(|| panic!("{k} in {}", self.info))
            .to_string()
    }

    /// Token balances (atomic units) of the payer, the payee and the poor payer.
    fn balances(&self) -> [u128; 3] {
        let (payer, payee, poor) = (self.s("payer"), self.s("payee"), self.s("poor"));
        let b = client(
            &self.dir,
            "",
            &[
                "balance",
                &self.s("rpc"),
                &self.s("token"),
                &payer,
                &payee,
                &poor,
            ],
        );
        [payer, payee, poor].map(|a| b[&a].as_str().unwrap().parse().unwrap())
    }

    /// The facilitator's next /settle settles, then answers after `--late-settle-ms`.
    fn late_settle_once(&self) {
        self.signal("-USR2", "the next settle answers late");
    }

    fn stop_facilitator(&self) {
        self.signal("-USR1", "facilitator is stopped");
    }

    /// Signals the stack, and waits for the log line that says it acted.
    fn signal(&self, signal: &str, acted: &str) {
        let pid = self.stack.pid().expect("the stack runs").to_string();
        let ok = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(ok.success());
        assert!(
            wait_until(Duration::from_secs(10), || self.stack.log().contains(acted)),
            "{}",
            self.stack.log_tail(10)
        );
    }
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn x402_paid_on_a_local_chain() {
    let test = "x402_paid_on_a_local_chain";
    let Some(dir) = x402_dir(test) else { return };
    let tmp = TempDir::new("x402-chain");
    // The facilitator's late answer (10 s) outlasts the service's bound of a call (5 s).
    let chain = Chain::start(&dir, tmp.path(), &["--late-settle-ms", "10000"]);
    let mut x402 = x402_flags(&chain);
    x402.extend([
        "--x402-facilitator-timeout-ms".to_string(),
        "5000".into(),
        "--x402-rpc-url".into(),
        chain.s("rpc"),
    ]);
    let s = stack("x402-chain")
        .plugin(|p| *p = paid_plugin())
        .balance_opts(BalanceOpts {
            extra_args: x402,
            ..Default::default()
        })
        .start();
    let url = format!("http://{}/v1/data", s.envoy.addr);
    let price = u128::from(PRICE_UNITS * AMOUNT_PER_UNIT);
    // Ten prices at most per payment: the client refuses anything dearer.
    let allowed = format!("{},{},{}", chain.s("network"), chain.s("token"), price * 10);
    let payer_account = format!("x402:{}", chain.s("payer").to_ascii_lowercase());

    let before = chain.balances();
    eprintln!("[x402] balances before (payer, payee, poor): {before:?}");

    // 402 with the offer -> the client pays on its retry -> 200 with PAYMENT-RESPONSE.
    let r = client(&dir, &allowed, &["pay", &url, &chain.s("payer_key")]);
    eprintln!("[x402] paid: {r}");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["paid"], 1, "{r}");
    let settled = &r["payment_response"];
    assert_eq!(settled["success"], true, "{r}");
    assert_eq!(settled["network"], "eip155:31337", "{r}");
    assert!(
        settled["transaction"].as_str().unwrap().starts_with("0x"),
        "{r}"
    );
    let after = chain.balances();
    eprintln!("[x402] balances after one paid request: {after:?}");
    assert_eq!(before[0] - after[0], price, "the payer paid the price");
    assert_eq!(after[1] - before[1], price, "the payee got the price");
    let acct = s.balance().account(&payer_account);
    assert_eq!(
        (num(&acct, "charged"), num(&acct, "balance")),
        (1, 0),
        "{acct}"
    );

    // A replayed payment: paid once, refused the second time.
    let r = client(&dir, &allowed, &["replay", &url, &chain.s("payer_key")]);
    eprintln!("[x402] replay: {r}");
    assert_eq!(r["first"]["status"], 200, "{r}");
    assert_eq!(r["again"]["status"], 402, "{r}");
    let required = &r["again"]["payment_required"];
    assert!(
        required["error"].as_str().unwrap().contains("already paid"),
        "{r}"
    );
    let replayed = chain.balances();
    assert_eq!(
        after[0] - replayed[0],
        price,
        "one price for the replayed payment"
    );
    assert_eq!(replayed[1] - after[1], price);

    // A payer without tokens: a 402 with the facilitator's reason, nothing moves.
    let r = client(&dir, &allowed, &["pay", &url, &chain.s("poor_key")]);
    eprintln!("[x402] poor payer: {r}");
    assert_eq!(r["status"], 402, "{r}");
    let why = r["payment_required"]["error"].as_str().unwrap().to_string();
    assert!(
        why.contains("invalid_exact_evm"),
        "the facilitator's reason: {why}"
    );
    assert_eq!(chain.balances(), replayed);

    // A keyed client with an empty account pays and is served.
    s.balance().create_account(KEYED_ACCOUNT, KEYED_KEY, 0);
    let key_header = format!("x-api-key: {KEYED_KEY}");
    let r = client(
        &dir,
        &allowed,
        &["pay", &url, &chain.s("payer_key"), &key_header],
    );
    eprintln!("[x402] keyed: {r}");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["paid"], 1, "{r}");
    let keyed = chain.balances();
    assert_eq!(replayed[0] - keyed[0], price);
    assert_eq!(keyed[1] - replayed[1], price);
    let acct = s.balance().account(KEYED_ACCOUNT);
    assert_eq!(
        (num(&acct, "charged"), num(&acct, "balance")),
        (1, 0),
        "{acct}"
    );

    // A settle that times out (the facilitator settled, but answers too late): the
    // outcome is unknown, so the service settles again (the token refuses the used
    // nonce) and asks the chain, which says the authorization is used: the request
    // is served and paid once.
    chain.late_settle_once();
    let r = client(&dir, &allowed, &["pay", &url, &chain.s("payer_key")]);
    eprintln!("[x402] late settle: {r}");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["paid"], 1, "{r}");
    assert_eq!(r["payment_response"]["success"], true, "{r}");
    let late = chain.balances();
    eprintln!("[x402] balances after the late settle: {late:?}");
    assert_eq!(keyed[0] - late[0], price, "paid once, not twice");
    assert_eq!(late[1] - keyed[1], price);
    let acct = s.balance().account(&payer_account);
    assert_eq!(num(&acct, "charged"), 3, "{acct}");
    assert!(
        s.balance().log().contains("reconciled"),
        "{}",
        s.balance().log()
    );

    // The facilitator down: closed mode answers 503; nothing charged, nothing served.
    chain.stop_facilitator();
    let r = client(&dir, &allowed, &["pay", &url, &chain.s("payer_key")]);
    eprintln!("[x402] facilitator down: {r}");
    assert_eq!(r["status"], 503, "{r}");
    assert_eq!(chain.balances(), late);
    let acct = s.balance().account(&payer_account);
    assert_eq!(num(&acct, "charged"), 3, "{acct}");
    eprintln!("[x402] balances at the end: {late:?}");
}

/// The Payment scheme paid for real on the same kind of chain: pympp's auto-paying
/// client reads the `WWW-Authenticate: Payment` challenge (method `evm`, intent
/// `charge`), signs the EIP-3009 authorization it asks for, and retries with
/// `Authorization: Payment`; the service checks it against its challenge and
/// settles it through the facilitator; the client gets a 200 with `Payment-Receipt`.
#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn mpp_paid_on_a_local_chain() {
    let test = "mpp_paid_on_a_local_chain";
    let Some(dir) = x402_dir(test) else { return };
    let Some(py) = mpp_python(test) else { return };
    let tmp = TempDir::new("mpp-chain");
    let chain = Chain::start(&dir, tmp.path(), &[]);
    let s = stack("mpp-chain")
        .plugin(|p| *p = paid_plugin())
        .balance_opts(BalanceOpts {
            extra_args: x402_flags(&chain),
            ..Default::default()
        })
        .start();
    let url = format!("http://{}/v1/data", s.envoy.addr);
    let price = u128::from(PRICE_UNITS * AMOUNT_PER_UNIT);
    let payer_account = format!("x402:{}", chain.s("payer").to_ascii_lowercase());
    let key = chain.s("payer_key");
    let before = chain.balances();
    eprintln!("[mpp] balances before (payer, payee, poor): {before:?}");

    // 402 with the challenge -> pympp pays on its retry -> 200 with Payment-Receipt.
    let r = mpp_client(&py, &chain, "pay", &url, &key, &[]);
    eprintln!("[mpp] paid: {r}");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["paid"], 1, "{r}");
    let receipt = &r["receipt"];
    assert_eq!(receipt["status"], "success", "{r}");
    assert_eq!(receipt["method"], "evm", "{r}");
    let tx = receipt["reference"].as_str().unwrap();
    assert!(
        tx.starts_with("0x") && tx.len() == 66,
        "a transaction hash: {r}"
    );
    assert!(
        r["cache_control"].as_str().unwrap().contains("private"),
        "{r}"
    );
    let after = chain.balances();
    eprintln!("[mpp] balances after one paid request: {after:?}");
    assert_eq!(before[0] - after[0], price, "the payer paid the price");
    assert_eq!(after[1] - before[1], price, "the payee got the price");
    let acct = s.balance().account(&payer_account);
    assert_eq!(
        (num(&acct, "charged"), num(&acct, "balance")),
        (1, 0),
        "{acct}"
    );

    // The same credential again: paid once, refused the second time, nothing moves.
    let r = mpp_client(&py, &chain, "replay", &url, &key, &[]);
    eprintln!("[mpp] replay: {r}");
    assert_eq!(r["first"]["status"], 200, "{r}");
    let again = &r["again"];
    assert_eq!(again["status"], 402, "{r}");
    assert_eq!(
        again["body"]["type"], "https://paymentauth.org/problems/invalid-challenge",
        "{r}"
    );
    assert!(
        again["body"]["detail"]
            .as_str()
            .unwrap()
            .contains("already paid"),
        "{r}"
    );
    assert_eq!(again["receipt"], Value::Null, "{r}");
    let replayed = chain.balances();
    assert_eq!(
        after[0] - replayed[0],
        price,
        "one price for the replayed credential"
    );
    assert_eq!(replayed[1] - after[1], price);

    // A credential for changed terms (the amount cut to 1): not a challenge the
    // service issued; nothing is settled.
    let r = mpp_client(&py, &chain, "tamper", &url, &key, &[]);
    eprintln!("[mpp] tampered: {r}");
    assert_eq!(r["offer"]["status"], 402, "{r}");
    assert_eq!(
        r["offer"]["body"]["type"], "https://paymentauth.org/problems/payment-required",
        "{r}"
    );
    assert_eq!(r["again"]["status"], 402, "{r}");
    assert_eq!(
        r["again"]["body"]["type"], "https://paymentauth.org/problems/invalid-challenge",
        "{r}"
    );
    assert_eq!(chain.balances(), replayed);

    // A payer without tokens: the facilitator's reason, nothing moves.
    let r = mpp_client(&py, &chain, "pay", &url, &chain.s("poor_key"), &[]);
    eprintln!("[mpp] poor payer: {r}");
    assert_eq!(r["status"], 402, "{r}");
    assert_eq!(
        r["body"]["type"], "https://paymentauth.org/problems/verification-failed",
        "{r}"
    );
    assert_eq!(chain.balances(), replayed);
    eprintln!("[mpp] balances at the end: {replayed:?}");
}
