//! Machine-payable 402s: the x402 v2 `PAYMENT-REQUIRED` header and the HTTP
//! Payment authentication scheme's `WWW-Authenticate: Payment` challenges,
//! built from what the balance service offers; and payments clients send back.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Value};

/// What the balance service offers a client that cannot pay from its balance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Offer {
    /// x402 `PaymentRequirements` objects, passed through as given.
    pub accepts: Vec<Value>,
    /// Payment-scheme challenges: `{id, method, intent, request, expires?, description?, opaque?, realm?}`.
    pub challenges: Vec<Value>,
    /// x402 `resource` fields the service wants (`description`, `mimeType`); farebox fills `url`.
    pub resource: Option<Value>,
}

impl Offer {
    pub fn is_empty(&self) -> bool {
        self.accepts.is_empty() && self.challenges.is_empty()
    }

    /// Reads `accepts`, `challenges` and `resource` of a 402 answer; junk entries are dropped.
    pub fn from_answer(body: &Value) -> Offer {
        let objects = |key: &str| -> Vec<Value> {
            body.get(key)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter(|v| v.is_object())
                        .take(16)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        };
        let accepts = objects("accepts");
        // `resource` only decorates `accepts`; alone it offers nothing.
        let resource = body
            .get("resource")
            .filter(|r| r.is_object() && !accepts.is_empty())
            .cloned();
        Offer {
            accepts,
            challenges: objects("challenges"),
            resource,
        }
    }
}

/// A payment a client attached to its request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    /// `"x402"` (a `PAYMENT-SIGNATURE` header) or `"payment"` (`Authorization: Payment …`).
    pub scheme: &'static str,
    /// The header value as sent (a credential: never logged).
    pub value: String,
}

/// Headers that only ever carry a payment (x402 v2, and v1's `X-PAYMENT`): never sent upstream.
pub const PAYMENT_HEADERS: [&str; 2] = ["payment-signature", "x-payment"];

/// Whether an `Authorization` value is a Payment-scheme credential.
pub fn is_payment_authorization(value: &[u8]) -> bool {
    let v = value.trim_ascii_start();
    v.get(..8)
        .is_some_and(|head| head.eq_ignore_ascii_case(b"payment "))
}

/// Largest payment header forwarded; x402 payloads are a few KB.
const MAX_PAYMENT_LEN: usize = 16 * 1024;

/// Finds a payment in the request: `header` reads one request header.
pub fn payment_in(header: impl Fn(&str) -> Option<Vec<u8>>) -> Option<Payment> {
    let clean = |v: Vec<u8>| -> Option<String> {
        let s = String::from_utf8(v).ok()?;
        let s = s.trim();
        (!s.is_empty()
            && s.len() <= MAX_PAYMENT_LEN
            && s.bytes().all(|b| (0x20..=0x7e).contains(&b)))
        .then(|| s.to_string())
    };
    if let Some(v) = header("payment-signature").and_then(clean) {
        return Some(Payment {
            scheme: "x402",
            value: v,
        });
    }
    let auth = header("authorization").and_then(clean)?;
    let (scheme, rest) = auth.split_once(' ')?;
    scheme.eq_ignore_ascii_case("payment").then(|| Payment {
        scheme: "payment",
        value: rest.trim().to_string(),
    })
}

/// The payment of an MCP call (x402's MCP transport puts the `PaymentPayload` object in
/// `params._meta["x402/payment"]`), as the `PAYMENT-SIGNATURE` header would carry it.
pub fn payment_in_mcp_meta(payload: &Value) -> Option<Payment> {
    if !payload.is_object() {
        return None;
    }
    let value = encode_x402(payload);
    (value.len() <= MAX_PAYMENT_LEN).then_some(Payment {
        scheme: "x402",
        value,
    })
}

/// The `PAYMENT-REQUIRED` header value: base64 of the x402 v2 `PaymentRequired` object.
pub fn x402_header(offer: &Offer, url: &str, route: &str, error: &str) -> Option<String> {
    x402_required(offer, url, route, error).map(|required| encode_x402(&required))
}

/// The `PAYMENT-REQUIRED` header value of a `PaymentRequired` document.
pub fn encode_x402(required: &Value) -> String {
    STANDARD.encode(required.to_string())
}

