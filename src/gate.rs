//! One request's way through the gate: price it, identify the caller, find a
//! decision (cache or balance service), act on it, and refund it if the
//! upstream does not serve it.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::balance_api::{
    authorize_body, parse_authorize, AuthorizeRequest, CalloutResponse, Verdict,
};
use crate::cache::{self, CacheKey, Entry, Lookup};
use crate::config::{Config, FailureMode};
use crate::decision::Decision;
use crate::host::HttpHost;
use crate::identity::IdentityError;
use crate::metrics::Metric;
use crate::pricing::normalize_path;
use crate::refunds::{Refund, RefundQueue};
use crate::response::{self, AuthProblem, Freshness, Reply};

/// What the host should do with the request after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Pause,
}

/// State shared by every stream of one VM (one Envoy worker).
#[derive(Debug, Default)]
pub struct Worker {
    pub refunds: RefCell<RefundQueue>,
    request_seq: Cell<u64>,
}

/// Status recorded on a refund for a request whose outcome the client never saw.
const CLIENT_GONE: u16 = 499;
const MAX_REQUEST_ID_LEN: usize = 128;

#[derive(Debug)]
enum Stage {
    Start,
    /// Nothing to bill: free route, or a request we answered ourselves.
    Done,
    /// Authorize call in flight; the request is paused.
    Waiting(Box<Pending>),
    /// Forwarded upstream; `charge` is set while a refund is still possible.
    Forwarded {
        charge: Option<Charge>,
        balance: Option<i64>,
    },
}

#[derive(Debug)]
struct Pending {
    token: u32,
    charge: Charge,
    route: String,
    key: Option<CacheKey>,
}

#[derive(Debug)]
struct Charge {
    request_id: String,
    credential: String,
    cost: u64,
}

impl Charge {
    fn refund(self, status: u16) -> Refund {
        Refund::new(self.request_id, self.credential, self.cost, status)
    }
}

pub struct Gate {
    /// `None` when the plugin has no valid configuration (Envoy should not let that happen).
    cfg: Option<Rc<Config>>,
    worker: Rc<Worker>,
    stage: Stage,
}

impl Gate {
    pub fn new(cfg: Option<Rc<Config>>, worker: Rc<Worker>) -> Gate {
        Gate {
            cfg,
            worker,
            stage: Stage::Start,
        }
    }

