//! End-to-end tests of the mock upstreams farebox-llm and farebox-mcp.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn start(dir: &TempDir, name: &str, bin: &str) -> Proc {
    Proc::spawn(
        bin,
        name,
        &["--listen", "127.0.0.1:0"],
        &dir.path(&format!("{name}.log")),
    )
}

fn llm(dir: &TempDir) -> Proc {
    start(dir, "farebox-llm", env!("CARGO_BIN_EXE_farebox-llm"))
}

fn mcp(dir: &TempDir) -> Proc {
    start(dir, "farebox-mcp", env!("CARGO_BIN_EXE_farebox-mcp"))
}

fn chat(addr: SocketAddr, body: &Value) -> Resp {
    post_json(addr, "/v1/chat/completions", &[], body)
}

/// The `data:` payloads of an event stream, in order.
fn events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_owned()
        })
        .collect()
}

#[test]
fn llm_non_streaming_counts_and_usage_last() {
    let dir = TempDir::new("llm");
    let p = llm(&dir);
    let r = chat(
        p.addr,
        &json!({
            "model": "gpt-test",
            "messages": [
                {"role": "system", "content": "you are  terse"},
                {"role": "user", "content": "count\tthese four words"},
            ],
            "max_tokens": 7,
        }),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j = r.json();
    assert_eq!(j["object"], "chat.completion");
    assert_eq!(j["model"], "gpt-test");
    assert!(j["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(j["created"].as_u64().unwrap() > 0);
    assert_eq!(j["choices"][0]["index"], 0);
    assert_eq!(j["choices"][0]["finish_reason"], "stop");
    assert_eq!(j["choices"][0]["message"]["role"], "assistant");
    let content = j["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.split_whitespace().count(), 7);
    assert_eq!(
        j["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14})
    );
    // `usage` is the last member of the object.
    assert!(
        r.text()
            .ends_with(r#""usage":{"prompt_tokens":7,"completion_tokens":7,"total_tokens":14}}"#),
        "{}",
        r.text()
    );

    // Defaults: 10 completion tokens; content parts count too.
    let r = chat(
        p.addr,
        &json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a b"}]}]}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json()["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 10, "total_tokens": 12})
    );
}

#[test]
fn llm_padding_puts_usage_after_a_large_prefix() {
    let dir = TempDir::new("llm");
    let p = llm(&dir);
    let pad = 300_000;
    let r = chat(
        p.addr,
        &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "x_pad_bytes": pad}),
    );
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.len() > pad);
    let at = text.find(r#""usage":"#).unwrap();
    assert!(at > pad, "usage at {at}");
    let j = r.json();
    let content = j["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.len(), "lorem ipsum".len() + pad);
    assert_eq!(j["usage"]["total_tokens"], 3);
}

#[test]
fn llm_streaming_with_and_without_usage() {
    let dir = TempDir::new("llm");
    let p = llm(&dir);
    let r = chat(
        p.addr,
        &json!({
            "model": "m",
            "messages": [{"role": "user", "content": "one two three"}],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 4,
        }),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    let ev = events(&r.text());
    assert_eq!(ev.len(), 4 + 1 + 1, "{ev:?}");
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let mut content = String::new();
    for (i, e) in ev[..4].iter().enumerate() {
        let c: Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "m");
        assert_eq!(c["usage"], Value::Null);
        let want_finish = if i == 3 { json!("stop") } else { Value::Null };
        assert_eq!(c["choices"][0]["finish_reason"], want_finish);
        content.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap());
    }
    assert_eq!(content.split_whitespace().count(), 4);
    let last: Value = serde_json::from_str(&ev[4]).unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
    );

    // Without include_usage: no usage chunk and no usage member at all.
    let r = chat(
        p.addr,
        &json!({"messages": [{"role": "user", "content": "x"}], "stream": true, "max_tokens": 3}),
    );
    let ev = events(&r.text());
    assert_eq!(ev.len(), 3 + 1, "{ev:?}");
    assert_eq!(ev[3], "[DONE]");
    for e in &ev[..3] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert!(c.get("usage").is_none(), "{c}");
    }
}

