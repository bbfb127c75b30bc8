//! The response side: giving back what an unserved request paid, and settling a
//! usage-priced response at what it really cost.

use crate::access_log::{Outcome, Record};
use crate::balance_api::UsageLine;
use crate::config::Config;
use crate::decision::Paid;
use crate::host::{Host, HttpHost};
use crate::lease::LeaseKey;
use crate::mcp;
use crate::metrics::Metric;
use crate::outbox::Job;
use crate::payments;
use crate::usage::{BodyKind, Meter, Metered};

use super::lease::{refund_lease, spend_extra, unlock};
use super::worker::Worker;
use super::{Charge, Exchange, Metering, Stage, CLIENT_GONE};

impl Exchange {
    /// Gives back what a request whose body is refused was charged (once: the charge
    /// is taken). Its headers went upstream, its body never does: the upstream
    /// request is reset with the local reply.
    pub(super) fn give_back_held(&mut self, host: &impl HttpHost, status: u16) {
        if let Stage::Forwarded(f) = &mut self.stage {
            if let Some(charge) = f.charge.take() {
                give_back(&self.worker, &mut self.access, host, charge, status);
            }
        }
    }

    pub(super) fn on_response_headers(&mut self, host: &impl HttpHost, cfg: Option<&Config>) {
        // (The payment proof is told first: a paid request may have nothing else to do here.)
        let Some(cfg) = cfg else { return };
        let Stage::Forwarded(f) = &mut self.stage else {
            return;
        };
        if let Some(paid) = f.paid.take() {
            tell_payment(host, paid);
        }
        let tell_balance = (f.balance.is_some() && cfg.balance_header.is_some())
            || (f.budget.is_some() && cfg.budget_header.is_some());
        if f.charge.is_none() && f.usage.is_none() && !tell_balance {
            return; // nothing to give back, meter or tell: skip the header reads
        }
        let status = host.response_header(":status").and_then(|s| {
            std::str::from_utf8(&s)
                .ok()
                .and_then(|s| s.parse::<u16>().ok())
        });
        if let Some(status) = status.filter(|s| cfg.no_charge_statuses.contains(*s)) {
            f.usage = None;
            if let Some(charge) = f.charge.take() {
                give_back(&self.worker, &mut self.access, host, charge, status);
            }
        }
        if let Some(id) = f.mcp_watch_id.take().filter(|_| f.charge.is_some()) {
            f.mcp_answer = host
                .response_header("content-type")
                .and_then(|ct| mcp::AnswerKind::from_content_type(&String::from_utf8_lossy(&ct)))
                .map(|kind| mcp::AnswerWatch::new(kind, id));
        }
        if let Some(usage) = &mut f.usage {
            let kind = host
                .response_header("content-type")
                .and_then(|ct| BodyKind::from_content_type(&String::from_utf8_lossy(&ct)));
            let spec = cfg
                .pricing
                .routes
                .get(usage.rule)
                .and_then(|r| r.usage.clone());
            match (kind, spec) {
                (Some(kind), Some(spec)) => {
                    usage.meter = Some(Meter::for_model(
                        kind,
                        spec,
                        cfg.usage_tail_bytes,
                        usage.model.take(),
                    ))
                }
                _ => {
                    // Not a body we can read usage from: the hold is the price.
                    host.count(Metric::UsageUnread);
                    f.usage = None;
                }
            }
        }
        if let (Some(name), Some(balance)) = (&cfg.balance_header, f.balance) {
            host.set_response_header(name, &balance.to_string());
        }
        if let (Some(name), Some(budget)) = (&cfg.budget_header, f.budget) {
            host.set_response_header(name, &budget.to_string());
        }
    }

