//! The shared-data encodings: decision cache entries (`cache::encode`/`decode`/`lookup`) and
//! lease records (`LeaseRecord::encode`/`decode`), on arbitrary bytes and as round trips of
//! structured values. Also the lease state machine (`lease::step`) on any record.
#![no_main]

use arbitrary::Arbitrary;
use farebox::balance_api::parse_authorize;
use farebox::cache::{self, CacheKey, Entry, Lookup};
use farebox::decision::Decision;
use farebox::lease::{self, LeaseRecord, Step};
use fuzz_support::Answer;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Record {
    lease_id: String,
    account_id: String,
    granted: u64,
    used: u64,
    reported: u64,
    spend_until_ms: u64,
    renewing_until_ms: u64,
    balance: Option<i64>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    fingerprint: [u8; 32],
    route: String,
    cost: u64,
    credential: String,
    other_credential: String,
    stored: Vec<u8>,
    now_ms: u64,
    expires_at_ms: u64,
    answer: Answer,
    record: Record,
    lease_cost: u64,
    lock_ms: u64,
}

/// What a decision shows the client. An offer without `accepts` or `challenges` is never
/// rendered (its `resource` only decorates `accepts`), and the cache does not keep it.
/// (Found by this target: a 402 carrying only `"resource": {}` came back from the cache
/// without it, which no client can see.)
fn observable(d: &Decision) -> Decision {
    let mut d = d.clone();
    if let Decision::Deny(denial) = &mut d {
        if denial.offer.is_empty() {
            denial.offer = Default::default();
        }
    }
    d
}

fuzz_target!(|input: Input| {
    let key = CacheKey::new(
        &input.fingerprint,
        &input.route,
        input.cost,
        &input.credential,
    );
    let other = CacheKey::new(
        &input.fingerprint,
        &input.route,
        input.cost,
        &input.other_credential,
    );

    // Arbitrary bytes: never a panic; whatever decodes is canonical.
    let decoded = cache::decode(&key, &input.stored);
    if let Some(entry) = &decoded {
        assert_eq!(
            cache::encode(&key, entry),
            input.stored,
            "non-canonical cache entry"
        );
    }
    let _ = cache::lookup(&key, &input.stored, input.now_ms);
    let _ = key.slot_key(1 + (input.cost % 10_000_000) as u32);

    // A decision the service can give, and that the filter would cache, survives the cache,
    // for its key only. (Decisions about one payment are never cached: `cacheable()`.)
    let verdict = parse_authorize(&input.answer.response(), input.cost % (1 << 53), 300);
    if let Some(verdict) = verdict.ok().filter(|v| v.decision.cacheable()) {
        let entry = Entry {
            decision: verdict.decision,
            expires_at_ms: input.expires_at_ms,
        };
        let bytes = cache::encode(&key, &entry);
        let decoded = cache::decode(&key, &bytes).expect("own entry decodes");
        assert_eq!(
            observable(&decoded.decision),
            observable(&entry.decision),
            "cache round trip"
        );
        assert_eq!(decoded.expires_at_ms, entry.expires_at_ms);
        if input.other_credential != input.credential {
            assert_eq!(
                cache::decode(&other, &bytes),
                None,
                "served to another credential"
            );
        }
        match cache::lookup(&key, &bytes, input.now_ms) {
            Lookup::Fresh(e) => {
                assert!(input.expires_at_ms > input.now_ms);
                assert!(
                    u64::from(e.remaining_s(input.now_ms))
                        <= (input.expires_at_ms - input.now_ms) / 1000
                );
            }
            Lookup::Expired => assert!(input.expires_at_ms <= input.now_ms),
            Lookup::Miss => panic!("own entry missed"),
        }
    }

    // Lease records: arbitrary bytes decode canonically; structured records round-trip.
    if let Some(r) = LeaseRecord::decode(&input.stored) {
        assert_eq!(r.encode(), input.stored, "non-canonical lease record");
    }
    let r = &input.record;
    let record = LeaseRecord {
        lease_id: r.lease_id.clone(),
        account_id: r.account_id.clone(),
        granted: r.granted,
        used: r.used,
        reported: r.reported,
        spend_until_ms: r.spend_until_ms,
        renewing_until_ms: r.renewing_until_ms,
        settle_seq: r.reported,
        ahead_not_before_ms: r.spend_until_ms,
        balance: r.balance,
        ..LeaseRecord::default()
    };
    assert_eq!(
        LeaseRecord::decode(&record.encode()),
        Some(record.clone()),
        "lease round trip"
    );

    // The state machine never spends what the lease does not hold.
    match lease::step(
        record.owner,
        Some(&record),
        input.lease_cost,
        input.now_ms,
        input.lock_ms,
        true,
    ) {
        Step::Spend { record: next, .. } => {
            assert!(record.has_lease() && input.now_ms < record.spend_until_ms);
            assert_eq!(next.used, record.used + input.lease_cost);
            // (A record that is already over, used > granted, can only come from corrupt
            // shared data; spending 0 from it is harmless, spending more is refused.)
            if input.lease_cost > 0 || record.used <= record.granted {
                assert!(next.used <= next.granted, "overspent: {next:?}");
            }
            assert_eq!(next.lease_id, record.lease_id);
        }
        Step::Lock { record: next } => {
            assert!(record.renewing_until_ms <= input.now_ms);
            assert_eq!(
                next.renewing_until_ms,
                input.now_ms.saturating_add(input.lock_ms)
            );
            assert_eq!(next.used, record.used);
        }
        Step::Wait => assert!(record.renewing_until_ms > input.now_ms),
    }
    if let Some(next) = lease::refund(&record, &record.lease_id, input.lease_cost) {
        assert_eq!(next.used, record.used - input.lease_cost);
    }
});
