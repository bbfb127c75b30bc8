//! Prices known only when the response is in: token usage reported by
//! OpenAI-compatible APIs, in a JSON body or in the last server-sent event
//! that carries it. The body streams to the client untouched; the meter keeps
//! only a bounded tail (JSON) or the current line (SSE).

use std::sync::Arc;

use serde_json::Value;

use crate::amount::MAX_AMOUNT;
use crate::tokens::{self, ModelFrom, PriceTable, Reported, Tokens};

/// How a route's usage is priced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSpec {
    /// (JSON pointer, price per unit): `/usage/total_tokens` at 2, or input and output apart.
    pub parts: Vec<(String, u64)>,
    /// Held at request time, and charged as is when no usage can be read.
    pub estimate: u64,
    /// Token classes priced per model (src/tokens.rs); `parts` is then empty. Shared, not
    /// copied, by each response's meter (and `Arc` keeps `Config` `Sync` for the fuzzers).
    pub table: Option<Arc<PriceTable>>,
    /// Streaming Chat Completions requests are sent with `stream_options.include_usage`
    /// (see [`with_include_usage`]), so that their stream reports the usage they are
    /// charged by instead of the hold.
    pub stream_include_usage: bool,
}

/// A Chat Completions request body that streams (`"stream": true`) without asking
/// for usage, rewritten to ask for it: `stream_options.include_usage: true` is added,
/// every other member kept. `None` when nothing is to change: not JSON, not
/// streaming, usage already asked for, or refused by the client with an explicit
/// `"include_usage": false` (its stream is then charged at the hold, as it asked
/// for no usage chunk, which clients that read `choices[0]` of every chunk may not
/// expect). A `stream_options` that is not an object is left to the upstream to refuse.
pub fn with_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let mut doc = serde_json::from_slice::<Value>(body).ok()?;
    let req = doc.as_object_mut()?;
    if req.get("stream") != Some(&Value::Bool(true)) {
        return None;
    }
    let options = req
        .entry("stream_options")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    if options.is_null() {
        *options = Value::Object(serde_json::Map::new());
    }
    let options = options.as_object_mut()?;
    match options.get("include_usage") {
        None | Some(Value::Null) => {
            options.insert("include_usage".into(), Value::Bool(true));
            serde_json::to_vec(&doc).ok()
        }
        Some(_) => None,
    }
}

impl UsageSpec {
    /// The key the meter looks for before it parses anything: the pointer's first segment.
    fn anchor(&self) -> Option<String> {
        if self.table.is_some() {
            return Some("\"usage\"".to_string());
        }
        let first = self
            .parts
            .first()?
            .0
            .trim_start_matches('/')
            .split('/')
            .next()?;
        Some(format!("\"{}\"", unescape_segment(first)))
    }

    /// The cost of a usage document, or `None` if it does not carry every part.
    pub fn cost_of(&self, doc: &Value) -> Option<u64> {
        let mut total: u64 = 0;
        for (pointer, unit_cost) in &self.parts {
            let units = doc.pointer(pointer)?.as_u64()?;
            total = total.saturating_add(units.saturating_mul(*unit_cost));
        }
        Some(total.min(MAX_AMOUNT))
    }
}

fn unescape_segment(s: &str) -> String {
    s.replace("~1", "/").replace("~0", "~")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    EventStream,
}

impl BodyKind {
    /// From the response's content type; `None` for bodies we do not meter.
    pub fn from_content_type(ct: &str) -> Option<BodyKind> {
        let media = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "application/json" => Some(BodyKind::Json),
            "text/event-stream" => Some(BodyKind::EventStream),
            m if m.ends_with("+json") => Some(BodyKind::Json),
            _ => None,
        }
    }
}

/// What a metered response cost, and (priced by a table) its tokens and model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metered {
    pub cost: u64,
    pub tokens: Option<Tokens>,
    pub model: Option<String>,
}