    /// A chunk of the response body: metered if the route is priced by usage,
    /// and always passed on untouched.
    pub(super) fn on_response_body(
        &mut self,
        host: &impl HttpHost,
        cfg: Option<&Config>,
        body_size: usize,
        end_of_stream: bool,
    ) {
        // Nothing is forwarded without a configuration.
        let (Some(cfg), Stage::Forwarded(f)) = (cfg, &mut self.stage) else {
            return;
        };
        if let Some(watch) = &mut f.mcp_answer {
            if body_size > 0 {
                if let Some(chunk) = host.response_body(body_size) {
                    watch.feed(&chunk);
                }
            }
            if end_of_stream {
                let errored = watch.is_error();
                f.mcp_answer = None;
                if errored {
                    if let Some(charge) = f.charge.take() {
                        log::info!("the MCP server answered with a JSON-RPC error: not charged");
                        host.count(Metric::McpErrorRefunds);
                        give_back(
                            &self.worker,
                            &mut self.access,
                            host,
                            charge,
                            MCP_ERROR_STATUS,
                        );
                    }
                }
            }
        }
        let Some(usage) = &mut f.usage else { return };
        if let Some(meter) = &mut usage.meter {
            if body_size > 0 {
                if let Some(chunk) = host.response_body(body_size) {
                    meter.feed(&chunk);
                }
            }
        }
        if !end_of_stream {
            return;
        }
        let Some(Metering {
            hold, rule, meter, ..
        }) = f.usage.take()
        else {
            return;
        };
        let charge = f.charge.take();
        match meter.and_then(Meter::finish_metered) {
            Some(m) => {
                host.count(Metric::UsageMetered);
                self.access.metered(&m);
                self.settle_usage(host, cfg, charge, (hold, rule), &m);
            }
            None => {
                host.count(Metric::UsageUnread);
                log::info!("no usage in the response: charged the hold of {hold} units");
            }
        }
    }

    /// The usage line of a table-priced response: route rule, model and tokens.
    pub(super) fn usage_line(&self, cfg: &Config, rule: usize, m: &Metered) -> Option<UsageLine> {
        let tokens = m.tokens?;
        let route = cfg.pricing.routes.get(rule)?.name.clone();
        Some(UsageLine {
            route,
            model: m.model.clone(),
            tokens,
        })
    }

    /// Turns the hold into the real price: the difference goes back, or is charged.
    /// A table-priced response's usage line goes to the ledger in both modes, so a bill
    /// can be itemised: with the final price (authorize), or on its own (lease).
    pub(super) fn settle_usage(
        &self,
        host: &impl HttpHost,
        cfg: &Config,
        charge: Option<Charge>,
        (hold, rule): (u64, usize),
        m: &Metered,
    ) {
        let actual = m.cost;
        let line = self.usage_line(cfg, rule, m);
        match charge {
            Some(Charge::Authorized {
                request_id,
                credential,
                ..
            }) if actual != hold || line.is_some() => {
                let job = Job::Usage {
                    request_id,
                    account: credential,
                    actual,
                    line,
                };
                self.worker.outbox.borrow_mut().push(host, job);
            }
            Some(Charge::Leased {
                key,
                lease_id,
                request_id,
                credential,
                ..
            }) => {
                if let Some(line) = line {
                    let job = Job::LeaseUsage {
                        lease_id: lease_id.clone(),
                        request_id: request_id.clone(),
                        units: actual,
                        line,
                    };
                    self.worker.outbox.borrow_mut().push(host, job);
                }
                if actual < hold {
                    // The usage was read from a served (2xx) response.
                    refund_leased(
                        &self.worker,
                        host,
                        &key,
                        &lease_id,
                        request_id,
                        hold - actual,
                        200,
                    );
                } else if actual > hold && !spend_extra(host, &key, &lease_id, actual - hold) {
                    // The lease cannot cover the overage: the service charges it directly.
                    let job = Job::Usage {
                        request_id: format!("{request_id}-overage"),
                        account: credential,
                        actual: actual - hold,
                        line: None,
                    };
                    self.worker.outbox.borrow_mut().push(host, job);
                }
            }
            _ => {}
        }
    }

