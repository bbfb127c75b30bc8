//! A check that cannot run here says so: under `CI=true` it fails with the reason, elsewhere
//! it prints one `SKIPPED` line that the test runner does not capture (it goes to the
//! terminal even for a passing test), so a skip is never mistaken for a pass.
#![allow(dead_code)]

use std::io::Write;

/// True under `CI=true` (as CI sets it), where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Call when `test` cannot run because of `reason`; the test then returns. Fails the test
/// under `CI=true`.
pub fn cannot_run(test: &str, reason: &str) {
    assert!(!in_ci(), "{test} cannot run under CI=true: {reason}");
    // Straight to the process's stderr: libtest captures only the print macros.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}
