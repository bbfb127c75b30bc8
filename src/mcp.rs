//! Prices for MCP (JSON-RPC 2.0 over HTTP POST): by method, and for
//! `tools/call` by tool name. The request body is read (up to a limit) to
//! find them. Transport plumbing, discovery and listing are free unless the
//! rule prices them, and a call the server answers with a JSON-RPC error is
//! given back ([`AnswerWatch`]).
//!
//! A client of MCP's 2026-07-28 streamable HTTP transport mirrors the method in
//! `Mcp-Method` and the tool name, prompt name or resource uri in `Mcp-Name`: such
//! a request is priced from its headers ([`Claim`]), and its body is then checked
//! against them before it goes upstream ([`Claim::check`]).

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::problem;

/// JSON-RPC error code of an unpaid call that is not a tool call: x402's MCP
/// convention (402, as HTTP's status). It lies outside the range JSON-RPC reserves
/// (-32768 to -32000), which MCP uses for its own errors (-32042 is MCP's "URL
/// elicitation required"). Other refusals carry their HTTP status as the code too.
pub const PAYMENT_REQUIRED_CODE: i64 = 402;

/// Methods that are session plumbing, discovery or listing: free on an MCP rule
/// unless its `methods` table prices them (as are all `notifications/*` and the
/// client's own responses). A session then pays for its tool calls only.
pub const FREE_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "server/discover",
    "tools/list",
    "resources/list",
    "resources/templates/list",
    "prompts/list",
];

/// Most of an MCP answer kept to find a JSON-RPC error in it: an error answer is
/// small, and in an event stream the answer to the call comes last.
pub const ANSWER_TAIL_BYTES: usize = 8192;

/// The request header mirroring the JSON-RPC method (MCP 2026-07-28).
pub const METHOD_HEADER: &str = "mcp-method";
/// The request header mirroring the target's name (MCP 2026-07-28).
pub const NAME_HEADER: &str = "mcp-name";

/// Methods whose target `Mcp-Name` mirrors, and the parameter it mirrors.
pub const NAME_BEARING: &[(&str, &str)] = &[
    ("tools/call", "name"),
    ("prompts/get", "name"),
    ("resources/read", "uri"),
];

/// JSON-RPC code of a request whose headers do not match its body: MCP's
/// "header mismatch" (2026-07-28), answered with HTTP 400 as the transport says.
pub const HEADER_MISMATCH_CODE: i64 = -32020;

/// What a request's `Mcp-Method` and `Mcp-Name` headers say it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub method: String,
    /// `Mcp-Name`, decoded (`=?base64?…?=` wraps a value that is not plain ASCII).
    pub name: Option<String>,
}

/// What the body of a request priced from its headers turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The JSON-RPC id (`null` for a notification).
    pub id: Value,
}

/// Why a body does not match its `Mcp-Method`/`Mcp-Name` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// Not one JSON-RPC request object.
    NotOneRequest,
    /// A JSON-RPC batch: the headers name one message (and MCP has no batches since 2025-06-18).
    Batch,
    Method {
        header: String,
        body: String,
    },
    /// `Mcp-Name` missing, or other than the body's target.
    Name {
        method: String,
        param: &'static str,
    },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::NotOneRequest => {
                write!(
                    f,
                    "the body is not one JSON-RPC request, as Mcp-Method says"
                )
            }
            Mismatch::Batch => write!(
                f,
                "the body is a JSON-RPC batch; Mcp-Method names one request: send them one by one"
            ),
            Mismatch::Method { header, body } => write!(
                f,
                "the Mcp-Method header {header:?} does not match the body's method {body:?}"
            ),
            Mismatch::Name { method, param } => write!(
                f,
                "the Mcp-Name header is missing or does not match params.{param} of this {method}"
            ),
        }
    }
}

/// Longest `Mcp-Method`/`Mcp-Name` value read; a longer one is not trusted and the
/// request is priced by its body.
const MAX_CLAIM_LEN: usize = 1024;

