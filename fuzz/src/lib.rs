//! Structured inputs shared by the fuzz targets: JSON values and balance-service answers
//! built from the fuzzer's bytes, so that the parsers see well-formed JSON of every shape
//! (not only the rare random bytes that happen to be JSON).

use arbitrary::Arbitrary;
use farebox::balance_api::CalloutResponse;
use serde_json::{Map, Number, Value};

pub mod request_flow;

/// A JSON value of bounded depth.
#[derive(Arbitrary, Debug, Clone)]
pub enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(Key, Json)>),
}

/// Field names the contract uses (so the fuzzer reaches the shape checks), or any other.
#[derive(Arbitrary, Debug, Clone)]
pub enum Key {
    Allow,
    AccountId,
    Balance,
    Price,
    Detail,
    Error,
    LeaseId,
    Granted,
    ExpiresInMs,
    Replay,
    Other(String),
}

impl Key {
    pub fn name(&self) -> String {
        match self {
            Key::Allow => "allow",
            Key::AccountId => "account_id",
            Key::Balance => "balance",
            Key::Price => "price",
            Key::Detail => "detail",
            Key::Error => "error",
            Key::LeaseId => "lease_id",
            Key::Granted => "granted",
            Key::ExpiresInMs => "expires_in_ms",
            Key::Replay => "replay",
            Key::Other(s) => return s.clone(),
        }
        .to_string()
    }
}

impl Json {
    pub fn to_value(&self, depth: u32) -> Value {
        if depth > 8 {
            return Value::Null;
        }
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Int(i) => Value::from(*i),
            Json::Uint(u) => Value::from(*u),
            Json::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Json::Str(s) => Value::String(s.clone()),
            Json::Array(items) => {
                Value::Array(items.iter().map(|j| j.to_value(depth + 1)).collect())
            }
            Json::Object(fields) => {
                let mut m = Map::new();
                for (k, v) in fields {
                    m.insert(k.name(), v.to_value(depth + 1));
                }
                Value::Object(m)
            }
        }
    }
}

/// The body of an answer: raw bytes, or a JSON value serialised (optionally cut short).
#[derive(Arbitrary, Debug, Clone)]
pub enum Body {
    Raw(Vec<u8>),
    Json(Json),
    Truncated(Json, u16),
}

impl Body {
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Body::Raw(b) => b.clone(),
            Body::Json(j) => j.to_value(0).to_string().into_bytes(),
            Body::Truncated(j, n) => {
                let mut b = j.to_value(0).to_string().into_bytes();
                b.truncate(usize::from(*n));
                b
            }
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub enum HeaderName {
    CacheControl,
    RetryAfter,
    ContentType,
    Status,
    Other(String),
}

/// A whole answer as the host could deliver it.
#[derive(Arbitrary, Debug, Clone)]
pub struct Answer {
    /// Mostly the statuses the contract knows, sometimes anything.
    pub status: Status,
    pub headers: Vec<(HeaderName, Vec<u8>)>,
    pub body: Body,
    pub body_too_large: bool,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Status {
    None,
    Ok,
    PaymentRequired,
    Unauthorized,
    Forbidden,
    TooMany,
    ServerError(u8),
    Any(u16),
}

impl Answer {
    pub fn response(&self) -> CalloutResponse {
        let status = match self.status {
            Status::None => None,
            Status::Ok => Some(200),
            Status::PaymentRequired => Some(402),
            Status::Unauthorized => Some(401),
            Status::Forbidden => Some(403),
            Status::TooMany => Some(429),
            Status::ServerError(n) => Some(500 + u16::from(n % 100)),
            Status::Any(s) => Some(s),
        };
        let headers = self
            .headers
            .iter()
            .map(|(name, value)| {
                let name = match name {
                    HeaderName::CacheControl => "cache-control".to_string(),
                    HeaderName::RetryAfter => "retry-after".to_string(),
                    HeaderName::ContentType => "content-type".to_string(),
                    HeaderName::Status => ":status".to_string(),
                    HeaderName::Other(s) => s.clone(),
                };
                (name, value.clone())
            })
            .collect();
        CalloutResponse {
            status,
            headers,
            body: if self.body_too_large {
                Vec::new()
            } else {
                self.body.bytes()
            },
            body_too_large: self.body_too_large,
        }
    }
}

/// What a header value may hold: visible ASCII, 1 to `max` bytes.
pub fn visible_ascii(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}
