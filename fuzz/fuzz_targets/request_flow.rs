//! Whole requests through the gate against the in-memory host, with the invariants
//! checked after every step; the harness is fuzz/src/request_flow.rs.
#![no_main]

use fuzz_support::request_flow::{run, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: Input| run(&input));