impl Claim {
    /// The claim of a request's headers; `None` without a usable `Mcp-Method` (an
    /// older client: its body prices it).
    pub fn from_headers(method: Option<&[u8]>, name: Option<&[u8]>) -> Option<Claim> {
        let method = std::str::from_utf8(method?).ok()?.trim();
        if method.is_empty() || method.len() > MAX_CLAIM_LEN {
            return None;
        }
        let name = match name {
            Some(raw) if raw.len() <= MAX_CLAIM_LEN => {
                Some(decode_header_value(std::str::from_utf8(raw).ok()?))
            }
            Some(_) => return None,
            None => None,
        };
        Some(Claim {
            method: method.to_string(),
            name,
        })
    }

    /// The parameter `Mcp-Name` mirrors for this method, if it names a target.
    fn name_param(&self) -> Option<&'static str> {
        NAME_BEARING
            .iter()
            .find(|(m, _)| *m == self.method)
            .map(|(_, p)| *p)
    }

    /// Checks a body against the claim: the same method and, for the methods
    /// that name a target, the same target. Headers never lower a price: whatever
    /// differs is refused, a body priced higher than its headers included.
    pub fn check(&self, body: &[u8]) -> Result<Checked, (Mismatch, Value)> {
        let msg = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Array(_)) => return Err((Mismatch::Batch, Value::Null)),
            Ok(msg @ Value::Object(_)) => msg,
            _ => return Err((Mismatch::NotOneRequest, Value::Null)),
        };
        let id = msg.get("id").cloned().unwrap_or(Value::Null);
        let Some(method) = msg.get("method").and_then(Value::as_str) else {
            return Err((Mismatch::NotOneRequest, id));
        };
        if method != self.method {
            let mismatch = Mismatch::Method {
                header: self.method.clone(),
                body: method.to_string(),
            };
            return Err((mismatch, id));
        }
        if let Some(param) = self.name_param() {
            let target = msg
                .get("params")
                .and_then(|p| p.get(param))
                .and_then(Value::as_str);
            if target != self.name.as_deref() {
                let mismatch = Mismatch::Name {
                    method: self.method.clone(),
                    param,
                };
                return Err((mismatch, id));
            }
        }
        Ok(Checked { id })
    }
}

/// An `Mcp-Name` value as sent: verbatim, or `=?base64?…?=` around the UTF-8 bytes of
/// a value a header cannot carry as is. A wrapper that does not decode is kept as
/// sent, so it matches no body but one naming it literally.
fn decode_header_value(raw: &str) -> String {
    use base64::Engine;
    let decoded = raw
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok());
    decoded.unwrap_or_else(|| raw.to_string())
}

/// The JSON-RPC error answering a request whose headers do not match its body:
/// HTTP 400, code [`HEADER_MISMATCH_CODE`], the problem (RFC 9457) in `error.data`.
pub fn mismatch_body(id: &Value, problem: &[u8]) -> Vec<u8> {
    let data = serde_json::from_slice::<Value>(problem).unwrap_or(Value::Object(Map::new()));
    let message = problem::summary(&data);
    json!({"jsonrpc": "2.0", "id": id,
           "error": {"code": HEADER_MISMATCH_CODE, "message": message, "data": data}})
    .to_string()
    .into_bytes()
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct McpPricing {
    /// Cost by JSON-RPC method (`initialize`, `tools/list`, …).
    pub methods: BTreeMap<String, u64>,
    /// Cost of `tools/call` by tool name.
    pub tools: BTreeMap<String, u64>,
}

/// What a JSON-RPC request body costs, and the id to answer an error with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpPrice {
    pub cost: u64,
    /// `"tools/call:search"`, `"tools/list"`, …: what was priced, for the route name.
    pub what: String,
    pub id: Value,
    /// One `tools/call` (its refusal is a tool result, per x402's MCP transport).
    pub tool_call: bool,
    /// One request with an id: its answer can be read for a JSON-RPC error.
    pub single: bool,
    /// x402's payment of a single call, from `params._meta["x402/payment"]` (x402's MCP
    /// transport: the `PaymentPayload` object).
    pub payment: Option<Value>,
}

