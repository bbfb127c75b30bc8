//! A client of an x402 facilitator's HTTP API (x402 v2): `GET /supported`,
//! `POST /verify` and `POST /settle`, each with the body
//! `{x402Version, paymentPayload, paymentRequirements}`.
//!
//! Plain HTTP/1.1 with hyper-util's client (as the webhooks use): the reference
//! service reaches a remote facilitator through a local TLS proxy (an Envoy
//! cluster, say).

use crate::config::Facilitator;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::fmt;
use std::time::Duration;

/// Largest facilitator answer read.
const MAX_ANSWER: usize = 256 * 1024;
/// The selector of EIP-3009's `authorizationState(address,bytes32)`
/// (keccak-256 of the signature, first 4 bytes; checked in the tests).
const AUTHORIZATION_STATE: &str = "0xe94a0102";

/// Why a facilitator call has no answer. Any of these leaves a settlement's
/// outcome unknown: the facilitator may have sent the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// No connection (the facilitator is down or the URL is wrong).
    Unreachable(String),
    /// No answer within `--x402-facilitator-timeout-ms`.
    Timeout,
    /// An answer that is not the API's (status, or not JSON).
    BadAnswer(String),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Unreachable(e) => write!(f, "x402 facilitator unreachable: {e}"),
            CallError::Timeout => write!(f, "x402 facilitator did not answer in time"),
            CallError::BadAnswer(e) => write!(f, "x402 facilitator answered oddly: {e}"),
        }
    }
}

/// `POST /verify`'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub is_valid: bool,
    /// The facilitator's reason (`invalidReason`, with `invalidMessage` when given).
    pub reason: String,
    pub payer: Option<String>,
}

/// `POST /settle`'s answer, kept whole: it is the client's `PAYMENT-RESPONSE`.
#[derive(Debug, Clone, PartialEq)]
pub struct Settled {
    pub success: bool,
    pub reason: String,
    pub payer: Option<String>,
    pub answer: Value,
}

impl Facilitator {
    /// `GET /supported`: the `kinds` it verifies and settles.
    pub async fn supported(&self) -> Result<Value, CallError> {
        self.call("GET", "/supported", None).await
    }

    pub async fn verify(
        &self,
        payload: &Value,
        requirements: &Value,
    ) -> Result<Verified, CallError> {
        let a = self
            .call("POST", "/verify", Some(body(payload, requirements)))
            .await?;
        let is_valid = a
            .get("isValid")
            .and_then(Value::as_bool)
            .ok_or_else(|| CallError::BadAnswer("/verify: no isValid".into()))?;
        Ok(Verified {
            is_valid,
            reason: reason(&a, "invalidReason", "invalidMessage"),
            payer: text(&a, "payer"),
        })
    }

    pub async fn settle(
        &self,
        payload: &Value,
        requirements: &Value,
    ) -> Result<Settled, CallError> {
        let a = self
            .call("POST", "/settle", Some(body(payload, requirements)))
            .await?;
        let success = a
            .get("success")
            .and_then(Value::as_bool)
            .ok_or_else(|| CallError::BadAnswer("/settle: no success".into()))?;
        Ok(Settled {
            success,
            reason: reason(&a, "errorReason", "errorMessage"),
            payer: text(&a, "payer"),
            answer: a,
        })
    }

