//! End-to-end tests of the farebox-echo demo upstream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::json;

fn start(dir: &TempDir) -> Proc {
    Proc::spawn(
        env!("CARGO_BIN_EXE_farebox-echo"),
        "farebox-echo",
        &["--listen", "127.0.0.1:0"],
        &dir.path("echo.log"),
    )
}

#[test]
fn echoes_method_path_and_headers() {
    let dir = TempDir::new("echo");
    let e = start(&dir);
    let r = request(
        e.addr,
        "GET",
        "/hello/world?x=1&y=2",
        &[("X-Custom", "A"), ("x-rep", "one"), ("x-rep", "two")],
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j = r.json();
    assert_eq!(j["method"], "GET");
    assert_eq!(j["path"], "/hello/world?x=1&y=2");
    assert_eq!(j["headers"]["x-custom"], "A");
    assert_eq!(j["headers"]["x-rep"], "one,two");
    assert_eq!(j["headers"]["host"], e.addr.to_string());

    let r = request(e.addr, "POST", "/submit", &[], Some("payload"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["method"], "POST");
    assert_eq!(r.json()["body"], "payload");
}

#[test]
fn status_paths() {
    let dir = TempDir::new("echo");
    let e = start(&dir);
    let r = request(e.addr, "GET", "/status/503", &[("x-a", "b")], None);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["path"], "/status/503");
    assert_eq!(r.json()["headers"]["x-a"], "b");
    let r = request(e.addr, "PUT", "/status/404?q=1", &[], Some("{}"));
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["path"], "/status/404?q=1");
    assert_eq!(r.json()["method"], "PUT");
    assert_eq!(request(e.addr, "GET", "/status/201", &[], None).status, 201);
    assert_eq!(request(e.addr, "GET", "/status/599", &[], None).status, 599);
    assert_eq!(request(e.addr, "GET", "/status/204", &[], None).status, 204);
    // Not a status path: plain 200.
    assert_eq!(request(e.addr, "GET", "/status/600", &[], None).status, 200);
    assert_eq!(request(e.addr, "GET", "/status/abc", &[], None).status, 200);
}

#[test]
fn keep_alive() {
    let dir = TempDir::new("echo");
    let e = start(&dir);
    let mut c = Conn::open(e.addr);
    for i in 0..5 {
        let path = if i % 2 == 0 {
            format!("/k/{i}")
        } else {
            "/status/502".to_owned()
        };
        let r = c.send("GET", &path, &[("x-i", &i.to_string())], None);
        assert_eq!(r.status, if i % 2 == 0 { 200 } else { 502 });
        assert_eq!(r.json()["headers"]["x-i"], json!(i.to_string()));
    }
    let r = c.send("POST", "/after", &[], Some("abc"));
    assert_eq!(r.json()["body"], "abc");
    assert!(e.terminate());
}
