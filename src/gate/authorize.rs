//! The authorize call: starting it (and the lease call, which starts the same way)
//! and acting on its answer.

use crate::balance_api::{
    authorize_body, call, parse_authorize, AuthorizeRequest, CalloutResponse,
};
use crate::config::{Config, FailureMode};
use crate::host::HttpHost;
use crate::metrics::Metric;
use crate::outbox::Job;

use super::{Charge, Exchange, Flow, Pending, Stage};

impl Pending {
    /// What this request paid through authorize, if it can be given back
    /// (anonymous payments are settled by the service and are not refunded here).
    pub(super) fn authorized(self) -> Option<Charge> {
        if self.payment.is_some() {
            return None;
        }
        let credential = self.credential?;
        Some(Charge::Authorized {
            request_id: self.request_id,
            credential,
            cost: self.cost,
        })
    }

    /// For a call that may have reached the service: undo whatever it did.
    pub(super) fn undo(self, status: u16) -> Option<Job> {
        // A payment the service may have settled is its to reconcile (the payment's
        // nonce makes a retry safe): crediting the account would pay twice.
        if self.payment.is_some() {
            return None;
        }
        let account = self.credential?;
        Some(Job::Refund {
            request_id: self.request_id,
            account,
            cost: self.cost,
            status,
            undo: true,
        })
    }
}

/// The two calls a request can wait for.
#[derive(Debug, Clone, Copy)]
pub(super) enum CallKind {
    /// Pay for this request (authorize mode, or a lease slot taken by another account).
    Authorize,
    /// Take a lease for the account (holding its renewal lock).
    Lease,
}

impl CallKind {
    fn path(self, cfg: &Config) -> &str {
        match self {
            CallKind::Authorize => &cfg.authorize_path,
            CallKind::Lease => &cfg.lease.path,
        }
    }

    /// The stage of a request waiting for this call's answer.
    fn waiting(self, p: Box<Pending>) -> Stage {
        match self {
            CallKind::Authorize => Stage::Authorizing(p),
            CallKind::Lease => Stage::Leasing(p),
        }
    }
}

impl Exchange {
    pub(super) fn authorize(&mut self, host: &impl HttpHost, cfg: &Config, p: Pending) -> Flow {
        let body = authorize_body(&AuthorizeRequest {
            account: p.credential.as_deref(),
            cost: p.cost,
            route: &p.route,
            method: &p.method,
            path: &p.path,
            request_id: &p.request_id,
            payment: p.payment.as_ref(),
        });
        // Nothing reached the service if the call fails to start: nothing to undo.
        self.start_call(host, cfg, CallKind::Authorize, &body, p, || {})
    }

    /// Starts an authorize or lease call for `p` and pauses the request until its
    /// answer; a call the host refuses is a service failure (after `undo` cleans up).
    pub(super) fn start_call(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        kind: CallKind,
        body: &[u8],
        mut p: Pending,
        undo: impl FnOnce(),
    ) -> Flow {
        let path = kind.path(cfg);
        match call(host, cfg, path, &p.request_id, body) {
            Ok(token) => {
                host.count(Metric::Callouts);
                log::debug!("request {}: call {token} to {path} started", p.request_id);
                p.token = token;
                self.stage = kind.waiting(Box::new(p));
                Flow::Pause(Some(token))
            }
            Err(e) => {
                host.count(Metric::CalloutFailures);
                log::warn!(
                    "call to {path} on cluster {:?} not dispatched: {e}",
                    cfg.cluster
                );
                undo();
                self.fail(host, cfg, None)
            }
        }
    }

    /// The answer to our authorize or lease call. Returns `Continue` when the
    /// request may now go upstream (the caller resumes it), `Park` when it waits
    /// for recalled credit (the caller wakes it from the timer).
    pub(super) fn on_callout_response(
        &mut self,
        host: &impl HttpHost,
        cfg: Option<&Config>,
        token: u32,
        resp: &CalloutResponse,
    ) -> Flow {
        let Some(cfg) = cfg else {
            return Flow::Pause(None);
        };
        match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Authorizing(p) if p.token == token => self.authorized(host, cfg, *p, resp),
            Stage::Leasing(p) if p.token == token => self.leased(host, cfg, *p, resp),
            other => {
                self.stage = other;
                log::warn!("answer for unknown call {token} ignored");
                Flow::Pause(None)
            }
        }
    }

    pub(super) fn authorized(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        p: Pending,
        resp: &CalloutResponse,
    ) -> Flow {
        match parse_authorize(resp, p.cost, cfg.cache_max_ttl_s) {
            Ok(verdict) => {
                let freshness = self.remember(host, cfg, p.cache_key.as_ref(), &verdict);
                let route = p.route.clone();
                self.act(
                    host,
                    cfg,
                    &route,
                    verdict.decision,
                    freshness,
                    p.authorized(),
                )
            }
            Err(failure) => {
                host.count(Metric::CalloutFailures);
                log::warn!("authorize for request {} failed: {failure}", p.request_id);
                // The client will not be served as paid: the service may have charged
                // before its answer was lost. Undoing an uncharged id is a no-op.
                let charge = match cfg.failure_mode {
                    FailureMode::Closed => {
                        if let Some(job) = p.undo(503) {
                            self.worker.outbox.borrow_mut().push(host, job);
                        }
                        None
                    }
                    FailureMode::Open => p.authorized(),
                };
                self.fail(host, cfg, charge)
            }
        }
    }
}