impl McpPricing {
    /// Prices one call or a batch (the sum). `default` prices what the tables do not
    /// name, and anything that is not JSON-RPC at all (the upstream will refuse it).
    pub fn price(&self, body: &[u8], default: u64) -> McpPrice {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Array(calls)) if !calls.is_empty() => {
                let mut cost: u64 = 0;
                let mut what = Vec::new();
                for call in &calls {
                    let (c, w) = self.price_one(call, default);
                    cost = cost.saturating_add(c);
                    what.push(w);
                }
                let id = calls
                    .first()
                    .and_then(|c| c.get("id"))
                    .cloned()
                    .unwrap_or(Value::Null);
                McpPrice {
                    cost,
                    what: format!("batch({})", what.join(",")),
                    id,
                    tool_call: false,
                    single: false,
                    payment: None,
                }
            }
            Ok(call @ Value::Object(_)) => {
                let (cost, what) = self.price_one(&call, default);
                let id = call.get("id").cloned().unwrap_or(Value::Null);
                McpPrice {
                    cost,
                    what,
                    payment: call.pointer("/params/_meta/x402~1payment").cloned(),
                    single: !id.is_null(),
                    tool_call: call.get("method").and_then(Value::as_str) == Some("tools/call"),
                    id,
                }
            }
            _ => McpPrice {
                cost: default,
                what: "not-json-rpc".into(),
                id: Value::Null,
                tool_call: false,
                single: false,
                payment: None,
            },
        }
    }

    /// Prices a request from its `Mcp-Method`/`Mcp-Name` headers, as its body would
    /// be priced if it matches them (which is checked before it goes upstream).
    pub fn price_claim(&self, claim: &Claim, default: u64) -> McpPrice {
        let call = match claim.name_param() {
            Some(param) => json!({"method": claim.method, "id": 0, "params": {param: claim.name}}),
            None => json!({"method": claim.method, "id": 0}),
        };
        let (cost, what) = self.price_one(&call, default);
        McpPrice {
            cost,
            what,
            id: Value::Null,
            tool_call: claim.method == "tools/call",
            single: true,
            payment: None,
        }
    }

    fn price_one(&self, call: &Value, default: u64) -> (u64, String) {
        let method = call.get("method").and_then(Value::as_str).unwrap_or("");
        if method == "tools/call" {
            if let Some(tool) = call.pointer("/params/name").and_then(Value::as_str) {
                let cost = self.tools.get(tool).copied().unwrap_or(default);
                return (cost, format!("tools/call:{tool}"));
            }
        }
        if let Some(cost) = self.methods.get(method) {
            return (*cost, method.to_string());
        }
        if method.is_empty() {
            // The client answering a server's request (sampling, elicitation, roots).
            let is_response = call.get("id").is_some()
                && (call.get("result").is_some() || call.get("error").is_some());
            return if is_response {
                (0, "response".into())
            } else {
                (default, "unknown".into())
            };
        }
        if FREE_METHODS.contains(&method) || method.starts_with("notifications/") {
            return (0, method.to_string());
        }
        (default, method.to_string())
    }
}

/// How an MCP answer is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    Json,
    EventStream,
}

impl AnswerKind {
    pub fn from_content_type(ct: &str) -> Option<AnswerKind> {
        let essence = ct.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case("application/json") {
            Some(AnswerKind::Json)
        } else if essence.eq_ignore_ascii_case("text/event-stream") {
            Some(AnswerKind::EventStream)
        } else {
            None
        }
    }
}

