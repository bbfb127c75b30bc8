//! Route matching and identity on arbitrary requests: `normalize_path`, `readings` and
//! `Pricing::price_request` (the dearest reading of the raw path) for any path and method,
//! and credential extraction from any header bytes and query.
//! Properties: never panics; a normalized path is canonical; the price is one of the
//! configured ones and no reading of the path is dearer; free only under a free rule; an
//! accepted credential is a token.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use farebox::config::Config;
use farebox::identity::{CredentialSource, MAX_CREDENTIAL_LEN};
use farebox::uri::{normalize_path, readings};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    method: String,
    path: String,
    header: Vec<u8>,
    authorization: Vec<u8>,
}

fn config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| {
        Config::parse(
            br#"{"cluster": "balance", "default_cost": 1, "routes": [
                {"name": "health", "exact": "/health", "cost": 0},
                {"name": "public", "prefix": "/public/", "cost": 0},
                {"name": "infer", "methods": ["POST"], "glob": "/v1/models/*/infer", "cost": 5},
                {"name": "priced", "prefix": "/v1/priced", "cost": 3},
                {"name": "deep", "glob": "/a/*/b/*/c/", "cost": 7}
            ]}"#,
        )
        .expect("the fuzz config is valid")
    })
}

fn is_token(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= MAX_CREDENTIAL_LEN
        && c.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

fuzz_target!(|input: Input| {
    let path = normalize_path(&input.path);
    assert!(path.starts_with('/'), "{path:?}");
    let inner = path.strip_suffix('/').unwrap_or(&path);
    for seg in inner.split('/').skip(1) {
        assert!(
            !seg.is_empty(),
            "empty segment in {path:?} (from {:?})",
            input.path
        );
        assert!(
            seg != "." && seg != "..",
            "dot segment in {path:?} (from {:?})",
            input.path
        );
    }
    // A path without escapes, query or fragment normalizes to itself once canonical.
    if !path.contains(['%', '?', '#']) {
        assert_eq!(normalize_path(&path), path, "not idempotent");
    }

    let cfg = config();
    let (price, normalized) = cfg.pricing.price_request(&input.method, &input.path);
    assert_eq!(normalized, path);
    assert!([0, 1, 3, 5, 7].contains(&price.cost), "{price:?}");
    let all = readings(&input.path);
    assert_eq!(
        all.first(),
        Some(&path),
        "the normalized reading comes first"
    );
    for reading in &all {
        let p = cfg.pricing.price(&input.method, reading);
        assert!(
            p.cost <= price.cost,
            "{:?}: reading {reading:?} costs {} > the price {}",
            input.path,
            p.cost,
            price.cost
        );
    }
    if price.cost == 0 {
        assert!(
            path == "/health" || path.starts_with("/public/"),
            "free: {path:?}"
        );
    }
    if all.iter().any(|r| r.starts_with("/v1/priced")) {
        assert!(price.cost >= 3, "{:?} priced as {price:?}", input.path);
    }

    let header = |want: &str| {
        if want == "x-api-key" {
            Some(input.header.clone())
        } else if want == "authorization" {
            Some(input.authorization.clone())
        } else {
            None
        }
    };
    for source in [
        CredentialSource::Header("x-api-key".into()),
        CredentialSource::Bearer,
        CredentialSource::Query("api_key".into()),
    ] {
        if let Ok(c) = source.extract(header, &input.path) {
            assert!(is_token(&c), "{source:?} accepted {c:?}");
        }
    }
});
