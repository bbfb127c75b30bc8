//! Reference balance service for the farebox HTTP 402 gate, plus helpers
//! shared with the `farebox-echo` demo upstream.
//!
//! The wire contract is described in `docs/balance-service.md` at the
//! repository root.

pub mod config;
pub mod ext_authz;
pub mod facilitator;
pub mod logging;
pub mod mpp;
pub mod service;
pub mod store;
pub mod util;
pub mod webhooks;
