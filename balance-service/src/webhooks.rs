//! Webhook delivery: a background task that POSTs the events of the outbox
//! (`webhook_events`, written in the transaction of the debit that raised
//! them) to `--webhook-url`, signed, and retries failures with exponential
//! backoff. Delivery is at least once: a receiver deduplicates by the event
//! id (`farebox-event-id`, also the body's `id`).
//!
//! Signature (the Stripe convention): `farebox-signature: t=T,v1=HEX`, where
//! `T` is the Unix time in seconds of the attempt and `HEX` the lower-case
//! hex HMAC-SHA256, keyed with `--webhook-secret`, of the bytes `T.BODY`.

use crate::config::Webhook;
use crate::store::{EventRow, Store};
use crate::util::now_ms;
use axum::body::Bytes;
use hmac::{KeyInit, Mac};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::Duration;

/// How often the outbox is polled for due events.
const POLL_EVERY: Duration = Duration::from_millis(200);
/// How long a claimed event is kept from other delivery tasks (a task that
/// dies mid-delivery releases it after this).
const CLAIM_MS: i64 = 30_000;
/// Events claimed per poll.
const BATCH: i64 = 32;
/// Longest wait for the receiver's answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest delay between two attempts.
const MAX_BACKOFF_MS: u64 = 3_600_000;

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "farebox-signature";
/// The header that carries the event id.
pub const EVENT_ID_HEADER: &str = "farebox-event-id";

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The `farebox-signature` value of `body` sent at `unix_s`.
pub fn signature(secret: &[u8], unix_s: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length: new_from_slice cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(unix_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={unix_s},v1={hex}")
}

/// The delay before attempt `attempt + 1` after `attempt` (>= 1) failed:
/// `base × 2^(attempt-1)`, at most an hour.
pub fn backoff_ms(base_ms: u64, attempt: i64) -> u64 {
    let shift = u32::try_from(attempt.saturating_sub(1).clamp(0, 40)).unwrap_or(40);
    base_ms
        .saturating_mul(1u64 << shift)
        .clamp(1, MAX_BACKOFF_MS)
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// POSTs one event; `Err` says why the attempt failed.
async fn post(client: &HttpClient, cfg: &Webhook, e: &EventRow) -> Result<(), String> {
    let ts = now_ms() / 1000;
    let req = hyper::Request::post(cfg.url.as_str())
        .header("content-type", "application/json")
        .header("user-agent", "farebox-balance")
        .header(EVENT_ID_HEADER, e.event_id.as_str())
        .header(
            SIGNATURE_HEADER,
            signature(cfg.secret.as_bytes(), ts, e.body.as_bytes()),
        )
        .body(Full::new(Bytes::from(e.body.clone())))
        .map_err(|err| format!("bad request: {err}"))?;
    match tokio::time::timeout(ATTEMPT_TIMEOUT, client.request(req)).await {
        Err(_) => Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")),
        Ok(Err(err)) => Err(format!("request failed: {err}")),
        Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
        Ok(Ok(resp)) => Err(format!("receiver answered {}", resp.status().as_u16())),
    }
}

/// One poll: claims the due events and attempts each once.
async fn deliver_due(store: &Store, client: &HttpClient, cfg: &Webhook) -> usize {
    let now = now_ms();
    let events = match store.claim_events(now, now + CLAIM_MS, BATCH).await {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(cause = %e, "webhook outbox unreadable");
            return 0;
        }
    };
    let n = events.len();
    for e in events {
        let attempt = e.attempts + 1;
        let result = match post(client, cfg, &e).await {
            Ok(()) => store.event_delivered(e.seq, now_ms()).await,
            Err(why) => {
                let max = i64::try_from(cfg.max_attempts).unwrap_or(i64::MAX);
                let next = (attempt < max).then(|| {
                    let delay = backoff_ms(cfg.retry_base_ms, attempt);
                    now_ms().saturating_add(i64::try_from(delay).unwrap_or(i64::MAX))
                });
                match next {
                    Some(_) => tracing::warn!(
                        event = %e.event_id, attempt, "webhook delivery failed, will retry: {why}"
                    ),
                    None => tracing::error!(
                        event = %e.event_id, attempt, "webhook delivery given up: {why}"
                    ),
                }
                store.event_failed(e.seq, next, why, now_ms()).await
            }
        };
        if let Err(err) = result {
            // The claim runs out and the event is attempted again.
            tracing::error!(cause = %err, event = %e.event_id, "webhook outcome not recorded");
        }
    }
    n
}

/// The delivery task: polls the outbox until the process ends.
pub async fn run(store: Arc<Store>, cfg: Webhook) {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A full batch: more may be due at once.
        while deliver_due(&store, &client, &cfg).await == usize::try_from(BATCH).unwrap_or(0) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_over_timestamp_dot_body() {
        let sig = signature(b"Jefe", 1_700_000_000, br#"{"a":1}"#);
        assert!(sig.starts_with("t=1700000000,v1="), "{sig}");
        assert_eq!(sig.len(), "t=1700000000,v1=".len() + 64);
        assert_ne!(sig, signature(b"Jefe", 1_700_000_001, br#"{"a":1}"#));
        assert_ne!(sig, signature(b"Jeff", 1_700_000_000, br#"{"a":1}"#));
        // HMAC-SHA256 of "1.x" keyed with "k", as the README's recipe
        // computes it (Python: hmac.new(b"k", b"1.x", hashlib.sha256)).
        assert_eq!(
            signature(b"k", 1, b"x"),
            "t=1,v1=976cb87e4f568d1c0f03f32859e90af8597cf00b978ba37c229c97d3a15b8449"
        );
    }

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        assert_eq!(backoff_ms(100, 1), 100);
        assert_eq!(backoff_ms(100, 2), 200);
        assert_eq!(backoff_ms(100, 5), 1_600);
        assert_eq!(backoff_ms(1_000, 30), 3_600_000);
        assert_eq!(backoff_ms(u64::MAX, 3), 3_600_000);
    }
}
