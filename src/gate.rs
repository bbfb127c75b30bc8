//! One request's way through the gate: price it, identify the caller, find a
//! decision (cache, lease or balance service), act on it, and settle what the
//! request really cost: nothing if the upstream did not serve it, its usage
//! if the route is priced by usage.
//!
//! [`Gate`] takes the host's callbacks and hands each to its phase, one module each:
//! `intake` (request headers and body: pricing, MCP body buffering, the headers kept
//! for a late decision, identifying the caller), `cached` (decisions the service let us
//! keep), `authorize` (the authorize call and its answer; it starts lease calls too),
//! `lease` (spending from a lease, taking and installing one), `reply` (acting on a
//! decision: forwarding, or the local reply), `settle` (the response side: refunds and
//! usage), and `worker` (the root context's timer: settlements, renewals, the outbox).
//! Where a request stands is its `Stage`, which holds what only that stage needs.

use std::rc::Rc;

use serde_json::Value;

use crate::access_log::Record;
use crate::balance_api::CalloutResponse;
use crate::cache::CacheKey;
use crate::config::Config;
use crate::decision::Paid;
use crate::host::HttpHost;
use crate::mcp;
use crate::payments::Payment;
use crate::response::Reply;
use crate::usage::Meter;

mod authorize;
mod cached;
mod intake;
mod lease;
mod reply;
mod settle;
mod worker;

pub use worker::Worker;

/// What the host should do with the request after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Paused; with the token of the call this callback started, whose answer resumes
    /// the request (it goes to whichever context was effective when the call started).
    Pause(Option<u32>),
    /// Paused until another request's lease call is over: call [`Gate::on_wake`] from a timer.
    Park,
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
    /// Refused while its body is held (priced from its MCP headers): the refusal
    /// answers the JSON-RPC id in the body, which Envoy lets a filter read only once
    /// the headers went on.
    Refused(Box<Reply>),
}

/// What is known of a request before its price.
#[derive(Debug)]
struct Request {
    method: String,
    raw_path: String,
    path: String,
    /// Index of the matching route rule.
    rule: Option<usize>,
    /// The x402 payment in an MCP call's `params._meta` (never logged).
    mcp_payment: Option<Payment>,
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
    /// The proof of the payment this request carried, for the client's response.
    paid: Option<Paid>,
    /// Usage pricing: the hold, and the meter once the response type is known.
    usage: Option<Metering>,
    /// A paid single MCP call: its answer is read for a JSON-RPC error, which is
    /// given back. The id until the response headers, then the watch.
    mcp_watch_id: Option<Value>,
    mcp_answer: Option<mcp::AnswerWatch>,
}

#[derive(Debug)]
struct Metering {
    hold: u64,
    /// Index of the route rule that prices the request by usage.
    rule: usize,
    /// The model a token-table route's request named.
    model: Option<String>,
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

/// One HTTP stream's gate: the callbacks the host layer calls, each handed to the
/// phase it belongs to.
pub struct Gate {
    /// `None` when the plugin has no valid configuration (Envoy should not let that happen).
    cfg: Option<Rc<Config>>,
    exchange: Exchange,
}

/// What the gate knows of one request and its response. The configuration stays
/// outside, in [`Gate`], and is lent to every phase: they read it while they change this.
struct Exchange {
    worker: Rc<Worker>,
    stage: Stage,
    /// JSON-RPC id of an MCP call: refusals are JSON-RPC answers for it.
    mcp_id: Option<Value>,
    /// The MCP call is one `tools/call` (refused with a tool result).
    mcp_tool_call: bool,
    /// A paid single MCP call priced from its body: the JSON-RPC id whose answer is
    /// watched once forwarded (see [`Forwarded::mcp_watch_id`]).
    mcp_watch_id: Option<Value>,
    /// x402's `PaymentRequired` of a 402 with offers, for an MCP tool result.
    x402_required: Option<Value>,
    /// A usage-priced (LLM) route: refusals carry OpenAI's `error` object too.
    openai_errors: bool,
    /// Index of the route rule that prices this request by usage, and the model a
    /// token-table route's request named: the metering once forwarded ([`Metering`]).
    usage_rule: Option<usize>,
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
    /// The request body is held to add `stream_options.include_usage` (its
    /// `content-length` went with the headers).
    include_usage: bool,
    /// Whether the client sent a payment header, read with the headers (from the one
    /// header-map read), so that stripping payments costs no host call when there is none.
    payment_headers: bool,
    /// What the access log is told about this request.
    access: Record,
}

impl Gate {
    pub fn new(cfg: Option<Rc<Config>>, worker: Rc<Worker>) -> Gate {
        let access = match &cfg {
            Some(c) if !c.access_log => Record::off(),
            _ => Record::default(),
        };
        let exchange = Exchange {
            worker,
            stage: Stage::Start,
            mcp_id: None,
            mcp_tool_call: false,
            mcp_watch_id: None,
            x402_required: None,
            openai_errors: false,
            usage_rule: None,
            request_model: None,
            headers_gone: false,
            kept_headers: Vec::new(),
            kept_credential: None,
            mcp_claim: None,
            include_usage: false,
            payment_headers: false,
            access,
        };
        Gate { cfg, exchange }
    }