/// Reads the answer to one paid call for a JSON-RPC error (method not found,
/// invalid params, …): the call was not served, so it is not charged. Only the
/// last [`ANSWER_TAIL_BYTES`] are kept.
#[derive(Debug)]
pub struct AnswerWatch {
    kind: AnswerKind,
    id: Value,
    tail: Vec<u8>,
    /// More than the tail came: a JSON answer that long is not an error.
    overflowed: bool,
}

impl AnswerWatch {
    pub fn new(kind: AnswerKind, id: Value) -> AnswerWatch {
        AnswerWatch {
            kind,
            id,
            tail: Vec::new(),
            overflowed: false,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        self.tail.extend_from_slice(chunk);
        if self.tail.len() > ANSWER_TAIL_BYTES {
            let cut = self.tail.len() - ANSWER_TAIL_BYTES;
            self.tail.drain(..cut);
            self.overflowed = true;
        }
    }

    /// Whether the answer to the call was a JSON-RPC error.
    pub fn is_error(&self) -> bool {
        match self.kind {
            AnswerKind::Json => {
                !self.overflowed
                    && serde_json::from_slice::<Value>(&self.tail)
                        .is_ok_and(|v| self.is_error_answer(&v))
            }
            AnswerKind::EventStream => {
                let text = String::from_utf8_lossy(&self.tail);
                // The answer is the last message for this id; a cut-off first event
                // simply fails to parse.
                let mut last = None;
                for event in text.split("\n\n").flat_map(|e| e.split("\r\n\r\n")) {
                    let data: Vec<&str> = event
                        .lines()
                        .filter_map(|l| l.strip_prefix("data:"))
                        .map(|d| d.strip_prefix(' ').unwrap_or(d))
                        .collect();
                    if data.is_empty() {
                        continue;
                    }
                    if let Ok(v) = serde_json::from_str::<Value>(&data.join("\n")) {
                        if v.get("id") == Some(&self.id)
                            && (v.get("result").is_some() || v.get("error").is_some())
                        {
                            last = Some(v);
                        }
                    }
                }
                last.is_some_and(|v| self.is_error_answer(&v))
            }
        }
    }

    fn is_error_answer(&self, v: &Value) -> bool {
        v.get("id") == Some(&self.id) && v.get("error").is_some() && v.get("result").is_none()
    }
}

/// The body of an MCP refusal, answered with HTTP 200 so that clients read it (the
/// TypeScript SDK turns any other status into a transport error without the body):
/// - an unpaid `tools/call` gets a tool result with `isError: true`, its text saying
///   the price, the balance and what to do, and `structuredContent` holding the
///   problem (RFC 9457) with x402's `PaymentRequired` fields when payments are offered
///   (x402's MCP transport);
/// - any other refusal is a JSON-RPC error, code [`PAYMENT_REQUIRED_CODE`] or the
///   HTTP status, its message saying the same, the problem in `error.data`.
pub fn refusal_body(id: &Value, tool_call: bool, problem: &[u8], x402: Option<&Value>) -> Vec<u8> {
    let data = serde_json::from_slice::<Value>(problem).unwrap_or(Value::Object(Map::new()));
    let status = data.get("status").and_then(Value::as_u64).unwrap_or(500);
    let message = problem::summary(&data);
    let answer = if tool_call && status == 402 {
        let mut structured = match &data {
            Value::Object(m) => m.clone(),
            _ => Map::new(),
        };
        if let Some(Value::Object(required)) = x402 {
            for (k, v) in required {
                structured.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        // `resultType` is required on MCP's 2026-07-28 wire (its clients refuse a result
        // without it); older clients ignore the member.
        json!({"jsonrpc": "2.0", "id": id, "result": {
            "content": [{"type": "text", "text": message}],
            "structuredContent": structured,
            "isError": true,
            "resultType": "complete",
        }})
    } else {
        json!({"jsonrpc": "2.0", "id": id,
               "error": {"code": status, "message": message, "data": data}})
    };
    answer.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pricing() -> McpPricing {
        McpPricing {
            methods: [
                ("initialize", 0),
                ("tools/list", 0),
                ("notifications/initialized", 0),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            tools: [("search", 5), ("fetch", 2)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }

    #[test]
    fn prices_by_method_and_tool() {
        let p = pricing();
        let call = |body: Value| p.price(body.to_string().as_bytes(), 1);
        let search = call(
            json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "search", "arguments": {}}}),
        );
        assert_eq!(
            (search.cost, search.what.as_str(), search.id.clone()),
            (5, "tools/call:search", json!(7))
        );
        assert_eq!(
            call(json!({"jsonrpc": "2.0", "id": "a", "method": "tools/list"})).cost,
            0
        );
        assert_eq!(
            call(json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}})).cost,
            0
        );
        // A tool the table does not name, or another method, pays the route's cost.
        assert_eq!(call(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "other"}})).cost, 1);
        assert_eq!(
            call(json!({"jsonrpc": "2.0", "id": 1, "method": "resources/read"})).cost,
            1
        );
        // A batch pays for every call.
        let batch = call(json!([
            {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search"}},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "fetch"}},
            {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}
        ]));
        assert_eq!((batch.cost, batch.id), (7, json!(1)));
    }

    #[test]
    fn garbage_pays_the_default() {
        let p = pricing();
        for body in [&b"not json"[..], b"[]", b"42", b"", b"{\"method\": 5}"] {
            assert_eq!(
                p.price(body, 3).cost,
                3,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn plumbing_is_free_unless_priced() {
        let empty = McpPricing::default();
        for method in [
            "initialize",
            "ping",
            "server/discover",
            "tools/list",
            "resources/list",
            "resources/templates/list",
            "prompts/list",
            "notifications/initialized",
            "notifications/cancelled",
        ] {
            let body = json!({"jsonrpc": "2.0", "id": 1, "method": method});
            let p = empty.price(body.to_string().as_bytes(), 3);
            assert_eq!((p.cost, p.what.as_str()), (0, method), "{method}");
        }
        // The client's answer to a server request is free; a message that is neither
        // request nor answer is not.
        let answer = json!({"jsonrpc": "2.0", "id": 4, "result": {}});
        assert_eq!(empty.price(answer.to_string().as_bytes(), 3).cost, 0);
        assert_eq!(empty.price(br#"{"id": 4}"#, 3).cost, 3);
        // Not plumbing: priced at the rule's cost.
        for method in ["resources/read", "prompts/get", "completion/complete"] {
            let body = json!({"jsonrpc": "2.0", "id": 1, "method": method});
            assert_eq!(empty.price(body.to_string().as_bytes(), 3).cost, 3);
        }
        // An explicit price wins.
        let priced = McpPricing {
            methods: [("ping".to_string(), 2), ("tools/list".to_string(), 1)].into(),
            tools: BTreeMap::new(),
        };
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
        assert_eq!(priced.price(body.to_string().as_bytes(), 3).cost, 2);
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"});
        assert_eq!(priced.price(body.to_string().as_bytes(), 3).cost, 1);
    }

    #[test]
    fn single_calls_and_tool_calls_are_told_apart() {
        let p = pricing();
        let one = p.price(
            br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"search"}}"#,
            1,
        );
        assert!(one.single && one.tool_call);
        let note = p.price(
            br#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"search"}}"#,
            1,
        );
        assert!(!note.single, "no id: nothing answers it");
        let batch = p.price(
            br#"[{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"search"}}]"#,
            1,
        );
        assert!(!batch.single && !batch.tool_call);
        let paid = p.price(br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"search","_meta":{"x402/payment":{"x402Version":2}}}}"#, 1);
        assert_eq!(paid.payment, Some(json!({"x402Version": 2})));
        assert_eq!(one.payment, None);
    }

    #[test]
    fn claims_from_headers_are_priced_and_checked_against_the_body() {
        let claim = |m: &str, n: Option<&str>| {
            Claim::from_headers(Some(m.as_bytes()), n.map(str::as_bytes)).unwrap()
        };
        assert_eq!(
            Claim::from_headers(None, Some(b"search")),
            None,
            "an older client"
        );
        assert_eq!(Claim::from_headers(Some(b" "), None), None);
        assert_eq!(Claim::from_headers(Some(&[0xff]), None), None);
        let p = pricing();
        let search = claim("tools/call", Some("search"));
        let price = p.price_claim(&search, 1);
        assert_eq!(
            (price.cost, price.what.as_str(), price.tool_call),
            (5, "tools/call:search", true)
        );
        assert_eq!(
            p.price_claim(&claim("tools/call", None), 1).cost,
            1,
            "no name: the route's cost"
        );
        assert_eq!(p.price_claim(&claim("tools/list", None), 1).cost, 0);
        assert_eq!(p.price_claim(&claim("ping", Some("x")), 1).cost, 0);
        assert_eq!(
            p.price_claim(&claim("resources/read", Some("file:///a")), 1)
                .cost,
            1
        );

        let body = |v: Value| v.to_string().into_bytes();
        let call = body(
            json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "search"}}),
        );
        assert_eq!(search.check(&call), Ok(Checked { id: json!(7) }));
        let wrong = |c: &Claim, b: &[u8]| c.check(b).err();
        assert!(
            matches!(wrong(&claim("tools/call", Some("fetch")), &call), Some((Mismatch::Name { .. }, id)) if id == json!(7))
        );
        assert!(matches!(
            wrong(&claim("tools/call", None), &call),
            Some((Mismatch::Name { .. }, _))
        ));
        assert!(matches!(
            wrong(&claim("ping", None), &call),
            Some((Mismatch::Method { .. }, _))
        ));
        assert!(matches!(wrong(&search, b"[]"), Some((Mismatch::Batch, _))));
        assert!(matches!(
            wrong(&search, b"{"),
            Some((Mismatch::NotOneRequest, _))
        ));
        assert!(matches!(
            wrong(&search, &body(json!({"id": 1, "result": {}}))),
            Some((Mismatch::NotOneRequest, _))
        ));
        // Other methods' Mcp-Name is not compared; resources/read compares the uri.
        let ping = body(json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}));
        assert!(claim("ping", Some("anything")).check(&ping).is_ok());
        let read = body(
            json!({"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": "file:///a"}}),
        );
        assert!(claim("resources/read", Some("file:///a"))
            .check(&read)
            .is_ok());
        assert!(claim("resources/read", Some("file:///b"))
            .check(&read)
            .is_err());
        // Base64-wrapped names decode; a broken wrapper is kept as sent.
        let uni = body(
            json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "suche\u{e4}"}}),
        );
        assert!(claim("tools/call", Some("=?base64?c3VjaGXDpA==?="))
            .check(&uni)
            .is_ok());
        assert_eq!(
            claim("tools/call", Some("=?base64?!!?=")).name.as_deref(),
            Some("=?base64?!!?=")
        );
        let v: Value = serde_json::from_slice(&mismatch_body(
            &json!(3),
            br#"{"title": "Bad Request", "status": 400, "detail": "d"}"#,
        ))
        .unwrap();
        assert_eq!(v["error"]["code"], HEADER_MISMATCH_CODE);
        assert_eq!(v["error"]["message"], "Bad Request: d");
        assert_eq!(v["id"], 3);
    }

    fn watch(kind: AnswerKind, id: Value, chunks: &[&str]) -> bool {
        let mut w = AnswerWatch::new(kind, id);
        for c in chunks {
            w.feed(c.as_bytes());
        }
        w.is_error()
    }

    #[test]
    fn error_answers_are_found_in_json_and_event_streams() {
        let err =
            r#"{"jsonrpc":"2.0","id":7,"error":{"code":-32601,"message":"Method not found"}}"#;
        let ok = r#"{"jsonrpc":"2.0","id":7,"result":{"content":[],"isError":false}}"#;
        assert!(watch(AnswerKind::Json, json!(7), &[&err[..20], &err[20..]]));
        assert!(!watch(AnswerKind::Json, json!(7), &[ok]));
        assert!(!watch(AnswerKind::Json, json!(8), &[err]), "another id");
        assert!(!watch(AnswerKind::Json, json!(7), &["not json"]));
        // A tool that failed is still a served call.
        let tool_error = r#"{"jsonrpc":"2.0","id":7,"result":{"content":[],"isError":true}}"#;
        assert!(!watch(AnswerKind::Json, json!(7), &[tool_error]));
        let sse = format!(
            "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}}\n\nevent: message\ndata: {err}\n\n"
        );
        assert!(watch(AnswerKind::EventStream, json!(7), &[&sse]));
        let sse_ok = format!("data: {ok}\r\n\r\n");
        assert!(!watch(AnswerKind::EventStream, json!(7), &[&sse_ok]));
        // A long answer keeps only its tail: a long JSON answer is no error.
        let long = format!(
            r#"{{"jsonrpc":"2.0","id":7,"error":{{"code":-32602,"message":"{}"}}}}"#,
            "x".repeat(ANSWER_TAIL_BYTES)
        );
        assert!(!watch(AnswerKind::Json, json!(7), &[&long]));
        let mut w = AnswerWatch::new(AnswerKind::EventStream, json!(7));
        for _ in 0..100 {
            w.feed(format!("data: {}\n\n", "y".repeat(500)).as_bytes());
        }
        w.feed(format!("data: {err}\n\n").as_bytes());
        assert!(w.is_error() && w.tail.len() <= ANSWER_TAIL_BYTES);
        assert_eq!(
            AnswerKind::from_content_type("text/event-stream; charset=utf-8"),
            Some(AnswerKind::EventStream)
        );
        assert_eq!(AnswerKind::from_content_type("text/html"), None);
    }

    #[test]
    fn refusals_are_tool_results_or_json_rpc_errors() {
        let problem = br#"{"type": "t", "title": "Payment Required", "status": 402, "detail": "top up", "price": 5, "balance": 1}"#;
        let x402 = json!({"x402Version": 2, "accepts": [{"scheme": "exact"}]});
        let v: Value =
            serde_json::from_slice(&refusal_body(&json!(9), true, problem, Some(&x402))).unwrap();
        assert_eq!(
            (v["jsonrpc"].clone(), v["id"].clone()),
            (json!("2.0"), json!(9))
        );
        assert_eq!(v["result"]["isError"], true);
        assert_eq!(v["result"]["resultType"], "complete");
        let text = "Payment Required: top up (price 5, balance 1)";
        assert_eq!(v["result"]["content"][0]["text"], text);
        assert_eq!(v["result"]["structuredContent"]["price"], 5);
        assert_eq!(v["result"]["structuredContent"]["x402Version"], 2);
        assert_eq!(
            v["result"]["structuredContent"]["accepts"][0]["scheme"],
            "exact"
        );

        let v: Value =
            serde_json::from_slice(&refusal_body(&json!("r"), false, problem, None)).unwrap();
        assert_eq!(v["error"]["code"], PAYMENT_REQUIRED_CODE);
        assert_eq!(v["error"]["message"], text);
        assert_eq!(v["error"]["data"]["balance"], 1);

        let v: Value = serde_json::from_slice(&refusal_body(
            &Value::Null,
            true,
            br#"{"status": 503, "title": "Service Unavailable", "detail": "try again later"}"#,
            None,
        ))
        .unwrap();
        assert_eq!(v["error"]["code"], 503);
        assert_eq!(
            v["error"]["message"],
            "Service Unavailable: try again later"
        );
        // The codes stay out of the range JSON-RPC and MCP reserve.
        assert!(!(-32768..=-32000).contains(&PAYMENT_REQUIRED_CODE));
    }
}
