//! Acting on a decision: forwarding an allowed request, or rendering the local reply
//! (problem document, JSON-RPC error, HTML page, OpenAI error).

use crate::access_log::Outcome;
use crate::config::{Config, FailureMode};
use crate::decision::{Decision, Denial};
use crate::host::HttpHost;
use crate::mcp;
use crate::metrics::Metric;
use crate::payments;
use crate::response::{self, AuthProblem, Freshness, Reply};
use crate::uri::normalize_path;

use super::{text, Charge, Exchange, Flow, Forwarded, Metering, Stage};

impl Exchange {
    pub(super) fn act(
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
                budget,
                paid,
            } => {
                host.count(Metric::Allowed);
                self.access.account(&account_id);
                if let Some(Charge::Leased { lease_id, .. }) = &charge {
                    self.access.lease(lease_id);
                }
                self.access.decided(Outcome::Allow);
                if !self.headers_gone {
                    host.set_request_header(&cfg.account_header, Some(&account_id));
                }
                self.strip_payment(host);
                let usage = match (&charge, self.usage_rule) {
                    (Some(c), Some(rule)) => Some(Metering {
                        hold: c.cost(),
                        rule,
                        model: self.request_model.take(),
                        meter: None,
                    }),
                    _ => None,
                };
                self.stage = Stage::Forwarded(Box::new(Forwarded {
                    charge,
                    balance,
                    budget,
                    paid,
                    usage,
                    mcp_watch_id: self.mcp_watch_id.take(),
                    mcp_answer: None,
                }));
                Flow::Continue
            }
            Decision::Deny(denial) => {
                host.count(Metric::Denied);
                if let Some(account_id) = &denial.account_id {
                    self.access.account(account_id);
                }
                self.access.decided(Outcome::Deny);
                let reply = response::payment_required(cfg, route, &denial, freshness);
                let reply = self.with_offer(host, cfg, route, &denial, reply);
                self.reply(host, cfg, &reply)
            }
            Decision::Unauthenticated => {
                host.count(Metric::Unauthenticated);
                self.access.decided(Outcome::Unauthenticated);
                let detail = "the credential is not known";
                self.reply(
                    host,
                    cfg,
                    &response::unauthorized(cfg, AuthProblem::Invalid, detail, freshness),
                )
            }
            Decision::Forbidden => {
                host.count(Metric::Forbidden);
                self.access.decided(Outcome::Forbidden);
                self.reply(host, cfg, &response::forbidden(cfg, freshness))
            }
            Decision::RateLimited { retry_after_s } => {
                host.count(Metric::RateLimited);
                self.access.decided(Outcome::RateLimited);
                self.reply(
                    host,
                    cfg,
                    &response::rate_limited(cfg, retry_after_s, freshness),
                )
            }
        }
    }

    /// Adds the machine-payable challenges the service offered to a 402.
    pub(super) fn with_offer(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        route: &str,
        denial: &Denial,
        mut reply: Reply,
    ) -> Reply {
        if denial.offer.is_empty() {
            return reply;
        }
        let authority = text(self.header(host, ":authority"));
        if cfg.challenges.x402 {
            let scheme = self
                .header(host, ":scheme")
                .or_else(|| self.header(host, "x-forwarded-proto"))
                .map_or_else(
                    || "http".to_string(),
                    |s| String::from_utf8_lossy(&s).into_owned(),
                );
            let path = normalize_path(&text(self.header(host, ":path")));
            let url = format!("{scheme}://{authority}{path}");
            if let Some(required) =
                payments::x402_required(&denial.offer, &url, route, &denial.detail)
            {
                reply
                    .headers
                    .push(("payment-required", payments::encode_x402(&required)));
                self.x402_required = Some(required);
            }
        }
        if cfg.challenges.payment {
            for h in payments::payment_challenges(&denial.offer, &authority) {
                reply.headers.push(("www-authenticate", h));
            }
        }
        reply
    }

    /// The service could not decide. `charge` is what may have been charged, kept
    /// if the request goes through (it is then served).
    pub(super) fn fail(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        charge: Option<Charge>,
    ) -> Flow {
        match cfg.failure_mode {
            FailureMode::Open => {
                host.count(Metric::FailOpen);
                self.access.decided(Outcome::FailOpen);
                self.strip_account(host, cfg);
                self.stage = Stage::Forwarded(Box::new(Forwarded {
                    charge,
                    mcp_watch_id: self.mcp_watch_id.take(),
                    ..Forwarded::default()
                }));
                Flow::Continue
            }
            FailureMode::Closed => {
                host.count(Metric::FailClosed);
                self.access.decided(Outcome::FailClosed);
                self.reply(host, cfg, &response::unavailable(cfg))
            }
        }
    }

    /// Sends a refusal: as a JSON-RPC error on MCP routes, as a page to browsers
    /// when configured, else as the problem document it is.
    pub(super) fn reply(&mut self, host: &impl HttpHost, cfg: &Config, reply: &Reply) -> Flow {
        self.stage = Stage::Done;
        if self.mcp_claim.is_some() {
            // Priced from its MCP headers: the JSON-RPC id to answer is in the body,
            // which Envoy gives a filter only once the headers went on. They go on
            // (without the account), the body is held and never sent, and the refusal
            // answers it (the upstream request is reset).
            self.strip_account(host, cfg);
            self.stage = Stage::Refused(Box::new(reply.clone()));
            return Flow::Continue;
        }
        let html = reply.status == 402
            && cfg.html_402
            && self
                .header(host, "accept")
                .is_some_and(|a| contains(&a, b"text/html"));
        match &self.mcp_id {
            Some(id) => host.send_reply(&response::as_json_rpc(
                reply,
                &mcp::refusal_body(
                    id,
                    self.mcp_tool_call,
                    &reply.body,
                    self.x402_required.as_ref(),
                ),
            )),
            None if html => host.send_reply(&response::as_html(reply)),
            None if self.openai_errors => host.send_reply(&response::with_openai_error(reply)),
            None => host.send_reply(reply),
        }
        Flow::Pause(None)
    }
}

pub(super) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}