    pub fn on_request_headers(&mut self, host: &impl HttpHost) -> Flow {
        let Some(cfg) = self.cfg.clone() else {
            log::error!("farebox has no valid configuration; refusing the request");
            host.send_reply(&Reply {
                status: 503,
                headers: vec![("content-type", "application/problem+json".into()), ("cache-control", "no-store".into())],
                body: br#"{"title":"Service Unavailable","status":503,"detail":"payment gate not configured"}"#.to_vec(),
            });
            self.stage = Stage::Done;
            return Flow::Pause;
        };
        // Whatever happens next, the upstream must never see a client's own copy.
        host.set_request_header(&cfg.account_header, None);

        let method = text(host.request_header(":method"));
        let raw_path = text(host.request_header(":path"));
        let path = normalize_path(&raw_path);
        let price = cfg.pricing.price(&method, &path);
        if price.cost == 0 {
            host.count(Metric::Free);
            self.stage = Stage::Done;
            return Flow::Continue;
        }
        let (route, cost) = (price.route.to_string(), price.cost);

        let credential = match cfg
            .credential
            .extract(|name| host.request_header(name), &raw_path)
        {
            Ok(c) => c,
            Err(e) => {
                host.count(Metric::Unauthenticated);
                let why = if e == IdentityError::Missing {
                    AuthProblem::Missing
                } else {
                    AuthProblem::Invalid
                };
                log::debug!("401 on {method} {path}: {e}");
                return self.reply(
                    host,
                    &response::unauthorized(&cfg, why, &e.to_string(), Freshness::NoStore),
                );
            }
        };

        let key = (cfg.cache_max_entries > 0)
            .then(|| CacheKey::new(&cfg.fingerprint, &route, cost, &credential));
        if let Some(key) = &key {
            let slot = key.slot_key(cfg.cache_max_entries);
            if let Some((bytes, cas)) = host.shared_get(&slot) {
                match cache::lookup(key, &bytes, host.now_ms()) {
                    Lookup::Fresh(entry) => {
                        host.count(Metric::CacheHits);
                        let freshness = Freshness::Private(entry.remaining_s(host.now_ms()));
                        return self.act(host, &cfg, &route, entry.decision, freshness, None);
                    }
                    // Clearing frees the value's memory; losing a CAS race to a fresh write is fine.
                    Lookup::Expired => {
                        host.shared_set(&slot, &[], cas);
                    }
                    Lookup::Miss => {}
                }
            }
        }

        let request_id = self.request_id(host);
        let body = authorize_body(&AuthorizeRequest {
            account: &credential,
            cost,
            route: &route,
            method: &method,
            path: &path,
            request_id: &request_id,
        });
        let auth = cfg.service_token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = vec![
            (":method", "POST"),
            (":path", cfg.authorize_path.as_str()),
            (":authority", cfg.authority.as_str()),
            ("content-type", "application/json"),
            ("x-request-id", request_id.as_str()),
        ];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        match host.dispatch(&cfg.cluster, &headers, &body, cfg.timeout) {
            Ok(token) => {
                host.count(Metric::Callouts);
                let charge = Charge {
                    request_id,
                    credential,
                    cost,
                };
                self.stage = Stage::Waiting(Box::new(Pending {
                    token,
                    charge,
                    route,
                    key,
                }));
                Flow::Pause
            }
            Err(e) => {
                host.count(Metric::CalloutFailures);
                log::warn!(
                    "authorize call to cluster {:?} not dispatched: {e}",
                    cfg.cluster
                );
                // Nothing reached the service, so there is nothing to refund.
                self.fail(host, &cfg, None)
            }
        }
    }

    /// Body and trailers wait while the decision is pending: letting them continue
    /// would make Envoy forward the paused headers before the request is paid for.
    pub fn on_request_body(&self) -> Flow {
        match self.stage {
            Stage::Waiting(_) => Flow::Pause,
            _ => Flow::Continue,
        }
    }

