//! What every test suite of the workspace needs to talk to a real process: one blocking
//! HTTP/1.1 client (fresh connections, keep-alive connections, raw bytes) and one polling
//! helper. The filter's end-to-end harness (tests/common) and the balance service's tests
//! (balance-service/tests/common) both use it, so a framing rule is fixed in one place.

pub mod http;

/// The reference service's demo x402 options (a made-up payee and asset on Base Sepolia,
/// 1,000 atomic units per unit), as both the service's payment tests and the filter's
/// end-to-end tests start it.
pub const DEMO_X402_ARGS: &[&str] = &[
    "--x402-pay-to",
    "0x00000000000000000000000000000000000000b0",
    "--x402-network",
    "eip155:84532",
    "--x402-asset",
    "0x00000000000000000000000000000000000000a0",
    "--x402-amount-per-unit",
    "1000",
];

use std::thread;
use std::time::{Duration, Instant};

/// Polls `cond` every 25 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(25));
    }
}
