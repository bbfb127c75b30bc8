//! `farebox-llm`: a mock OpenAI-compatible chat-completions upstream for the
//! filter's end-to-end tests of usage-metered pricing. Token counts are
//! deterministic so a test can compute the expected charge:
//!
//! - `prompt_tokens` = number of whitespace-separated words in all message
//!   contents (string contents, or the `text` of array parts);
//! - `completion_tokens` = `max_tokens` (else `max_completion_tokens`) if
//!   given, else 10.
//!
//! See `--help` and `docs/balance-service.md` (section "The mock upstreams").

mod mock_support;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use mock_support::{mock_status, with_admin_routes, Mock};
use serde::Serialize;
use serde_json::{json, Value};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

const USAGE: &str = "\
usage: farebox-llm [--listen ADDR]

  --listen ADDR   listen address (default 127.0.0.1:8083; port 0 picks one);
                  falls back to the environment variable FAREBOX_LLM_LISTEN

A mock OpenAI-compatible upstream:
  POST /v1/chat/completions  {\"model\", \"messages\": [{\"role\", \"content\"}...],
                              \"stream\": bool, \"stream_options\": {\"include_usage\": bool},
                              \"max_tokens\": n}
     prompt_tokens     = whitespace-separated words in all message contents
     completion_tokens = max_tokens (or max_completion_tokens) if given, else 10
     non-streaming: one JSON chat.completion, \"usage\" is its last member
     stream: true:  text/event-stream, one chunk per completion token, then (if
                    stream_options.include_usage) a chunk with \"choices\": [] and
                    \"usage\", then data: [DONE]
  Test knobs: body \"x_pad_bytes\": N (N filler bytes in the content),
  \"x_abort_after\": k (stream: k events, then the connection is dropped),
  \"x_delay_ms\": n (pause between events, default 1); header
  x-mock-status: NNN (answer NNN with an OpenAI-style JSON error).
  POST /v1/messages (Anthropic Messages)  {\"model\", \"max_tokens\", \"messages\", \"system\",
                              \"stream\"}: input_tokens = words in system and messages,
     output_tokens = max_tokens; body knobs \"x_cache_read\": n, \"x_cache_creation\": n
     (cache_read_input_tokens / cache_creation_input_tokens, not counted in input_tokens).
     stream: message_start (message.usage with output_tokens 1), content_block_start,
     ping, one content_block_delta per output token, content_block_stop, message_delta
     (usage.output_tokens, the cumulative count), message_stop.
  POST /v1/responses (OpenAI Responses)  {\"model\", \"input\", \"instructions\",
                              \"max_output_tokens\", \"stream\"}: input_tokens = words,
     output_tokens = max_output_tokens or 10; knobs \"x_cached\": n (input_tokens_details.
     cached_tokens, inside input_tokens), \"x_reasoning\": n (output_tokens_details.
     reasoning_tokens, inside output_tokens), \"x_end\": \"incomplete\" | \"failed\".
     stream: response.created, response.output_text.delta per token, then
     response.completed (or .incomplete / .failed) with response.usage; no [DONE].
  POST /v1/embeddings  {\"model\", \"input\": string or strings}: usage.prompt_tokens =
     total_tokens = words; three-dimensional zero vectors (base64 when encoding_format
     is \"base64\", as the openai client asks by default).
  On the three: \"x_pad_bytes\", \"x_abort_after\", \"x_delay_ms\" and x-mock-status as above.
  GET /v1/models, GET /healthz, GET /stats, POST /stats/reset.
";

/// Completion tokens when the request names no `max_tokens`.
const DEFAULT_COMPLETION_TOKENS: u64 = 10;
/// Largest accepted `max_tokens` (keeps answers bounded).
const MAX_COMPLETION_TOKENS: u64 = 1_000_000;
/// Largest accepted `x_pad_bytes`.
const MAX_PAD_BYTES: u64 = 64 << 20;
/// Largest accepted `x_delay_ms`.
const MAX_DELAY_MS: u64 = 10_000;
/// Pause between stream events when the request names none.
const DEFAULT_DELAY_MS: u64 = 1;
/// Name of the model when the request has none.
const DEFAULT_MODEL: &str = "farebox-mock";

/// The words the completions are made of (cycled).
const WORDS: &[&str] = &[
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
];

#[derive(Default)]
struct Stats {
    chat_completions: AtomicU64,
    streamed: AtomicU64,
    aborted: AtomicU64,
    mock_status: AtomicU64,
}

impl Stats {
    fn snapshot(&self) -> Value {
        json!({
            "chat_completions": self.chat_completions.load(Ordering::Relaxed),
            "streamed": self.streamed.load(Ordering::Relaxed),
            "aborted": self.aborted.load(Ordering::Relaxed),
            "mock_status": self.mock_status.load(Ordering::Relaxed),
        })
    }

    fn reset(&self) {
        for c in [
            &self.chat_completions,
            &self.streamed,
            &self.aborted,
            &self.mock_status,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

type Shared = Arc<Stats>;

/// A validated chat-completions request.
#[derive(Debug, PartialEq, Eq)]
struct ChatRequest {
    model: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    stream: bool,
    include_usage: bool,
    pad_bytes: usize,
    abort_after: Option<u64>,
    delay_ms: u64,
}

fn words_in(content: &Value) -> Result<u64, String> {
    let count = |s: &str| s.split_whitespace().count() as u64;
    match content {
        Value::Null => Ok(0),
        Value::String(s) => Ok(count(s)),
        Value::Array(parts) => {
            let mut n = 0u64;
            for p in parts {
                match p {
                    Value::String(s) => n += count(s),
                    Value::Object(o) => {
                        if let Some(Value::String(s)) = o.get("text") {
                            n += count(s);
                        }
                    }
                    _ => return Err("content parts must be objects or strings".into()),
                }
            }
            Ok(n)
        }
        _ => Err("message content must be a string, an array of parts or null".into()),
    }
}

/// An optional non-negative integer field (`null` counts as absent).
fn opt_u64(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<u64>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{key} must be a non-negative integer")),
    }
}

fn opt_bool(obj: &serde_json::Map<String, Value>, key: &str) -> Result<bool, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(format!("{key} must be a boolean")),
    }
}

fn parse_request(body: &[u8]) -> Result<ChatRequest, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let Value::Object(obj) = v else {
        return Err("the body must be a JSON object".into());
    };
    let model = match obj.get("model") {
        None | Some(Value::Null) => DEFAULT_MODEL.to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("model must be a string".into()),
    };
    let Some(Value::Array(messages)) = obj.get("messages") else {
        return Err("messages must be an array".into());
    };
    let mut prompt_tokens = 0u64;
    for m in messages {
        let Value::Object(m) = m else {
            return Err("every message must be an object".into());
        };
        prompt_tokens += words_in(m.get("content").unwrap_or(&Value::Null))?;
    }
    let completion_tokens = match opt_u64(&obj, "max_tokens")? {
        Some(n) => Some(n),
        None => opt_u64(&obj, "max_completion_tokens")?,
    }
    .unwrap_or(DEFAULT_COMPLETION_TOKENS);
    if completion_tokens > MAX_COMPLETION_TOKENS {
        return Err(format!(
            "max_tokens must be at most {MAX_COMPLETION_TOKENS}"
        ));
    }
    let stream = opt_bool(&obj, "stream")?;
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => opt_bool(o, "include_usage")?,
        Some(_) => return Err("stream_options must be an object".into()),
    };
    let pad = opt_u64(&obj, "x_pad_bytes")?.unwrap_or(0);
    if pad > MAX_PAD_BYTES {
        return Err(format!("x_pad_bytes must be at most {MAX_PAD_BYTES}"));
    }
    let delay_ms = opt_u64(&obj, "x_delay_ms")?.unwrap_or(DEFAULT_DELAY_MS);
    if delay_ms > MAX_DELAY_MS {
        return Err(format!("x_delay_ms must be at most {MAX_DELAY_MS}"));
    }
    Ok(ChatRequest {
        model,
        prompt_tokens,
        completion_tokens,
        stream,
        include_usage,
        pad_bytes: usize::try_from(pad).map_err(|_| "x_pad_bytes too large".to_owned())?,
        abort_after: opt_u64(&obj, "x_abort_after")?,
        delay_ms,
    })
}

/// The `i`-th token of a completion: its word, with a leading space after
/// the first. The tokens concatenated are the non-streaming content.
fn token(i: u64) -> String {
    let word = WORDS
        .get(usize::try_from(i % WORDS.len() as u64).unwrap_or(0))
        .copied()
        .unwrap_or("x");
    if i == 0 {
        word.to_owned()
    } else {
        format!(" {word}")
    }
}

/// Exactly `n` bytes of ASCII filler (starting with a space).
fn filler(n: usize) -> String {
    const PATTERN: &[u8] = b" padding";
    let bytes: Vec<u8> = PATTERN.iter().copied().cycle().take(n).collect();
    String::from_utf8(bytes).unwrap_or_default()
}

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

// Field order is the serialization order: `usage` is last on purpose (a
// filter that meters the body must find it after a large prefix).
#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [CompletionChoice<'a>; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    message: Message<'a>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChunkChoice<'a>>,
    /// Absent without `include_usage`; `null` on the token chunks and the
    /// totals on the final chunk with it (as the OpenAI API does).
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    content: &'a str,
}

