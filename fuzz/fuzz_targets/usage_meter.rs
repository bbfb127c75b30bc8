//! The usage readers (src/usage.rs, src/tokens.rs) on arbitrary response bodies, cut into
//! arbitrary chunks: every API's price table, JSON and event streams, and the legacy
//! pointer pricing. Properties: never panics; the total is the same however the body is
//! chunked (the whole body at once is the reference); the kept buffer stays bounded.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use farebox::config::Config;
use farebox::usage::{BodyKind, Meter};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    body: Vec<u8>,
    /// Chunk lengths, cycled.
    cuts: Vec<u8>,
    route: u8,
    stream: bool,
    model: Option<String>,
}

const LIMIT: usize = 256;

fn config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| {
        let table = |api: &str| {
            format!(
                r#"{{"api": "{api}", "per_tokens": 1000, "models": {{"m": {{"input": 3, "cached_input": 1,
                   "cache_creation_input": 4, "output": 15, "reasoning": 20}}}},
                   "default_prices": {{"input": 1, "output": 2}}, "estimate": 9}}"#
            )
        };
        let raw = format!(
            r#"{{"cluster": "balance", "routes": [
                {{"name": "a", "exact": "/a", "usage": {}}},
                {{"name": "b", "exact": "/b", "usage": {}}},
                {{"name": "c", "exact": "/c", "usage": {}}},
                {{"name": "d", "exact": "/d", "usage": {}}},
                {{"name": "e", "exact": "/e", "usage": {{"input_pointer": "/usage/prompt_tokens", "input_unit_cost": 1,
                  "output_pointer": "/usage/completion_tokens", "output_unit_cost": 3, "estimate": 9}}}}
            ]}}"#,
            table("openai_chat"),
            table("openai_responses"),
            table("openai_embeddings"),
            table("anthropic_messages")
        );
        Config::parse(raw.as_bytes()).expect("the fuzz config is valid")
    })
}

fuzz_target!(|input: Input| {
    let routes = &config().pricing.routes;
    let Some(spec) = routes
        .get(usize::from(input.route) % routes.len())
        .and_then(|r| r.usage.clone())
    else {
        return;
    };
    let kind = if input.stream {
        BodyKind::EventStream
    } else {
        BodyKind::Json
    };
    let meter = || Meter::for_model(kind, spec.clone(), LIMIT, input.model.clone());
    let mut whole = meter();
    whole.feed(&input.body);
    let want = whole.finish();

    let mut chunked = meter();
    let mut rest = input.body.as_slice();
    let mut cuts = input.cuts.iter().cycle();
    while !rest.is_empty() {
        let n = usize::from(*cuts.next().unwrap_or(&0))
            .max(1)
            .min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        chunked.feed(chunk);
        assert!(
            chunked.kept() <= LIMIT + 1,
            "the meter keeps {} bytes",
            chunked.kept()
        );
        rest = tail;
    }
    assert_eq!(chunked.finish(), want, "the chunking changed the total");
});
