#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! Native regression tests for what fuzzing (fuzz/, `make fuzz`) and the hardening review
//! found, calling the filter's pure modules directly. Also the native half of claims made in
//! docs/security.md (the credential is in no shared-data key or value; a cache entry is
//! served to its own credential and configuration only).

use farebox::balance_api::{parse_authorize, parse_max_age, parse_retry_after, CalloutResponse};
use farebox::cache::{self, CacheKey, Entry, Lookup};
use farebox::config::Config;
use farebox::decision::Decision;
use farebox::lease::{self, LeaseRecord, Step};
use farebox::pricing::normalize_path;

const CREDENTIAL: &str = "fbk-regression-5e3c7a";

fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> CalloutResponse {
    CalloutResponse {
        status: Some(status),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: body.as_bytes().to_vec(),
        body_too_large: false,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// Found by fuzz/shared_data: a lease record that is already over (used > granted, which only
// corrupt shared data can hold) is spent from only for a cost of 0.
// ---------------------------------------------------------------------------------------

#[test]
fn over_used_lease_record_is_never_spent_from() {
    let corrupt = LeaseRecord {
        lease_id: "\0\0".into(),
        account_id: "+".into(),
        granted: 144_115_188_075_855_625,
        used: 18_446_742_991_394_570_240,
        reported: u64::MAX,
        spend_until_ms: 18_446_744_073_695_789_055,
        renewing_until_ms: 4_294_967_295,
        settle_seq: u64::MAX,
        balance: None,
        ..LeaseRecord::default()
    };
    let now = 1_800_000_000_000;
    // Cost 0: harmless (nothing is spent), which is what the fuzzer flagged.
    match lease::step(corrupt.owner, Some(&corrupt), 0, now, 1000, true) {
        Step::Spend { record, .. } => assert_eq!(record.used, corrupt.used),
        other => panic!("{other:?}"),
    }
    // Any real cost: not spent; the request asks for a new lease (or waits for one).
    for cost in [1, 5, u64::MAX] {
        assert!(
            !matches!(
                lease::step(corrupt.owner, Some(&corrupt), cost, now, 1000, true),
                Step::Spend { .. }
            ),
            "cost {cost}"
        );
    }
    // A settle seq at its maximum stays there rather than overflow.
    assert_eq!(
        lease::next_seq(&corrupt, "\0\0").map(|r| r.settle_seq),
        Some(u64::MAX)
    );
    // And the record round-trips through its shared-data encoding.
    assert_eq!(LeaseRecord::decode(&corrupt.encode()), Some(corrupt));
}

/// Found by fuzz/shared_data: a 402 whose only payment field is `"resource": {}` is cacheable
/// (its offer has no `accepts` and no `challenges`), and comes back from the cache without
/// the `resource`. Nothing a client sees changes: the resource only decorates `accepts`.
#[test]
fn cached_402_with_a_bare_resource_renders_the_same() {
    let resp = answer(
        402,
        &[("cache-control", "max-age=60")],
        r#"{"resource": {}}"#,
    );
    let v = parse_authorize(&resp, 5_851_007_520_395_657, 300).unwrap();
    assert!(v.decision.cacheable());
    let key = CacheKey::new(&[7; 32], "default", 1, CREDENTIAL);
    let entry = Entry {
        decision: v.decision.clone(),
        expires_at_ms: 2_546_118_879_921_414_561,
    };
    let back = cache::decode(&key, &cache::encode(&key, &entry)).unwrap();
    match (&back.decision, &v.decision) {
        (Decision::Deny(cached), Decision::Deny(fresh)) => {
            assert_eq!(
                (
                    cached.balance,
                    cached.price,
                    &cached.detail,
                    cached.retry_after_s
                ),
                (
                    fresh.balance,
                    fresh.price,
                    &fresh.detail,
                    fresh.retry_after_s
                )
            );
            assert_eq!(cached.price, 5_851_007_520_395_657);
            assert!(cached.offer.is_empty() && fresh.offer.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Claims of docs/security.md, natively
// ---------------------------------------------------------------------------------------

/// The credential is hashed into every shared-data key and never stored in a value.
#[test]
fn credential_is_in_no_shared_data_key_or_value() {
    let cfg = Config::parse(br#"{"cluster": "balance"}"#).unwrap();
    let key = CacheKey::new(&cfg.fingerprint, "default", 1, CREDENTIAL);
    for entries in [1, 10_000, 10_000_000] {
        assert!(!key.slot_key(entries).contains(CREDENTIAL));
    }
    let verdicts = [
        answer(
            200,
            &[],
            r#"{"allow": true, "account_id": "acct_x", "balance": 3}"#,
        ),
        answer(
            402,
            &[("cache-control", "max-age=60")],
            r#"{"balance": 0, "price": 1, "detail": "top up"}"#,
        ),
        answer(401, &[], "{}"),
        answer(403, &[], "{}"),
        answer(429, &[("retry-after", "7")], "{}"),
    ];
    for resp in &verdicts {
        let v = parse_authorize(resp, 1, 300).unwrap();
        let bytes = cache::encode(
            &key,
            &Entry {
                decision: v.decision,
                expires_at_ms: 1,
            },
        );
        assert!(!contains(&bytes, CREDENTIAL.as_bytes()), "{bytes:?}");
    }
    let lease_key = lease::LeaseKey::new("balance", CREDENTIAL).slot_key(16_384);
    assert!(!lease_key.contains(CREDENTIAL), "{lease_key}");
}

/// An entry is served only to the (configuration, route, cost, credential) it was made for.
#[test]
fn cache_entry_is_served_to_its_own_key_only() {
    let a = Config::parse(br#"{"cluster": "balance"}"#).unwrap();
    let b = Config::parse(br#"{"cluster": "balance", "default_cost": 2}"#).unwrap();
    assert_ne!(a.fingerprint, b.fingerprint);
    let mine = CacheKey::new(&a.fingerprint, "default", 1, CREDENTIAL);
    let entry = Entry {
        decision: Decision::allow("acct_x", Some(1)),
        expires_at_ms: 2_000,
    };
    let bytes = cache::encode(&mine, &entry);
    assert_eq!(cache::decode(&mine, &bytes), Some(entry.clone()));
    assert!(matches!(
        cache::lookup(&mine, &bytes, 1_999),
        Lookup::Fresh(_)
    ));
    assert_eq!(cache::lookup(&mine, &bytes, 2_000), Lookup::Expired);
    for other in [
        CacheKey::new(&b.fingerprint, "default", 1, CREDENTIAL),
        CacheKey::new(&a.fingerprint, "other", 1, CREDENTIAL),
        CacheKey::new(&a.fingerprint, "default", 2, CREDENTIAL),
        CacheKey::new(&a.fingerprint, "default", 1, "fbk-regression-5e3c7b"),
        CacheKey::new(&a.fingerprint, "defaul", 1, &format!("t{CREDENTIAL}")),
    ] {
        assert_eq!(cache::decode(&other, &bytes), None);
        assert_eq!(cache::lookup(&other, &bytes, 0), Lookup::Miss);
    }
}

/// Hints from the service: a cache lifetime is capped, garbage means "do not cache", a
/// Retry-After that is not delta-seconds is dropped (the e2e fault matrix shows the same
/// through Envoy: tests/faults.rs, odd_decisions_*).
#[test]
fn service_hints_are_capped_or_dropped() {
    assert_eq!(parse_max_age(b"max-age=31536000", 300), Some(300));
    assert_eq!(
        parse_max_age(b"public, max-age=99999999999999999999999", 300),
        Some(300)
    );
    assert_eq!(parse_max_age(b"max-age=banana", 300), None);
    assert_eq!(parse_max_age(b"max-age=-5", 300), None);
    assert_eq!(parse_max_age(b"max-age=60, no-store", 300), None);
    assert_eq!(parse_max_age(b"\xff\xfe", 300), None);
    assert_eq!(parse_retry_after(b"soon"), None);
    assert_eq!(parse_retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT"), None);
    assert_eq!(parse_retry_after(b"9999999999"), None);
    assert_eq!(parse_retry_after(b" 30 "), Some(30));
}

// ---------------------------------------------------------------------------------------
// The path bugs tests/hostile.rs found in Envoy, at their root (fixed; kept as regressions)
// ---------------------------------------------------------------------------------------

/// `%2F` is data, not a separator: `..` is never resolved across it, so a path that Envoy
/// forwards undecoded (its default KEEP_UNCHANGED for escaped slashes) is not priced as
/// another one. See tests/hostile.rs::escaped_slashes_kept_by_envoy_do_not_make_priced_paths_free.
#[test]
fn normalize_path_never_resolves_dots_across_an_encoded_slash() {
    let priced_as = normalize_path("/v1/priced%2F..%2F..%2Fpublic%2Fx");
    assert!(
        priced_as.starts_with("/v1/priced"),
        "the upstream receives /v1/priced%2F..., the filter prices {priced_as:?}"
    );
}

/// Dot segments are resolved as RFC 3986 (and Envoy) do, an empty segment counting as one:
/// `/v1/models/m1/infer//..` is `/v1/models/m1/infer/`, not `/v1/models/m1/` (which the
/// filter used to price at the default price).
#[test]
fn normalize_path_resolves_dot_segments_like_rfc3986() {
    assert_eq!(
        normalize_path("/v1/models/m1/infer//.."),
        "/v1/models/m1/infer/"
    );
}

/// What is fine today and must stay so: the tricks Envoy's own normalization leaves to the
/// filter never make a priced path free.
#[test]
fn normalize_path_keeps_priced_paths_priced() {
    for (raw, want) in [
        ("/public/%2e%2e/v1/priced", "/v1/priced"),
        ("/public/.%2E/v1/priced", "/v1/priced"),
        ("/v1/priced?x=/public/", "/v1/priced"),
        ("/v1/priced#/public/", "/v1/priced"),
        ("/public/../../../v1/priced", "/v1/priced"),
        ("/v1/priced/..", "/v1/"),
        ("", "/"),
        ("%", "/%"),
        ("/%zz/%4", "/%zz/%4"),
    ] {
        assert_eq!(normalize_path(raw), want, "{raw:?}");
    }
}
