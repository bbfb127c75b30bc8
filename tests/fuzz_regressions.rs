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
use farebox::uri::normalize_path;

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
// Found by fuzz/shared_data: lease units are spent only while the lease covers the whole
// cost, also from a record corrupt shared data holds over its grant.
// ---------------------------------------------------------------------------------------

#[test]
fn lease_is_spent_only_within_its_grant_and_time() {
    let now = 1_800_000_000_000;
    let record = |granted: u64, used: u64| LeaseRecord {
        lease_id: "ls_regression".into(),
        account_id: "acct_regression".into(),
        granted,
        used,
        reported: 0,
        spend_until_ms: now + 60_000,
        renewing_until_ms: 0,
        balance: None,
        ..LeaseRecord::default()
    };
    // The last units of a lease are spent, exactly.
    let owner = [7u8; 16];
    let record = |granted: u64, used: u64| LeaseRecord {
        owner,
        ..record(granted, used)
    };
    match lease::step(owner, Some(&record(10, 7)), 3, now, 1000, true) {
        Step::Spend { record, .. } => assert_eq!(record.used, 10),
        other => panic!("the last 3 of 10 units: {other:?}"),
    }
    // One unit more than is left, a used-up lease, and (the fuzzer's find) a corrupt
    // record already over its grant: nothing is spent; the request needs a new lease.
    for (granted, used, cost) in [
        (10, 7, 4),
        (10, 10, 1),
        (10, 0, u64::MAX),
        (144_115_188_075_855_625, 18_446_742_991_394_570_240, 1),
    ] {
        let step = lease::step(owner, Some(&record(granted, used)), cost, now, 1000, true);
        assert!(
            !matches!(step, Step::Spend { .. }),
            "granted {granted}, used {used}, cost {cost}: {step:?}"
        );
    }
    // At its spend deadline a lease is not spent from, whatever is left.
    let expired = LeaseRecord {
        spend_until_ms: now,
        ..record(10, 0)
    };
    let step = lease::step(owner, Some(&expired), 1, now, 1000, true);
    assert!(!matches!(step, Step::Spend { .. }), "{step:?}");
    // Another account's live lease in the slot is not this account's to spend from.
    let other = lease::LeaseKey::new("balance", "another-credential");
    let stored = record(10, 0).encode();
    assert!(matches!(
        lease::view(&other, Some(&stored), now),
        lease::View::Occupied
    ));
    // A corrupt record round-trips through its shared-data encoding unchanged, and a
    // settle seq at its maximum stays there rather than overflow.
    let corrupt = LeaseRecord {
        settle_seq: u64::MAX,
        ..record(1, u64::MAX)
    };
    assert_eq!(
        lease::next_seq(&corrupt, "ls_regression").map(|r| r.settle_seq),
        Some(u64::MAX)
    );
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
    // A slot key is a number below the cache size (it cannot hold a credential), derived
    // from the credential's hash: different credentials spread over the slots.
    let slots: std::collections::BTreeSet<String> = (0..100)
        .map(|i| CacheKey::new(&cfg.fingerprint, "default", 1, &format!("{CREDENTIAL}-{i}")))
        .map(|k| k.slot_key(10_000_000))
        .collect();
    assert!(slots.len() > 90, "100 credentials in {} slots", slots.len());
    // A lease key is hex: a credential of hex digits would show through if it embedded one.
    let hex = "deadbeef0042c0ffee";
    let key = CacheKey::new(&cfg.fingerprint, "default", 1, CREDENTIAL);
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
    // A lease slot key is a number below the table size, derived from the credential's
    // hash: different credentials spread over the slots; the owner tag separates clusters.
    let lease_slots: std::collections::BTreeSet<String> = (0..100)
        .map(|i| lease::LeaseKey::new("balance", &format!("{CREDENTIAL}-{i}")).slot_key(10_000_000))
        .collect();
    assert!(
        lease_slots.len() > 90,
        "100 credentials in {} lease slots",
        lease_slots.len()
    );
    let lease_key = lease::LeaseKey::new("balance", hex);
    assert!(!lease_key.slot_key(16_384).contains(hex));
    assert_ne!(
        lease_key.owner(),
        lease::LeaseKey::new("balance", "deadbeef0042c0ffef").owner()
    );
    assert_ne!(
        lease_key.owner(),
        lease::LeaseKey::new("balanc", &format!("e{hex}")).owner()
    );
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
