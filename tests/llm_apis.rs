//! The LLM APIs people run, metered through Envoy and farebox with their official
//! Python clients (`anthropic`, `openai`, installed into .venv-interop by `make interop-clients`)
//! against the farebox-llm mock: Anthropic Messages, the OpenAI Responses API, Chat
//! Completions and embeddings, JSON and streaming, cached and reasoning tokens priced
//! apart, a model missing from the table (refused, or priced by the default), and for each
//! streaming API an interrupted stream and usage after 300 KB (in JSON and in a stream).
//! Each charge in the ledger must be the tokens the client saw ×
//! the model's price per class, to the unit.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ACCOUNT: &str = "acct-llm-apis";
const KEY: &str = "fbk-llm-apis-5eed";
const BALANCE: i64 = 1_000_000;

/// The Python with the official clients ($FAREBOX_INTEROP_PYTHON, else .venv-interop's, the
/// one `make interop-clients` fills for tests/interop.rs too), or `None` when `test` cannot
/// run for want of it (a failure under CI=true).
fn llm_python(test: &str) -> Option<PathBuf> {
    let python = match std::env::var_os("FAREBOX_INTEROP_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root().join(".venv-interop/bin/python"),
    };
    if python.exists() {
        return Some(python);
    }
    cannot_run(
        test,
        &format!(
            "{} is missing: run `make interop-clients` (it installs the anthropic and openai clients)",
            python.display()
        ),
    );
    None
}

fn routes() -> Value {
    json!([
        {"name": "claude", "methods": ["POST"], "exact": "/v1/messages", "usage": {
            "api": "anthropic_messages", "per_tokens": 1_000_000,
            "models": {"claude-test": {"input": 3_000_000, "cached_input": 300_000,
                                       "cache_creation_input": 3_750_000, "output": 15_000_000}},
            "max_hold": 100_000, "estimate": 5000}},
        {"name": "responses", "methods": ["POST"], "exact": "/v1/responses", "usage": {
            "api": "openai_responses",
            "models": {"gpt-test": {"input": 2, "cached_input": 1, "output": 8, "reasoning": 10}},
            "default_prices": {"input": 5, "output": 20},
            "max_hold": 200, "estimate": 150}},
        {"name": "embeddings", "methods": ["POST"], "exact": "/v1/embeddings", "usage": {
            "api": "openai_embeddings",
            "models": {"emb-test": {"input": 2, "output": 0}},
            "default_prices": {"input": 1, "output": 0}, "estimate": 50}},
        {"name": "chat", "methods": ["POST"], "exact": "/v1/chat/completions", "usage": {
            "api": "openai_chat", "models": {"chat-test": {"input": 1, "output": 4}},
            "estimate": 500}}
    ])
}

/// The test's own reading of the prices above: (per_tokens, [input, cached, creation,
/// output, reasoning]) for a route and model.
fn prices(route: &str, model: &str) -> (u128, [u128; 5]) {
    match (route, model) {
        ("claude", "claude-test") => (
            1_000_000,
            [3_000_000, 300_000, 3_750_000, 15_000_000, 15_000_000],
        ),
        ("responses", "gpt-test") => (1, [2, 1, 2, 8, 10]),
        ("responses", _) => (1, [5, 5, 5, 20, 20]),
        ("embeddings", "emb-test") => (1, [2, 2, 2, 0, 0]),
        ("embeddings", _) => (1, [1, 1, 1, 0, 0]),
        ("chat", "chat-test") => (1, [1, 1, 1, 4, 4]),
        other => panic!("no prices for {other:?}"),
    }
}

fn n(v: &Value, p: &str) -> u128 {
    u128::from(v.pointer(p).and_then(Value::as_u64).unwrap_or(0))
}

