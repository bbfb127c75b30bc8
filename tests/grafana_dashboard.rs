#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! deploy/grafana/farebox.json against a real Envoy: every metric name the dashboard
//! queries (panel targets and template variables) must be one that Envoy 1.40 with the
//! farebox filter really serves in `/stats/prometheus`, under that exact name, after
//! traffic has made every counter and histogram exist; every label it matches on (other
//! than the `instance` label Prometheus adds) must be a label of that metric. A name that
//! is not there fails the test, and the test proves that it would (a made-up name is
//! reported). It also checks that the dashboard covers what operators ask for (allowed
//! and denied rates, cache-hit ratio, callout failures, fail-open passes, refunds and their
//! failures, lease calls and waits, metered usage) and is well-formed Grafana JSON.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use common::*;
use serde_json::Value;

fn dashboard() -> Value {
    let path = repo_root().join("deploy/grafana/farebox.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// Every panel, rows' nested panels included.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// (where, PromQL) of every query: panel targets and query variables.
fn queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_else(|| {
                panic!("panel {:?}: a target without a PromQL expr", p["title"])
            });
            out.push((format!("panel {}", p["title"]), expr.to_string()));
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap();
            out.push((format!("variable {}", v["name"]), label_values_as_promql(q)));
        }
    }
    out
}

/// Grafana's `label_values(metric, label)` is not PromQL: it asks for `metric` and its
/// label, which is what `metric{label!=""}` selects.
fn label_values_as_promql(q: &str) -> String {
    let Some(args) = q
        .trim()
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    else {
        return q.to_string();
    };
    match args.split_once(',') {
        Some((metric, label)) => format!("{}{{{}!=\"\"}}", metric.trim(), label.trim()),
        None => panic!("label_values without a metric: {q:?}"),
    }
}

const KEYWORDS: [&str; 11] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
];

