//! The request side: headers and body, MCP body buffering and the headers kept for
//! a decision made after they went on, pricing, and identifying the caller.

use serde_json::Value;

use crate::access_log::Outcome;
use crate::cache::CacheKey;
use crate::config::{Config, Mode};
use crate::host::HttpHost;
use crate::identity::{CredentialSource, IdentityError};
use crate::mcp;
use crate::metrics::Metric;
use crate::payments;
use crate::response::{self, AuthProblem, Freshness, Reply};
use crate::tokens::{ModelFrom, PriceTable, MAX_MODEL_LEN};

use super::{text, Exchange, Flow, Pending, Request, Stage, MAX_REQUEST_ID_LEN};

/// Request headers read after the headers phase (besides the credential's own).
pub(super) const LATE_HEADERS: [&str; 8] = [
    "authorization",
    "payment-signature",
    "x-request-id",
    "accept",
    ":authority",
    ":scheme",
    "x-forwarded-proto",
    ":path",
];

impl Exchange {
    /// A request header: from the host while the headers phase lasts, else as kept.
    pub(super) fn header(&self, host: &impl HttpHost, name: &str) -> Option<Vec<u8>> {
        if !self.headers_gone {
            return host.request_header(name);
        }
        if let Some((n, v)) = &self.kept_credential {
            if n == name {
                return v.clone();
            }
        }
        self.kept_headers
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.clone())
    }

    /// Every request that goes upstream carries the account header set by us or none:
    /// an allowed one gets it replaced (which drops a client's copy), the others lose it here.
    pub(super) fn strip_account(&self, host: &impl HttpHost, cfg: &Config) {
        if !self.headers_gone {
            host.set_request_header(&cfg.account_header, None);
        }
        self.strip_payment(host);
    }

    /// A payment is for the gate: the upstream never sees one (it is a bearer
    /// instrument until settled). `Authorization` goes only when it holds a payment.
    pub(super) fn strip_payment(&self, host: &impl HttpHost) {
        if self.headers_gone || !self.payment_headers {
            return;
        }
        for name in payments::PAYMENT_HEADERS {
            if host.request_header(name).is_some() {
                host.set_request_header(name, None);
            }
        }
        if host
            .request_header("authorization")
            .is_some_and(|v| payments::is_payment_authorization(&v))
        {
            host.set_request_header("authorization", None);
        }
    }

    /// A repeated credential header reaches a filter as its first value, and the
    /// upstream as all of them; the header is set to the one value that pays, so
    /// both sides see the same caller.
    pub(super) fn pin_credential(&self, host: &impl HttpHost, cfg: &Config, credential: &str) {
        if self.headers_gone {
            return;
        }
        match &cfg.credential {
            CredentialSource::Header(name) => host.set_request_header(name, Some(credential)),
            CredentialSource::Bearer => {
                host.set_request_header("authorization", Some(&format!("Bearer {credential}")))
            }
            CredentialSource::Query(_) => {}
        }
    }

    pub(super) fn on_request_headers(
        &mut self,
        host: &impl HttpHost,
        cfg: Option<&Config>,
        end_of_stream: bool,
    ) -> Flow {
        let Some(cfg) = cfg else {
            log::error!("farebox has no valid configuration; refusing the request");
            host.send_reply(&Reply {
                status: 503,
                headers: vec![
                    ("content-type", "application/problem+json".into()),
                    ("cache-control", "no-store".into()),
                ],
                body: br#"{"title":"Service Unavailable","status":503,"detail":"payment gate not configured"}"#.to_vec(),
            });
            self.access.decided(Outcome::Unconfigured);
            self.stage = Stage::Done;
            return Flow::Pause(None);
        };
        let method = text(host.request_header(":method"));
        let raw_path = text(host.request_header(":path"));
        self.payment_headers = payments::PAYMENT_HEADERS
            .iter()
            .any(|name| host.request_header(name).is_some())
            || host
                .request_header("authorization")
                .is_some_and(|v| payments::is_payment_authorization(&v));
        let (price, path) = cfg.pricing.price_request(&method, &raw_path);
        let rule = price
            .rule
            .and_then(|r| cfg.pricing.routes.iter().position(|x| std::ptr::eq(x, r)));
        let (route, cost, wants_body) = (
            price.route.to_string(),
            price.cost,
            price.rule.is_some_and(|r| {
                r.mcp.is_some() || r.usage.as_ref().is_some_and(|u| u.table.is_some())
            }),
        );
        // MCP's GET (the server's event stream), DELETE (closing the session) and
        // the rest of the transport are plumbing: free on an MCP rule. A rule placed
        // before it can still price them.
        let plumbing = wants_body && method != "POST";
        let include_usage = !end_of_stream
            && method == "POST"
            && price
                .rule
                .and_then(|r| r.usage.as_ref())
                .is_some_and(|u| u.stream_include_usage);
        let req = Request {
            method,
            raw_path,
            path,
            rule,
            mcp_payment: None,
        };
        if plumbing {
            let route = format!("{route}/{}", req.method);
            return self.proceed(host, cfg, req, route, 0);
        }
        if include_usage {
            // The body may grow; the headers go on before it is whole.
            host.set_request_header("content-length", None);
            self.include_usage = true;
        }
        if wants_body {
            if end_of_stream {
                // The headers are still held: stripped when the decision lets them go.
                return self.priced_by_body(host, cfg, req, &[]);
            }
            self.keep_headers(host, cfg);
            if let Some((claim, price, route)) = self.priced_by_claim(host, cfg, &req) {
                // Decided now, from the headers, which then carry the account; the body
                // is held until it is checked against them.
                log::debug!("{} {}: priced from its MCP headers", req.method, req.path);
                self.mcp_tool_call = claim.method == "tools/call";
                self.mcp_claim = Some(claim);
                return self.proceed(host, cfg, req, route, price);
            }
            // Envoy delivers no body to a filter that paused on the headers, so the
            // headers go on (the upstream waits for a body it gets only once paid for)
            // and the body is held until the decision.
            log::debug!("{} {}: reading the body to price it", req.method, req.path);
            // The headers go on before the decision: no client copy of the account
            // header, and no payment, goes with them (both were kept above).
            self.strip_account(host, cfg);
            self.stage = Stage::AwaitingBody(Box::new(req));
            self.headers_gone = true;
            return Flow::Continue;
        }
        self.proceed(host, cfg, req, route, cost)
    }

    /// Keeps the request headers a decision made after the headers went on needs.
    pub(super) fn keep_headers(&mut self, host: &impl HttpHost, cfg: &Config) {
        for name in LATE_HEADERS.iter().copied() {
            self.kept_headers.push((name, host.request_header(name)));
        }
        if let CredentialSource::Header(name) = &cfg.credential {
            self.kept_credential = Some((name.clone(), host.request_header(name)));
        }
    }

    /// An MCP request that names its method (and target) in `Mcp-Method`/`Mcp-Name`:
    /// its claim, price and route. `None` sends it the body way: an older client, or
    /// a caller with no credential that may pay in `params._meta` (x402's MCP transport).
    pub(super) fn priced_by_claim(
        &self,
        host: &impl HttpHost,
        cfg: &Config,
        req: &Request,
    ) -> Option<(mcp::Claim, u64, String)> {
        let rule = req.rule.and_then(|i| cfg.pricing.routes.get(i))?;
        let pricing = rule.mcp.as_ref()?;
        let claim = mcp::Claim::from_headers(
            host.request_header(mcp::METHOD_HEADER).as_deref(),
            host.request_header(mcp::NAME_HEADER).as_deref(),
        )?;
        let may_pay_in_body = cfg.accept_payments
            && cfg
                .credential
                .extract(|n| host.request_header(n), &req.raw_path)
                .is_err()
            && payments::payment_in(|n| host.request_header(n)).is_none();
        if may_pay_in_body {
            return None;
        }
        let price = pricing.price_claim(&claim, rule.cost);
        let route = format!("{}/{}", rule.name, price.what);
        Some((claim, price.cost, route))
    }

    /// Body and trailers wait while the decision is pending: letting them continue
    /// would make Envoy forward the paused headers before the request is paid for.
    /// An MCP route reads the whole body (up to `max_body_bytes`) to price it.
    pub(super) fn on_request_body(
        &mut self,
        host: &impl HttpHost,
        cfg: Option<&Config>,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        match &self.stage {
            Stage::Authorizing(_) | Stage::Leasing(_) | Stage::Parked(_) => {
                return Flow::Pause(None)
            }
            Stage::AwaitingBody(_) => {}
            _ if self.mcp_claim.is_some() || self.include_usage => {
                // The headers went on: from now on they are read as kept.
                self.headers_gone = true;
                let Some(cfg) = cfg else {
                    return Flow::Pause(None);
                };
                return self.held_body(host, cfg, body_size, end_of_stream);
            }
            _ => return Flow::Continue,
        }
        let Some(cfg) = cfg else {
            return Flow::Pause(None);
        };
        if body_size > cfg.max_body_bytes {
            return self.too_large(host, cfg);
        }
        if !end_of_stream {
            return Flow::Pause(None);
        }
        let Stage::AwaitingBody(req) = std::mem::replace(&mut self.stage, Stage::Done) else {
            return Flow::Pause(None);
        };
        let body = host.request_body(body_size).unwrap_or_default();
        self.ask_for_usage(host, body_size, &body);
        self.priced_by_body(host, cfg, *req, &body)
    }

    /// A body held after the decision went on with the headers: to check it against
    /// its MCP headers, or to ask a stream for its usage. Held whole, up to
    /// `max_body_bytes`.
    pub(super) fn held_body(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if body_size > cfg.max_body_bytes {
            self.include_usage = false;
            if self.mcp_claim.take().is_none() {
                // Too large to rewrite: it goes as sent, charged at the hold if no usage comes.
                return Flow::Continue;
            }
            if matches!(self.stage, Stage::Refused(_)) {
                self.stage = Stage::Done;
            }
            self.give_back_held(host, 413);
            return self.too_large(host, cfg);
        }
        if !end_of_stream {
            return Flow::Pause(None);
        }
        let body = host.request_body(body_size).unwrap_or_default();
        self.ask_for_usage(host, body_size, &body);
        self.check_claim(host, cfg, &body)
    }

    /// 413: a body over `max_body_bytes`, which farebox would have to read whole.
    pub(super) fn too_large(&mut self, host: &impl HttpHost, cfg: &Config) -> Flow {
        host.count(Metric::BodyTooLarge);
        self.access.decided(Outcome::TooLarge);
        let detail = format!(
            "the request body is larger than {} bytes",
            cfg.max_body_bytes
        );
        self.reply(host, cfg, &response::too_large(cfg, &detail))
    }

    /// Adds `stream_options.include_usage` to a streaming Chat Completions request
    /// whose route asks for it (see [`crate::usage::with_include_usage`]).
    pub(super) fn ask_for_usage(&mut self, host: &impl HttpHost, body_size: usize, body: &[u8]) {
        if !std::mem::take(&mut self.include_usage) {
            return;
        }
        if let Some(rewritten) = crate::usage::with_include_usage(body) {
            if host.set_request_body(body_size, &rewritten) {
                host.count(Metric::IncludeUsageAdded);
            }
        }
    }

    /// The whole body of a request priced from its MCP headers: on if it says what
    /// they said, else refused with 400 and given back.
    pub(super) fn check_claim(&mut self, host: &impl HttpHost, cfg: &Config, body: &[u8]) -> Flow {
        let Some(claim) = self.mcp_claim.take() else {
            return Flow::Continue;
        };
        match claim.check(body) {
            Ok(checked) => {
                if let Stage::Forwarded(f) = &mut self.stage {
                    if f.charge.is_some() && !checked.id.is_null() {
                        f.mcp_watch_id = Some(checked.id.clone());
                    }
                }
                self.mcp_id = Some(checked.id);
                match std::mem::replace(&mut self.stage, Stage::Done) {
                    Stage::Refused(refusal) => self.reply(host, cfg, &refusal),
                    other => {
                        self.stage = other;
                        Flow::Continue
                    }
                }
            }
            Err((mismatch, id)) => {
                host.count(Metric::McpHeaderMismatch);
                log::info!(
                    "400 on an MCP request whose headers say {:?}: {mismatch}",
                    claim.method
                );
                self.give_back_held(host, 400);
                self.access.decided(Outcome::HeaderMismatch);
                let problem = response::header_mismatch(cfg, &mismatch.to_string());
                let mut reply =
                    response::as_json_rpc(&problem, &mcp::mismatch_body(&id, &problem.body));
                // MCP's transport answers a mismatch with 400, which clients read as such.
                reply.status = 400;
                self.stage = Stage::Done;
                host.send_reply(&reply);
                Flow::Pause(None)
            }
        }
    }

    /// Trailers end the body: nothing is read from them.
    pub(super) fn on_request_trailers(
        &mut self,
        host: &impl HttpHost,
        cfg: Option<&Config>,
    ) -> Flow {
        let pending = matches!(
            self.stage,
            Stage::Authorizing(_) | Stage::Leasing(_) | Stage::Parked(_) | Stage::AwaitingBody(_)
        );
        if !pending && (self.mcp_claim.is_some() || self.include_usage) {
            let Some(cfg) = cfg else {
                return Flow::Pause(None);
            };
            self.headers_gone = true;
            let body = host.request_body(cfg.max_body_bytes).unwrap_or_default();
            self.ask_for_usage(host, body.len(), &body);
            return self.check_claim(host, cfg, &body);
        }
        match &self.stage {
            Stage::AwaitingBody(_) => {
                let Some(cfg) = cfg else {
                    return Flow::Pause(None);
                };
                let Stage::AwaitingBody(req) = std::mem::replace(&mut self.stage, Stage::Done)
                else {
                    return Flow::Pause(None);
                };
                let body = host.request_body(cfg.max_body_bytes).unwrap_or_default();
                self.ask_for_usage(host, body.len(), &body);
                self.priced_by_body(host, cfg, *req, &body)
            }
            Stage::Authorizing(_) | Stage::Leasing(_) | Stage::Parked(_) => Flow::Pause(None),
            _ => Flow::Continue,
        }
    }

    pub(super) fn priced_by_body(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        mut req: Request,
        body: &[u8],
    ) -> Flow {
        let Some(rule) = req.rule.and_then(|i| cfg.pricing.routes.get(i)) else {
            return self.proceed(
                host,
                cfg,
                req,
                cfg.pricing.default_route.clone(),
                cfg.pricing.default_cost,
            );
        };
        if let Some(spec) = &rule.usage {
            if let Some(table) = &spec.table {
                return self.priced_by_tokens(
                    host,
                    cfg,
                    req,
                    (&rule.name, spec.estimate),
                    table,
                    body,
                );
            }
        }
        let Some(pricing) = &rule.mcp else {
            return self.proceed(host, cfg, req, rule.name.clone(), rule.cost);
        };
        let price = pricing.price(body, rule.cost);
        self.mcp_tool_call = price.tool_call;
        req.mcp_payment = price
            .payment
            .as_ref()
            .and_then(payments::payment_in_mcp_meta);
        if price.single && price.cost > 0 {
            self.mcp_watch_id = Some(price.id.clone());
        }
        self.mcp_id = Some(price.id);
        let route = format!("{}/{}", rule.name, price.what);
        self.proceed(host, cfg, req, route, price.cost)
    }

    /// A route priced by a token table: the model the request names picks the prices
    /// (or is refused with 400), and the hold fits the request where it bounds its
    /// output. The route the ledger sees is `NAME/MODEL`, so a bill can be itemised.
    pub(super) fn priced_by_tokens(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        req: Request,
        (name, estimate): (&str, u64),
        table: &PriceTable,
        body: &[u8],
    ) -> Flow {
        let doc: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let model = doc
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| m.len() <= MAX_MODEL_LEN && !m.is_empty())
            .map(str::to_string);
        let prices = table.prices(model.as_deref());
        if prices.is_none() && table.model_from == ModelFrom::Request {
            host.count(Metric::UnknownModel);
            self.access.decided(Outcome::UnknownModel);
            log::info!(
                "400 on {} {}: model {:?} has no price",
                req.method,
                req.path,
                model
            );
            // A usage route: refused in OpenAI's error shape too, like its other refusals.
            self.openai_errors = true;
            return self.reply(host, cfg, &response::unknown_model(cfg, model.as_deref()));
        }
        let hold = prices
            .and_then(|p| table.hold(p, &doc, body.len()))
            .unwrap_or(estimate);
        let route = match &model {
            Some(m) => format!("{name}/{m}"),
            None => name.to_string(),
        };
        self.request_model = model;
        self.proceed(host, cfg, req, route, hold)
    }

    /// A priced request: identify the caller and find a decision.
    pub(super) fn proceed(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        mut req: Request,
        route: String,
        cost: u64,
    ) -> Flow {
        self.access.priced(&route, cost);
        let metered = req
            .rule
            .and_then(|i| cfg.pricing.routes.get(i))
            .is_some_and(|r| r.usage.is_some());
        self.openai_errors = metered;
        if cost == 0 {
            host.count(Metric::Free);
            self.access.decided(Outcome::Free);
            self.strip_account(host, cfg);
            self.stage = Stage::Done;
            return Flow::Continue;
        }
        // A payment goes to the service whether or not a credential comes with it: a
        // client that pays (say, on the retry of a 402 for its empty account) means it.
        // When both could pay, the payment pays; the credential names the account.
        // `payment_headers` (read with the headers) says whether a header can hold one: a
        // request without (nearly every one) costs no header lookups here.
        let payment = if cfg.accept_payments {
            self.payment_headers
                .then(|| payments::payment_in(|n| self.header(host, n)))
                .flatten()
                .or(req.mcp_payment.take())
        } else {
            None
        };
        let (credential, payment) = match cfg
            .credential
            .extract(|name| self.header(host, name), &req.raw_path)
        {
            Ok(c) => {
                self.pin_credential(host, cfg, &c);
                (Some(c), payment)
            }
            Err(e) => {
                match (payment, e) {
                    // A payment stands in for a credential; so, when configured, does
                    // nothing at all (the service then answers with what to pay).
                    (Some(p), _) => (None, Some(p)),
                    (None, IdentityError::Missing) if cfg.anonymous => (None, None),
                    (None, e) => {
                        host.count(Metric::Unauthenticated);
                        self.access.decided(Outcome::Unauthenticated);
                        let why = if e == IdentityError::Missing {
                            AuthProblem::Missing
                        } else {
                            AuthProblem::Invalid
                        };
                        log::debug!("401 on {} {}: {e}", req.method, req.path);
                        return self.reply(
                            host,
                            cfg,
                            &response::unauthorized(cfg, why, &e.to_string(), Freshness::NoStore),
                        );
                    }
                }
            }
        };
        // A payment pays the price as quoted: usage is not metered against it.
        self.usage_rule = if metered && credential.is_some() && payment.is_none() {
            req.rule
        } else {
            None
        };

        // Decisions about a payment, or about nobody, are never cached.
        let leased = cfg.mode == Mode::Lease && credential.is_some() && payment.is_none();
        // Lease mode pays from the lease first and only looks at cached refusals when the
        // lease cannot pay (a hash and a shared-data read fewer on its common path).
        let (cache_key, local_key) = match (&credential, &payment) {
            (Some(c), None) if cfg.cache_max_entries > 0 && !leased => {
                // The worker's own copy first: no shared-data read, no SHA-256.
                let local = self.worker.decisions.borrow().key(&route, cost, c);
                if let Some(flow) = self.serve_local(host, cfg, local, &route) {
                    return flow;
                }
                (
                    Some(CacheKey::new(&cfg.fingerprint, &route, cost, c)),
                    Some(local),
                )
            }
            _ => (None, None),
        };
        if let Some(flow) =
            self.serve_cached(host, cfg, cache_key.as_ref(), local_key, &route, true)
        {
            return flow;
        }
        // A lease spend needs no request id unless the response is metered; a lease call
        // makes one when it needs it.
        let request_id = if leased && self.usage_rule.is_none() {
            String::new()
        } else {
            self.request_id(host)
        };
        let pending = Pending {
            token: 0,
            request_id,
            credential,
            payment,
            route,
            cost,
            cache_key,
            parked_since_ms: 0,
            method: req.method,
            path: req.path,
            recall_since_ms: 0,
            wake_at_ms: 0,
        };
        if leased {
            self.spend_from_lease(host, cfg, pending)
        } else {
            self.authorize(host, cfg, pending)
        }
    }

    /// Envoy's `x-request-id` when it is usable, so the service's ledger lines up
    /// with Envoy's access log; otherwise one made up here, unique within this worker.
    pub(super) fn request_id(&self, host: &impl HttpHost) -> String {
        if let Some(id) = self.header(host, "x-request-id") {
            if !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_LEN
                && id.iter().all(|b| (0x21..=0x7e).contains(b))
            {
                if let Ok(id) = String::from_utf8(id) {
                    return id;
                }
            }
        }
        self.worker.make_id(host)
    }
}