    /// Reconciles a settlement whose outcome is unknown: whether the token
    /// (`asset`) has marked the payer's EIP-3009 `nonce` used, asked of the
    /// chain at `--x402-rpc-url` (`authorizationState(address,bytes32)`). A
    /// used nonce is taken as the transfer to the authorization's recipient;
    /// the payer's `cancelAuthorization`, or another authorization of the same
    /// nonce, also marks it used (docs/balance-service.md 10.3, known limit);
    /// `None` without an RPC URL.
    pub async fn authorization_used(
        &self,
        asset: &str,
        payer: &str,
        nonce: &str,
    ) -> Option<Result<bool, CallError>> {
        let rpc = self.rpc_url.as_deref()?;
        let word = |hex: &str| {
            let h = hex.trim_start_matches("0x");
            (h.len() <= 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("{h:0>64}"))
        };
        let (Some(who), Some(n)) = (word(payer), word(nonce)) else {
            return Some(Err(CallError::BadAnswer(
                "payer or nonce is not hex".into(),
            )));
        };
        let data = format!("{AUTHORIZATION_STATE}{who}{n}");
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "eth_call",
                          "params": [{"to": asset, "data": data}, "latest"]});
        let answer = match self.call_url("POST", rpc, false, Some(body)).await {
            Ok(a) => a,
            Err(e) => return Some(Err(e)),
        };
        let Some(result) = answer.get("result").and_then(Value::as_str) else {
            return Some(Err(CallError::BadAnswer(format!(
                "eth_call authorizationState: {}",
                answer
                    .get("error")
                    .map(Value::to_string)
                    .unwrap_or_default()
            ))));
        };
        let digits = result.trim_start_matches("0x");
        Some(
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
                Err(CallError::BadAnswer(
                    "eth_call authorizationState: not a word".into(),
                ))
            } else {
                Ok(digits.bytes().any(|b| b != b'0'))
            },
        )
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CallError> {
        self.call_url(method, &format!("{}{path}", self.url), true, body)
            .await
    }

    /// One JSON call to `url`, bounded by `--x402-facilitator-timeout-ms`;
    /// `auth`: with the facilitator's auth header.
    async fn call_url(
        &self,
        method: &str,
        url: &str,
        auth: bool,
        body: Option<Value>,
    ) -> Result<Value, CallError> {
        let limit = Duration::from_millis(self.timeout_ms);
        match tokio::time::timeout(limit, self.exchange(method, url, auth, body)).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout),
        }
    }

    async fn exchange(
        &self,
        method: &str,
        url: &str,
        auth: bool,
        body: Option<Value>,
    ) -> Result<Value, CallError> {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let mut req = Request::builder()
            .method(method)
            .uri(url)
            .header("accept", "application/json")
            .header("user-agent", "farebox-balance");
        if let Some((name, value)) = self.auth_header.as_ref().filter(|_| auth) {
            req = req.header(name.as_str(), value.as_str());
        }
        if method == "POST" {
            req = req.header("content-type", "application/json");
        }
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| CallError::BadAnswer(e.to_string()))?;
        let resp = client
            .request(req)
            .await
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        let status = resp.status();
        let collected = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| CallError::BadAnswer(e.to_string()))?
            .to_bytes();
        let path = url.split_once("://").map_or(url, |(_, rest)| rest);
        let path = path.find('/').map_or("/", |i| path.get(i..).unwrap_or("/"));
        let answer: Value = serde_json::from_slice(&collected)
            .map_err(|_| CallError::BadAnswer(format!("{path}: {status}, not JSON")))?;
        // A refused verify or settle may come as a 4xx with the answer's shape.
        if status.is_server_error() || !answer.is_object() {
            return Err(CallError::BadAnswer(format!("{path}: {status}")));
        }
        Ok(answer)
    }
}

fn body(payload: &Value, requirements: &Value) -> Value {
    let version = payload.get("x402Version").cloned().unwrap_or(json!(2));
    json!({"x402Version": version, "paymentPayload": payload, "paymentRequirements": requirements})
}

fn text(a: &Value, k: &str) -> Option<String> {
    a.get(k).and_then(Value::as_str).map(str::to_owned)
}

/// The facilitator's reason: its code, and the first line of its message (bounded:
/// it goes into a 402's `error`, and some facilitators put a whole stack there).
fn reason(a: &Value, code: &str, message: &str) -> String {
    // Two lines: viem-based facilitators put the revert reason on the second.
    let message = text(a, message).map(|m| {
        let lines: Vec<&str> = m
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .take(2)
            .collect();
        lines.join(" ").chars().take(200).collect::<String>()
    });
    match (text(a, code), message.filter(|m| !m.is_empty())) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c,
        (None, Some(m)) => m,
        (None, None) => "no reason given".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn authorization_state_selector() {
        let h = crate::util::keccak256_hex(b"authorizationState(address,bytes32)");
        assert_eq!(h.get(..10), Some(super::AUTHORIZATION_STATE));
    }
}