#[test]
fn llm_stream_abort_drops_the_connection() {
    let dir = TempDir::new("llm");
    let p = llm(&dir);
    let body = json!({
        "messages": [{"role": "user", "content": "x"}],
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": 10,
        "x_abort_after": 3,
    })
    .to_string();
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    // The server closes (or resets) the connection: read what arrived.
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(text.matches("data: ").count(), 3, "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(!text.contains("\"usage\":{"), "{text}");
    assert!(!text.contains("\r\n0\r\n\r\n"), "ended cleanly: {text}");
    let stats = request(p.addr, "GET", "/stats", &[], None).json();
    assert_eq!(stats["aborted"], 1);
}

#[test]
fn llm_mock_status_and_bad_requests() {
    let dir = TempDir::new("llm");
    let p = llm(&dir);
    let body = json!({"messages": [{"role": "user", "content": "x"}]}).to_string();
    for code in [503u16, 429, 500, 400] {
        let r = request(
            p.addr,
            "POST",
            "/v1/chat/completions",
            &[("x-mock-status", &code.to_string())],
            Some(&body),
        );
        assert_eq!(r.status, code, "{r:?}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.json()["error"]["code"], code);
    }
    let r = chat(p.addr, &json!({"messages": "nope"}));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.json()["error"]["message"].is_string());
    let r = request(p.addr, "POST", "/v1/chat/completions", &[], Some("{"));
    assert_eq!(r.status, 400);
    assert_eq!(request(p.addr, "GET", "/nope", &[], None).status, 404);
    let r = request(p.addr, "GET", "/v1/models", &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["object"], "list");
    let s = request(p.addr, "GET", "/stats", &[], None).json();
    assert_eq!(s["chat_completions"], 6);
    assert_eq!(s["mock_status"], 4);
    let s = request(p.addr, "POST", "/stats/reset", &[], None).json();
    assert_eq!(s["chat_completions"], 0);
}

#[test]
fn llm_keep_alive_mixes_streams_and_plain_answers() {
    let dir = TempDir::new("llm");
    let p = llm(&dir);
    let mut c = Conn::open(p.addr);
    for i in 0..6u64 {
        let body = json!({
            "messages": [{"role": "user", "content": "a b c"}],
            "stream": i % 2 == 1,
            "stream_options": {"include_usage": true},
            "max_tokens": i + 1,
        })
        .to_string();
        let r = c.send(
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            Some(&body),
        );
        assert_eq!(r.status, 200, "{r:?}");
        if i % 2 == 1 {
            let ev = events(&r.text());
            assert_eq!(ev.len() as u64, i + 1 + 2);
        } else {
            assert_eq!(r.json()["usage"]["completion_tokens"], i + 1);
        }
    }
    assert!(p.terminate());
}

fn rpc(addr: SocketAddr, body: &Value) -> Resp {
    post_json(
        addr,
        "/mcp",
        &[("accept", "application/json, text/event-stream")],
        body,
    )
}

