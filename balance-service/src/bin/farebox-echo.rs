//! `farebox-echo`: a demo/test upstream. Answers every request with a JSON
//! description of what it received; `/status/NNN` answers with status NNN.

use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
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
    let mut listen: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--help" | "-h" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--listen" => match args.next() {
                Some(v) => listen = Some(v),
                None => {
                    eprintln!("farebox-echo: --listen needs a value\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            other => {
                if let Some(v) = other.strip_prefix("--listen=") {
                    listen = Some(v.to_owned());
                } else {
                    eprintln!("farebox-echo: unknown argument {other:?}\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            }
        }
    }
    let listen = listen
        .or_else(|| {
            std::env::var("FAREBOX_ECHO_LISTEN")
                .ok()
                .filter(|v| !v.is_empty())
        })
        .unwrap_or_else(|| "127.0.0.1:8082".to_owned());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("farebox-echo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(listen)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("farebox-echo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen: String) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "farebox-echo listening on {addr}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot write to stdout: {e}"))?;
    }
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = Router::new().fallback(echo);
    axum::serve(listener, app)
        .with_graceful_shutdown(farebox_balance::util::shutdown_signal())
        .await
        .map_err(|e| format!("server error: {e}"))
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
