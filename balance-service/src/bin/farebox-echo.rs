//! `farebox-echo`: a demo/test upstream. Answers every request with a JSON
//! description of what it received; `/status/NNN` answers with status NNN.

// Only the start-up is used here, not the shared API routes.
#[allow(dead_code)]
mod mock_support;

use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use mock_support::Mock;
use serde_json::json;
use std::collections::BTreeMap;
use std::process::ExitCode;

const USAGE: &str = "\
usage: farebox-echo [--listen ADDR]

  --listen ADDR   listen address (default 127.0.0.1:8082; port 0 picks one);
                  falls back to the environment variable FAREBOX_ECHO_LISTEN

Any method and path answers 200 with
  {\"method\": ..., \"path\": ..., \"headers\": {...}, \"body\": ...}
and /status/NNN (NNN 200-599, optionally with a query string) answers status NNN
with the same body (none for 204 and 304). /status/1xx cannot be a final answer in
HTTP/1.1; the HTTP stack turns it into an empty 500.
";

/// Status requested by a `/status/NNN` path, if any.
fn wanted_status(path: &str) -> Option<StatusCode> {
    let code = path.strip_prefix("/status/")?;
    let code = code.strip_suffix('/').unwrap_or(code);
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u16 = code.parse().ok()?;
    if !(100..=599).contains(&n) {
        return None;
    }
    StatusCode::from_u16(n).ok()
}

async fn echo(method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let target = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &headers {
        let v = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_owned())
            .and_modify(|e| {
                e.push(',');
                e.push_str(&v);
            })
            .or_insert_with(|| v.into_owned());
    }
    let status = wanted_status(uri.path()).unwrap_or(StatusCode::OK);
    let doc = json!({
        "method": method.as_str(),
        "path": target,
        "headers": map,
        "body": String::from_utf8_lossy(&body),
    });
    if status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational()
    {
        // These cannot carry a body.
        return status.into_response();
    }
    let mut resp = (status, doc.to_string()).into_response();
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn main() -> ExitCode {
    Mock {
        name: "farebox-echo",
        default_listen: "127.0.0.1:8082",
        env_listen: "FAREBOX_ECHO_LISTEN",
        usage: USAGE,
    }
    .main(|| Router::new().fallback(echo))
}

#[cfg(test)]
mod tests {
    use super::wanted_status;

    #[test]
    fn status_paths() {
        assert_eq!(wanted_status("/status/503").map(|s| s.as_u16()), Some(503));
        assert_eq!(wanted_status("/status/200/").map(|s| s.as_u16()), Some(200));
        assert_eq!(wanted_status("/status/600"), None);
        assert_eq!(wanted_status("/status/99"), None);
        assert_eq!(wanted_status("/status/abc"), None);
        assert_eq!(wanted_status("/other/503"), None);
    }
}