    /// Request headers of a request without a body.
    pub fn on_request_headers(&mut self, host: &impl HttpHost) -> Flow {
        self.on_request_headers_eos(host, true)
    }

    pub fn on_request_headers_eos(&mut self, host: &impl HttpHost, end_of_stream: bool) -> Flow {
        self.exchange
            .on_request_headers(host, self.cfg.as_deref(), end_of_stream)
    }

    /// A chunk of the request body: held while the decision is pending, read whole
    /// where the body prices the request.
    pub fn on_request_body(
        &mut self,
        host: &impl HttpHost,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        self.exchange
            .on_request_body(host, self.cfg.as_deref(), body_size, end_of_stream)
    }

    /// Trailers end the body: nothing is read from them.
    pub fn on_request_trailers(&mut self, host: &impl HttpHost) -> Flow {
        self.exchange.on_request_trailers(host, self.cfg.as_deref())
    }

    /// A parked request's timer tick: try again. Returns how it went, like
    /// [`Gate::on_request_headers`]; `Park` means still waiting.
    pub fn on_wake(&mut self, host: &impl HttpHost) -> Flow {
        self.exchange.on_wake(host, self.cfg.as_deref())
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
        self.exchange
            .on_callout_response(host, self.cfg.as_deref(), token, resp)
    }

    pub fn on_response_headers(&mut self, host: &impl HttpHost) {
        self.exchange.on_response_headers(host, self.cfg.as_deref())
    }

    /// A chunk of the response body: metered if the route is priced by usage,
    /// and always passed on untouched.
    pub fn on_response_body(
        &mut self,
        host: &impl HttpHost,
        body_size: usize,
        end_of_stream: bool,
    ) {
        self.exchange
            .on_response_body(host, self.cfg.as_deref(), body_size, end_of_stream)
    }

    /// The stream is over: a request still waiting for its decision is undone, an
    /// unfinished usage-priced response is settled.
    pub fn on_log(&mut self, host: &impl HttpHost) {
        self.exchange.on_log(host, self.cfg.as_deref())
    }

    /// The access-log fields that changed since the last call, for the host layer
    /// to publish (empty, and allocation-free, when nothing changed).
    pub fn access_log_changes(&mut self) -> Vec<(&'static str, String)> {
        self.exchange.access.changes()
    }

    /// Hands the changed access-log fields to the host (the record as one property, see
    /// src/access_log.rs). Must run
    /// with the stream as the effective context.
    pub fn publish_access_log(&mut self, host: &impl HttpHost) {
        if self.exchange.access.is_dirty() {
            self.exchange
                .access
                .publish(|name, value| host.set_property(name, value));
        }
    }
}

impl Charge {
    fn cost(&self) -> u64 {
        match self {
            Charge::Authorized { cost, .. } | Charge::Leased { cost, .. } => *cost,
        }
    }
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