/// Reads usage out of a response body fed to it chunk by chunk.
#[derive(Debug)]
pub struct Meter {
    kind: BodyKind,
    spec: UsageSpec,
    anchor: String,
    limit: usize,
    /// JSON: the last `limit` bytes. SSE: the current, unfinished line.
    buf: Vec<u8>,
    /// The whole JSON body so far fits in `buf`.
    whole: bool,
    /// SSE: the line being read is longer than `limit`; `buf` keeps its last `limit`
    /// bytes, where its usage is read (the Responses API's final event carries the
    /// whole output before its usage).
    skipping: bool,
    /// SSE: the cost of the last event that carried usage.
    last: Option<u64>,
    /// Priced by a table: the usage fields seen so far (latest value of each).
    reported: Reported,
    /// The model the request named, and the one the response names.
    request_model: Option<String>,
    response_model: Option<String>,
}

impl Meter {
    pub fn new(kind: BodyKind, spec: UsageSpec, limit: usize) -> Meter {
        Meter::for_model(kind, spec, limit, None)
    }

    /// A meter for a table-priced route, told the model the request named.
    pub fn for_model(
        kind: BodyKind,
        spec: UsageSpec,
        limit: usize,
        request_model: Option<String>,
    ) -> Meter {
        let anchor = spec.anchor().unwrap_or_default();
        Meter {
            reported: Reported::default(),
            request_model,
            response_model: None,
            kind,
            spec,
            anchor,
            limit: limit.max(64),
            buf: Vec::new(),
            whole: true,
            skipping: false,
            last: None,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        match self.kind {
            BodyKind::Json => {
                self.buf.extend_from_slice(chunk);
                if self.buf.len() > self.limit {
                    let cut = self.buf.len() - self.limit;
                    self.buf.drain(..cut);
                    self.whole = false;
                }
            }
            BodyKind::EventStream => {
                for piece in chunk.split_inclusive(|b| *b == b'\n') {
                    let complete = piece.last() == Some(&b'\n');
                    let keep = piece
                        .get(piece.len().saturating_sub(self.limit)..)
                        .unwrap_or(piece);
                    self.buf.extend_from_slice(keep);
                    if keep.len() < piece.len() {
                        self.skipping = true;
                    }
                    if self.buf.len() > self.limit {
                        let cut = self.buf.len() - self.limit;
                        self.buf.drain(..cut);
                        self.skipping = true;
                    }
                    if complete {
                        let line = std::mem::take(&mut self.buf);
                        self.end_line(&line);
                    }
                }
            }
        }
    }

    /// A whole line, or the tail of one longer than the limit.
    fn end_line(&mut self, line: &[u8]) {
        if std::mem::take(&mut self.skipping) {
            if let Some(cost) = self.tail_cost(line) {
                self.last = Some(cost);
            }
        } else {
            self.event_line(line);
        }
    }

    fn event_line(&mut self, line: &[u8]) {
        let line = trim_line(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let wants_model = self.wants_model() && contains(data, b"\"model\"");
        if !wants_model && !contains(data, self.anchor.as_bytes()) {
            return;
        }
        if let Ok(doc) = serde_json::from_slice::<Value>(data) {
            if self.spec.table.is_some() {
                self.take_doc(&doc);
            } else if let Some(cost) = self.spec.cost_of(&doc) {
                self.last = Some(cost);
            }
        }
    }

    /// Table pricing by the response's model, not seen yet.
    fn wants_model(&self) -> bool {
        self.response_model.is_none()
            && self
                .spec
                .table
                .as_ref()
                .is_some_and(|t| t.model_from == ModelFrom::Response)
    }

    /// A response document (or event) of a table-priced route.
    fn take_doc(&mut self, doc: &Value) {
        let Some(table) = &self.spec.table else {
            return;
        };
        if let Some(usage) = tokens::usage_in(doc) {
            self.reported.update(table.api, usage);
        }
        if self.wants_model() {
            self.response_model = tokens::model_in(doc).map(str::to_string);
        }
    }

    /// The cost of the usage seen, by the model's prices; `None` without usage, or
    /// for a model the table refuses (the hold is then the price).
    fn table_cost(&self) -> Option<u64> {
        let table = self.spec.table.as_ref()?;
        if !self.reported.any() {
            return None;
        }
        let model = match table.model_from {
            ModelFrom::Response => self.response_model.as_ref().or(self.request_model.as_ref()),
            ModelFrom::Request => self.request_model.as_ref(),
        };
        let prices = table.prices(model.map(String::as_str))?;
        Some(table.cost(prices, &self.reported.tokens(table.api)))
    }

    /// Bytes the meter holds (its memory bound is the limit).
    pub fn kept(&self) -> usize {
        self.buf.len()
    }

    /// The model the charge was priced by, once known (for the log).
    pub fn model(&self) -> Option<&str> {
        let from_response = self
            .spec
            .table
            .as_ref()
            .is_some_and(|t| t.model_from == ModelFrom::Response);
        if from_response {
            if let Some(m) = &self.response_model {
                return Some(m);
            }
        }
        self.request_model.as_deref()
    }

    /// The actual cost, once the body is complete; `None` if no usage was found.
    pub fn finish(self) -> Option<u64> {
        self.finish_metered().map(|m| m.cost)
    }

    /// The actual cost with what it was worked out from (the token classes and the
    /// model on a table-priced route), for the access log.
    pub fn finish_metered(mut self) -> Option<Metered> {
        let cost = self.finish_cost()?;
        let tokens = self
            .spec
            .table
            .as_ref()
            .map(|t| self.reported.tokens(t.api));
        let model = tokens.and(self.model()).map(str::to_string);
        Some(Metered {
            cost,
            tokens,
            model,
        })
    }

    fn finish_cost(&mut self) -> Option<u64> {
        match self.kind {
            BodyKind::EventStream => {
                let rest = std::mem::take(&mut self.buf);
                self.end_line(&rest);
                if self.spec.table.is_some() {
                    return self.table_cost();
                }
                self.last
            }
            BodyKind::Json => {
                if self.whole {
                    if let Ok(doc) = serde_json::from_slice::<Value>(&self.buf) {
                        if self.spec.table.is_some() {
                            self.take_doc(&doc);
                            return self.table_cost();
                        }
                        return self.spec.cost_of(&doc);
                    }
                }
                let tail = std::mem::take(&mut self.buf);
                self.tail_cost(&tail)
            }
        }
    }

    /// The body (or an event line) was larger than the tail: find the last `"usage":`
    /// in it and read just that value, then the rest of each pointer inside it.
    fn tail_cost(&mut self, tail: &[u8]) -> Option<u64> {
        let value = value_after(tail, self.anchor.as_bytes())?;
        let key = self.anchor.trim_matches('"').to_string();
        let mut doc = serde_json::Map::new();
        doc.insert(key, value);
        if self.spec.table.is_some() {
            if let Some(model) = value_after(tail, b"\"model\"") {
                doc.insert("model".to_string(), model);
            }
            self.take_doc(&Value::Object(doc));
            return self.table_cost();
        }
        self.spec.cost_of(&Value::Object(doc))
    }
}

/// The JSON value after the last `key` (a quoted member name) in `buf`.
fn value_after(buf: &[u8], key: &[u8]) -> Option<Value> {
    let at = rfind(buf, key)?;
    if at > 0 && buf.get(at - 1) == Some(&b'\\') {
        return None; // inside a string: `\"usage\"`
    }
    let after = buf.get(at + key.len()..)?;
    let colon = after.iter().position(|b| !b.is_ascii_whitespace())?;
    if after.get(colon) != Some(&b':') {
        return None;
    }
    let value_bytes = after.get(colon + 1..)?;
    serde_json::Deserializer::from_slice(value_bytes)
        .into_iter::<Value>()
        .next()?
        .ok()
}

fn trim_line(mut l: &[u8]) -> &[u8] {
    while let [rest @ .., b'\n' | b'\r'] = l {
        l = rest;
    }
    while let [b' ' | b'\t', rest @ ..] = l {
        l = rest;
    }
    l
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return None;
    }
    (0..=hay.len() - needle.len())
        .rev()
        .find(|&i| hay.get(i..i + needle.len()) == Some(needle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn total(unit: u64) -> UsageSpec {
        UsageSpec {
            parts: vec![("/usage/total_tokens".into(), unit)],
            estimate: 100,
            table: None,
            stream_include_usage: false,
        }
    }

    fn split_cost(input: u64, output: u64) -> UsageSpec {
        UsageSpec {
            parts: vec![
                ("/usage/prompt_tokens".into(), input),
                ("/usage/completion_tokens".into(), output),
            ],
            estimate: 100,
            table: None,
            stream_include_usage: false,
        }
    }

    fn feed_in_pieces(meter: &mut Meter, body: &[u8], piece: usize) {
        for chunk in body.chunks(piece) {
            meter.feed(chunk);
        }
    }

    #[test]
    fn json_body_whole_or_by_tail() {
        let body = json!({"id": "x", "choices": [{"message": {"content": "hi"}}],
                          "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})
        .to_string();
        for piece in [1, 7, 4096] {
            let mut m = Meter::new(BodyKind::Json, total(2), 1024);
            feed_in_pieces(&mut m, body.as_bytes(), piece);
            assert_eq!(m.finish(), Some(20));
            let mut m = Meter::new(BodyKind::Json, split_cost(1, 3), 1024);
            feed_in_pieces(&mut m, body.as_bytes(), piece);
            assert_eq!(m.finish(), Some(7 + 9));
        }
        // A large body: only the tail is kept, and usage is still found in it.
        let padded = json!({"choices": [{"message": {"content": "w ".repeat(100_000)}}],
                            "usage": {"total_tokens": 12}})
        .to_string();
        let mut m = Meter::new(BodyKind::Json, total(1), 256);
        feed_in_pieces(&mut m, padded.as_bytes(), 1000);
        assert!(m.buf.len() <= 256);
        assert_eq!(m.finish(), Some(12));
    }

    #[test]
    fn json_without_usage_or_broken() {
        let mut m = Meter::new(BodyKind::Json, total(1), 1024);
        m.feed(br#"{"choices": []}"#);
        assert_eq!(m.finish(), None);
        let mut m = Meter::new(BodyKind::Json, total(1), 1024);
        m.feed(br#"{"usage": {"total_tokens": "many"}}"#);
        assert_eq!(m.finish(), None);
        let mut m = Meter::new(BodyKind::Json, total(1), 1024);
        m.feed(br#"{"usage": {"total_tokens": 5"#);
        assert_eq!(m.finish(), None);
        let mut m = Meter::new(BodyKind::Json, total(u64::MAX), 1024);
        m.feed(br#"{"usage": {"total_tokens": 5}}"#);
        assert_eq!(m.finish(), Some(MAX_AMOUNT), "overflow saturates");
    }

    #[test]
    fn sse_takes_the_last_event_with_usage() {
        let mut stream = String::new();
        for i in 0..5 {
            stream.push_str(&format!(
                "data: {}\n\n",
                json!({"choices": [{"delta": {"content": format!("t{i}")}}]})
            ));
        }
        stream.push_str(&format!(
            "data: {}\r\n\r\n",
            json!({"choices": [], "usage": {"total_tokens": 9}})
        ));
        stream.push_str("data: [DONE]\n\n");
        for piece in [1, 3, 50, 10_000] {
            let mut m = Meter::new(BodyKind::EventStream, total(3), 4096);
            feed_in_pieces(&mut m, stream.as_bytes(), piece);
            assert_eq!(m.finish(), Some(27), "piece {piece}");
        }
    }

    #[test]
    fn sse_without_usage_or_with_huge_lines() {
        let mut m = Meter::new(BodyKind::EventStream, total(1), 4096);
        m.feed(b"data: {\"choices\": []}\n\ndata: [DONE]\n\n");
        assert_eq!(m.finish(), None);
        // A line longer than the limit is skipped, and the next one is still read.
        let mut m = Meter::new(BodyKind::EventStream, total(1), 128);
        let big = format!(
            "data: {{\"usage\": {{\"total_tokens\": 1}}, \"pad\": \"{}\"}}\n",
            "x".repeat(500)
        );
        m.feed(big.as_bytes());
        m.feed(b"data: {\"usage\": {\"total_tokens\": 4}}\n");
        assert_eq!(m.finish(), Some(4));
        // An abandoned stream: no usage.
        let mut m = Meter::new(BodyKind::EventStream, total(1), 128);
        m.feed(b"data: {\"choices\": [{\"delta\": {}}]}\n\ndata: {\"usa");
        assert_eq!(m.finish(), None);
    }

    #[test]
    fn streams_are_made_to_report_usage() {
        let rewrite = |body: Value| {
            with_include_usage(body.to_string().as_bytes())
                .map(|b| serde_json::from_slice::<Value>(&b).unwrap())
        };
        let messages = json!([{"role": "user", "content": "hi"}]);
        let asked = rewrite(
            json!({"model": "m", "messages": messages, "stream": true, "temperature": 0.5}),
        )
        .unwrap();
        assert_eq!(
            asked,
            json!({"model": "m", "messages": messages, "stream": true, "temperature": 0.5,
                   "stream_options": {"include_usage": true}}),
            "the option added, every other member kept"
        );
        let other =
            rewrite(json!({"stream": true, "stream_options": {"include_obfuscation": false}}));
        assert_eq!(
            other.unwrap()["stream_options"],
            json!({"include_obfuscation": false, "include_usage": true})
        );
        assert_eq!(
            rewrite(json!({"stream": true, "stream_options": null})).unwrap()["stream_options"],
            json!({"include_usage": true})
        );
        // Nothing to change: not streaming, already asked, refused by the client, not JSON.
        for body in [
            json!({"messages": []}),
            json!({"stream": false}),
            json!({"stream": "true"}),
            json!({"stream": true, "stream_options": {"include_usage": true}}),
            json!({"stream": true, "stream_options": {"include_usage": false}}),
            json!({"stream": true, "stream_options": "x"}),
            json!([{"stream": true}]),
        ] {
            assert_eq!(rewrite(body.clone()), None, "{body}");
        }
        assert_eq!(with_include_usage(b"{\"stream\": tru"), None);
    }

    fn table(api: crate::tokens::Api, model_from: ModelFrom) -> UsageSpec {
        use crate::tokens::{Prices, UnknownModel};
        let mut models = std::collections::BTreeMap::new();
        let p = |i, c, w, o, r| Prices {
            input: i,
            cached_input: c,
            cache_creation_input: w,
            output: o,
            reasoning: r,
        };
        models.insert("m".to_string(), p(3, 1, 4, 15, 20));
        models.insert("big".to_string(), p(30, 10, 40, 150, 200));
        UsageSpec {
            parts: Vec::new(),
            estimate: 100,
            table: Some(Arc::new(PriceTable {
                api,
                per_tokens: 1,
                models,
                unknown: UnknownModel::Refuse,
                model_from,
                max_hold: 1_000,
            })),
            stream_include_usage: false,
        }
    }

    /// The body cut at every chunk size, and at every single split point: one total.
    fn same_whatever_the_chunking(
        spec: &UsageSpec,
        kind: BodyKind,
        body: &str,
        model: &str,
        want: Option<u64>,
    ) {
        let b = body.as_bytes();
        for piece in [1, 2, 3, 7, 64, 1000, b.len().max(1)] {
            let mut m = Meter::for_model(kind, spec.clone(), 4096, Some(model.into()));
            feed_in_pieces(&mut m, b, piece);
            assert_eq!(m.finish(), want, "piece {piece}");
        }
        for cut in 0..=b.len() {
            let mut m = Meter::for_model(kind, spec.clone(), 4096, Some(model.into()));
            m.feed(&b[..cut]);
            m.feed(&b[cut..]);
            assert_eq!(m.finish(), want, "cut at {cut}");
        }
    }

    fn sse(events: &[(&str, Value)]) -> String {
        events
            .iter()
            .map(|(e, d)| format!("event: {e}\ndata: {d}\n\n"))
            .collect()
    }

    #[test]
    fn anthropic_stream_takes_the_latest_of_each_field() {
        use crate::tokens::Api;
        let spec = table(Api::Anthropic, ModelFrom::Request);
        let body = sse(&[
            (
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg", "model": "m", "content": [],
                "usage": {"input_tokens": 5, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20, "output_tokens": 1}}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}),
            ),
            ("ping", json!({"type": "ping"})),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ]);
        // 5×3 + 100×1 + 20×4 + 9×15: the message_delta's output replaces message_start's 1.
        let want = 5 * 3 + 100 + 20 * 4 + 9 * 15;
        same_whatever_the_chunking(&spec, BodyKind::EventStream, &body, "m", Some(want));
        // Cut after message_start: its usage is what was reported.
        let cut = body.find("event: content_block_delta").unwrap();
        same_whatever_the_chunking(
            &spec,
            BodyKind::EventStream,
            &body[..cut],
            "m",
            Some(5 * 3 + 100 + 80 + 15),
        );
        // Priced by the other model's table.
        let mut m = Meter::for_model(
            BodyKind::EventStream,
            spec.clone(),
            4096,
            Some("big".into()),
        );
        m.feed(body.as_bytes());
        assert_eq!(m.finish(), Some(want * 10));
        // A model the table refuses: no cost (the hold stands).
        let mut m = Meter::for_model(BodyKind::EventStream, spec, 4096, Some("nope".into()));
        m.feed(body.as_bytes());
        assert_eq!(m.finish(), None);
    }

    #[test]
    fn anthropic_json_and_model_from_the_response() {
        use crate::tokens::Api;
        let body = json!({"id": "msg", "type": "message", "model": "big", "content": [{"type": "text", "text": "x"}],
            "usage": {"input_tokens": 7, "output_tokens": 2, "cache_read_input_tokens": 0}}).to_string();
        let by_request = table(Api::Anthropic, ModelFrom::Request);
        same_whatever_the_chunking(
            &by_request,
            BodyKind::Json,
            &body,
            "m",
            Some(7 * 3 + 2 * 15),
        );
        let by_response = table(Api::Anthropic, ModelFrom::Response);
        same_whatever_the_chunking(
            &by_response,
            BodyKind::Json,
            &body,
            "m",
            Some(7 * 30 + 2 * 150),
        );
        // Past the tail: the model and usage are still read from the end.
        let padded = json!({"content": [{"text": "w ".repeat(50_000)}], "model": "big",
            "usage": {"input_tokens": 7, "output_tokens": 2}})
        .to_string();
        let mut m = Meter::for_model(BodyKind::Json, by_response, 256, None);
        feed_in_pieces(&mut m, padded.as_bytes(), 999);
        assert_eq!(m.finish(), Some(7 * 30 + 2 * 150));
    }

    #[test]
    fn responses_api_stream_json_and_embeddings() {
        use crate::tokens::Api;
        let spec = table(Api::OpenAiResponses, ModelFrom::Request);
        let usage = json!({"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4},
            "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 5}, "total_tokens": 17});
        let want = 6 * 3 + 4 + 2 * 15 + 5 * 20;
        for end in [
            "response.completed",
            "response.incomplete",
            "response.failed",
        ] {
            let body = sse(&[
                (
                    "response.created",
                    json!({"type": "response.created", "response": {"id": "r", "model": "m", "usage": null}}),
                ),
                (
                    "response.output_text.delta",
                    json!({"type": "response.output_text.delta", "delta": "hi"}),
                ),
                (
                    end,
                    json!({"type": end, "response": {"id": "r", "model": "m", "usage": usage}}),
                ),
            ]);
            same_whatever_the_chunking(&spec, BodyKind::EventStream, &body, "m", Some(want));
        }
        let json_body =
            json!({"id": "r", "object": "response", "model": "m", "output": [], "usage": usage})
                .to_string();
        same_whatever_the_chunking(&spec, BodyKind::Json, &json_body, "m", Some(want));
        // A final event larger than the limit (its output is 300 KB): read from its tail.
        let big = sse(&[(
            "response.completed",
            json!({"type": "response.completed", "response": {"model": "m", "output": [{"text": "w".repeat(300_000)}], "usage": usage}}),
        )]);
        for piece in [1000, 65_536, big.len()] {
            let mut m =
                Meter::for_model(BodyKind::EventStream, spec.clone(), 4096, Some("m".into()));
            feed_in_pieces(&mut m, big.as_bytes(), piece);
            assert!(m.buf.len() <= 4096);
            assert_eq!(m.finish(), Some(want), "piece {piece}");
        }
        // Interrupted before the final event: nothing reported.
        let cut = sse(&[(
            "response.created",
            json!({"type": "response.created", "response": {"usage": null}}),
        )]);
        same_whatever_the_chunking(&spec, BodyKind::EventStream, &cut, "m", None);

        let spec = table(Api::Embeddings, ModelFrom::Request);
        let body = json!({"object": "list", "data": [{"embedding": [0.1]}], "model": "m",
            "usage": {"prompt_tokens": 8, "total_tokens": 8}})
        .to_string();
        same_whatever_the_chunking(&spec, BodyKind::Json, &body, "m", Some(24));
        // Chat with cached tokens inside prompt_tokens.
        let spec = table(Api::OpenAiChat, ModelFrom::Request);
        let body = format!(
            "data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
            json!({"choices": [{"delta": {"content": "x"}}], "usage": null}),
            json!({"choices": [], "usage": {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 8}, "completion_tokens": 3}})
        );
        same_whatever_the_chunking(
            &spec,
            BodyKind::EventStream,
            &body,
            "m",
            Some(2 * 3 + 8 + 3 * 15),
        );
    }

    #[test]
    fn malformed_events_never_panic() {
        use crate::tokens::Api;
        let spec = table(Api::Anthropic, ModelFrom::Response);
        let junk = "data: {\"usage\": 5}\ndata: {\"message\": {\"usage\": []}}\ndata: {\"usage\": {\"input_tokens\": -1}}\n\u{1}\r\r\ndata:\ndata: {\"usage\"";
        same_whatever_the_chunking(&spec, BodyKind::EventStream, junk, "m", None);
        same_whatever_the_chunking(&spec, BodyKind::Json, junk, "m", None);
    }

    /// Bodies made of pieces of real events and junk, cut at pseudo-random points: the
    /// same total as the whole body, and a bounded buffer (the native half of
    /// fuzz/fuzz_targets/usage_meter.rs).
    #[test]
    fn random_bodies_and_chunkings_agree() {
        use crate::tokens::Api;
        let pieces: &[&str] = &[
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"model\":\"big\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n",
            "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n",
            "data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":4,\"output_tokens\":2}}}\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n",
            "{\"usage\": {\"input_tokens\": 8, \"prompt_tokens\": 8}, \"model\": \"m\"}",
            "\n", "\r\n", "data: ", "\"usage\"", ":", "{", "}", "data: [DONE]\n",
            "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        ];
        let mut seed: u64 = 0x5eed;
        let mut next = |n: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            usize::try_from(seed >> 33).unwrap_or(0) % n.max(1)
        };
        let apis = [
            Api::OpenAiChat,
            Api::OpenAiResponses,
            Api::Embeddings,
            Api::Anthropic,
        ];
        for round in 0..400 {
            let mut body = String::new();
            for _ in 0..next(40) {
                body.push_str(pieces[next(pieces.len())]);
            }
            let from = if round % 2 == 0 {
                ModelFrom::Request
            } else {
                ModelFrom::Response
            };
            let spec = table(apis[round % apis.len()], from);
            for kind in [BodyKind::Json, BodyKind::EventStream] {
                let mut whole = Meter::for_model(kind, spec.clone(), 128, Some("m".into()));
                whole.feed(body.as_bytes());
                let want = whole.finish();
                let mut m = Meter::for_model(kind, spec.clone(), 128, Some("m".into()));
                let mut rest = body.as_bytes();
                while !rest.is_empty() {
                    let (chunk, tail) = rest.split_at((next(50) + 1).min(rest.len()));
                    m.feed(chunk);
                    assert!(m.kept() <= 128);
                    rest = tail;
                }
                assert_eq!(m.finish(), want, "round {round} {kind:?}: {body:?}");
            }
        }
    }

    #[test]
    fn content_types() {
        assert_eq!(
            BodyKind::from_content_type("application/json; charset=utf-8"),
            Some(BodyKind::Json)
        );
        assert_eq!(
            BodyKind::from_content_type("text/event-stream"),
            Some(BodyKind::EventStream)
        );
        assert_eq!(
            BodyKind::from_content_type("application/problem+json"),
            Some(BodyKind::Json)
        );
        assert_eq!(BodyKind::from_content_type("text/html"), None);
    }

    /// `{"pad": …, "usage": {"total_tokens": N}, "meta": {"usage": 0}}` padded to exactly
    /// `len` bytes: read whole it costs N; read from its tail, the last `"usage"` (the
    /// nested one) would be taken instead.
    fn exactly(len: usize, prefix: &str, n: u64, suffix: &str) -> String {
        let shape = |pad: &str| {
            format!(
                "{prefix}{{\"pad\": \"{pad}\", \"usage\": {{\"total_tokens\": {n}}}, \"meta\": {{\"usage\": 0}}}}{suffix}"
            )
        };
        let pad = "x".repeat(len - shape("").len());
        let body = shape(&pad);
        assert_eq!(body.len(), len);
        body
    }

    #[test]
    fn a_body_or_event_line_that_exactly_fills_the_limit_is_read_whole() {
        let body = exactly(200, "", 5, "");
        let mut m = Meter::new(BodyKind::Json, total(1), 200);
        m.feed(body.as_bytes());
        assert_eq!(m.finish(), Some(5));
        // An event line, its newline included, of exactly the limit; and a short one.
        for len in [200, 120] {
            let line = exactly(len, "data: ", 4, "\n");
            let mut m = Meter::new(BodyKind::EventStream, total(1), 200);
            m.feed(line.as_bytes());
            assert_eq!(m.finish(), Some(4), "a line of {len} bytes");
        }
    }

    #[test]
    fn the_model_a_stream_names_early_prices_the_usage_reported_at_its_end() {
        use crate::tokens::Api;
        // The usage chunk of some OpenAI-compatible servers names no model: the one
        // named by the first chunk still prices it, not the request's.
        let spec = table(Api::OpenAiChat, ModelFrom::Response);
        let body = format!(
            "data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
            json!({"model": "big", "choices": [{"delta": {"content": "x"}}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 3}})
        );
        same_whatever_the_chunking(
            &spec,
            BodyKind::EventStream,
            &body,
            "m",
            Some(10 * 30 + 3 * 150),
        );
        // And the access log names the model it was priced by.
        let mut m = Meter::for_model(BodyKind::EventStream, spec, 4096, Some("m".into()));
        m.feed(body.as_bytes());
        let metered = m.finish_metered().unwrap();
        assert_eq!(
            (metered.cost, metered.model.as_deref()),
            (10 * 30 + 3 * 150, Some("big"))
        );
    }

    #[test]
    fn the_meter_reports_the_bytes_it_holds_up_to_its_limit() {
        let mut m = Meter::new(BodyKind::EventStream, total(1), 256);
        assert_eq!(m.kept(), 0);
        m.feed(b"data: {\"choi");
        assert_eq!(m.kept(), 12, "the unfinished line");
        m.feed(b"ces\": []}\n");
        assert_eq!(m.kept(), 0, "a finished line is let go");
        let mut m = Meter::new(BodyKind::Json, total(1), 256);
        m.feed(&[b' '; 1000]);
        assert_eq!(m.kept(), 256, "a JSON body keeps its tail");
    }

    #[test]
    fn a_member_whose_name_only_ends_in_usage_is_not_read_from_the_tail() {
        // A body past the tail whose last `"usage"` closes a member named `\"usage` (as a
        // document the client stored may hold): that value is not taken for the usage,
        // and the hold stands.
        let body = format!(
            "{{\"content\": \"{}\", \"usage\": {{\"total_tokens\": 7}}, \"echo\": {{\"\\\"usage\": {{\"total_tokens\": 1}}}}}}",
            "w".repeat(5_000)
        );
        assert!(serde_json::from_str::<Value>(&body).is_ok());
        let mut m = Meter::new(BodyKind::Json, total(1), 256);
        feed_in_pieces(&mut m, body.as_bytes(), 1000);
        assert_eq!(m.finish(), None);
    }
}
