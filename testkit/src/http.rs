//! A minimal blocking HTTP/1.1 client: enough framing (Content-Length, chunked, EOF) to
//! read what Envoy, the filter and the services answer, and to send requests a real
//! client would not (raw bytes, repeated or malformed headers).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// How long a client waits for an answer before the test fails instead of hanging.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// Lower-cased names, in order, repeated headers kept.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): status {} headers {:?} body {:?}",
                self.status,
                self.headers,
                self.text()
            )
        })
    }

    /// The whole response as text (status line, headers, body), for "never contains" checks.
    pub fn dump(&self) -> String {
        let mut s = format!("{}\n", self.status);
        for (k, v) in &self.headers {
            let _ = writeln!(s, "{k}: {v}");
        }
        s.push_str(&self.text());
        s
    }
}

/// Sends one request (`Connection: close`, `Host` and `Content-Length` added unless given)
/// and reads the answer. Panics on I/O errors and timeouts.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_http(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("HTTP {method} {path} to {addr} failed: {e}"))
}

pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, String> {
    let raw = request_bytes(addr, method, path, headers, body, true);
    let head_only = method == "HEAD";
    let buf = exchange(addr, &raw, head_only)?;
    match parse(&buf, false, head_only) {
        Some(r) => r.map(|(resp, _)| resp),
        None => Err(format!(
            "incomplete response: {:?}",
            String::from_utf8_lossy(&buf)
        )),
    }
}

/// The bytes of a request: `Host` and `Content-Length` added unless given, and
/// `Connection: close` when `close` and no `Connection` header is given.
fn request_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    if !has("host") {
        let _ = write!(head, "Host: {addr}\r\n");
    }
    if close && !has("connection") {
        head.push_str("Connection: close\r\n");
    }
    if !has("content-length")
        && !has("transfer-encoding")
        && (!body.is_empty() || method == "POST" || method == "PUT")
    {
        let _ = write!(head, "Content-Length: {}\r\n", body.len());
    }
    for (k, v) in headers {
        let _ = write!(head, "{k}: {v}\r\n");
    }
    head.push_str("\r\n");
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body);
    raw
}

/// A keep-alive connection: requests one after another on one socket, each answer read
/// by its framing.
pub struct Conn {
    addr: SocketAddr,
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        let stream = connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        Conn {
            addr,
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends one request and reads its answer. Panics on I/O errors and timeouts.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Response {
        let body = body.unwrap_or_default().as_bytes();
        let raw = request_bytes(self.addr, method, path, headers, body, false);
        self.stream
            .write_all(&raw)
            .unwrap_or_else(|e| panic!("{method} {path}: write: {e}"));
        let head_only = method == "HEAD";
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(parsed) = parse(&self.buf, true, head_only) {
                let (resp, used) = parsed.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
                self.buf.drain(..used);
                return resp;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!(
                    "{method} {path}: connection closed after {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("{method} {path}: read: {e}"),
            }
        }
    }
}

fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Sends raw bytes (a complete request, any headers) and reads the answer.
pub fn http_raw(addr: SocketAddr, raw: &[u8]) -> Response {
    try_http_raw(addr, raw).unwrap_or_else(|e| panic!("raw HTTP to {addr} failed: {e}"))
}

pub fn try_http_raw(addr: SocketAddr, raw: &[u8]) -> Result<Response, String> {
    let buf = exchange(addr, raw, false)?;
    match parse_response(&buf, false) {
        Some(r) => r,
        None => Err(format!(
            "incomplete response: {:?}",
            String::from_utf8_lossy(&buf)
        )),
    }
}

/// What came back for a raw request: the status, and the parsed answer when its body could
/// be read (never for HEAD, which has none).
#[derive(Debug, Clone)]
pub struct RawAnswer {
    pub status: u16,
    pub response: Option<Response>,
}

/// Sends `METHOD TARGET HTTP/1.1` with exactly these header lines (any bytes, in order),
/// plus Host and `Connection: close`, and reads the answer. Works for HEAD (no body is
/// expected).
pub fn raw_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &[u8])],
) -> RawAnswer {
    let mut req =
        format!("{method} {target} HTTP/1.1\r\nHost: farebox.test\r\nConnection: close\r\n")
            .into_bytes();
    for (k, v) in headers {
        req.extend_from_slice(k.as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(v);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    let head_only = method == "HEAD";
    let buf = exchange(addr, &req, head_only)
        .unwrap_or_else(|e| panic!("{method} {target}: no HTTP answer: {e}"));
    let status = split_head(&buf)
        .and_then(|(start, _, _)| start.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "{method} {target}: no HTTP answer: {:?}",
                String::from_utf8_lossy(&buf)
            )
        });
    let response = if head_only {
        None
    } else {
        parse_response(&buf, false).and_then(Result::ok)
    };
    RawAnswer { status, response }
}

