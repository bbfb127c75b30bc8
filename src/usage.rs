//! Prices known only when the response is in: token usage reported by
//! OpenAI-compatible APIs, in a JSON body or in the last server-sent event
//! that carries it. The body streams to the client untouched; the meter keeps
//! only a bounded tail (JSON) or the current line (SSE).

use serde_json::Value;

use crate::config::MAX_AMOUNT;

/// How a route's usage is priced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSpec {
    /// (JSON pointer, price per unit): `/usage/total_tokens` at 2, or input and output apart.
    pub parts: Vec<(String, u64)>,
    /// Held at request time, and charged as is when no usage can be read.
    pub estimate: u64,
}

impl UsageSpec {
    /// The key the meter looks for before it parses anything: the pointer's first segment.
    fn anchor(&self) -> Option<String> {
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
    /// SSE: the line being read is longer than `limit`, and is skipped.
    skipping: bool,
    /// SSE: the cost of the last event that carried usage.
    last: Option<u64>,
}

impl Meter {
    pub fn new(kind: BodyKind, spec: UsageSpec, limit: usize) -> Meter {
        let anchor = spec.anchor().unwrap_or_default();
        Meter {
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
                    if !self.skipping {
                        self.buf.extend_from_slice(piece);
                        if self.buf.len() > self.limit {
                            self.buf.clear();
                            self.skipping = true;
                        }
                    }
                    if complete {
                        if !self.skipping {
                            let line = std::mem::take(&mut self.buf);
                            self.event_line(&line);
                        }
                        self.skipping = false;
                    }
                }
            }
        }
    }

    fn event_line(&mut self, line: &[u8]) {
        let line = trim_line(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        if !contains(data, self.anchor.as_bytes()) {
            return;
        }
        if let Ok(doc) = serde_json::from_slice::<Value>(data) {
            if let Some(cost) = self.spec.cost_of(&doc) {
                self.last = Some(cost);
            }
        }
    }

    /// The actual cost, once the body is complete; `None` if no usage was found.
    pub fn finish(mut self) -> Option<u64> {
        match self.kind {
            BodyKind::EventStream => {
                let rest = std::mem::take(&mut self.buf);
                if !self.skipping {
                    self.event_line(&rest);
                }
                self.last
            }
            BodyKind::Json => {
                if self.whole {
                    if let Ok(doc) = serde_json::from_slice::<Value>(&self.buf) {
                        return self.spec.cost_of(&doc);
                    }
                }
                self.read_tail()
            }
        }
    }

    /// The body was larger than the tail: find the last `"usage":` in it and read
    /// just that value, then the rest of each pointer inside it.
    fn read_tail(&self) -> Option<u64> {
        let at = rfind(&self.buf, self.anchor.as_bytes())?;
        let after = self.buf.get(at + self.anchor.len()..)?;
        let colon = after.iter().position(|b| !b.is_ascii_whitespace())?;
        if after.get(colon) != Some(&b':') {
            return None;
        }
        let value_bytes = after.get(colon + 1..)?;
        let value = serde_json::Deserializer::from_slice(value_bytes)
            .into_iter::<Value>()
            .next()?
            .ok()?;
        let key = self.anchor.trim_matches('"').to_string();
        let mut doc = serde_json::Map::new();
        doc.insert(key, value);
        self.spec.cost_of(&Value::Object(doc))
    }
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
        }
    }

    fn split_cost(input: u64, output: u64) -> UsageSpec {
        UsageSpec {
            parts: vec![
                ("/usage/prompt_tokens".into(), input),
                ("/usage/completion_tokens".into(), output),
            ],
            estimate: 100,
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
}
