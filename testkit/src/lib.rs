//! What every test suite of the workspace needs to talk to a real process: one blocking
//! HTTP/1.1 client (fresh connections, keep-alive connections, raw bytes) and one polling
//! helper. The filter's end-to-end harness (tests/common) and the balance service's tests
//! (balance-service/tests/common) both use it, so a framing rule is fixed in one place.

pub mod http;

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
