//! Plugin configuration parsing and validation (`Config::parse`) on arbitrary bytes.
//! Properties: never panics; parsing is deterministic; an accepted config is within its
//! documented bounds and can price any request.
#![no_main]

use farebox::amount::MAX_AMOUNT;
use farebox::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cfg) = Config::parse(data) else {
        // A refusal names a field (`(root)` for the document) and a reason.
        let e = Config::parse(data).expect_err("parse is deterministic");
        assert!(!e.field.is_empty() && !e.reason.is_empty(), "{e:?}");
        return;
    };
    assert_eq!(
        Config::parse(data).ok().as_ref(),
        Some(&cfg),
        "parse is deterministic"
    );
    let ms = cfg.timeout.as_millis();
    assert!((1..=60_000).contains(&ms), "timeout {ms}");
    assert!(!cfg.cluster.is_empty());
    assert!(cfg.cache_max_ttl_s <= 86_400);
    assert!(cfg.pricing.default_cost <= MAX_AMOUNT);
    for route in &cfg.pricing.routes {
        assert!(route.cost <= MAX_AMOUNT, "{route:?}");
        assert!(
            !route.name.is_empty() && route.name.len() <= 64,
            "{route:?}"
        );
    }
    for (method, path) in [
        ("GET", "/"),
        ("POST", "/v1/models/m/infer"),
        ("get", "/docs/a/../../v1//x?q=1#f"),
        ("DELETE", "/%2e%2e/%2F/a"),
    ] {
        let (price, _) = cfg.pricing.price_request(method, path);
        assert!(price.cost <= MAX_AMOUNT);
        assert!(!price.route.is_empty());
    }
});