/// Tokens per class as the client saw them: [input, cached input, cache-creation
/// input, output, reasoning], disjoint (OpenAI counts cached and reasoning tokens inside
/// its totals; Anthropic's input excludes the cache).
fn classes(route: &str, usage: &Value) -> [u128; 5] {
    match route {
        "claude" => [
            n(usage, "/input_tokens"),
            n(usage, "/cache_read_input_tokens"),
            n(usage, "/cache_creation_input_tokens"),
            n(usage, "/output_tokens"),
            0,
        ],
        "chat" => {
            let c = n(usage, "/prompt_tokens_details/cached_tokens");
            let r = n(usage, "/completion_tokens_details/reasoning_tokens");
            [
                n(usage, "/prompt_tokens") - c,
                c,
                0,
                n(usage, "/completion_tokens") - r,
                r,
            ]
        }
        "responses" => {
            let c = n(usage, "/input_tokens_details/cached_tokens");
            let r = n(usage, "/output_tokens_details/reasoning_tokens");
            [
                n(usage, "/input_tokens") - c,
                c,
                0,
                n(usage, "/output_tokens") - r,
                r,
            ]
        }
        _ => [n(usage, "/prompt_tokens"), 0, 0, 0, 0],
    }
}

/// Tokens per class, as the client saw them, × the prices, rounded up once.
fn expected_cost(route: &str, model: &str, usage: &Value) -> i64 {
    let (per, price) = prices(route, model);
    let sum: u128 = classes(route, usage)
        .iter()
        .zip(price)
        .map(|(t, p)| t * p)
        .sum();
    i64::try_from(sum.div_ceil(per)).unwrap()
}

/// A usage line as the test expects it: (route, model, tokens per class, units).
type Line = (String, String, [u128; 5], i64);

fn expected_line(route: &str, model: &str, usage: &Value) -> Line {
    (
        route.to_string(),
        model.to_string(),
        classes(route, usage),
        expected_cost(route, model, usage),
    )
}

/// The ledger's itemised bill (`GET /admin/accounts/{id}/usage`) once it holds `want`
/// lines (the filter sends them after each response): its items as [`Line`]s, sorted,
/// and the whole answer.
fn itemised(s: &Stack, want: usize) -> (Vec<Line>, Value) {
    let mut bill = Value::Null;
    let read = |bill: &Value| -> Vec<Line> {
        let mut lines: Vec<Line> = bill["items"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|i| {
                let t = &i["tokens"];
                (
                    i["route"].as_str().unwrap_or("-").to_string(),
                    i["model"].as_str().unwrap_or("-").to_string(),
                    [
                        n(t, "/input"),
                        n(t, "/cached_input"),
                        n(t, "/cache_creation_input"),
                        n(t, "/output"),
                        n(t, "/reasoning"),
                    ],
                    i["units"].as_i64().unwrap_or(-1),
                )
            })
            .collect();
        lines.sort();
        lines
    };
    let complete = wait_until(Duration::from_secs(10), || {
        bill = s
            .balance()
            .admin("GET", &format!("/admin/accounts/{ACCOUNT}/usage"), None);
        bill["items"].as_array().map_or(0, Vec::len) >= want
    });
    assert!(
        complete,
        "the ledger holds fewer than {want} usage lines: {bill}"
    );
    (read(&bill), bill)
}