/// The metric names a PromQL expression selects, each with the label names it matches on.
/// Functions and aggregations (an identifier before `(`), keywords, grouping label lists,
/// label matchers, ranges and numbers are not metric names.
fn metric_selectors(expr: &str) -> Vec<(String, BTreeSet<String>)> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out: Vec<(String, BTreeSet<String>)> = Vec::new();
    let mut i = 0;
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_ws = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    // The closing partner of the bracket at `j`, quotes respected.
    let close = |j: usize, open: char, shut: char| {
        let (mut depth, mut k, mut quoted) = (0, j, false);
        while k < chars.len() {
            match chars[k] {
                '"' => quoted = !quoted,
                c if c == open && !quoted => depth += 1,
                c if c == shut && !quoted => {
                    depth -= 1;
                    if depth == 0 {
                        return k;
                    }
                }
                _ => {}
            }
            k += 1;
        }
        panic!("unbalanced {open} in {expr:?}");
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i = close_quote(&chars, i);
        } else if c == '[' {
            i = close(i, '[', ']') + 1;
        } else if c == '{' {
            // A selector with no name before it ({__name__=...}) is not used here.
            panic!("a label matcher without a metric name in {expr:?}");
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric()
                    || chars[i] == '.'
                    || ((chars[i] == '-' || chars[i] == '+') && matches!(chars[i - 1], 'e' | 'E')))
            {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = skip_ws(i);
            if KEYWORDS.contains(&word.as_str()) {
                if [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                ]
                .contains(&word.as_str())
                    && chars.get(next) == Some(&'(')
                {
                    i = close(next, '(', ')') + 1;
                }
            } else if chars.get(next) == Some(&'(') || followed_by_grouping(&chars, next) {
                // A function or an aggregation (`sum by (le) (...)`): its arguments are
                // scanned next.
            } else {
                let mut labels = BTreeSet::new();
                if chars.get(next) == Some(&'{') {
                    let end = close(next, '{', '}');
                    let body: String = chars[next + 1..end].iter().collect();
                    for matcher in split_matchers(&body) {
                        let name: String =
                            matcher.trim().chars().take_while(|c| ident(*c)).collect();
                        if !name.is_empty() {
                            labels.insert(name);
                        }
                    }
                    i = end + 1;
                }
                out.push((word, labels));
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Whether the word at `at` is `by` or `without` (so the identifier before it is an
/// aggregation operator).
fn followed_by_grouping(chars: &[char], at: usize) -> bool {
    let word: String = chars
        .get(at..)
        .unwrap_or_default()
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
        .collect();
    word == "by" || word == "without"
}

fn close_quote(chars: &[char], start: usize) -> usize {
    let mut k = start + 1;
    while k < chars.len() {
        match chars[k] {
            '\\' => k += 2,
            '"' => return k + 1,
            _ => k += 1,
        }
    }
    panic!("unterminated string");
}

/// `a="x",b=~"y,z"` -> [`a="x"`, `b=~"y,z"`] (commas inside quotes kept).
fn split_matchers(body: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    for c in body.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().filter(|m| !m.trim().is_empty()).collect()
}

/// Metric name -> label names seen on its samples, from a /stats/prometheus text.
fn exposition(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let labels = out.entry(name.to_string()).or_default();
        if line[name_end..].starts_with('{') {
            let end = line.rfind('}').expect("closing brace");
            for m in split_matchers(&line[name_end + 1..end]) {
                if let Some((k, _)) = m.split_once('=') {
                    labels.insert(k.trim().to_string());
                }
            }
        }
    }
    out
}

/// What is wrong with the dashboard's queries against this exposition (empty if nothing).
fn missing(
    queries: &[(String, String)],
    served: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (place, expr) in queries {
        let selectors = metric_selectors(expr);
        if selectors.is_empty() {
            problems.push(format!("{place}: no metric in {expr:?}"));
        }
        for (name, labels) in selectors {
            let Some(have) = served.get(&name) else {
                problems.push(format!("{place}: {name} is not in /stats/prometheus"));
                continue;
            };
            for label in labels.iter().filter(|l| *l != "instance") {
                if !have.contains(label) {
                    problems.push(format!(
                        "{place}: {name} has no label {label} (it has {have:?})"
                    ));
                }
            }
        }
    }
    problems
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn promql_metric_names_are_found() {
    let sel = metric_selectors(
        r#"histogram_quantile(0.99, sum by (le) (rate(envoy_x_bucket{instance=~"$i",c="a,b"}[$__rate_interval]))) / clamp_min(sum(rate(farebox_a[1m])) + 1e-9, 1)"#,
    );
    let names: Vec<&str> = sel.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["envoy_x_bucket", "farebox_a"]);
    assert_eq!(
        sel[0].1,
        BTreeSet::from(["c".to_string(), "instance".to_string()])
    );
    assert_eq!(
        metric_selectors(&label_values_as_promql(
            "label_values(farebox_allowed, instance)"
        )),
        vec![(
            "farebox_allowed".to_string(),
            BTreeSet::from(["instance".to_string()])
        )]
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn dashboard_is_well_formed_and_covers_the_operators_questions() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "farebox");
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(
        vars.contains(&"datasource"),
        "a Prometheus data-source variable"
    );
    let mut ids = BTreeSet::new();
    for p in panels(&dash) {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id {}",
            p["id"]
        );
        let g = &p["gridPos"];
        assert!(
            g["w"].as_u64().is_some_and(|w| (1..=24).contains(&w))
                && g["x"]
                    .as_u64()
                    .is_some_and(|x| x + g["w"].as_u64().unwrap() <= 24),
            "panel {}: gridPos {g}",
            p["title"]
        );
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "panel {}: use the data-source variable",
                p["title"]
            );
        }
    }
    let all: String = queries(&dash)
        .into_iter()
        .map(|(_, q)| q)
        .collect::<Vec<_>>()
        .join("\n");
    for metric in [
        "farebox_allowed",
        "farebox_denied",
        "farebox_cache_hits",
        "farebox_callouts",
        "farebox_callout_failures",
        "farebox_fail_open",
        "farebox_refunds",
        "farebox_refund_failures",
        "farebox_leases_taken",
        "farebox_lease_waits",
        "farebox_settles",
        "farebox_lease_units_spent",
        "farebox_usage_metered",
        "farebox_usage_adjusted",
    ] {
        assert!(all.contains(metric), "the dashboard never queries {metric}");
    }
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn every_metric_the_dashboard_queries_is_served_by_envoy() {
    let dash = dashboard();
    let queries = queries(&dash);
    let stack = stack("grafana-metrics")
        .balance_opts(BalanceOpts {
            deny_max_age: Some(30),
            ..BalanceOpts::default()
        })
        .concurrency(1)
        .start();
    let balance = stack.balance();
    balance.create_account("acct_graf_rich", "fbk-graf-rich", 100);
    balance.create_account("acct_graf_poor", "fbk-graf-poor", 0);
    // Traffic, so that every counter and the callout histogram have samples: allowed,
    // denied (then from the cache), refunded (the upstream's 503), free, unauthenticated.
    assert_eq!(stack.get_with_key("/v1/a", "fbk-graf-rich").status, 200);
    assert_eq!(stack.get_with_key("/v1/a", "fbk-graf-poor").status, 402);
    assert_eq!(stack.get_with_key("/v1/a", "fbk-graf-poor").status, 402);
    assert_eq!(
        stack.get_with_key("/status/503", "fbk-graf-rich").status,
        503
    );
    assert_eq!(stack.get("/health", &[]).status, 200);
    assert_eq!(stack.get("/v1/a", &[]).status, 401);
    // The timer hands the counts to Envoy; the refund is sent from it too.
    wait_metric(
        &stack.envoy,
        "refunds",
        1,
        std::time::Duration::from_secs(10),
    );
    wait_metric(
        &stack.envoy,
        "cache_hits",
        1,
        std::time::Duration::from_secs(10),
    );

    let text = stack.envoy.stats_prometheus();
    let served = exposition(&text);
    let problems = missing(&queries, &served);
    assert!(
        problems.is_empty(),
        "deploy/grafana/farebox.json queries what Envoy does not serve:\n  {}\nfarebox and \
         cluster metrics served: {:?}",
        problems.join("\n  "),
        served
            .keys()
            .filter(|k| k.starts_with("farebox_") || k.starts_with("envoy_cluster_upstream_rq_time"))
            .collect::<Vec<_>>()
    );
    // The check is able to fail: a made-up name, and a label the metric lacks.
    let bogus = vec![
        (
            "test".to_string(),
            "sum(rate(farebox_allowed_total[5m]))".to_string(),
        ),
        (
            "test".to_string(),
            r#"sum(rate(farebox_allowed{envoy_cluster_name="x"}[5m]))"#.to_string(),
        ),
    ];
    assert_eq!(
        missing(&bogus, &served).len(),
        2,
        "{:?}",
        missing(&bogus, &served)
    );
    eprintln!(
        "{} queries, {} metric selectors, all served by {}",
        queries.len(),
        queries
            .iter()
            .map(|(_, q)| metric_selectors(q).len())
            .sum::<usize>(),
        served.len()
    );
}
