//! Prices for MCP (JSON-RPC 2.0 over HTTP POST): by method, and for
//! `tools/call` by tool name. The request body is read (up to a limit) to
//! find them.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

/// JSON-RPC error code of an unpaid call: in the range JSON-RPC leaves to
/// implementations (-32000 to -32099), and easy to tell from HTTP's 402.
pub const PAYMENT_REQUIRED_CODE: i64 = -32042;

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
                }
            }
            Ok(call @ Value::Object(_)) => {
                let (cost, what) = self.price_one(&call, default);
                McpPrice {
                    cost,
                    what,
                    id: call.get("id").cloned().unwrap_or(Value::Null),
                }
            }
            _ => McpPrice {
                cost: default,
                what: "not-json-rpc".into(),
                id: Value::Null,
            },
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
        match self.methods.get(method) {
            Some(cost) => (*cost, method.to_string()),
            None => (
                default,
                if method.is_empty() {
                    "unknown".into()
                } else {
                    method.to_string()
                },
            ),
        }
    }
}

/// The body of an MCP refusal: a JSON-RPC error response an MCP client can show,
/// with the problem details (RFC 9457) in `error.data`.
pub fn error_body(id: &Value, problem: &[u8]) -> Vec<u8> {
    let data = serde_json::from_slice::<Value>(problem).unwrap_or(Value::Object(Map::new()));
    let message = data
        .get("title")
        .and_then(Value::as_str)
        .unwrap_or("Payment Required")
        .to_string();
    let code = match data.get("status").and_then(Value::as_u64) {
        Some(402) => PAYMENT_REQUIRED_CODE,
        // Other refusals (401, 403, 429, 503) use the generic server-error code.
        _ => -32000,
    };
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message, "data": data}})
        .to_string()
        .into_bytes()
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
    fn error_body_is_json_rpc_with_the_problem() {
        let problem = br#"{"type": "t", "title": "Payment Required", "status": 402, "detail": "top up", "price": 5}"#;
        let v: Value = serde_json::from_slice(&error_body(&json!(9), problem)).unwrap();
        assert_eq!(v["jsonrpc"], "2.0");
        assert_eq!(v["id"], 9);
        assert_eq!(v["error"]["code"], PAYMENT_REQUIRED_CODE);
        assert_eq!(v["error"]["message"], "Payment Required");
        assert_eq!(v["error"]["data"]["price"], 5);
        let v: Value = serde_json::from_slice(&error_body(
            &Value::Null,
            br#"{"status": 503, "title": "Service Unavailable"}"#,
        ))
        .unwrap();
        assert_eq!(v["error"]["code"], -32000);
    }
}