/// x402's `PaymentRequired` document (the header's content; MCP carries it as is).
pub fn x402_required(offer: &Offer, url: &str, route: &str, error: &str) -> Option<Value> {
    if offer.accepts.is_empty() {
        return None;
    }
    let field = |k: &str| {
        offer
            .resource
            .as_ref()
            .and_then(|r| r.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let resource = json!({
        "url": url,
        "description": field("description").unwrap_or_else(|| format!("farebox route {route}")),
        "mimeType": field("mimeType").unwrap_or_else(|| "application/json".to_string()),
    });
    Some(json!({"x402Version": 2, "error": error, "resource": resource, "accepts": offer.accepts}))
}

/// One `WWW-Authenticate: Payment …` value per challenge the service gave, per
/// the HTTP Payment authentication scheme: `request` and `opaque` are JSON,
/// sent base64url-encoded; challenges missing a required parameter are skipped.
pub fn payment_challenges(offer: &Offer, default_realm: &str) -> Vec<String> {
    offer
        .challenges
        .iter()
        .filter_map(|c| {
            let text = |k: &str| c.get(k).and_then(Value::as_str);
            let (id, method, intent, request) = (
                text("id")?,
                text("method")?,
                text("intent")?,
                c.get("request")?,
            );
            let realm = text("realm").unwrap_or(default_realm);
            let mut params = vec![
                ("id", quote(id)),
                ("realm", quote(realm)),
                ("method", quote(method)),
                ("intent", quote(intent)),
                (
                    "request",
                    quote(&URL_SAFE_NO_PAD.encode(request.to_string())),
                ),
            ];
            if let Some(e) = text("expires") {
                params.push(("expires", quote(e)));
            }
            if let Some(d) = text("description") {
                params.push(("description", quote(d)));
            }
            if let Some(o) = c.get("opaque") {
                params.push(("opaque", quote(&URL_SAFE_NO_PAD.encode(o.to_string()))));
            }
            let list: Vec<String> = params
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            Some(format!("Payment {}", list.join(", ")))
        })
        .collect()
}

/// The Payment scheme's `Payment-Receipt` header: base64url (no padding) of the
/// receipt the service gave.
pub fn payment_receipt_header(receipt: &Value) -> String {
    URL_SAFE_NO_PAD.encode(receipt.to_string())
}

/// The registry of problem types of the Payment scheme (draft-ryan-httpauth-payment).
pub const PROBLEM_REGISTRY: &str = "https://paymentauth.org/problems/";

/// A payment failure's problem type, if the service named one the registry has.
pub fn registered_problem(slug: &str) -> Option<&'static str> {
    [
        "payment-required",
        "payment-insufficient",
        "payment-expired",
        "verification-failed",
        "method-unsupported",
        "malformed-credential",
        "invalid-challenge",
    ]
    .into_iter()
    .find(|s| *s == slug)
}

/// The status a payment failure is answered with: the registry's 400 for a method the
/// server does not take (a client that retries with the same method would fail again),
/// 402 for the rest, which a new payment can fix.
pub fn problem_status(slug: &str) -> u32 {
    if slug == "method-unsupported" {
        400
    } else {
        402
    }
}

/// `Cache-Control` for a response only its requester may keep: shared-cache
/// directives (`public`, `s-maxage`) dropped, `private` added unless it or
/// `no-store` is there.
pub fn private_cache_control(existing: Option<&str>) -> String {
    let kept: Vec<&str> = existing
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|d| {
            let name = d.split('=').next().unwrap_or_default().trim();
            !d.is_empty()
                && !name.eq_ignore_ascii_case("public")
                && !name.eq_ignore_ascii_case("s-maxage")
        })
        .collect();
    let private = kept.iter().any(|d| {
        let name = d.split('=').next().unwrap_or_default().trim();
        name.eq_ignore_ascii_case("private") || name.eq_ignore_ascii_case("no-store")
    });
    if private {
        kept.join(", ")
    } else {
        std::iter::once("private")
            .chain(kept)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The `PAYMENT-RESPONSE` header: base64 of the x402 settlement response the service gave.
pub fn x402_response_header(settlement: &Value) -> String {
    STANDARD.encode(settlement.to_string())
}

/// An HTTP quoted-string: control characters dropped, `"` and `\` escaped.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars().filter(|c| !c.is_control()) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> Offer {
        Offer::from_answer(&json!({
            "accepts": [{"scheme": "exact", "network": "base-sepolia", "amount": "5000", "asset": "0xA",
                         "payTo": "0xB", "maxTimeoutSeconds": 60, "extra": {"name": "USDC"}}, "junk"],
            "challenges": [{"id": "ch_1", "method": "x402", "intent": "charge", "request": {"amount": "5000"},
                            "expires": "2026-11-25T00:00:00Z", "description": "say \"hi\"", "opaque": {"r": 1}},
                           {"id": "no-method", "intent": "charge", "request": {}}],
            "resource": {"description": "chat", "mimeType": "text/event-stream"}
        }))
    }

    #[test]
    fn x402_payment_required_header() {
        let h = x402_header(
            &offer(),
            "http://api.test/v1/chat",
            "chat",
            "insufficient balance",
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&STANDARD.decode(&h).unwrap()).unwrap();
        assert_eq!(v["x402Version"], 2);
        assert_eq!(v["error"], "insufficient balance");
        assert_eq!(
            v["resource"],
            json!({"url": "http://api.test/v1/chat", "description": "chat", "mimeType": "text/event-stream"})
        );
        assert_eq!(
            v["accepts"].as_array().unwrap().len(),
            1,
            "non-objects are dropped"
        );
        assert_eq!(v["accepts"][0]["payTo"], "0xB");
        assert_eq!(x402_header(&Offer::default(), "u", "r", "e"), None);
    }

    #[test]
    fn payment_scheme_challenges() {
        let hs = payment_challenges(&offer(), "api.test");
        assert_eq!(hs.len(), 1, "a challenge without method is skipped");
        let h = &hs[0];
        assert!(h.starts_with("Payment id=\"ch_1\", realm=\"api.test\", method=\"x402\", intent=\"charge\", request=\""), "{h}");
        assert!(h.contains("description=\"say \\\"hi\\\"\""), "{h}");
        let request = h
            .split("request=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert!(!request.contains('=') && !request.contains('+') && !request.contains('/'));
        assert_eq!(
            serde_json::from_slice::<Value>(&URL_SAFE_NO_PAD.decode(request).unwrap()).unwrap(),
            json!({"amount": "5000"})
        );
    }

    #[test]
    fn paid_responses_stay_private() {
        assert_eq!(private_cache_control(None), "private");
        assert_eq!(
            private_cache_control(Some("public, max-age=60, s-maxage=600")),
            "private, max-age=60"
        );
        assert_eq!(private_cache_control(Some("no-store")), "no-store");
        assert_eq!(
            private_cache_control(Some("Private, max-age=5")),
            "Private, max-age=5"
        );
        assert_eq!(
            registered_problem("verification-failed"),
            Some("verification-failed")
        );
        assert_eq!(registered_problem("made-up"), None);
        assert_eq!(problem_status("method-unsupported"), 400);
        assert_eq!(problem_status("verification-failed"), 402);
        assert_eq!(problem_status("invalid-challenge"), 402);
        let r = payment_receipt_header(&json!({"status": "success"}));
        assert!(!r.contains('=') && !r.contains('+') && !r.contains('/'));
        assert_eq!(
            URL_SAFE_NO_PAD.decode(&r).unwrap(),
            br#"{"status":"success"}"#
        );
    }

    #[test]
    fn payments_in_requests() {
        let with = |pairs: &'static [(&'static str, &'static str)]| {
            move |n: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.as_bytes().to_vec())
            }
        };
        assert_eq!(
            payment_in(with(&[("payment-signature", "eyJ4In0=")])),
            Some(Payment {
                scheme: "x402",
                value: "eyJ4In0=".into()
            })
        );
        assert_eq!(
            payment_in(with(&[("authorization", "Payment abc.def")])),
            Some(Payment {
                scheme: "payment",
                value: "abc.def".into()
            })
        );
        assert_eq!(payment_in(with(&[("authorization", "Bearer x")])), None);
        assert!(is_payment_authorization(b"Payment abc"));
        assert!(is_payment_authorization(b"payment abc"));
        assert!(!is_payment_authorization(b"Bearer abc"));
        assert!(!is_payment_authorization(b"Paymentabc"));
        assert_eq!(payment_in(with(&[("payment-signature", "  ")])), None);
        assert_eq!(payment_in(with(&[])), None);
    }
}
