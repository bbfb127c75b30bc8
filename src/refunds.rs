//! Refunds for charged requests the upstream did not serve.
//!
//! Refunds are sent from the root context's timer, not from the request's own
//! context: Envoy cancels a context's pending calls when its stream ends, and a
//! refund must outlive the request it is for. Refunds are idempotent by
//! request id on the service side, so retrying one is always safe.

use std::collections::VecDeque;

use crate::balance_api::{classify_refund, refund_body, RefundOutcome};
use crate::config::Config;
use crate::host::Host;
use crate::metrics::Metric;

/// Attempts before a refund is given up (and logged as lost): about a minute of backoff.
pub const MAX_ATTEMPTS: u32 = 7;
const FIRST_BACKOFF_MS: u64 = 1_000;
/// Refunds waiting beyond this are dropped oldest first (and logged), so a dead
/// service cannot make the queue grow without bound.
pub const MAX_QUEUED: usize = 10_000;
const MAX_IN_FLIGHT: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    pub request_id: String,
    /// The credential, as the contract identifies the payer by it. Never logged.
    pub account: String,
    pub cost: u64,
    pub status: u16,
    pub attempts: u32,
    pub due_ms: u64,
}

impl Refund {
    pub fn new(request_id: String, account: String, cost: u64, status: u16) -> Refund {
        Refund {
            request_id,
            account,
            cost,
            status,
            attempts: 0,
            due_ms: 0,
        }
    }
}

#[derive(Debug, Default)]
pub struct RefundQueue {
    waiting: VecDeque<Refund>,
    in_flight: Vec<(u32, Refund)>,
}

impl RefundQueue {
    pub fn push(&mut self, host: &impl Host, refund: Refund) {
        if self.waiting.len() >= MAX_QUEUED {
            if let Some(dropped) = self.waiting.pop_front() {
                host.count(Metric::RefundFailures);
                log::error!(
                    "refund queue full: refund for request {} dropped",
                    dropped.request_id
                );
            }
        }
        self.waiting.push_back(refund);
    }

    pub fn len(&self) -> usize {
        self.waiting.len() + self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sends the refunds that are due. Called from the root context's tick.
    pub fn flush(&mut self, host: &impl Host, cfg: &Config) {
        let now = host.now_ms();
        let mut later = VecDeque::new();
        while let Some(refund) = self.waiting.pop_front() {
            if refund.due_ms > now || self.in_flight.len() >= MAX_IN_FLIGHT {
                later.push_back(refund);
                continue;
            }
            let body = refund_body(
                &refund.request_id,
                &refund.account,
                refund.cost,
                refund.status,
            );
            let auth = cfg.service_token.as_ref().map(|t| format!("Bearer {t}"));
            let mut headers = vec![
                (":method", "POST"),
                (":path", cfg.refund_path.as_str()),
                (":authority", cfg.authority.as_str()),
                ("content-type", "application/json"),
                ("x-request-id", refund.request_id.as_str()),
            ];
            if let Some(a) = &auth {
                headers.push(("authorization", a.as_str()));
            }
            match host.dispatch(&cfg.cluster, &headers, &body, cfg.timeout) {
                Ok(token) => self.in_flight.push((token, refund)),
                Err(e) => {
                    log::warn!("refund for request {} not sent: {e}", refund.request_id);
                    self.retry_later(host, refund, now, &mut later);
                }
            }
        }
        self.waiting = later;
    }

    /// The service answered (or the call failed) for the refund sent with `token`.
    pub fn on_response(&mut self, host: &impl Host, token: u32, status: Option<u16>) {
        let Some(pos) = self.in_flight.iter().position(|(t, _)| *t == token) else {
            return;
        };
        let (_, refund) = self.in_flight.swap_remove(pos);
        match classify_refund(status) {
            RefundOutcome::Done => {
                host.count(Metric::Refunds);
                log::info!(
                    "refunded request {} ({} units, upstream status {})",
                    refund.request_id,
                    refund.cost,
                    refund.status
                );
            }
            RefundOutcome::Rejected(s) => {
                // 404: the service never charged it (a speculative refund); nothing was lost.
                if s == 404 {
                    log::debug!(
                        "refund for request {}: no charge to refund",
                        refund.request_id
                    );
                } else {
                    host.count(Metric::RefundFailures);
                    log::error!(
                        "refund for request {} rejected by the balance service (status {s})",
                        refund.request_id
                    );
                }
            }
            RefundOutcome::Retry(s) => {
                let mut later = VecDeque::new();
                let now = host.now_ms();
                log::warn!(
                    "refund for request {} failed (status {s:?}), will retry",
                    refund.request_id
                );
                self.retry_later(host, refund, now, &mut later);
                self.waiting.extend(later);
            }
        }
    }

    fn retry_later(
        &mut self,
        host: &impl Host,
        mut refund: Refund,
        now: u64,
        into: &mut VecDeque<Refund>,
    ) {
        host.count(Metric::RefundFailures);
        refund.attempts += 1;
        if refund.attempts >= MAX_ATTEMPTS {
            log::error!(
                "refund for request {} ({} units) given up after {} attempts",
                refund.request_id,
                refund.cost,
                refund.attempts
            );
            return;
        }
        refund.due_ms = now + (FIRST_BACKOFF_MS << (refund.attempts - 1).min(16));
        into.push_back(refund);
    }
}