    pub fn on_callout_response(
        &mut self,
        host: &impl HttpHost,
        token: u32,
        resp: &CalloutResponse,
    ) {
        let Some(cfg) = self.cfg.clone() else { return };
        let pending = match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Waiting(p) if p.token == token => p,
            other => {
                self.stage = other;
                log::warn!("answer for unknown call {token} ignored");
                return;
            }
        };
        let Pending {
            charge, route, key, ..
        } = *pending;
        match parse_authorize(resp, charge.cost, cfg.cache_max_ttl_s) {
            Ok(Verdict {
                decision,
                max_age_s,
            }) => {
                if let (Some(key), Some(max_age)) = (key, max_age_s) {
                    let entry = Entry {
                        decision: decision.clone(),
                        expires_at_ms: host.now_ms() + u64::from(max_age) * 1000,
                    };
                    // Last writer wins: both writers hold a decision the service just made.
                    host.shared_set(
                        &key.slot_key(cfg.cache_max_entries),
                        &cache::encode(&key, &entry),
                        None,
                    );
                }
                if self.act(
                    host,
                    &cfg,
                    &route,
                    decision,
                    Freshness::from_max_age(max_age_s),
                    Some(charge),
                ) == Flow::Continue
                {
                    host.resume_request();
                }
            }
            Err(failure) => {
                host.count(Metric::CalloutFailures);
                log::warn!(
                    "authorize for request {} failed: {failure}",
                    charge.request_id
                );
                if self.fail(host, &cfg, Some(charge)) == Flow::Continue {
                    host.resume_request();
                }
            }
        }
    }

    pub fn on_response_headers(&mut self, host: &impl HttpHost) {
        let Some(cfg) = self.cfg.clone() else { return };
        let Stage::Forwarded { charge, balance } = &mut self.stage else {
            return;
        };
        let status = host.response_header(":status").and_then(|s| {
            std::str::from_utf8(&s)
                .ok()
                .and_then(|s| s.parse::<u16>().ok())
        });
        if let Some(status) = status.filter(|s| cfg.no_charge_statuses.contains(*s)) {
            if let Some(charge) = charge.take() {
                self.worker
                    .refunds
                    .borrow_mut()
                    .push(host, charge.refund(status));
            }
        }
        if let (Some(name), Some(balance)) = (&cfg.balance_header, balance) {
            host.set_response_header(name, &balance.to_string());
        }
    }

    /// The stream is over. A request still waiting for its decision never reached
    /// the upstream; if the service charged it before the client left, give it back.
    pub fn on_log(&mut self, host: &impl HttpHost) {
        if let Stage::Waiting(p) = std::mem::replace(&mut self.stage, Stage::Done) {
            self.worker
                .refunds
                .borrow_mut()
                .push(host, p.charge.refund(CLIENT_GONE));
        }
    }

    fn act(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        route: &str,
        decision: Decision,
        freshness: Freshness,
        charge: Option<Charge>,
    ) -> Flow {
        match decision {
            Decision::Allow {
                account_id,
                balance,
            } => {
                host.count(Metric::Allowed);
                host.set_request_header(&cfg.account_header, Some(&account_id));
                self.stage = Stage::Forwarded { charge, balance };
                Flow::Continue
            }
            Decision::Deny(denial) => {
                host.count(Metric::Denied);
                self.reply(
                    host,
                    &response::payment_required(cfg, route, &denial, freshness),
                )
            }
            Decision::Unauthenticated => {
                host.count(Metric::Unauthenticated);
                let detail = "the credential is not known";
                self.reply(
                    host,
                    &response::unauthorized(cfg, AuthProblem::Invalid, detail, freshness),
                )
            }
            Decision::Forbidden => {
                host.count(Metric::Forbidden);
                self.reply(host, &response::forbidden(cfg, freshness))
            }
            Decision::RateLimited { retry_after_s } => {
                host.count(Metric::RateLimited);
                self.reply(host, &response::rate_limited(cfg, retry_after_s, freshness))
            }
        }
    }

    /// The service could not decide. `charge` is the call that may have reached it.
    fn fail(&mut self, host: &impl HttpHost, cfg: &Config, charge: Option<Charge>) -> Flow {
        match cfg.failure_mode {
            FailureMode::Open => {
                host.count(Metric::FailOpen);
                // If the service did charge, the request is served: keep the charge.
                self.stage = Stage::Forwarded {
                    charge,
                    balance: None,
                };
                Flow::Continue
            }
            FailureMode::Closed => {
                host.count(Metric::FailClosed);
                // The client sees a failure, so it must not pay: the service may have
                // charged before its answer was lost. A refund of an uncharged id is a no-op.
                if let Some(charge) = charge {
                    self.worker
                        .refunds
                        .borrow_mut()
                        .push(host, charge.refund(503));
                }
                self.reply(host, &response::unavailable(cfg))
            }
        }
    }

    fn reply(&mut self, host: &impl HttpHost, reply: &Reply) -> Flow {
        host.send_reply(reply);
        self.stage = Stage::Done;
        Flow::Pause
    }

    /// Envoy's `x-request-id` when it is usable, so the service's ledger lines up
    /// with Envoy's access log; otherwise one made up here, unique within this process.
    fn request_id(&self, host: &impl HttpHost) -> String {
        if let Some(id) = host.request_header("x-request-id") {
            if !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_LEN
                && id.iter().all(|b| (0x21..=0x7e).contains(b))
            {
                if let Ok(id) = String::from_utf8(id) {
                    return id;
                }
            }
        }
        let seq = self.worker.request_seq.get().wrapping_add(1);
        self.worker.request_seq.set(seq);
        let addr = Rc::as_ptr(&self.worker) as usize;
        format!("fbx-{:x}-{addr:x}-{seq:x}", host.now_ms())
    }
}

fn text(v: Option<Vec<u8>>) -> String {
    v.map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