/// Seconds since the Unix epoch (0 before 1970).
fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// An OpenAI-style error answer.
fn api_error(status: StatusCode, kind: &str, message: &str) -> Response {
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return status.into_response();
    }
    let body = json!({
        "error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}
    });
    json_response(status, body.to_string())
}

async fn chat_completions(State(st): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    st.chat_completions.fetch_add(1, Ordering::Relaxed);
    if let Some(status) = mock_status(&headers).filter(|s| *s != StatusCode::OK) {
        st.mock_status.fetch_add(1, Ordering::Relaxed);
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let msg = format!("mock status {} (x-mock-status)", status.as_u16());
        return api_error(status, kind, &msg);
    }
    let req = match parse_request(&body) {
        Ok(r) => r,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, "invalid_request_error", &e),
    };
    let id = format!("chatcmpl-{}", farebox_balance::util::random_hex(12));
    let created = unix_seconds();
    let usage = Usage {
        prompt_tokens: req.prompt_tokens,
        completion_tokens: req.completion_tokens,
        total_tokens: req.prompt_tokens + req.completion_tokens,
    };
    if req.stream {
        st.streamed.fetch_add(1, Ordering::Relaxed);
        return stream_response(st, req, id, created, usage);
    }
    let mut content: String = (0..req.completion_tokens).map(token).collect();
    content.push_str(&filler(req.pad_bytes));
    let doc = Completion {
        id: &id,
        object: "chat.completion",
        created,
        model: &req.model,
        choices: [CompletionChoice {
            index: 0,
            message: Message {
                role: "assistant",
                content: &content,
            },
            finish_reason: "stop",
        }],
        usage,
    };
    match serde_json::to_string(&doc) {
        Ok(s) => json_response(StatusCode::OK, s),
        Err(e) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            &e.to_string(),
        ),
    }
}

