//! farebox: an HTTP 402 Payment Required gate, the host-independent logic of the
//! proxy-wasm filter, tested natively. The thin layer over the proxy-wasm SDK is the
//! `farebox-filter` crate (filter/); this crate does not depend on proxy-wasm, so no
//! module here can reach the host but through the traits in `host`
//! (tests/crate_layout.rs fails if the dependency comes back).
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod access_log;
pub mod amount;
pub mod balance_api;
pub mod cache;
pub mod config;
pub mod decision;
pub mod gate;
pub mod header_snapshot;
pub mod host;
pub mod identity;
pub mod lease;
pub mod local_cache;
pub mod mcp;
pub mod metrics;
pub mod outbox;
pub mod payments;
pub mod pricing;
pub mod problem;
pub mod response;
pub mod shared_data;
pub mod tokens;
pub mod uri;
pub mod usage;

/// The in-memory host: native tests, and the fuzz crate (feature `fake`).
#[cfg(any(test, feature = "fake"))]
pub mod fake;