    /// The stream is over. A request still waiting for its decision never reached
    /// the upstream: whatever the service did for it is undone. A usage-priced
    /// response that never finished is charged at its hold.
    pub(super) fn on_log(&mut self, host: &impl HttpHost, cfg: Option<&Config>) {
        let Some(cfg) = cfg else { return };
        if self.mcp_claim.take().is_some() {
            // Paid from its headers, but its body never came whole: never served.
            self.give_back_held(host, CLIENT_GONE);
        }
        match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Authorizing(p) => {
                if let Some(job) = p.undo(CLIENT_GONE) {
                    self.worker.outbox.borrow_mut().push(host, job);
                }
            }
            Stage::Leasing(p) => {
                let key = LeaseKey::new(&cfg.cluster, p.credential.as_deref().unwrap_or_default());
                unlock(host, &key.slot_key(cfg.lease.max_entries), &key, 0);
                self.worker.outbox.borrow_mut().push(
                    host,
                    Job::Cancel {
                        request_id: p.request_id,
                    },
                );
            }
            // Cut short (upstream reset, client gone): charged by the usage the body
            // reported so far if it reported any (Anthropic's message_start), else the hold.
            Stage::Forwarded(mut f) if f.usage.is_some() => {
                let (hold, rule, meter) = match f.usage.take() {
                    Some(Metering {
                        hold, rule, meter, ..
                    }) => (hold, rule, meter),
                    None => return,
                };
                match meter.and_then(Meter::finish_metered) {
                    Some(m) if m.cost < hold => {
                        host.count(Metric::UsageMetered);
                        self.access.metered(&m);
                        log::info!(
                            "an interrupted response: charged the usage it reported, {} units",
                            m.cost
                        );
                        self.settle_usage(host, cfg, f.charge.take(), (hold, rule), &m);
                    }
                    _ => host.count(Metric::UsageUnread),
                }
            }
            _ => {}
        }
    }
}

/// Status recorded on the refund of an MCP call answered with a JSON-RPC error:
/// the upstream's HTTP status, which for such an answer is 200.
pub(super) const MCP_ERROR_STATUS: u16 = 200;

/// Gives a charge back: to the service (a refund job) or to the lease it came from.
pub(super) fn give_back(
    worker: &Worker,
    access: &mut Record,
    host: &impl HttpHost,
    charge: Charge,
    status: u16,
) {
    match charge {
        Charge::Authorized {
            request_id,
            credential,
            cost,
        } => {
            let job = Job::Refund {
                request_id,
                account: credential,
                cost,
                status,
                undo: false,
            };
            worker.outbox.borrow_mut().push(host, job);
        }
        Charge::Leased {
            key,
            lease_id,
            request_id,
            cost,
            ..
        } => {
            // Given back to the lease, or queued for the lease refund call.
            refund_leased(worker, host, &key, &lease_id, request_id, cost, status);
        }
    }
    access.decided(Outcome::Refunded);
}

/// Gives a request's units back: to the current lease locally, else through
/// the service's lease refund call (the lease was replaced or closed since).
pub(super) fn refund_leased(
    worker: &Worker,
    host: &impl Host,
    slot: &str,
    lease_id: &str,
    request_id: String,
    units: u64,
    status: u16,
) {
    if refund_lease(host, slot, lease_id, units) {
        return;
    }
    // A lease spend carries no request id unless it was metered: one is made up,
    // and kept by the job's retries (the refund is idempotent by it).
    let request_id = if request_id.is_empty() {
        worker.make_id(host)
    } else {
        request_id
    };
    log::info!(
        "{units} units of request {request_id} go back through the refund call of lease {lease_id}"
    );
    let job = Job::LeaseRefund {
        lease_id: lease_id.to_string(),
        request_id,
        units,
        status,
    };
    worker.outbox.borrow_mut().push(host, job);
}

/// Tells the client of its payment on the upstream's response: x402's
/// `PAYMENT-RESPONSE` always (the payment was settled before the request went
/// on), the Payment scheme's `Payment-Receipt` on a 2xx (the draft's success).
/// Either makes the response the paying client's alone: `Cache-Control` gains
/// `private`, so no shared cache serves it (or its proof) to another account.
fn tell_payment(host: &impl HttpHost, paid: Paid) {
    match paid {
        Paid::X402(settlement) => {
            host.set_response_header(
                "payment-response",
                &payments::x402_response_header(&settlement),
            );
        }
        Paid::Receipt(receipt) => {
            let ok = host
                .response_header(":status")
                .is_some_and(|s| s.len() == 3 && s.first() == Some(&b'2'));
            if !ok {
                return;
            }
            host.set_response_header(
                "payment-receipt",
                &payments::payment_receipt_header(&receipt),
            );
        }
    }
    let existing = host.response_header("cache-control");
    let existing = existing.as_deref().map(String::from_utf8_lossy);
    host.set_response_header(
        "cache-control",
        &payments::private_cache_control(existing.as_deref()),
    );
}