#[test]
fn mcp_session() {
    let dir = TempDir::new("mcp");
    let p = mcp(&dir);
    let a = p.addr;
    let r = rpc(
        a,
        &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "0"}}}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j = r.json();
    assert_eq!(j["jsonrpc"], "2.0");
    assert_eq!(j["id"], 1);
    assert_eq!(j["result"]["protocolVersion"], "2025-06-18");
    assert_eq!(j["result"]["capabilities"], json!({"tools": {}}));
    assert_eq!(j["result"]["serverInfo"]["name"], "farebox-mcp");
    assert!(j["result"]["serverInfo"]["version"].is_string());

    let r = rpc(
        a,
        &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    );
    assert_eq!(r.status, 202, "{r:?}");
    assert!(r.body.is_empty());

    let r = rpc(
        a,
        &json!({"jsonrpc": "2.0", "id": "l", "method": "tools/list"}),
    );
    let tools = r.json()["result"]["tools"].as_array().unwrap().clone();
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["search", "fetch", "echo"]);
    for t in &tools {
        assert!(t["description"].is_string());
        assert_eq!(t["inputSchema"]["type"], "object");
    }

    for (i, tool) in ["search", "search", "fetch"].iter().enumerate() {
        let r = rpc(
            a,
            &json!({"jsonrpc": "2.0", "id": 10 + i, "method": "tools/call",
                    "params": {"name": tool, "arguments": {"q": i}}}),
        );
        let j = r.json();
        assert_eq!(j["id"], 10 + i);
        assert_eq!(
            j["result"],
            json!({"content": [{"type": "text", "text": format!("{tool} ok: {{\"q\":{i}}}")}],
                   "isError": false})
        );
    }

    let r = rpc(
        a,
        &json!({"jsonrpc": "2.0", "id": 20, "method": "resources/list"}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["error"]["code"], -32601);
    assert_eq!(r.json()["id"], 20);
    let r = rpc(
        a,
        &json!({"jsonrpc": "2.0", "id": 21, "method": "tools/call", "params": {"name": "rm"}}),
    );
    assert_eq!(r.json()["error"]["code"], -32602);

    let s = request(a, "GET", "/stats", &[], None).json();
    assert_eq!(
        s,
        json!({
            // No call here carried x-farebox-account (only a gateway's allowed calls do).
            "accounts": {},
            "calls": {"search": 2, "fetch": 1},
            "methods": {"initialize": 1, "notifications/initialized": 1, "tools/list": 1,
                        "tools/call": 4, "resources/list": 1},
        })
    );
    let s = request(a, "POST", "/stats/reset", &[], None).json();
    assert_eq!(s, json!({"accounts": {}, "calls": {}, "methods": {}}));
}

#[test]
fn mcp_batches_errors_and_keep_alive() {
    let dir = TempDir::new("mcp");
    let p = mcp(&dir);
    let a = p.addr;
    let r = rpc(
        a,
        &json!([
            {"jsonrpc": "2.0", "id": 1, "method": "ping"},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hi"}}},
            {"jsonrpc": "2.0", "id": 3, "method": "nope"},
        ]),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let j = r.json();
    let list = j.as_array().unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(list[0], json!({"jsonrpc": "2.0", "id": 1, "result": {}}));
    assert_eq!(
        list[1]["result"]["content"][0]["text"],
        r#"echo ok: {"text":"hi"}"#
    );
    assert_eq!(list[2]["error"]["code"], -32601);
    // A batch of notifications only: 202.
    let r = rpc(
        a,
        &json!([{"jsonrpc": "2.0", "method": "notifications/cancelled"}]),
    );
    assert_eq!(r.status, 202);

    let r = request(a, "POST", "/mcp", &[], Some("{not json"));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32700);
    let r = rpc(a, &json!([]));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32600);
    let r = request(a, "GET", "/mcp", &[], None);
    assert_eq!(r.status, 405);
    let r = request(
        a,
        "POST",
        "/mcp",
        &[("x-mock-status", "503")],
        Some(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#),
    );
    assert_eq!(r.status, 503);

    let mut c = Conn::open(a);
    for i in 0..5 {
        let body = json!({"jsonrpc": "2.0", "id": i, "method": "tools/call",
                          "params": {"name": "search", "arguments": {"query": "x"}}})
        .to_string();
        let r = c.send(
            "POST",
            "/mcp",
            &[("content-type", "application/json")],
            Some(&body),
        );
        assert_eq!(r.json()["id"], i);
    }
    let s = request(a, "GET", "/stats", &[], None).json();
    assert_eq!(s["calls"], json!({"echo": 1, "search": 5}));
    assert!(p.terminate());
}