/// The body stream of an event-stream answer: fed by a producer task, ended
/// by an `Err` item when the answer must be cut off (the HTTP stack then
/// drops the connection without the final chunk).
struct Events(tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl futures_core::Stream for Events {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

fn event(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

fn stream_response(
    st: Shared,
    req: ChatRequest,
    id: String,
    created: u64,
    usage: Usage,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    tokio::spawn(async move {
        let delay = Duration::from_millis(req.delay_ms);
        let usage_field = req.include_usage.then_some(None);
        let pad = filler(req.pad_bytes);
        for i in 0..req.completion_tokens {
            if req.abort_after == Some(i) {
                break;
            }
            let mut content = token(i);
            if i == 0 {
                content.push_str(&pad);
            }
            let last = i + 1 == req.completion_tokens;
            let chunk = Chunk {
                id: &id,
                object: "chat.completion.chunk",
                created,
                model: &req.model,
                choices: vec![ChunkChoice {
                    index: 0,
                    delta: Delta {
                        role: (i == 0).then_some("assistant"),
                        content: &content,
                    },
                    finish_reason: last.then_some("stop"),
                }],
                usage: usage_field,
            };
            let Ok(data) = serde_json::to_string(&chunk) else {
                return;
            };
            if tx.send(Ok(event(&data))).await.is_err() {
                return; // The client went away.
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
        if req.abort_after.is_some() {
            // Let the events written so far reach the client, then cut the
            // connection: no usage, no [DONE], no final chunk.
            tokio::time::sleep(Duration::from_millis(50)).await;
            st.aborted.fetch_add(1, Ordering::Relaxed);
            let _ = tx
                .send(Err(std::io::Error::other(
                    "x_abort_after: connection dropped",
                )))
                .await;
            return;
        }
        if req.include_usage {
            let chunk = Chunk {
                id: &id,
                object: "chat.completion.chunk",
                created,
                model: &req.model,
                choices: Vec::new(),
                usage: Some(Some(usage)),
            };
            let Ok(data) = serde_json::to_string(&chunk) else {
                return;
            };
            if tx.send(Ok(event(&data))).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(event("[DONE]"))).await;
    });
    let mut resp = Response::new(Body::from_stream(Events(rx)));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// The knobs and counts the Anthropic, Responses and embeddings mocks share.
struct Shape {
    model: String,
    input_tokens: u64,
    output_tokens: u64,
    stream: bool,
    pad: String,
    abort_after: Option<u64>,
    delay: Duration,
    obj: serde_json::Map<String, Value>,
}

fn words_of(v: Option<&Value>) -> Result<u64, String> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => Ok(s.split_whitespace().count() as u64),
        Some(Value::Array(items)) => {
            let mut n = 0u64;
            for item in items {
                n += match item {
                    Value::Object(o) if o.contains_key("content") => words_of(o.get("content"))?,
                    Value::Object(o) => words_of(o.get("text"))?,
                    Value::String(_) => words_of(Some(item))?,
                    _ => return Err("content parts must be objects or strings".into()),
                };
            }
            Ok(n)
        }
        Some(_) => Err("content must be a string or an array".into()),
    }
}

fn parse_shape(body: &[u8], input_fields: &[&str], max_field: &str) -> Result<Shape, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let Value::Object(obj) = v else {
        return Err("the body must be a JSON object".into());
    };
    let model = match obj.get("model") {
        Some(Value::String(s)) => s.clone(),
        _ => DEFAULT_MODEL.to_owned(),
    };
    let mut input_tokens = 0;
    for f in input_fields {
        input_tokens += words_of(obj.get(*f))?;
    }
    let output_tokens = opt_u64(&obj, max_field)?.unwrap_or(DEFAULT_COMPLETION_TOKENS);
    if output_tokens > MAX_COMPLETION_TOKENS {
        return Err(format!(
            "{max_field} must be at most {MAX_COMPLETION_TOKENS}"
        ));
    }
    let pad = opt_u64(&obj, "x_pad_bytes")?.unwrap_or(0);
    if pad > MAX_PAD_BYTES {
        return Err(format!("x_pad_bytes must be at most {MAX_PAD_BYTES}"));
    }
    let delay_ms = opt_u64(&obj, "x_delay_ms")?.unwrap_or(DEFAULT_DELAY_MS);
    if delay_ms > MAX_DELAY_MS {
        return Err(format!("x_delay_ms must be at most {MAX_DELAY_MS}"));
    }
    Ok(Shape {
        model,
        input_tokens,
        output_tokens,
        stream: opt_bool(&obj, "stream")?,
        pad: filler(usize::try_from(pad).map_err(|_| "x_pad_bytes too large".to_owned())?),
        abort_after: opt_u64(&obj, "x_abort_after")?,
        delay: Duration::from_millis(delay_ms),
        obj,
    })
}

/// An event-stream answer whose events a producer sends; `abort` ends it by
/// dropping the connection.
fn event_stream(
    st: Shared,
    events: Vec<(String, Value)>,
    abort_after: Option<usize>,
    delay: Duration,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    tokio::spawn(async move {
        for (i, (name, data)) in events.into_iter().enumerate() {
            if abort_after == Some(i) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                st.aborted.fetch_add(1, Ordering::Relaxed);
                let _ = tx
                    .send(Err(std::io::Error::other(
                        "x_abort_after: connection dropped",
                    )))
                    .await;
                return;
            }
            let text = if name.is_empty() {
                format!("data: {data}\n\n")
            } else {
                format!("event: {name}\ndata: {data}\n\n")
            };
            if tx.send(Ok(Bytes::from(text))).await.is_err() {
                return;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(Events(rx)));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn refuse_by_header(st: &Shared, headers: &HeaderMap) -> Option<Response> {
    let status = mock_status(headers).filter(|s| *s != StatusCode::OK)?;
    st.mock_status.fetch_add(1, Ordering::Relaxed);
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    Some(api_error(
        status,
        kind,
        &format!("mock status {} (x-mock-status)", status.as_u16()),
    ))
}

/// The completion text: the tokens, then the padding.
fn completion_text(n: u64, pad: &str) -> String {
    let mut text: String = (0..n).map(token).collect();
    text.push_str(pad);
    text
}

async fn anthropic_messages(State(st): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    st.chat_completions.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = refuse_by_header(&st, &headers) {
        return r;
    }
    let sh = match parse_shape(&body, &["system", "messages"], "max_tokens") {
        Ok(s) => s,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, "invalid_request_error", &e),
    };
    let (cache_read, cache_creation) = match (
        opt_u64(&sh.obj, "x_cache_read"),
        opt_u64(&sh.obj, "x_cache_creation"),
    ) {
        (Ok(r), Ok(c)) => (r.unwrap_or(0), c.unwrap_or(0)),
        (Err(e), _) | (_, Err(e)) => {
            return api_error(StatusCode::BAD_REQUEST, "invalid_request_error", &e)
        }
    };
    let id = format!("msg_{}", farebox_balance::util::random_hex(12));
    let usage = |output: u64| {
        json!({"input_tokens": sh.input_tokens, "cache_creation_input_tokens": cache_creation,
               "cache_read_input_tokens": cache_read, "output_tokens": output})
    };
    if !sh.stream {
        let mut doc = serde_json::Map::new();
        doc.insert("id".into(), json!(id));
        doc.insert("type".into(), json!("message"));
        doc.insert("role".into(), json!("assistant"));
        doc.insert("model".into(), json!(sh.model));
        doc.insert(
            "content".into(),
            json!([{"type": "text", "text": completion_text(sh.output_tokens, &sh.pad)}]),
        );
        doc.insert("stop_reason".into(), json!("max_tokens"));
        doc.insert("stop_sequence".into(), Value::Null);
        doc.insert("usage".into(), usage(sh.output_tokens));
        return json_response(StatusCode::OK, Value::Object(doc).to_string());
    }
    st.streamed.fetch_add(1, Ordering::Relaxed);
    let mut events = vec![
        (
            "message_start".to_string(),
            json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant",
                "model": sh.model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": usage(1)}}),
        ),
        (
            "content_block_start".to_string(),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping".to_string(), json!({"type": "ping"})),
    ];
    for i in 0..sh.output_tokens {
        let mut text = token(i);
        if i == 0 {
            text.push_str(&sh.pad);
        }
        events.push((
            "content_block_delta".to_string(),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
        ));
    }
    events.push((
        "content_block_stop".to_string(),
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push((
        "message_delta".to_string(),
        json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": null},
               "usage": {"output_tokens": sh.output_tokens}}),
    ));
    events.push(("message_stop".to_string(), json!({"type": "message_stop"})));
    // x_abort_after counts content deltas, after the three opening events.
    let abort = sh
        .abort_after
        .map(|k| usize::try_from(k.saturating_add(3)).unwrap_or(usize::MAX));
    event_stream(st, events, abort, sh.delay)
}

async fn responses(State(st): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    st.chat_completions.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = refuse_by_header(&st, &headers) {
        return r;
    }
    let sh = match parse_shape(&body, &["instructions", "input"], "max_output_tokens") {
        Ok(s) => s,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, "invalid_request_error", &e),
    };
    let (cached, reasoning) = match (
        opt_u64(&sh.obj, "x_cached"),
        opt_u64(&sh.obj, "x_reasoning"),
    ) {
        (Ok(c), Ok(r)) => (
            c.unwrap_or(0).min(sh.input_tokens),
            r.unwrap_or(0).min(sh.output_tokens),
        ),
        (Err(e), _) | (_, Err(e)) => {
            return api_error(StatusCode::BAD_REQUEST, "invalid_request_error", &e)
        }
    };
    let end = match sh.obj.get("x_end").and_then(Value::as_str) {
        None => "completed",
        Some(e @ ("incomplete" | "failed")) => e,
        Some(_) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "x_end must be \"incomplete\" or \"failed\"",
            )
        }
    };
    let id = format!("resp_{}", farebox_balance::util::random_hex(12));
    let created = unix_seconds();
    let usage = json!({"input_tokens": sh.input_tokens, "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": sh.output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": sh.input_tokens + sh.output_tokens});
    let text = completion_text(sh.output_tokens, &sh.pad);
    let response = |status: &str, text: &str, usage: Value| {
        let mut doc = serde_json::Map::new();
        doc.insert("id".into(), json!(id));
        doc.insert("object".into(), json!("response"));
        doc.insert("created_at".into(), json!(created));
        doc.insert("status".into(), json!(status));
        doc.insert("model".into(), json!(sh.model));
        let output = if text.is_empty() {
            json!([])
        } else {
            json!([{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}])
        };
        doc.insert("output".into(), output);
        doc.insert("parallel_tool_calls".into(), json!(true));
        doc.insert("tool_choice".into(), json!("auto"));
        doc.insert("tools".into(), json!([]));
        doc.insert("usage".into(), usage);
        Value::Object(doc)
    };
    if !sh.stream {
        return json_response(StatusCode::OK, response(end, &text, usage).to_string());
    }
    st.streamed.fetch_add(1, Ordering::Relaxed);
    let mut events = vec![(
        "response.created".to_string(),
        json!({"type": "response.created", "sequence_number": 0, "response": response("in_progress", "", Value::Null)}),
    )];
    for i in 0..sh.output_tokens {
        let mut delta = token(i);
        if i == 0 {
            delta.push_str(&sh.pad);
        }
        events.push((
            "response.output_text.delta".to_string(),
            json!({"type": "response.output_text.delta", "sequence_number": i + 1, "item_id": "msg_1",
                   "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []}),
        ));
    }
    let name = format!("response.{end}");
    events.push((
        name.clone(),
        json!({"type": name, "sequence_number": sh.output_tokens + 1, "response": response(end, &text, usage)}),
    ));
    let abort = sh
        .abort_after
        .map(|k| usize::try_from(k.saturating_add(1)).unwrap_or(usize::MAX));
    event_stream(st, events, abort, sh.delay)
}

async fn embeddings(State(st): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    st.chat_completions.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = refuse_by_header(&st, &headers) {
        return r;
    }
    let sh = match parse_shape(&body, &["input"], "x_unused") {
        Ok(s) => s,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, "invalid_request_error", &e),
    };
    let inputs = match sh.obj.get("input") {
        Some(Value::Array(items)) => items.len(),
        _ => 1,
    };
    // Three float32 zeros, as the client decodes them.
    let vector = match sh.obj.get("encoding_format").and_then(Value::as_str) {
        Some("base64") => json!("AAAAAAAAAAAAAAAA"),
        _ => json!([0.0, 0.0, 0.0]),
    };
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": vector}))
        .collect();
    let mut doc = serde_json::Map::new();
    doc.insert("object".into(), json!("list"));
    doc.insert("data".into(), json!(data));
    doc.insert("model".into(), json!(sh.model));
    doc.insert(
        "usage".into(),
        json!({"prompt_tokens": sh.input_tokens, "total_tokens": sh.input_tokens}),
    );
    json_response(StatusCode::OK, Value::Object(doc).to_string())
}

async fn models() -> Response {
    let body = json!({
        "object": "list",
        "data": [{"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "farebox"}],
    });
    json_response(StatusCode::OK, body.to_string())
}

async fn stats(State(st): State<Shared>) -> Response {
    json_response(StatusCode::OK, st.snapshot().to_string())
}

async fn stats_reset(State(st): State<Shared>) -> Response {
    st.reset();
    json_response(StatusCode::OK, st.snapshot().to_string())
}

async fn not_found() -> Response {
    api_error(StatusCode::NOT_FOUND, "invalid_request_error", "not found")
}

fn app() -> Router {
    let api = Router::<Shared>::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/messages", post(anthropic_messages))
        .route("/v1/responses", post(responses))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models));
    with_admin_routes(api, stats, stats_reset, not_found)
}

fn main() -> ExitCode {
    Mock {
        name: "farebox-llm",
        default_listen: "127.0.0.1:8083",
        env_listen: "FAREBOX_LLM_LISTEN",
        usage: USAGE,
    }
    .main(app)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn counts_words_and_defaults() {
        let r = parse_request(
            br#"{"model":"m","messages":[{"role":"system","content":"be  brief"},
                {"role":"user","content":[{"type":"text","text":"one two three"}]},
                {"role":"assistant","content":null}]}"#,
        )
        .unwrap();
        assert_eq!((r.prompt_tokens, r.completion_tokens), (5, 10));
        assert_eq!(r.model, "m");
        assert!(!r.stream && !r.include_usage);
        let r = parse_request(
            br#"{"messages":[],"max_tokens":3,"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!((r.prompt_tokens, r.completion_tokens), (0, 3));
        assert_eq!(r.model, DEFAULT_MODEL);
        assert!(r.stream && r.include_usage);
        let r = parse_request(br#"{"messages":[],"max_completion_tokens":4}"#).unwrap();
        assert_eq!(r.completion_tokens, 4);
    }

    #[test]
    fn rejects_bad_bodies() {
        for body in [
            &b"nope"[..],
            b"[]",
            b"{}",
            br#"{"messages":{}}"#,
            br#"{"messages":[1]}"#,
            br#"{"messages":[{"content":5}]}"#,
            br#"{"messages":[],"max_tokens":-1}"#,
            br#"{"messages":[],"stream":"yes"}"#,
            br#"{"messages":[],"x_pad_bytes":999999999999}"#,
        ] {
            assert!(
                parse_request(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn anthropic_and_responses_shapes_count_words() {
        let sh = parse_shape(
            br#"{"model":"c","max_tokens":4,"system":"be brief","messages":[{"role":"user","content":[{"type":"text","text":"a b c"}]}]}"#,
            &["system", "messages"],
            "max_tokens",
        )
        .unwrap();
        assert_eq!(
            (sh.model.as_str(), sh.input_tokens, sh.output_tokens),
            ("c", 5, 4)
        );
        let sh = parse_shape(
            br#"{"input":[{"role":"user","content":"one two"}],"instructions":"x"}"#,
            &["instructions", "input"],
            "max_output_tokens",
        )
        .unwrap();
        assert_eq!(
            (sh.input_tokens, sh.output_tokens),
            (3, DEFAULT_COMPLETION_TOKENS)
        );
        assert!(parse_shape(br#"{"input": 5}"#, &["input"], "max_output_tokens").is_err());
        assert!(parse_shape(br#"{"max_tokens": -1}"#, &["messages"], "max_tokens").is_err());
    }

    #[test]
    fn tokens_and_filler() {
        let s: String = (0..3).map(token).collect();
        assert_eq!(s, "lorem ipsum dolor");
        assert_eq!(filler(0), "");
        assert_eq!(filler(11), " padding pa");
        assert_eq!(filler(1000).len(), 1000);
    }
}