/// The one raw-bytes sender: writes `raw` and reads until the answer is complete by its
/// framing (Envoy may keep the connection open after an error of its own; with
/// `head_only`, as soon as the head is in), EOF, or a reset after some bytes.
fn exchange(addr: SocketAddr, raw: &[u8], head_only: bool) -> Result<Vec<u8>, String> {
    let mut stream = connect(addr)?;
    stream.write_all(raw).map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                let complete = if head_only {
                    find(&buf, b"\r\n\r\n").is_some()
                } else {
                    matches!(parse_response(&buf, true), Some(Ok(_)))
                };
                if complete {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !buf.is_empty() => break,
            Err(e) => return Err(format!("read after {} bytes: {e}", buf.len())),
        }
    }
    Ok(buf)
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Header (name, value) pairs.
pub type Headers = Vec<(String, String)>;

/// The head of an HTTP/1.1 message at the start of `buf`, once complete: the
/// start line, the headers (lower-cased names, trimmed values) and where the
/// body starts.
pub fn split_head(buf: &[u8]) -> Option<(String, Headers, usize)> {
    let head_end = find(buf, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let start = lines.next()?.to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some((start, headers, head_end + 4))
}

/// A response parsed from `buf`: None while more bytes are needed (with `need_complete`;
/// without it, what is there is taken, a body framed by the end of the connection too).
pub fn parse_response(buf: &[u8], need_complete: bool) -> Option<Result<Response, String>> {
    parse(buf, need_complete, false).map(|r| r.map(|(resp, _)| resp))
}

/// [`parse_response`], also for the answer to HEAD (`head_only`: no body whatever the
/// headers say), with the number of bytes the response took.
fn parse(
    buf: &[u8],
    need_complete: bool,
    head_only: bool,
) -> Option<Result<(Response, usize), String>> {
    let head_end = find(buf, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = match status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
    {
        Some(s) => s,
        None => return Some(Err(format!("bad status line {status_line:?}"))),
    };
    let mut headers = Vec::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let body_start = head_end + 4;
    let rest = &buf[body_start..];
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let no_body = head_only || status == 204 || status == 304 || (100..200).contains(&status);
    let (body, used) = if no_body {
        (Vec::new(), 0)
    } else if header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
    {
        match decode_chunked(rest) {
            Some(done) => done,
            None if need_complete => return None,
            None => return Some(Err("truncated chunked body".to_string())),
        }
    } else if let Some(cl) = header("content-length") {
        let Ok(cl) = cl.parse::<usize>() else {
            return Some(Err(format!("bad content-length {cl:?}")));
        };
        if rest.len() < cl {
            if need_complete {
                return None;
            }
            return Some(Err(format!("body truncated: {} of {cl} bytes", rest.len())));
        }
        (rest[..cl].to_vec(), cl)
    } else {
        if need_complete {
            return None;
        }
        (rest.to_vec(), rest.len())
    };
    let resp = Response {
        status,
        headers,
        body,
    };
    Some(Ok((resp, body_start + used)))
}

/// Decodes a chunked body; returns the body and the number of bytes consumed, or None
/// if incomplete.
pub fn decode_chunked(data: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut pos = 0;
    let mut body = Vec::new();
    loop {
        let line_end = pos + find(&data[pos..], b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[pos..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        pos = line_end + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let end = pos + find(&data[pos..], b"\r\n")?;
                let empty = end == pos;
                pos = end + 2;
                if empty {
                    return Some((body, pos));
                }
            }
        }
        if data.len() < pos + size + 2 {
            return None;
        }
        body.extend_from_slice(&data[pos..pos + size]);
        pos += size + 2;
    }
}
