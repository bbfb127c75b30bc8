//! `farebox-mcp`: a mock MCP server (the streamable-HTTP transport, JSON
//! answers only) for the filter's end-to-end tests of per-tool pricing. It
//! counts what it served so a test can check that a denied call never
//! reached it. See `--help` and `docs/balance-service.md`.

mod mock_support;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::{ALLOW, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use mock_support::{mock_status, with_admin_routes, Mock};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

const USAGE: &str = "\
usage: farebox-mcp [--listen ADDR]

  --listen ADDR   listen address (default 127.0.0.1:8084; port 0 picks one);
                  falls back to the environment variable FAREBOX_MCP_LISTEN

A mock MCP server (streamable HTTP, JSON answers), of both protocol eras:
  POST /mcp   one JSON-RPC 2.0 message or a batch (array):
              initialize (2025-06-18), server/discover (2026-07-28; such a
              request's Mcp-Method/Mcp-Name headers must match its body, else
              400 with -32020), notifications/* (202, no body), ping, tools/list,
              tools/call {name, arguments} for the tools search, fetch, echo
              (result text \"<name> ok: <arguments json>\"); anything else -32601.
              Header x-mock-status: NNN answers NNN instead.
  GET /stats  {\"calls\": {tool: n}, \"methods\": {method: n},
              \"accounts\": {x-farebox-account of tool calls: n}}; POST /stats/reset
  GET /healthz
";

/// The protocol revision this mock speaks to `initialize`.
const PROTOCOL_VERSION: &str = "2025-06-18";
/// The revision it speaks to `server/discover` (no sessions; every POST carries
/// `Mcp-Method`, and `Mcp-Name` for the methods that name a target).
const MODERN_VERSION: &str = "2026-07-28";
/// MCP 2026-07-28: headers that do not match the body.
const HEADER_MISMATCH: i64 = -32020;

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;

/// (name, description, the one required string argument).
const TOOLS: &[(&str, &str, &str)] = &[
    ("search", "Search the mock corpus.", "query"),
    ("fetch", "Fetch one mock document by id.", "id"),
    ("echo", "Echo the arguments back.", "text"),
];

#[derive(Default)]
struct Counters {
    calls: BTreeMap<String, u64>,
    methods: BTreeMap<String, u64>,
    /// The `x-farebox-account` header of the tool calls served, by value.
    accounts: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Mcp {
    counters: Mutex<Counters>,
}

type Shared = Arc<Mcp>;

impl Mcp {
    fn with<T>(&self, f: impl FnOnce(&mut Counters) -> T) -> T {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut c)
    }

    fn snapshot(&self) -> Value {
        self.with(|c| json!({"calls": c.calls, "methods": c.methods, "accounts": c.accounts}))
    }
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    match map.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            map.insert(key.to_owned(), 1);
        }
    }
}

fn rpc_error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn rpc_result(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

fn tools_list() -> Value {
    let tools: Vec<Value> = TOOLS
        .iter()
        .map(|(name, description, arg)| {
            json!({
                "name": name,
                "description": description,
                "inputSchema": {
                    "type": "object",
                    "properties": {*arg: {"type": "string"}},
                    "required": [arg],
                },
            })
        })
        .collect();
    json!({ "tools": tools })
}

/// The answer to one JSON-RPC message; `None` for notifications and for
/// responses sent by the client.
fn handle(mcp: &Mcp, msg: &Value) -> Option<Value> {
    let Value::Object(obj) = msg else {
        return Some(rpc_error(Value::Null, INVALID_REQUEST, "Invalid Request"));
    };
    let id = obj.get("id").cloned();
    let Some(method) = obj.get("method").and_then(Value::as_str) else {
        if obj.contains_key("result") || obj.contains_key("error") {
            return None; // A response from the client: nothing to answer.
        }
        return Some(rpc_error(
            id.unwrap_or(Value::Null),
            INVALID_REQUEST,
            "Invalid Request",
        ));
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Some(rpc_error(
            id.unwrap_or(Value::Null),
            INVALID_REQUEST,
            "Invalid Request: jsonrpc must be \"2.0\"",
        ));
    }
    mcp.with(|c| bump(&mut c.methods, method));
    // A notification (no id) is never answered, whatever its method.
    let id = id?;
    let params = obj.get("params").cloned().unwrap_or(Value::Null);
    let answer = match method {
        "initialize" => rpc_result(
            id,
            json!({
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "farebox-mcp", "version": env!("CARGO_PKG_VERSION")},
            }),
        ),
        "server/discover" => rpc_result(
            id,
            json!({
                "supportedVersions": [MODERN_VERSION],
                "capabilities": {"tools": {}},
                "ttlMs": 0,
                "cacheScope": "private",
                "resultType": "complete",
                "_meta": {"io.modelcontextprotocol/serverInfo":
                          {"name": "farebox-mcp", "version": env!("CARGO_PKG_VERSION")}},
            }),
        ),
        "ping" => rpc_result(id, json!({})),
        "tools/list" => rpc_result(id, tools_list()),
        "tools/call" => {
            let Some(name) = params.get("name").and_then(Value::as_str) else {
                return Some(rpc_error(
                    id,
                    INVALID_PARAMS,
                    "Invalid params: name is required",
                ));
            };
            if !TOOLS.iter().any(|(t, _, _)| *t == name) {
                return Some(rpc_error(
                    id,
                    INVALID_PARAMS,
                    &format!("Unknown tool: {name}"),
                ));
            }
            mcp.with(|c| bump(&mut c.calls, name));
            let args = params.get("arguments").cloned().unwrap_or(json!({}));
            rpc_result(
                id,
                json!({
                    "content": [{"type": "text", "text": format!("{name} ok: {args}")}],
                    "isError": false,
                }),
            )
        }
        _ => rpc_error(id, METHOD_NOT_FOUND, &format!("Method not found: {method}")),
    };
    Some(answer)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

async fn post_mcp(State(mcp): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(status) = mock_status(&headers).filter(|s| *s != StatusCode::OK) {
        if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return status.into_response();
        }
        let msg = format!("mock status {} (x-mock-status)", status.as_u16());
        return json_response(status, &rpc_error(Value::Null, -32000, &msg));
    }
    let msg: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            let err = rpc_error(Value::Null, PARSE_ERROR, &format!("Parse error: {e}"));
            return json_response(StatusCode::BAD_REQUEST, &err);
        }
    };
    if let Some(err) = header_mismatch(&headers, &msg) {
        return json_response(StatusCode::BAD_REQUEST, &err);
    }
    if msg.get("method").and_then(Value::as_str) == Some("tools/call") {
        if let Some(account) = headers
            .get("x-farebox-account")
            .and_then(|v| v.to_str().ok())
        {
            mcp.with(|c| bump(&mut c.accounts, account));
        }
    }
    let answer = match &msg {
        Value::Array(items) if items.is_empty() => {
            let err = rpc_error(Value::Null, INVALID_REQUEST, "Invalid Request: empty batch");
            return json_response(StatusCode::BAD_REQUEST, &err);
        }
        Value::Array(items) => {
            let answers: Vec<Value> = items.iter().filter_map(|m| handle(&mcp, m)).collect();
            (!answers.is_empty()).then_some(Value::Array(answers))
        }
        single => handle(&mcp, single).map(|a| {
            if headers.contains_key("mcp-method") {
                modern_result(a, single.get("method").and_then(Value::as_str))
            } else {
                a
            }
        }),
    };
    match answer {
        Some(a) => json_response(StatusCode::OK, &a),
        None => StatusCode::ACCEPTED.into_response(),
    }
}

/// A result as the 2026-07-28 wire has it: `resultType` always, and the caching
/// fields on the results clients may cache (the listings).
fn modern_result(mut answer: Value, method: Option<&str>) -> Value {
    if let Some(Value::Object(result)) = answer.get_mut("result") {
        result
            .entry("resultType")
            .or_insert_with(|| json!("complete"));
        if method.is_some_and(|m| m.ends_with("/list")) {
            result.entry("ttlMs").or_insert_with(|| json!(0));
            result
                .entry("cacheScope")
                .or_insert_with(|| json!("private"));
        }
    }
    answer
}

/// A 2026-07-28 request (it carries `Mcp-Method`) whose headers do not match its body:
/// the error to answer with 400, as the transport requires of servers.
fn header_mismatch(headers: &HeaderMap, msg: &Value) -> Option<Value> {
    let header = |n: &str| headers.get(n).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let claimed = header("mcp-method")?;
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let method = msg.get("method").and_then(Value::as_str);
    if method != Some(claimed) {
        return Some(rpc_error(
            id,
            HEADER_MISMATCH,
            "Mcp-Method does not match the body",
        ));
    }
    let param = match claimed {
        "tools/call" | "prompts/get" => "name",
        "resources/read" => "uri",
        _ => return None,
    };
    let target = msg
        .pointer(&format!("/params/{param}"))
        .and_then(Value::as_str);
    // Plain ASCII names only here: the mock's tools have such names.
    (target != header("mcp-name"))
        .then(|| rpc_error(id, HEADER_MISMATCH, "Mcp-Name does not match the body"))
}

/// `GET /mcp` would open a server-to-client event stream; this mock has none.
async fn mcp_other() -> Response {
    let mut resp = json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &json!({"error": "only POST is supported"}),
    );
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static("POST"));
    resp
}

async fn stats(State(mcp): State<Shared>) -> Response {
    json_response(StatusCode::OK, &mcp.snapshot())
}

async fn stats_reset(State(mcp): State<Shared>) -> Response {
    mcp.with(|c| *c = Counters::default());
    json_response(StatusCode::OK, &mcp.snapshot())
}

async fn not_found() -> Response {
    json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"}))
}

fn app() -> Router {
    let api =
        Router::<Shared>::new().route("/mcp", post(post_mcp).get(mcp_other).delete(mcp_other));
    with_admin_routes(api, stats, stats_reset, not_found)
}

fn main() -> ExitCode {
    Mock {
        name: "farebox-mcp",
        default_listen: "127.0.0.1:8084",
        env_listen: "FAREBOX_MCP_LISTEN",
        usage: USAGE,
    }
    .main(app)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        let mcp = Mcp::default();
        let r = handle(
            &mcp,
            &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize"}),
        )
        .unwrap();
        assert_eq!(r["result"]["protocolVersion"], PROTOCOL_VERSION);
        assert_eq!(r["id"], 1);
        assert!(handle(
            &mcp,
            &json!({"jsonrpc": "2.0", "method": "notifications/initialized"})
        )
        .is_none());
        let r = handle(
            &mcp,
            &json!({"jsonrpc": "2.0", "id": "x", "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"text": "hi"}}}),
        )
        .unwrap();
        assert_eq!(
            r["result"]["content"][0]["text"],
            r#"echo ok: {"text":"hi"}"#
        );
        assert_eq!(r["id"], "x");
        let r = handle(
            &mcp,
            &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "nope"}}),
        )
        .unwrap();
        assert_eq!(r["error"]["code"], INVALID_PARAMS);
        let r = handle(&mcp, &json!({"jsonrpc": "2.0", "id": 3, "method": "x/y"})).unwrap();
        assert_eq!(r["error"]["code"], METHOD_NOT_FOUND);
        let r = handle(&mcp, &json!({"id": 4, "method": "ping"})).unwrap();
        assert_eq!(r["error"]["code"], INVALID_REQUEST);
        assert!(handle(&mcp, &json!({"jsonrpc": "2.0", "id": 5, "result": {}})).is_none());
        let r = handle(
            &mcp,
            &json!({"jsonrpc": "2.0", "id": 6, "method": "server/discover"}),
        )
        .unwrap();
        assert_eq!(r["result"]["supportedVersions"], json!([MODERN_VERSION]));
        assert_eq!(
            mcp.snapshot(),
            json!({"calls": {"echo": 1},
                   "methods": {"initialize": 1, "notifications/initialized": 1,
                               "server/discover": 1, "tools/call": 2, "x/y": 1},
                   "accounts": {}})
        );
    }

    #[test]
    fn modern_headers_must_match_the_body() {
        let mut h = HeaderMap::new();
        let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search"}});
        assert!(header_mismatch(&h, &call).is_none(), "an older client");
        h.insert("mcp-method", HeaderValue::from_static("tools/call"));
        assert_eq!(
            header_mismatch(&h, &call).unwrap()["error"]["code"],
            HEADER_MISMATCH
        );
        h.insert("mcp-name", HeaderValue::from_static("search"));
        assert!(header_mismatch(&h, &call).is_none());
        h.insert("mcp-method", HeaderValue::from_static("ping"));
        assert_eq!(header_mismatch(&h, &call).unwrap()["id"], 1);
    }
}
