//! One request's way through the gate: price it, identify the caller, find a
//! decision (cache, lease or balance service), act on it, and settle what the
//! request really cost: nothing if the upstream did not serve it, its usage
//! if the route is priced by usage.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use serde_json::Value;

use crate::access_log::{Outcome, Record};
use crate::balance_api::{
    authorize_body, call, lease_body, parse_authorize, parse_lease, AuthorizeRequest,
    CalloutResponse, LeaseAnswer, LeaseRequest, UsageLine, Verdict,
};
use crate::cache::{self, CacheKey, Entry, Lookup};
use crate::config::{Config, FailureMode, Mode};
use crate::decision::{Decision, Denial};
use crate::host::{Host, HttpHost};
use crate::identity::{CredentialSource, IdentityError};
use crate::lease::{self, Grant, LeaseRecord, Step};
use crate::lease::{LeaseKey, View};
use crate::local_cache::{LocalCache, LocalKey};
use crate::mcp;
use crate::metrics::Metric;
use crate::outbox::{Finished, Job, Outbox};
use crate::payments::{self, Payment};
use crate::pricing::normalize_path;
use crate::response::{self, AuthProblem, Freshness, Reply};
use crate::tokens::{ModelFrom, PriceTable, MAX_MODEL_LEN};
use crate::usage::{BodyKind, Meter, Metered};

/// What the host should do with the request after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Pause,
    /// Paused until another request's lease call is over: call [`Gate::on_wake`] from a timer.
    Park,
}

/// State shared by every stream of one VM (one Envoy worker).
#[derive(Debug, Default)]
pub struct Worker {
    pub outbox: RefCell<Outbox>,
    /// Cached decisions (authorize mode), copied from shared data for this worker.
    decisions: RefCell<LocalCache>,
    /// Leases this worker took and must settle.
    owned: RefCell<Vec<Owned>>,
    request_seq: Cell<u64>,
    /// Random, per worker: makes the ids it invents unique (see [`Worker::make_id`]).
    tag: Cell<u64>,
    /// Names this Envoy process to the balance service when taking leases.
    pub holder: RefCell<String>,
    /// Renewals ahead of need, waiting for the timer to send them from the root
    /// context (a stream's own calls die with the stream).
    renewals: RefCell<Vec<Renewal>>,
    /// Renewals sent, by call token.
    renewing: RefCell<Vec<(u32, Renewal)>>,
}

/// At most this many renewals ahead of need per worker at once; past it, a
/// lease is renewed when it runs out instead.
const MAX_RENEWALS: usize = 256;

#[derive(Debug)]
struct Owned {
    key: String,
    lease_id: String,
    spend_until_ms: u64,
    next_settle_ms: u64,
    settling: bool,
}

/// A lease call made ahead of need, for an account whose lease is running low.
#[derive(Debug)]
struct Renewal {
    slot: String,
    key: LeaseKey,
    /// The credential, as the contract names the account by it. Never logged.
    credential: String,
    cost: u64,
    request_id: String,
}

/// A lease 402 is kept in the decision cache at most this long, whatever the
/// service allows, and only for requests that waited for the call it answered.
pub const LEASE_DENY_MAX_AGE_S: u32 = 1;

/// Status recorded on a refund for a request whose outcome the client never saw.
const CLIENT_GONE: u16 = 499;
const MAX_REQUEST_ID_LEN: usize = 128;

#[derive(Debug)]
enum Stage {
    Start,
    /// Nothing to bill: free route, or a request we answered ourselves.
    Done,
    /// Reading the request body to price it (MCP).
    AwaitingBody(Box<Request>),
    /// Authorize call in flight; the request is paused.
    Authorizing(Box<Pending>),
    /// Lease call in flight (we hold the account's renewal lock).
    Leasing(Box<Pending>),
    /// Waiting for another request's lease call.
    Parked(Box<Pending>),
    /// Forwarded upstream.
    Forwarded(Box<Forwarded>),
}

/// What is known of a request before its price.
#[derive(Debug)]
struct Request {
    method: String,
    raw_path: String,
    path: String,
    /// Index of the matching route rule.
    rule: Option<usize>,
}

/// A priced, identified request on its way to a decision.
#[derive(Debug)]
struct Pending {
    token: u32,
    request_id: String,
    /// `None`: anonymous (paying with `payment`, or asking what to pay).
    credential: Option<String>,
    payment: Option<Payment>,
    route: String,
    cost: u64,
    cache_key: Option<CacheKey>,
    parked_since_ms: u64,
    /// Method and normalized path, for an authorize call.
    method: String,
    path: String,
    /// When the service first answered that it is recalling credit for this request (0: never).
    recall_since_ms: u64,
    /// Parked until this time before asking again (0: until the lease call it waits for ends).
    wake_at_ms: u64,
}