/// Per route and model: the bill's sums are its lines' sums.
fn check_sums(lines: &[Line], bill: &Value) {
    let mut sums: BTreeMap<(String, String), ([u128; 5], i64, i64)> = BTreeMap::new();
    for (route, model, tokens, units) in lines {
        let e = sums
            .entry((route.clone(), model.clone()))
            .or_insert(([0; 5], 0, 0));
        for (acc, t) in e.0.iter_mut().zip(tokens) {
            *acc += t;
        }
        e.1 += units;
        e.2 += 1;
    }
    let got: BTreeMap<(String, String), ([u128; 5], i64, i64)> = bill["by_route_model"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let t = &g["tokens"];
            (
                (
                    g["route"].as_str().unwrap().to_string(),
                    g["model"].as_str().unwrap_or("-").to_string(),
                ),
                (
                    [
                        n(t, "/input"),
                        n(t, "/cached_input"),
                        n(t, "/cache_creation_input"),
                        n(t, "/output"),
                        n(t, "/reasoning"),
                    ],
                    g["units"].as_i64().unwrap(),
                    g["requests"].as_i64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(got, sums, "{bill}");
    let total: i64 = lines.iter().map(|l| l.3).sum();
    assert_eq!(bill["units"], json!(total), "{bill}");
}

fn run_clients(python: &PathBuf, base: &str, calls: &Value) -> Vec<Value> {
    let out = Command::new(python)
        .arg(repo_root().join("tests/llm/clients.py"))
        .arg(base)
        .arg(KEY)
        .arg(calls.to_string())
        .output()
        .expect("run tests/llm/clients.py");
    assert!(
        out.status.success(),
        "clients.py failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "clients.py printed no JSON list ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn ledger(s: &Stack) -> Vec<(String, i64)> {
    let mut out = s.balance().charge_routes(ACCOUNT);
    out.sort();
    out
}

const PROMPT: &str = "one two three four";

fn anthropic(model: &str, max_tokens: u64, stream: bool, extra: Value) -> Value {
    let mut params = json!({"model": model, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": PROMPT}]});
    params
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    json!({"api": "anthropic", "stream": stream, "params": params})
}

fn responses(model: &str, max_output: u64, stream: bool, extra: Value) -> Value {
    let mut params =
        json!({"model": model, "max_output_tokens": max_output, "input": "one two three"});
    params
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    json!({"api": "responses", "stream": stream, "params": params})
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn official_clients_are_charged_tokens_times_the_models_prices() {
    let Some(python) = llm_python("llm_apis") else {
        return;
    };
    let dir = TempDir::new("llm-apis-upstream");
    let (_llm, addr) = start_service("farebox-llm", dir.path());
    // envoy/envoy-access-log.yaml, logging to a file: the usage fields are checked too.
    let log = dir.join("access.log");
    let yaml = access_log_envoy_yaml(&log);
    let s = stack("llm-apis")
        .envoy_yaml(yaml)
        .plugin(|c| {
            c["timeout_ms"] = json!(3000);
            c["routes"] = routes();
        })
        .upstream_addr(addr)
        .start();
    s.balance().create_account(ACCOUNT, KEY, BALANCE);
    let base = format!("http://{}", s.envoy.addr);

    // (call, route, model, what it shows); the model refused with 400 comes last.
    let cases: Vec<(Value, &str, &str, &str)> = vec![
        (
            anthropic(
                "claude-test",
                6,
                false,
                json!({"x_cache_read": 7, "x_cache_creation": 2}),
            ),
            "claude",
            "claude-test",
            "anthropic JSON, cache reads and writes",
        ),
        (
            anthropic("claude-test", 9, true, json!({"x_cache_read": 7})),
            "claude",
            "claude-test",
            "anthropic stream",
        ),
        (
            anthropic("claude-test", 5, true, json!({"x_pad_bytes": 300_000})),
            "claude",
            "claude-test",
            "anthropic stream, usage after 300 KB",
        ),
        (
            anthropic("claude-test", 4, false, json!({"x_pad_bytes": 300_000})),
            "claude",
            "claude-test",
            "anthropic JSON, usage after 300 KB",
        ),
        (
            responses(
                "gpt-test",
                7,
                false,
                json!({"x_cached": 1, "x_reasoning": 3}),
            ),
            "responses",
            "gpt-test",
            "responses JSON, cached and reasoning",
        ),
        (
            responses(
                "gpt-test",
                5,
                true,
                json!({"x_cached": 2, "x_reasoning": 1}),
            ),
            "responses",
            "gpt-test",
            "responses stream",
        ),
        (
            responses("gpt-test", 5, true, json!({"x_end": "incomplete"})),
            "responses",
            "gpt-test",
            "responses stream ending response.incomplete",
        ),
        (
            responses(
                "gpt-test",
                3,
                true,
                json!({"x_end": "failed", "x_reasoning": 1}),
            ),
            "responses",
            "gpt-test",
            "responses stream ending response.failed",
        ),
        (
            responses("gpt-test", 6, true, json!({"x_pad_bytes": 300_000})),
            "responses",
            "gpt-test",
            "responses stream, usage after 300 KB",
        ),
        (
            responses("gpt-test", 4, false, json!({"x_pad_bytes": 300_000})),
            "responses",
            "gpt-test",
            "responses JSON, usage after 300 KB",
        ),
        (
            responses("gpt-unlisted", 4, false, json!({})),
            "responses",
            "gpt-unlisted",
            "responses, a model priced by default_prices",
        ),
        (
            json!({"api": "embeddings", "params": {"model": "emb-test", "input": ["one two", "three"]}}),
            "embeddings",
            "emb-test",
            "embeddings",
        ),
        (
            json!({"api": "embeddings", "params": {"model": "emb-other", "input": "a b c d"}}),
            "embeddings",
            "emb-other",
            "embeddings, a model priced by default_prices",
        ),
        (
            json!({"api": "chat", "params": {"model": "chat-test", "max_tokens": 6,
                "messages": [{"role": "user", "content": PROMPT}]}}),
            "chat",
            "chat-test",
            "chat completions JSON",
        ),
        (
            json!({"api": "chat", "params": {"model": "chat-test", "max_tokens": 5,
                "x_pad_bytes": 300_000, "messages": [{"role": "user", "content": PROMPT}]}}),
            "chat",
            "chat-test",
            "chat completions JSON, usage after 300 KB",
        ),
        (
            json!({"api": "chat", "stream": true, "params": {"model": "chat-test", "max_tokens": 3,
                "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": PROMPT}]}}),
            "chat",
            "chat-test",
            "chat completions stream",
        ),
        (
            json!({"api": "chat", "stream": true, "params": {"model": "chat-test", "max_tokens": 4,
                "stream_options": {"include_usage": true}, "x_pad_bytes": 300_000,
                "messages": [{"role": "user", "content": PROMPT}]}}),
            "chat",
            "chat-test",
            "chat completions stream, usage after 300 KB",
        ),
        (
            // The client's default: no stream_options. farebox adds include_usage (the
            // route's stream_include_usage, on by default for openai_chat), so the stream
            // reports its usage and is charged by it, not the hold of 500.
            json!({"api": "chat", "stream": true, "params": {"model": "chat-test", "max_tokens": 3,
                "messages": [{"role": "user", "content": PROMPT}]}}),
            "chat",
            "chat-test",
            "chat completions stream, the client's default (no stream_options)",
        ),
    ];
    let mut calls: Vec<Value> = cases.iter().map(|c| c.0.clone()).collect();
    // Interrupted streams: Anthropic's after two deltas (message_start told the input and
    // one output token), the Responses API's before any usage (charged the hold, capped
    // by max_hold: 200).
    calls.push(anthropic(
        "claude-test",
        8,
        true,
        json!({"x_abort_after": 2}),
    ));
    calls.push(responses("gpt-test", 5, true, json!({"x_abort_after": 2})));
    // A model missing from a table without default prices: 400 naming it, no charge.
    calls.push(anthropic("claude-unlisted", 3, false, json!({})));
    // Chat Completions without a bound on the output, so the hold is the estimate (500):
    // a stream with no usage (the client said include_usage: false, which farebox leaves
    // alone) and one cut short are charged the hold; a model missing from its table (no
    // default prices) is refused.
    let chat_messages = json!([{"role": "user", "content": PROMPT}]);
    calls.push(json!({"api": "chat", "stream": true,
        "params": {"model": "chat-test", "messages": chat_messages,
                   "stream_options": {"include_usage": false}}}));
    calls.push(json!({"api": "chat", "stream": true,
        "params": {"model": "chat-test", "messages": chat_messages,
                   "stream_options": {"include_usage": true}, "x_abort_after": 2}}));
    calls.push(json!({"api": "chat",
        "params": {"model": "chat-unlisted", "max_tokens": 2, "messages": chat_messages}}));

    let results = run_clients(&python, &base, &json!(calls));
    assert_eq!(results.len(), calls.len(), "{results:?}");

    let mut want: Vec<(String, i64)> = Vec::new();
    let mut want_lines: Vec<Line> = Vec::new();
    let mut table = Vec::new();
    for (i, (_, route, model, what)) in cases.iter().enumerate() {
        let usage = &results[i]["usage"];
        assert!(
            usage.is_object(),
            "{what}: the client saw no usage: {}",
            results[i]
        );
        let cost = expected_cost(route, model, usage);
        table.push(format!("{what}: {usage} -> {cost}"));
        want.push((format!("{route}/{model}"), cost));
        want_lines.push(expected_line(route, model, usage));
    }
    let n_cases = cases.len();
    let interrupted = &results[n_cases];
    assert!(interrupted.get("interrupted").is_some(), "{interrupted}");
    // message_start's usage: 4 input tokens at 3, 1 output token at 15.
    want.push(("claude/claude-test".into(), 4 * 3 + 15));
    want_lines.push((
        "claude".into(),
        "claude-test".into(),
        [4, 0, 0, 1, 0],
        4 * 3 + 15,
    ));
    assert!(
        results[n_cases + 1].get("interrupted").is_some(),
        "{}",
        results[n_cases + 1]
    );
    want.push(("responses/gpt-test".into(), 200));
    let refused = &results[n_cases + 2];
    assert_eq!(refused["status"], 400, "{refused}");
    assert_eq!(refused["error"]["model"], "claude-unlisted", "{refused}");
    assert!(
        refused["error"]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("claude-unlisted"),
        "{refused}"
    );

    let no_usage = &results[n_cases + 3];
    assert!(
        no_usage["usage"].is_null() && no_usage["text_len"].as_u64() > Some(0),
        "a chat stream without usage reached the client: {no_usage}"
    );
    want.push(("chat/chat-test".into(), 500));
    let cut = &results[n_cases + 4];
    assert!(cut.get("interrupted").is_some(), "{cut}");
    want.push(("chat/chat-test".into(), 500));
    let refused_chat = &results[n_cases + 5];
    assert_eq!(refused_chat["status"], 400, "{refused_chat}");
    // OpenAI's client keeps the `error` object: its code says what OpenAI says for an
    // unknown model, its message names it.
    assert_eq!(
        (
            &refused_chat["error"]["type"],
            &refused_chat["error"]["code"]
        ),
        (&json!("invalid_request_error"), &json!("model_not_found")),
        "{refused_chat}"
    );
    assert!(
        refused_chat["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("chat-unlisted"),
        "{refused_chat}"
    );

    // Spot checks against the mock's own counts (4 prompt words; 3 for responses).
    let first = &results[0]["usage"];
    assert_eq!(
        (
            n(first, "/input_tokens"),
            n(first, "/cache_read_input_tokens"),
            n(first, "/cache_creation_input_tokens"),
            n(first, "/output_tokens")
        ),
        (4, 7, 2, 6)
    );
    assert_eq!(
        want[0].1, 112,
        "(4×3 + 7×0.3 + 2×3.75 + 6×15) = 111.6, rounded up"
    );
    assert!(
        results[2]["text_len"].as_u64().unwrap() > 300_000,
        "the stream reached the client whole"
    );

    want.sort();
    let mut got = Vec::new();
    let settled = wait_until(Duration::from_secs(10), || {
        got = ledger(&s);
        got == want
    });
    assert!(
        settled,
        "the ledger is not tokens × prices:\n got  {got:?}\n want {want:?}\n{}",
        table.join("\n")
    );
    let total: i64 = want.iter().map(|(_, c)| c).sum();
    let acct = s.balance().account(ACCOUNT);
    assert_eq!(num(&acct, "charged"), total, "{acct}");
    assert_eq!(num(&acct, "balance"), BALANCE - total, "{acct}");
    // Only the stream that did not ask for usage was rewritten.
    expect_metrics(
        &s.envoy,
        &[("unknown_model", 2), ("include_usage_added", 1)],
        Duration::from_secs(5),
    );
    let default_stream = &results[n_cases - 1]["usage"];
    assert_eq!(
        (
            n(default_stream, "/prompt_tokens"),
            n(default_stream, "/completion_tokens")
        ),
        (4, 3),
        "the mock's counts for the default stream"
    );

    // The itemised bill: one line per metered request, its tokens those the client saw,
    // its units the request's charge (the interrupted stream that reported nothing was
    // charged its hold and has no line).
    want_lines.sort();
    let (lines, bill) = itemised(&s, want_lines.len());
    assert_eq!(lines, want_lines, "{bill}");
    let charges: BTreeMap<String, (String, i64)> = s
        .balance()
        .charges(ACCOUNT)
        .into_iter()
        .map(|c| {
            (
                c["request_id"].as_str().unwrap().to_string(),
                (
                    c["route"].as_str().unwrap().to_string(),
                    c["cost"].as_i64().unwrap(),
                ),
            )
        })
        .collect();
    for item in bill["items"].as_array().unwrap() {
        let rid = item["request_id"].as_str().unwrap();
        let route = format!(
            "{}/{}",
            item["route"].as_str().unwrap(),
            item["model"].as_str().unwrap()
        );
        assert_eq!(
            charges.get(rid),
            Some(&(route, item["units"].as_i64().unwrap())),
            "line {item} against its charge"
        );
        assert!(item["lease_id"].is_null(), "{item}");
    }
    check_sums(&lines, &bill);
    let mut by_line = String::new();
    for (route, model, t, units) in &lines {
        by_line.push_str(&format!("  {route}/{model} tokens {t:?} -> {units}\n"));
    }
    eprintln!("llm_apis itemised (authorize mode):\n{by_line}");

    // The access log: each metered line's usage_cost is its ledger charge, with its model
    // and tokens; the refused request says unknown-model.
    let mut lines: Vec<Value> = Vec::new();
    let logged = wait_until(Duration::from_secs(10), || {
        lines = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        lines.len() >= calls.len()
    });
    assert!(
        logged,
        "{} access-log lines for {} calls",
        lines.len(),
        calls.len()
    );
    let mut logged_costs: Vec<(String, i64)> = lines
        .iter()
        .filter(|l| l["decision"] == "allow")
        .map(|l| {
            let cost = l["usage_cost"]
                .as_str()
                .or(l["cost"].as_str())
                .unwrap_or("-");
            (
                l["route"].as_str().unwrap_or("-").to_string(),
                cost.parse::<i64>().unwrap_or(-1),
            )
        })
        .collect();
    logged_costs.sort();
    // The interrupted Responses stream kept its hold (no usage_cost): its line shows the hold.
    assert_eq!(logged_costs, want, "access log {lines:?}");
    let first = lines
        .iter()
        .find(|l| l["usage_cost"] == "112")
        .unwrap_or_else(|| panic!("no line with usage_cost 112: {lines:?}"));
    assert_eq!(
        (
            &first["model"],
            &first["input_tokens"],
            &first["cached_input_tokens"],
            &first["cache_creation_input_tokens"],
            &first["output_tokens"]
        ),
        (
            &json!("claude-test"),
            &json!("4"),
            &json!("7"),
            &json!("2"),
            &json!("6")
        ),
        "{first}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["decision"] == "unknown-model" && l["status"] == 400),
        "{lines:?}"
    );
    // Dynamic metadata (the Lua bridge in envoy-access-log.yaml), with Envoy AI Gateway's
    // key names: every metered response that ended cleanly carries its cost and inclusive
    // token counts as numbers, equal to the filter state's.
    let fs = |l: &Value, k: &str| -> u64 {
        l[k].as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {l}"))
    };
    let mut with_metadata = 0;
    for l in lines.iter().filter(|l| l["usage_cost"].is_string()) {
        if l["md_cost"].is_null() {
            // Only a response cut short has no metadata (its usage came in on_log).
            assert!(
                !(l["status"] == 200 && l["md_total_tokens"].is_number()),
                "{l}"
            );
            continue;
        }
        with_metadata += 1;
        let input = fs(l, "input_tokens")
            + fs(l, "cached_input_tokens")
            + fs(l, "cache_creation_input_tokens");
        let output = fs(l, "output_tokens") + fs(l, "reasoning_tokens");
        assert_eq!(
            (
                &l["md_cost"],
                &l["md_model"],
                &l["md_input_tokens"],
                &l["md_cached_input_tokens"],
                &l["md_cache_creation_input_tokens"],
                &l["md_output_tokens"],
                &l["md_reasoning_tokens"],
                &l["md_total_tokens"],
            ),
            (
                &json!(fs(l, "usage_cost")),
                &l["model"],
                &json!(input),
                &json!(fs(l, "cached_input_tokens")),
                &json!(fs(l, "cache_creation_input_tokens")),
                &json!(output),
                &json!(fs(l, "reasoning_tokens")),
                &json!(input + output),
            ),
            "{l}"
        );
    }
    // Every case above ended cleanly; the interrupted streams have none.
    assert_eq!(with_metadata, n_cases, "{lines:?}");
    let first = lines
        .iter()
        .find(|l| l["md_cost"] == json!(112))
        .unwrap_or_else(|| panic!("no metadata cost 112: {lines:?}"));
    eprintln!("llm_apis access-log line with dynamic metadata: {first}");
    assert_eq!(
        (&first["md_input_tokens"], &first["md_total_tokens"]),
        (&json!(4 + 7 + 2), &json!(4 + 7 + 2 + 6)),
        "{first}"
    );
    let by_route: BTreeMap<&str, i64> = want.iter().fold(BTreeMap::new(), |mut m, (r, c)| {
        *m.entry(r.as_str()).or_default() += c;
        m
    });
    eprintln!(
        "llm_apis ledger by route/model: {by_route:?}\n{}",
        table.join("\n")
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn lease_mode_charges_the_same_tokens_times_prices() {
    let Some(python) = llm_python("llm_apis (lease mode)") else {
        return;
    };
    let dir = TempDir::new("llm-apis-lease-upstream");
    let (_llm, addr) = start_service("farebox-llm", dir.path());
    let s = stack("llm-apis-lease")
        .plugin(|c| {
            c["timeout_ms"] = json!(3000);
            c["routes"] = routes();
            c["mode"] = json!("lease");
            c["lease_want"] = json!(20_000);
            c["settle_interval_ms"] = json!(200);
        })
        // A short lease: it expires soon after the calls and is settled for good.
        .balance_opts(BalanceOpts {
            extra_args: vec!["--lease-ttl-ms".into(), "3000".into()],
            ..Default::default()
        })
        .upstream_addr(addr)
        .concurrency(1)
        .start();
    s.balance().create_account(ACCOUNT, KEY, BALANCE);
    let base = format!("http://{}", s.envoy.addr);
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            anthropic(
                "claude-test",
                6,
                false,
                json!({"x_cache_read": 7, "x_cache_creation": 2}),
            ),
            "claude",
            "claude-test",
        ),
        (
            anthropic("claude-test", 9, true, json!({"x_cache_read": 7})),
            "claude",
            "claude-test",
        ),
        (
            responses(
                "gpt-test",
                7,
                true,
                json!({"x_cached": 1, "x_reasoning": 3}),
            ),
            "responses",
            "gpt-test",
        ),
        (
            json!({"api": "embeddings", "params": {"model": "emb-test", "input": ["one two", "three"]}}),
            "embeddings",
            "emb-test",
        ),
    ];
    let calls: Vec<Value> = cases.iter().map(|c| c.0.clone()).collect();
    let results = run_clients(&python, &base, &json!(calls));
    let mut total = 0;
    let mut want_lines: Vec<Line> = Vec::new();
    for (i, (_, route, model)) in cases.iter().enumerate() {
        let usage = &results[i]["usage"];
        assert!(usage.is_object(), "{}", results[i]);
        total += expected_cost(route, model, usage);
        want_lines.push(expected_line(route, model, usage));
    }
    want_lines.sort();
    assert_eq!(total, 112 + 150 + 67 + 6);
    // The lease settles what was spent from it (holds given back to it, usage kept): once
    // it is settled for good, the account's charged total is the tokens × prices, to the
    // unit, and nothing is lost.
    let mut acct = Value::Null;
    let settled = wait_until(Duration::from_secs(20), || {
        acct = s.balance().account(ACCOUNT);
        num(&acct, "reserved") == 0 && num(&acct, "charged") == total
    });
    assert!(settled, "charged {} want {total}: {acct}", acct["charged"]);
    assert_eq!(
        num(&acct, "balance") + num(&acct, "reserved") + num(&acct, "charged"),
        BALANCE,
        "{acct}"
    );
    // The lease's settles carry totals; each request's usage line went to its lease, so
    // the bill is itemised all the same, and its lines add up to what the lease charged.
    let (lines, bill) = itemised(&s, want_lines.len());
    assert_eq!(lines, want_lines, "{bill}");
    assert_eq!(
        lines.iter().map(|l| l.3).sum::<i64>(),
        num(&acct, "charged")
    );
    let leases = s
        .balance()
        .admin("GET", &format!("/admin/accounts/{ACCOUNT}/leases"), None);
    let lease_ids: Vec<&Value> = leases
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l["lease_id"])
        .collect();
    for item in bill["items"].as_array().unwrap() {
        assert!(lease_ids.contains(&&item["lease_id"]), "{item} on {leases}");
    }
    check_sums(&lines, &bill);
    let mut by_line = String::new();
    for (route, model, t, units) in &lines {
        by_line.push_str(&format!("  {route}/{model} tokens {t:?} -> {units}\n"));
    }
    eprintln!("llm_apis itemised (lease mode):\n{by_line}");
}
