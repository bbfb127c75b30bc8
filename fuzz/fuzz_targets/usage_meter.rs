//! The usage readers (src/usage.rs, src/tokens.rs) on arbitrary response bodies, cut into
//! arbitrary chunks: every API's price table (the model from the request or from the
//! response), JSON and event streams, and the legacy pointer pricing. Properties: never
//! panics; the total (cost, tokens per class, model) is the same however the body is
//! chunked (the whole body at once is the reference); the kept buffer stays bounded.
//!
//! The input is a 3-byte header, then chunk lengths, then the body as is, so that the
//! seeds in fuzz/seeds/usage_meter are real response bodies behind a header:
//! byte 0 picks the route (`% ROUTES`), byte 1 the body kind (bit 0: event stream) and
//! the request's model (bits 1-2: "m", "big", an unknown one, none), byte 2 the number
//! of chunk lengths that follow (`% 16`, cycled; none: one byte at a time).
#![no_main]

use std::sync::OnceLock;

use farebox::config::Config;
use farebox::usage::{BodyKind, Meter};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 256;
const APIS: [&str; 4] = [
    "openai_chat",
    "openai_responses",
    "openai_embeddings",
    "anthropic_messages",
];

fn config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| {
        let table = |api: &str, from: &str| {
            format!(
                r#"{{"api": "{api}", "per_tokens": 1000, "model_from": "{from}",
                   "models": {{"m": {{"input": 3, "cached_input": 1, "cache_creation_input": 4,
                   "output": 15, "reasoning": 20}}, "big": {{"input": 30, "output": 150}}}},
                   "default_prices": {{"input": 1, "output": 2}}, "estimate": 9}}"#
            )
        };
        let mut routes = Vec::new();
        for from in ["request", "response"] {
            for api in APIS {
                let n = routes.len();
                routes.push(format!(
                    r#"{{"name": "r{n}", "exact": "/r{n}", "usage": {}}}"#,
                    table(api, from)
                ));
            }
        }
        routes.push(
            r#"{"name": "pointer", "exact": "/p", "usage": {"input_pointer": "/usage/prompt_tokens",
                "input_unit_cost": 1, "output_pointer": "/usage/completion_tokens",
                "output_unit_cost": 3, "estimate": 9}}"#
                .to_string(),
        );
        let raw = format!(
            r#"{{"cluster": "balance", "routes": [{}]}}"#,
            routes.join(",")
        );
        Config::parse(raw.as_bytes()).expect("the fuzz config is valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let [route, flags, ncuts, rest @ ..] = data else {
        return;
    };
    let ncuts = usize::from(*ncuts % 16).min(rest.len());
    let (cuts, body) = rest.split_at(ncuts);
    let routes = &config().pricing.routes;
    let Some(spec) = routes
        .get(usize::from(*route) % routes.len())
        .and_then(|r| r.usage.clone())
    else {
        return;
    };
    let kind = if flags & 1 == 1 {
        BodyKind::EventStream
    } else {
        BodyKind::Json
    };
    let model = match (flags >> 1) & 3 {
        0 => Some("m".to_string()),
        1 => Some("big".to_string()),
        2 => Some("not-in-the-table".to_string()),
        _ => None,
    };
    let meter = || Meter::for_model(kind, spec.clone(), LIMIT, model.clone());
    let mut whole = meter();
    whole.feed(body);
    let want = whole.finish_metered();

    let mut chunked = meter();
    let mut rest = body;
    let mut lengths = cuts.iter().cycle();
    while !rest.is_empty() {
        let n = usize::from(*lengths.next().unwrap_or(&1))
            .max(1)
            .min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        chunked.feed(chunk);
        assert!(
            chunked.kept() <= LIMIT,
            "the meter keeps {} bytes",
            chunked.kept()
        );
        rest = tail;
    }
    assert_eq!(
        chunked.finish_metered(),
        want,
        "the chunking changed the total"
    );
});
