//! farebox: an HTTP 402 Payment Required gate as a proxy-wasm filter.
//!
//! Everything but `glue` is host-independent and tested natively; `glue` is
//! the thin layer over the proxy-wasm SDK.
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
pub mod response;
pub mod sha256;
pub mod tokens;
pub mod usage;

/// The in-memory host: native tests, and the fuzz crate (feature `fake`).
#[cfg(any(test, feature = "fake"))]
pub mod fake;

#[cfg(target_arch = "wasm32")]
mod glue;