#[derive(Debug, Default)]
struct Forwarded {
    /// Set while the money can still be given back or adjusted.
    charge: Option<Charge>,
    balance: Option<i64>,
    /// The remaining budget the service answered, for `budget_header`.
    budget: Option<i64>,
    /// Headers for the client's response (`PAYMENT-RESPONSE`).
    headers: Vec<(&'static str, String)>,
    /// Usage pricing: the hold, and the meter once the response type is known.
    usage: Option<Metering>,
}

#[derive(Debug)]
struct Metering {
    hold: u64,
    meter: Option<Meter>,
}

#[derive(Debug)]
enum Charge {
    /// Debited by the service for this request.
    Authorized {
        request_id: String,
        credential: String,
        cost: u64,
    },
    /// Spent from a lease in shared data.
    Leased {
        key: String,
        lease_id: String,
        request_id: String,
        credential: String,
        cost: u64,
    },
}

impl Pending {
    /// What this request paid through authorize, if it can be given back
    /// (anonymous payments are settled by the service and are not refunded here).
    fn authorized(self) -> Option<Charge> {
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
    fn undo(self, status: u16) -> Option<Job> {
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

pub struct Gate {
    /// `None` when the plugin has no valid configuration (Envoy should not let that happen).
    cfg: Option<Rc<Config>>,
    worker: Rc<Worker>,
    stage: Stage,
    /// JSON-RPC id of an MCP call: refusals are JSON-RPC answers for it.
    mcp_id: Option<Value>,
    /// The MCP call is one `tools/call` (refused with a tool result).
    mcp_tool_call: bool,
    /// A paid single MCP call: its answer is read for a JSON-RPC error, which is
    /// given back. The id until the response headers, then the watch.
    mcp_watch_id: Option<Value>,
    mcp_answer: Option<mcp::AnswerWatch>,
    /// x402's `PaymentRequired` of a 402 with offers, for an MCP tool result.
    x402_required: Option<Value>,
    /// A usage-priced (LLM) route: refusals carry OpenAI's `error` object too.
    openai_errors: bool,
    /// The x402 payment in an MCP call's `params._meta` (never logged).
    mcp_payment: Option<payments::Payment>,
    /// Index of the route rule that prices this request by usage.
    usage_rule: Option<usize>,
    /// The model a token-table route's request named.
    request_model: Option<String>,
    /// The request headers went on before the decision (MCP pricing reads the body
    /// first), so they can no longer carry the account.
    headers_gone: bool,
    /// The request headers the decision needs, kept when the headers went on: Envoy
    /// no longer lets a filter read them then.
    kept_headers: Vec<(&'static str, Option<Vec<u8>>)>,
    kept_credential: Option<(String, Option<Vec<u8>>)>,
    /// An MCP request priced from its `Mcp-Method`/`Mcp-Name` headers, whose body is
    /// still to be checked against them (it is held until then).
    mcp_claim: Option<mcp::Claim>,
    /// A refusal of such a request, waiting for the body: it answers the JSON-RPC id
    /// there, which Envoy lets a filter read only once the headers went on.
    deferred: Option<Reply>,
    /// The request body is held to add `stream_options.include_usage` (its
    /// `content-length` went with the headers).
    include_usage: bool,
    /// Whether the client sent a payment header, read with the headers (from the one
    /// header-map read), so that stripping payments costs no host call when there is none.
    payment_headers: bool,
    /// What the access log is told about this request.
    access: Record,
}

/// Request headers read after the headers phase (besides the credential's own).
const LATE_HEADERS: [&str; 8] = [
    "authorization",
    "payment-signature",
    "x-request-id",
    "accept",
    ":authority",
    ":scheme",
    "x-forwarded-proto",
    ":path",
];

impl Gate {
    pub fn new(cfg: Option<Rc<Config>>, worker: Rc<Worker>) -> Gate {
        let access = match &cfg {
            Some(c) if !c.access_log => Record::off(),
            _ => Record::default(),
        };
        Gate {
            cfg,
            worker,
            stage: Stage::Start,
            mcp_id: None,
            mcp_tool_call: false,
            mcp_watch_id: None,
            mcp_answer: None,
            x402_required: None,
            openai_errors: false,
            mcp_payment: None,
            usage_rule: None,
            request_model: None,
            headers_gone: false,
            kept_headers: Vec::new(),
            kept_credential: None,
            mcp_claim: None,
            deferred: None,
            include_usage: false,
            payment_headers: false,
            access,
        }
    }

    /// The access-log fields that changed since the last call, for the host layer
    /// to publish (empty, and allocation-free, when nothing changed).
    pub fn access_log_changes(&mut self) -> Vec<(&'static str, String)> {
        self.access.changes()
    }

    /// Hands the changed access-log fields to the host (one property each). Must run
    /// with the stream as the effective context.
    pub fn publish_access_log(&mut self, host: &impl HttpHost) {
        if self.access.is_dirty() {
            self.access
                .publish(|name, value| host.set_property(name, value));
        }
    }

    /// A request header: from the host while the headers phase lasts, else as kept.
    fn header(&self, host: &impl HttpHost, name: &str) -> Option<Vec<u8>> {
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
    fn strip_account(&self, host: &impl HttpHost, cfg: &Config) {
        if !self.headers_gone {
            host.set_request_header(&cfg.account_header, None);
        }
        self.strip_payment(host);
    }

    /// A payment is for the gate: the upstream never sees one (it is a bearer
    /// instrument until settled). `Authorization` goes only when it holds a payment.
    fn strip_payment(&self, host: &impl HttpHost) {
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
    fn pin_credential(&self, host: &impl HttpHost, cfg: &Config, credential: &str) {
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

    /// Request headers of a request without a body.
    pub fn on_request_headers(&mut self, host: &impl HttpHost) -> Flow {
        self.on_request_headers_eos(host, true)
    }

    pub fn on_request_headers_eos(&mut self, host: &impl HttpHost, end_of_stream: bool) -> Flow {
        let Some(cfg) = self.cfg.clone() else {
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
            return Flow::Pause;
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
        };
        if plumbing {
            let route = format!("{route}/{}", req.method);
            return self.proceed(host, &cfg, req, route, 0);
        }
        if include_usage {
            // The body may grow; the headers go on before it is whole.
            host.set_request_header("content-length", None);
            self.include_usage = true;
        }
        if wants_body {
            if end_of_stream {
                // The headers are still held: stripped when the decision lets them go.
                return self.priced_by_body(host, &cfg, req, &[]);
            }
            self.keep_headers(host, &cfg);
            if let Some((claim, price, route)) = self.priced_by_claim(host, &cfg, &req) {
                // Decided now, from the headers, which then carry the account; the body
                // is held until it is checked against them.
                log::debug!("{} {}: priced from its MCP headers", req.method, req.path);
                self.mcp_tool_call = claim.method == "tools/call";
                self.mcp_claim = Some(claim);
                return self.proceed(host, &cfg, req, route, price);
            }
            // Envoy delivers no body to a filter that paused on the headers, so the
            // headers go on (the upstream waits for a body it gets only once paid for)
            // and the body is held until the decision.
            log::debug!("{} {}: reading the body to price it", req.method, req.path);
            // The headers go on before the decision: no client copy of the account
            // header, and no payment, goes with them (both were kept above).
            self.strip_account(host, &cfg);
            self.stage = Stage::AwaitingBody(Box::new(req));
            self.headers_gone = true;
            return Flow::Continue;
        }
        self.proceed(host, &cfg, req, route, cost)
    }

    /// Keeps the request headers a decision made after the headers went on needs.
    fn keep_headers(&mut self, host: &impl HttpHost, cfg: &Config) {
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
    fn priced_by_claim(
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
    pub fn on_request_body(
        &mut self,
        host: &impl HttpHost,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        match &self.stage {
            Stage::Authorizing(_) | Stage::Leasing(_) | Stage::Parked(_) => return Flow::Pause,
            Stage::AwaitingBody(_) => {}
            _ if self.mcp_claim.is_some() || self.include_usage => {
                return self.held_body(host, body_size, end_of_stream)
            }
            _ => return Flow::Continue,
        }
        let Some(cfg) = self.cfg.clone() else {
            return Flow::Pause;
        };
        if body_size > cfg.max_body_bytes {
            return self.too_large(host, &cfg);
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        let Stage::AwaitingBody(req) = std::mem::replace(&mut self.stage, Stage::Done) else {
            return Flow::Pause;
        };
        let body = host.request_body(body_size).unwrap_or_default();
        self.ask_for_usage(host, body_size, &body);
        self.priced_by_body(host, &cfg, *req, &body)
    }

    /// A body held after the decision went on with the headers: to check it against
    /// its MCP headers, or to ask a stream for its usage. Held whole, up to
    /// `max_body_bytes`.
    fn held_body(&mut self, host: &impl HttpHost, body_size: usize, end_of_stream: bool) -> Flow {
        // The headers went on: from now on they are read as kept.
        self.headers_gone = true;
        let Some(cfg) = self.cfg.clone() else {
            return Flow::Pause;
        };
        if body_size > cfg.max_body_bytes {
            self.include_usage = false;
            if self.mcp_claim.take().is_none() {
                // Too large to rewrite: it goes as sent, charged at the hold if no usage comes.
                return Flow::Continue;
            }
            self.deferred = None;
            self.give_back_held(host, 413);
            return self.too_large(host, &cfg);
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        let body = host.request_body(body_size).unwrap_or_default();
        self.ask_for_usage(host, body_size, &body);
        self.check_claim(host, &cfg, &body)
    }

    /// 413: a body over `max_body_bytes`, which farebox would have to read whole.
    fn too_large(&mut self, host: &impl HttpHost, cfg: &Config) -> Flow {
        host.count(Metric::BodyTooLarge);
        self.access.decided(Outcome::TooLarge);
        let detail = format!(
            "the request body is larger than {} bytes",
            cfg.max_body_bytes
        );
        self.reply(host, &response::too_large(cfg, &detail))
    }

    /// Adds `stream_options.include_usage` to a streaming Chat Completions request
    /// whose route asks for it (see [`crate::usage::with_include_usage`]).
    fn ask_for_usage(&mut self, host: &impl HttpHost, body_size: usize, body: &[u8]) {
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
    fn check_claim(&mut self, host: &impl HttpHost, cfg: &Config, body: &[u8]) -> Flow {
        let Some(claim) = self.mcp_claim.take() else {
            return Flow::Continue;
        };
        match claim.check(body) {
            Ok(checked) => {
                let charged = matches!(&self.stage, Stage::Forwarded(f) if f.charge.is_some());
                if charged && !checked.id.is_null() {
                    self.mcp_watch_id = Some(checked.id.clone());
                }
                self.mcp_id = Some(checked.id);
                match self.deferred.take() {
                    Some(refusal) => self.reply(host, &refusal),
                    None => Flow::Continue,
                }
            }
            Err((mismatch, id)) => {
                host.count(Metric::McpHeaderMismatch);
                log::info!(
                    "400 on an MCP request whose headers say {:?}: {mismatch}",
                    claim.method
                );
                self.deferred = None;
                self.give_back_held(host, 400);
                self.access.decided(Outcome::HeaderMismatch);
                let problem = response::header_mismatch(cfg, &mismatch.to_string());
                let mut reply =
                    response::as_json_rpc(&problem, &mcp::mismatch_body(&id, &problem.body));
                // MCP's transport answers a mismatch with 400, which clients read as such.
                reply.status = 400;
                self.stage = Stage::Done;
                host.send_reply(&reply);
                Flow::Pause
            }
        }
    }

    /// Gives back what a request whose body is refused was charged (once: the charge
    /// is taken). Its headers went upstream, its body never does: the upstream
    /// request is reset with the local reply.
    fn give_back_held(&mut self, host: &impl HttpHost, status: u16) {
        if let Stage::Forwarded(f) = &mut self.stage {
            if let Some(charge) = f.charge.take() {
                give_back(&self.worker, &mut self.access, host, charge, status);
            }
        }
    }

    /// Trailers end the body: nothing is read from them.
    pub fn on_request_trailers(&mut self, host: &impl HttpHost) -> Flow {
        let pending = matches!(
            self.stage,
            Stage::Authorizing(_) | Stage::Leasing(_) | Stage::Parked(_) | Stage::AwaitingBody(_)
        );
        if !pending && (self.mcp_claim.is_some() || self.include_usage) {
            let Some(cfg) = self.cfg.clone() else {
                return Flow::Pause;
            };
            self.headers_gone = true;
            let body = host.request_body(cfg.max_body_bytes).unwrap_or_default();
            self.ask_for_usage(host, body.len(), &body);
            return self.check_claim(host, &cfg, &body);
        }
        match &self.stage {
            Stage::AwaitingBody(_) => {
                let Some(cfg) = self.cfg.clone() else {
                    return Flow::Pause;
                };
                let Stage::AwaitingBody(req) = std::mem::replace(&mut self.stage, Stage::Done)
                else {
                    return Flow::Pause;
                };
                let body = host.request_body(cfg.max_body_bytes).unwrap_or_default();
                self.ask_for_usage(host, body.len(), &body);
                self.priced_by_body(host, &cfg, *req, &body)
            }
            Stage::Authorizing(_) | Stage::Leasing(_) | Stage::Parked(_) => Flow::Pause,
            _ => Flow::Continue,
        }
    }

    fn priced_by_body(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        req: Request,
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
        self.mcp_payment = price
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
    fn priced_by_tokens(
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
            return self.reply(host, &response::unknown_model(cfg, model.as_deref()));
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
    fn proceed(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        req: Request,
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
        let payment = if cfg.accept_payments {
            payments::payment_in(|n| self.header(host, n)).or(self.mcp_payment.take())
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

    /// Acts on a fresh decision in this worker's copy of the cache, if it has one.
    /// Authorize mode only: in lease mode a cached refusal is cleared from shared data
    /// when credit arrives, which a copy would not see.
    fn serve_local(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        key: LocalKey,
        route: &str,
    ) -> Option<Flow> {
        if cfg.mode != Mode::Authorize {
            return None;
        }
        let (entry, now) = self
            .worker
            .decisions
            .borrow_mut()
            .get(&cfg.fingerprint, key, || host.now_ms())?;
        Some(self.serve_entry(host, cfg, entry, now, route))
    }

    /// Acts on a cached decision (served from the cache: no balance shown again).
    fn serve_entry(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        entry: Entry,
        now: u64,
        route: &str,
    ) -> Flow {
        host.count(Metric::CacheHits);
        self.access.cache_hit();
        let freshness = Freshness::Private(entry.remaining_s(now));
        // A balance from when the decision was cached is stale: not shown again.
        let decision = match entry.decision {
            Decision::Allow { account_id, .. } => Decision::allow(account_id, None),
            other => other,
        };
        self.act(host, cfg, route, decision, freshness, None)
    }

    /// Acts on a fresh cached decision, if there is one (a cached 402 only
    /// when `deny` says so), and copies it to this worker's cache under `local`.
    fn serve_cached(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        key: Option<&CacheKey>,
        local: Option<LocalKey>,
        route: &str,
        deny: bool,
    ) -> Option<Flow> {
        let key = key?;
        let slot = key.slot_key(cfg.cache_max_entries);
        let (bytes, cas) = host.shared_get(&slot)?;
        let now = host.now_ms();
        match cache::lookup(key, &bytes, now) {
            Lookup::Fresh(entry) if deny || !matches!(entry.decision, Decision::Deny(_)) => {
                if let (Some(local), Mode::Authorize) = (local, cfg.mode) {
                    self.worker.decisions.borrow_mut().put(
                        &cfg.fingerprint,
                        cfg.cache_max_entries,
                        local,
                        entry.clone(),
                        now,
                    );
                }
                Some(self.serve_entry(host, cfg, entry, now, route))
            }
            // Clearing frees the value's memory; losing a CAS race to a fresh write is fine.
            Lookup::Expired => {
                host.shared_set(&slot, &[], cas);
                None
            }
            Lookup::Fresh(_) | Lookup::Miss => None,
        }
    }

    fn authorize(&mut self, host: &impl HttpHost, cfg: &Config, p: Pending) -> Flow {
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
        self.start_call(host, cfg, false, &body, p, || {})
    }

    /// Starts an authorize or lease call for `p` and pauses the request until its
    /// answer; a call the host refuses is a service failure (after `undo` cleans up).
    fn start_call(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        lease: bool,
        body: &[u8],
        mut p: Pending,
        undo: impl FnOnce(),
    ) -> Flow {
        let path = if lease {
            &cfg.lease.path
        } else {
            &cfg.authorize_path
        };
        match call(host, cfg, path, &p.request_id, body) {
            Ok(token) => {
                host.count(Metric::Callouts);
                log::debug!("request {}: call {token} to {path} started", p.request_id);
                p.token = token;
                let p = Box::new(p);
                self.stage = if lease {
                    Stage::Leasing(p)
                } else {
                    Stage::Authorizing(p)
                };
                Flow::Pause
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

    /// Lease mode: pay from the account's lease, or take the renewal lock and ask
    /// for a new one, or wait for whoever holds the lock.
    fn spend_from_lease(&mut self, host: &impl HttpHost, cfg: &Config, mut p: Pending) -> Flow {
        let Some(credential) = p.credential.clone() else {
            return self.fail(host, cfg, None);
        };
        let key = LeaseKey::new(&cfg.cluster, &credential);
        let slot = key.slot_key(cfg.lease.max_entries);
        let lock_ms = lock_ms(cfg);
        for _ in 0..lease::MAX_CAS_RETRIES {
            let (bytes, cas) = raw_slot(host, &slot);
            let now = host.now_ms();
            let current = match lease::view(&key, bytes.as_deref(), now) {
                View::Mine(current) => current,
                View::Occupied => {
                    // Another account's lease holds this slot: this request is paid
                    // per request instead (the lease table is full there).
                    host.count(Metric::LeaseSlotBusy);
                    if p.request_id.is_empty() {
                        p.request_id = self.request_id(host);
                    }
                    return self.authorize(host, cfg, p);
                }
            };
            let may_renew = self.worker.renewals_open();
            match lease::step(
                key.owner(),
                current.as_ref(),
                p.cost,
                now,
                lock_ms,
                may_renew,
            ) {
                Step::Spend { record, renew } => {
                    if host.shared_set(&slot, &record.encode(), cas) {
                        host.add(Metric::LeaseUnitsSpent, p.cost);
                        if renew {
                            let request_id = self.worker.make_id(host);
                            self.worker.renewals.borrow_mut().push(Renewal {
                                slot: slot.clone(),
                                key,
                                credential: credential.clone(),
                                cost: p.cost,
                                request_id,
                            });
                        }
                        let charge = Charge::Leased {
                            key: slot,
                            lease_id: record.lease_id.clone(),
                            request_id: p.request_id,
                            credential,
                            cost: p.cost,
                        };
                        let allow = Decision::allow(record.account_id, None);
                        return self.act(
                            host,
                            cfg,
                            &p.route,
                            allow,
                            Freshness::NoStore,
                            Some(charge),
                        );
                    }
                }
                Step::Lock { record } => {
                    // No lease can pay. A refusal the service let us cache answers first:
                    // a 401/403 always; a 402 only to a request that waited for the very
                    // lease call that was refused. A new request asks again, so that a
                    // top-up while other gateways hold leases is usable at once.
                    if p.cache_key.is_none() && cfg.cache_max_entries > 0 {
                        p.cache_key = Some(CacheKey::new(
                            &cfg.fingerprint,
                            &p.route,
                            p.cost,
                            &credential,
                        ));
                    }
                    let waited = p.parked_since_ms != 0 && p.recall_since_ms == 0;
                    if let Some(flow) =
                        self.serve_cached(host, cfg, p.cache_key.as_ref(), None, &p.route, waited)
                    {
                        return flow;
                    }
                    if host.shared_set(&slot, &record.encode(), cas) {
                        return self.take_lease(host, cfg, slot, &credential, p);
                    }
                }
                Step::Wait => break,
            }
        }
        if p.parked_since_ms == 0 {
            host.count(Metric::LeaseWaits);
            p.parked_since_ms = host.now_ms();
        }
        self.stage = Stage::Parked(Box::new(p));
        Flow::Park
    }

    fn take_lease(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        slot: String,
        credential: &str,
        mut p: Pending,
    ) -> Flow {
        if p.request_id.is_empty() {
            p.request_id = self.request_id(host);
        }
        let holder = self.worker.holder.borrow().clone();
        // An account whose credit had to be recalled from other gateways is short
        // against the fleet: ask for this request only, and leave the rest unreserved
        // for the others (taking it all would only make them recall it back).
        let want = if p.recall_since_ms != 0 {
            p.cost
        } else {
            lease::want(cfg.lease.want, p.cost)
        };
        let body = lease_body(&LeaseRequest {
            account: credential,
            want,
            min: p.cost,
            request_id: &p.request_id,
            holder: &holder,
        });
        let key = LeaseKey::new(&cfg.cluster, credential);
        self.start_call(host, cfg, true, &body, p, || unlock(host, &slot, &key, 0))
    }

    /// A parked request's timer tick: try again. Returns how it went, like
    /// [`Gate::on_request_headers`]; `Park` means still waiting.
    pub fn on_wake(&mut self, host: &impl HttpHost) -> Flow {
        let Some(cfg) = self.cfg.clone() else {
            return Flow::Pause;
        };
        // A wake for a stream that is not parked (a stale timer) leaves it as it is: a
        // pending decision dropped here would let the request through unpaid.
        let p = match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Parked(p) => p,
            other => {
                self.stage = other;
                return Flow::Pause;
            }
        };
        let now = host.now_ms();
        if now < p.wake_at_ms {
            self.stage = Stage::Parked(p);
            return Flow::Park;
        }
        // The lock holder has the call timeout to finish, and a recall its wait; past
        // that (plus slack) something is wrong, and this request is answered as a
        // service failure rather than hang.
        let limit = u64::try_from(cfg.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_mul(2)
            .saturating_add(1_000)
            .saturating_add(cfg.lease.recall_wait_ms);
        if now.saturating_sub(p.parked_since_ms) > limit {
            host.count(Metric::CalloutFailures);
            log::warn!("request {} waited too long for a lease", p.request_id);
            return self.fail(host, &cfg, None);
        }
        self.spend_from_lease(host, &cfg, *p)
    }

    /// The answer to our authorize or lease call. Returns `Continue` when the
    /// request may now go upstream (the caller resumes it), `Park` when it waits
    /// for recalled credit (the caller wakes it from the timer).
    pub fn on_callout_response(
        &mut self,
        host: &impl HttpHost,
        token: u32,
        resp: &CalloutResponse,
    ) -> Flow {
        let Some(cfg) = self.cfg.clone() else {
            return Flow::Pause;
        };
        match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Authorizing(p) if p.token == token => self.authorized(host, &cfg, *p, resp),
            Stage::Leasing(p) if p.token == token => self.leased(host, &cfg, *p, resp),
            other => {
                self.stage = other;
                log::warn!("answer for unknown call {token} ignored");
                Flow::Pause
            }
        }
    }

    fn authorized(
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

    fn leased(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        mut p: Pending,
        resp: &CalloutResponse,
    ) -> Flow {
        log::debug!(
            "request {}: lease call {} answered {:?}",
            p.request_id,
            p.token,
            resp.status
        );
        let credential = p.credential.clone().unwrap_or_default();
        let key = LeaseKey::new(&cfg.cluster, &credential);
        let slot = key.slot_key(cfg.lease.max_entries);
        match parse_lease(resp, p.cost, cfg.cache_max_ttl_s) {
            Ok(LeaseAnswer::Granted(grant)) => {
                forget(host, cfg, p.cache_key.as_ref());
                match self
                    .worker
                    .install_grant(host, cfg, &slot, &key, &grant, p.cost)
                {
                    Some(_) => {
                        host.add(Metric::LeaseUnitsSpent, p.cost);
                        let charge = Charge::Leased {
                            key: slot,
                            lease_id: grant.lease_id.clone(),
                            request_id: p.request_id,
                            credential,
                            cost: p.cost,
                        };
                        let allow = Decision::Allow {
                            account_id: grant.account_id.clone(),
                            balance: grant.balance,
                            budget: grant.budget,
                            payment_response: None,
                        };
                        self.act(host, cfg, &p.route, allow, Freshness::NoStore, Some(charge))
                    }
                    None => self.fail(host, cfg, None),
                }
            }
            Ok(LeaseAnswer::Decided(mut verdict)) => {
                unlock(host, &slot, &key, 0);
                // A 402 in lease mode holds only for a moment (the account may be topped
                // up while other gateways hold leases): kept at most a second, for the
                // requests that waited for this call, and the client is not told to keep it.
                let deny = matches!(verdict.decision, Decision::Deny(_));
                if deny {
                    verdict.max_age_s = verdict.max_age_s.map(|s| s.min(LEASE_DENY_MAX_AGE_S));
                }
                let freshness = self.remember(host, cfg, p.cache_key.as_ref(), &verdict);
                let freshness = if deny { Freshness::NoStore } else { freshness };
                // A lease call never debits without a grant, so there is no charge to keep.
                self.act(host, cfg, &p.route, verdict.decision, freshness, None)
            }
            Ok(LeaseAnswer::Recall {
                verdict,
                retry_after_ms,
            }) => {
                unlock(host, &slot, &key, 0);
                // An older refusal no longer holds: the account has credit, held elsewhere.
                forget(host, cfg, p.cache_key.as_ref());
                let now = host.now_ms();
                let since = match (p.recall_since_ms, p.parked_since_ms) {
                    (0, 0) => now,
                    (0, parked) => parked,
                    (recalled, _) => recalled,
                };
                let wake_at = now.saturating_add(retry_after_ms);
                if wake_at > since.saturating_add(cfg.lease.recall_wait_ms) {
                    log::info!(
                        "request {}: recalled credit did not arrive within {} ms",
                        p.request_id,
                        cfg.lease.recall_wait_ms
                    );
                    return self.act(
                        host,
                        cfg,
                        &p.route,
                        verdict.decision,
                        Freshness::NoStore,
                        None,
                    );
                }
                host.count(Metric::LeaseRecallWaits);
                p.recall_since_ms = since;
                p.wake_at_ms = wake_at;
                if p.parked_since_ms == 0 {
                    p.parked_since_ms = now;
                }
                self.stage = Stage::Parked(Box::new(p));
                Flow::Park
            }
            Err(failure) => {
                host.count(Metric::CalloutFailures);
                log::warn!("lease for request {} failed: {failure}", p.request_id);
                unlock(host, &slot, &key, 0);
                // The service may have granted a lease we will never use: release it.
                self.worker.outbox.borrow_mut().push(
                    host,
                    Job::Cancel {
                        request_id: p.request_id,
                    },
                );
                self.fail(host, cfg, None)
            }
        }
    }

    /// Caches a decision the service allowed us to keep; returns what to tell the client.
    fn remember(
        &self,
        host: &impl Host,
        cfg: &Config,
        key: Option<&CacheKey>,
        v: &Verdict,
    ) -> Freshness {
        if !v.decision.cacheable() {
            return Freshness::NoStore;
        }
        if let (Some(key), Some(max_age)) = (key, v.max_age_s) {
            let expires_at_ms = host.now_ms().saturating_add(u64::from(max_age) * 1000);
            let entry = Entry {
                decision: v.decision.clone(),
                expires_at_ms,
            };
            // Last writer wins: both writers hold a decision the service just made.
            host.shared_set(
                &key.slot_key(cfg.cache_max_entries),
                &cache::encode(key, &entry),
                None,
            );
        }
        Freshness::from_max_age(v.max_age_s)
    }

    pub fn on_response_headers(&mut self, host: &impl HttpHost) {
        let Some(cfg) = self.cfg.clone() else { return };
        let Stage::Forwarded(f) = &mut self.stage else {
            return;
        };
        for (name, value) in f.headers.drain(..) {
            host.set_response_header(name, &value);
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
        if let Some(id) = self.mcp_watch_id.take().filter(|_| f.charge.is_some()) {
            self.mcp_answer = host
                .response_header("content-type")
                .and_then(|ct| mcp::AnswerKind::from_content_type(&String::from_utf8_lossy(&ct)))
                .map(|kind| mcp::AnswerWatch::new(kind, id));
        }
        if let Some(usage) = &mut f.usage {
            let kind = host
                .response_header("content-type")
                .and_then(|ct| BodyKind::from_content_type(&String::from_utf8_lossy(&ct)));
            let spec = self
                .usage_rule
                .and_then(|i| cfg.pricing.routes.get(i))
                .and_then(|r| r.usage.clone());
            match (kind, spec) {
                (Some(kind), Some(spec)) => {
                    usage.meter = Some(Meter::for_model(
                        kind,
                        spec,
                        cfg.usage_tail_bytes,
                        self.request_model.clone(),
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
    pub fn on_response_body(
        &mut self,
        host: &impl HttpHost,
        body_size: usize,
        end_of_stream: bool,
    ) {
        let Stage::Forwarded(f) = &mut self.stage else {
            return;
        };
        if let Some(watch) = &mut self.mcp_answer {
            if body_size > 0 {
                if let Some(chunk) = host.response_body(body_size) {
                    watch.feed(&chunk);
                }
            }
            if end_of_stream {
                let errored = watch.is_error();
                self.mcp_answer = None;
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
        let Some(Metering { hold, meter }) = f.usage.take() else {
            return;
        };
        let charge = f.charge.take();
        match meter.and_then(Meter::finish_metered) {
            Some(m) => {
                host.count(Metric::UsageMetered);
                self.access.metered(&m);
                self.settle_usage(host, charge, hold, &m);
            }
            None => {
                host.count(Metric::UsageUnread);
                log::info!("no usage in the response: charged the hold of {hold} units");
            }
        }
    }

    /// The usage line of a table-priced response: route rule, model and tokens.
    fn usage_line(&self, m: &Metered) -> Option<UsageLine> {
        let tokens = m.tokens?;
        let route = self
            .cfg
            .as_ref()?
            .pricing
            .routes
            .get(self.usage_rule?)?
            .name
            .clone();
        Some(UsageLine {
            route,
            model: m.model.clone(),
            tokens,
        })
    }

    /// Turns the hold into the real price: the difference goes back, or is charged.
    /// A table-priced response's usage line goes to the ledger in both modes, so a bill
    /// can be itemised: with the final price (authorize), or on its own (lease).
    fn settle_usage(&self, host: &impl HttpHost, charge: Option<Charge>, hold: u64, m: &Metered) {
        let actual = m.cost;
        let line = self.usage_line(m);
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
    pub fn on_log(&mut self, host: &impl HttpHost) {
        let Some(cfg) = self.cfg.clone() else { return };
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
                let (hold, meter) = match f.usage.take() {
                    Some(Metering { hold, meter }) => (hold, meter),
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
                        self.settle_usage(host, f.charge.take(), hold, &m);
                    }
                    _ => host.count(Metric::UsageUnread),
                }
            }
            _ => {}
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
                budget,
                payment_response,
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
                let mut headers = Vec::new();
                if let Some(settlement) = payment_response {
                    headers.push((
                        "payment-response",
                        payments::x402_response_header(&settlement),
                    ));
                }
                let usage = match (&charge, self.usage_rule) {
                    (Some(c), Some(_)) => Some(Metering {
                        hold: c.cost(),
                        meter: None,
                    }),
                    _ => None,
                };
                self.stage = Stage::Forwarded(Box::new(Forwarded {
                    charge,
                    balance,
                    budget,
                    headers,
                    usage,
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
                self.reply(host, &reply)
            }
            Decision::Unauthenticated => {
                host.count(Metric::Unauthenticated);
                self.access.decided(Outcome::Unauthenticated);
                let detail = "the credential is not known";
                self.reply(
                    host,
                    &response::unauthorized(cfg, AuthProblem::Invalid, detail, freshness),
                )
            }
            Decision::Forbidden => {
                host.count(Metric::Forbidden);
                self.access.decided(Outcome::Forbidden);
                self.reply(host, &response::forbidden(cfg, freshness))
            }
            Decision::RateLimited { retry_after_s } => {
                host.count(Metric::RateLimited);
                self.access.decided(Outcome::RateLimited);
                self.reply(host, &response::rate_limited(cfg, retry_after_s, freshness))
            }
        }
    }

    /// Adds the machine-payable challenges the service offered to a 402.
    fn with_offer(
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
    fn fail(&mut self, host: &impl HttpHost, cfg: &Config, charge: Option<Charge>) -> Flow {
        match cfg.failure_mode {
            FailureMode::Open => {
                host.count(Metric::FailOpen);
                self.access.decided(Outcome::FailOpen);
                self.strip_account(host, cfg);
                self.stage = Stage::Forwarded(Box::new(Forwarded {
                    charge,
                    ..Forwarded::default()
                }));
                Flow::Continue
            }
            FailureMode::Closed => {
                host.count(Metric::FailClosed);
                self.access.decided(Outcome::FailClosed);
                self.reply(host, &response::unavailable(cfg))
            }
        }
    }

    /// Sends a refusal: as a JSON-RPC error on MCP routes, as a page to browsers
    /// when configured, else as the problem document it is.
    fn reply(&mut self, host: &impl HttpHost, reply: &Reply) -> Flow {
        self.stage = Stage::Done;
        if self.mcp_claim.is_some() {
            // Priced from its MCP headers: the JSON-RPC id to answer is in the body,
            // which Envoy gives a filter only once the headers went on. They go on
            // (without the account), the body is held and never sent, and the refusal
            // answers it (the upstream request is reset).
            if let Some(cfg) = self.cfg.clone() {
                self.strip_account(host, &cfg);
            }
            self.deferred = Some(reply.clone());
            return Flow::Continue;
        }
        let html = reply.status == 402
            && self.cfg.as_ref().is_some_and(|c| c.html_402)
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
        Flow::Pause
    }

    /// Envoy's `x-request-id` when it is usable, so the service's ledger lines up
    /// with Envoy's access log; otherwise one made up here, unique within this worker.
    fn request_id(&self, host: &impl HttpHost) -> String {
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

impl Charge {
    fn cost(&self) -> u64 {
        match self {
            Charge::Authorized { cost, .. } | Charge::Leased { cost, .. } => *cost,
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

impl Worker {
    /// The root context's timer: settle owned leases that are due (a heartbeat
    /// even when nothing was spent, while units are unspent: that is how a recall
    /// reaches an idle holder), close expired ones, send renewals ahead of need,
    /// and send what the outbox holds.
    pub fn tick(&self, host: &impl Host, cfg: &Config) {
        let now = host.now_ms();
        let mut outbox = self.outbox.borrow_mut();
        self.owned.borrow_mut().retain_mut(|o| {
            if now < o.next_settle_ms.min(o.spend_until_ms) {
                return true;
            }
            let (current, cas) = read_lease(host, &o.key);
            let Some(record) = current.filter(|r| r.lease_id == o.lease_id) else {
                // Replaced: whoever replaced it settles it.
                return false;
            };
            if let Some((emptied, closed)) = lease::close(&record, &o.lease_id, now, false) {
                if !host.shared_set(&o.key, &lease::stored(&emptied), cas) {
                    return true; // raced with a spend; next tick
                }
                outbox.push(host, final_settle(&o.key, &closed));
                return false;
            }
            if o.settling || (record.used == record.reported && record.remaining() == 0) {
                o.next_settle_ms = now + cfg.lease.settle_interval_ms;
                return true;
            }
            let Some(numbered) = lease::next_seq(&record, &o.lease_id) else {
                return true;
            };
            if !host.shared_set(&o.key, &numbered.encode(), cas) {
                return true; // raced with a spend; next tick
            }
            o.next_settle_ms = now + cfg.lease.settle_interval_ms;
            o.settling = true;
            let job = Job::Settle {
                lease_key: o.key.clone(),
                lease_id: o.lease_id.clone(),
                used: record.used,
                last: false,
                seq: numbered.settle_seq,
            };
            outbox.push(host, job);
            true
        });
        drop(outbox);
        self.send_renewals(host, cfg);
        let mut outbox = self.outbox.borrow_mut();
        if !outbox.is_empty() {
            let finished = outbox.flush(host, cfg);
            drop(outbox);
            for f in finished {
                self.finished(host, cfg, f);
            }
        }
    }

    /// Whether a renewal ahead of need may be queued now.
    fn renewals_open(&self) -> bool {
        self.renewals.borrow().len() + self.renewing.borrow().len() < MAX_RENEWALS
    }

    /// A request id made up here: unique across workers and Envoy processes (every
    /// VM lays out its memory alike, so neither an address nor the clock tells them
    /// apart; a random tag per worker does), as the service deduplicates by it.
    fn make_id(&self, host: &impl Host) -> String {
        let seq = self.request_seq.get().wrapping_add(1);
        self.request_seq.set(seq);
        if self.tag.get() == 0 {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(host.now_ms());
            self.tag.set(h.finish() | 1);
        }
        format!("fbx-{:x}-{:016x}-{seq:x}", host.now_ms(), self.tag.get())
    }

    fn send_renewals(&self, host: &impl Host, cfg: &Config) {
        let queued = std::mem::take(&mut *self.renewals.borrow_mut());
        if queued.is_empty() {
            return; // the common tick: no holder id to copy
        }
        let holder = self.holder.borrow().clone();
        for r in queued {
            let body = lease_body(&LeaseRequest {
                account: &r.credential,
                want: lease::want(cfg.lease.want, r.cost),
                min: r.cost,
                request_id: &r.request_id,
                holder: &holder,
            });
            match call(host, cfg, &cfg.lease.path, &r.request_id, &body) {
                Ok(token) => {
                    host.count(Metric::Callouts);
                    self.renewing.borrow_mut().push((token, r));
                }
                Err(e) => {
                    host.count(Metric::CalloutFailures);
                    log::warn!("renewal ahead of need not dispatched: {e}");
                    let retry_at = host.now_ms() + cfg.lease.settle_interval_ms;
                    unlock(host, &r.slot, &r.key, retry_at);
                }
            }
        }
    }

    /// An answer to a call made from the root context: a renewal or an outbox job.
    pub fn on_outbox_response(
        &self,
        host: &impl Host,
        cfg: &Config,
        token: u32,
        resp: &CalloutResponse,
    ) {
        let renewal = {
            let mut renewing = self.renewing.borrow_mut();
            renewing
                .iter()
                .position(|(t, _)| *t == token)
                .map(|i| renewing.swap_remove(i).1)
        };
        if let Some(r) = renewal {
            self.renewed(host, cfg, r, resp);
            return;
        }
        let finished = self.outbox.borrow_mut().on_response(host, token, resp);
        if let Some(f) = finished {
            self.finished(host, cfg, f);
        }
    }

    /// The answer to a renewal ahead of need. Nobody waits for it: a refusal or
    /// failure only means the lease is renewed when it runs out instead.
    fn renewed(&self, host: &impl Host, cfg: &Config, r: Renewal, resp: &CalloutResponse) {
        match parse_lease(resp, r.cost, cfg.cache_max_ttl_s) {
            Ok(LeaseAnswer::Granted(grant)) => {
                if self
                    .install_grant(host, cfg, &r.slot, &r.key, &grant, 0)
                    .is_some()
                {
                    host.count(Metric::LeaseAheadRenewals);
                }
            }
            Ok(LeaseAnswer::Decided(_) | LeaseAnswer::Recall { .. }) => {
                // No more credit for now: not again for this lease.
                unlock(host, &r.slot, &r.key, u64::MAX);
            }
            Err(failure) => {
                host.count(Metric::CalloutFailures);
                log::warn!("renewal ahead of need failed: {failure}");
                let retry_at = host.now_ms() + cfg.lease.settle_interval_ms;
                unlock(host, &r.slot, &r.key, retry_at);
                self.outbox.borrow_mut().push(
                    host,
                    Job::Cancel {
                        request_id: r.request_id,
                    },
                );
            }
        }
    }

    /// Installs a granted lease in its slot (`cost` already spent from it), and
    /// settles the lease it replaces. `None` when it could not be stored: it is
    /// then given back whole.
    fn install_grant(
        &self,
        host: &impl Host,
        cfg: &Config,
        slot: &str,
        key: &LeaseKey,
        grant: &Grant,
        cost: u64,
    ) -> Option<LeaseRecord> {
        for _ in 0..lease::MAX_CAS_RETRIES {
            let (bytes, cas) = raw_slot(host, slot);
            let now = host.now_ms();
            let current = match lease::view(key, bytes.as_deref(), now) {
                View::Mine(current) => current,
                View::Occupied => break,
            };
            let (record, replaced) = lease::install(
                key.owner(),
                current.as_ref(),
                grant,
                cost,
                now,
                cfg.lease.expiry_margin_ms,
            );
            if !host.shared_set(slot, &record.encode(), cas) {
                continue;
            }
            host.count(Metric::LeasesTaken);
            let mut outbox = self.outbox.borrow_mut();
            if let Some(old) = replaced {
                host.count(Metric::LeaseRenewals);
                outbox.push(host, final_settle(slot, &old));
            }
            self.owned.borrow_mut().push(Owned {
                key: slot.to_string(),
                lease_id: grant.lease_id.clone(),
                spend_until_ms: record.spend_until_ms,
                next_settle_ms: now + cfg.lease.settle_interval_ms,
                settling: false,
            });
            return Some(record);
        }
        // Never installed: give the whole lease back.
        log::error!("lease {} could not be stored; releasing it", grant.lease_id);
        let release = Job::Settle {
            lease_key: slot.to_string(),
            lease_id: grant.lease_id.clone(),
            used: 0,
            last: true,
            seq: 1,
        };
        self.outbox.borrow_mut().push(host, release);
        None
    }

    fn finished(&self, host: &impl Host, cfg: &Config, f: Finished) {
        let Job::Settle {
            lease_key,
            lease_id,
            used,
            last: false,
            ..
        } = f.job
        else {
            return;
        };
        if let Some(o) = self
            .owned
            .borrow_mut()
            .iter_mut()
            .find(|o| o.lease_id == lease_id)
        {
            o.settling = false;
        }
        if !f.ok {
            return;
        }
        for _ in 0..lease::MAX_CAS_RETRIES {
            let (current, cas) = read_lease(host, &lease_key);
            let Some(current) = current.filter(|r| r.lease_id == lease_id) else {
                return; // replaced or closed meanwhile: its final settle is on its way
            };
            let next = if f.recall {
                // Another gateway needs the credit: stop spending and give the rest back now.
                lease::close(&current, &lease_id, host.now_ms(), true).map(|(e, c)| (e, Some(c)))
            } else {
                lease::acknowledge(&current, &lease_id, used).map(|r| (r, None))
            };
            let Some((record, closed)) = next else { return };
            if !host.shared_set(&lease_key, &lease::stored(&record), cas) {
                continue;
            }
            if let Some(closed) = closed {
                host.count(Metric::LeaseRecalls);
                log::info!(
                    "lease {lease_id} recalled by the balance service: settled at {} of {} units",
                    closed.used,
                    closed.granted
                );
                self.owned.borrow_mut().retain(|o| o.lease_id != lease_id);
                self.outbox
                    .borrow_mut()
                    .push(host, final_settle(&lease_key, &closed));
                // Sent at the next tick at the latest; now if the outbox can.
                let finished = self.outbox.borrow_mut().flush(host, cfg);
                for f in finished {
                    self.finished(host, cfg, f);
                }
            }
            return;
        }
    }
}

/// The final settle of a lease that was closed or replaced (its `settle_seq` is the final one).
fn final_settle(slot: &str, closed: &LeaseRecord) -> Job {
    Job::Settle {
        lease_key: slot.to_string(),
        lease_id: closed.lease_id.clone(),
        used: closed.used,
        last: true,
        seq: closed.settle_seq,
    }
}

/// How long the renewal lock is held at most: a call's timeout, plus slack.
fn lock_ms(cfg: &Config) -> u64 {
    u64::try_from(cfg.timeout.as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1_000)
}

fn raw_slot(host: &impl Host, slot: &str) -> (Option<Vec<u8>>, Option<u32>) {
    match host.shared_get(slot) {
        Some((bytes, cas)) => (Some(bytes), cas),
        None => (None, None),
    }
}

/// The record in a slot, whoever it belongs to (callers match it by lease id,
/// which the service makes unique).
fn read_lease(host: &impl Host, slot: &str) -> (Option<LeaseRecord>, Option<u32>) {
    match host.shared_get(slot) {
        Some((bytes, cas)) => (LeaseRecord::decode(&bytes), cas),
        None => (None, None),
    }
}

/// Drops the renewal lock (keeping the lease) so the next request can try; a
/// slot left with neither is emptied. `ahead_not_before_ms`: no renewal ahead of
/// need before then.
fn unlock(host: &impl Host, slot: &str, key: &LeaseKey, ahead_not_before_ms: u64) {
    for _ in 0..lease::MAX_CAS_RETRIES {
        let (bytes, cas) = raw_slot(host, slot);
        let View::Mine(current) = lease::view(key, bytes.as_deref(), host.now_ms()) else {
            return; // another account's now: our lock is long gone
        };
        let record = lease::unlock(current.as_ref(), ahead_not_before_ms);
        if host.shared_set(slot, &lease::stored(&record), cas) {
            return;
        }
    }
    log::warn!("lease lock not released; it expires by itself");
}

/// Clears a cached decision for `key` (a refusal that no longer holds).
fn forget(host: &impl Host, cfg: &Config, key: Option<&CacheKey>) {
    let Some(key) = key else { return };
    let slot = key.slot_key(cfg.cache_max_entries);
    if let Some((bytes, cas)) = host.shared_get(&slot) {
        if !matches!(cache::lookup(key, &bytes, 0), Lookup::Miss) {
            host.shared_set(&slot, &[], cas);
        }
    }
}

/// Status recorded on the refund of an MCP call answered with a JSON-RPC error:
/// the upstream's HTTP status, which for such an answer is 200.
const MCP_ERROR_STATUS: u16 = 200;

/// Gives a charge back: to the service (a refund job) or to the lease it came from.
fn give_back(
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
fn refund_leased(
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

/// Gives `cost` back to the lease it was spent from, if that lease is still
/// current. `false`: it is not (replaced, closed or settled).
fn refund_lease(host: &impl Host, slot: &str, lease_id: &str, cost: u64) -> bool {
    for _ in 0..lease::MAX_CAS_RETRIES {
        let (current, cas) = read_lease(host, slot);
        match current.and_then(|r| lease::refund(&r, lease_id, cost)) {
            Some(record) => {
                if host.shared_set(slot, &record.encode(), cas) {
                    host.count(Metric::Refunds);
                    return true;
                }
            }
            None => return false,
        }
    }
    false
}

/// Spends `extra` more units from lease `lease_id`, if it is current and can cover them.
fn spend_extra(host: &impl Host, key: &str, lease_id: &str, extra: u64) -> bool {
    for _ in 0..lease::MAX_CAS_RETRIES {
        let (current, cas) = read_lease(host, key);
        match current.and_then(|r| lease::spend_extra(&r, lease_id, extra)) {
            Some(record) => {
                if host.shared_set(key, &record.encode(), cas) {
                    host.add(Metric::LeaseUnitsSpent, extra);
                    return true;
                }
            }
            None => return false,
        }
    }
    false
}

fn text(v: Option<Vec<u8>>) -> String {
    // Valid UTF-8 (every header Envoy lets through, nearly) keeps its buffer: no copy.
    v.map(|b| {
        String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests;

// Named tests.rs so that ../shared/tools/panic-paths knows it for test code.
#[cfg(test)]
#[path = "gate/access_log/tests.rs"]
mod access_log_tests;

#[cfg(test)]
#[path = "gate/hostcall_budget/tests.rs"]
mod hostcall_budget_tests;
