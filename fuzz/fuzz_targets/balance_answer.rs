//! The balance service's answers (`parse_authorize`, `parse_lease`) built from the fuzz
//! input: any status, headers and body (raw bytes, or JSON of any shape, or JSON cut short).
//! Properties: never panics, and whatever is accepted is within the contract's bounds.
#![no_main]

use arbitrary::Arbitrary;
use farebox::balance_api::{
    parse_authorize, parse_lease, parse_max_age, parse_retry_after, LeaseAnswer,
};
use farebox::amount::MAX_AMOUNT;
use farebox::decision::Decision;
use fuzz_support::{visible_ascii, Answer};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    answer: Answer,
    cost: u64,
    max_ttl_s: u32,
    raw_header: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let resp = input.answer.response();
    let cost = input.cost % (MAX_AMOUNT + 1);
    let max_ttl = input.max_ttl_s % 86_401;

    // Header parsers on their own.
    if let Some(age) = parse_max_age(&input.raw_header, max_ttl) {
        assert!(age > 0 && age <= max_ttl, "max-age {age} > cap {max_ttl}");
    }
    if let Some(s) = parse_retry_after(&input.raw_header) {
        assert!(s <= 999_999_999);
    }

    match parse_authorize(&resp, cost, max_ttl) {
        Ok(verdict) => {
            let status = resp.status.expect("a decision needs a status");
            assert!(!resp.body_too_large, "an oversized answer must be refused");
            if let Some(age) = verdict.max_age_s {
                assert!(age > 0 && age <= max_ttl, "max-age {age} > cap {max_ttl}");
            }
            match &verdict.decision {
                Decision::Allow { account_id, .. } => {
                    assert_eq!(status, 200);
                    assert!(visible_ascii(account_id, 256), "account id {account_id:?}");
                }
                Decision::Deny(d) => {
                    assert_eq!(status, 402);
                    assert!(d.price <= MAX_AMOUNT, "price {}", d.price);
                    assert!(d.detail.chars().count() <= 512);
                }
                Decision::Unauthenticated => assert_eq!(status, 401),
                Decision::Forbidden => assert_eq!(status, 403),
                Decision::RateLimited { .. } => assert_eq!(status, 429),
                #[allow(unreachable_patterns)]
                _ => {}
            }
        }
        Err(_) => {}
    }

    let min = cost.max(1);
    match parse_lease(&resp, min, max_ttl) {
        Ok(LeaseAnswer::Granted(g)) => {
            assert_eq!(resp.status, Some(200));
            assert!(
                g.granted >= min && g.granted <= MAX_AMOUNT,
                "granted {} (min {min})",
                g.granted
            );
            assert!(
                (1..=86_400_000).contains(&g.expires_in_ms),
                "{}",
                g.expires_in_ms
            );
            assert!(
                !g.lease_id.is_empty()
                    && g.lease_id.len() <= 128
                    && g.lease_id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b)),
                "lease id {:?}",
                g.lease_id
            );
            assert!(visible_ascii(&g.account_id, 256));
        }
        Ok(LeaseAnswer::Decided(v)) => {
            assert_ne!(
                resp.status,
                Some(200),
                "a 200 lease answer is a grant or a failure"
            );
            if let Decision::Allow { .. } = v.decision {
                panic!("a lease call never allows without a grant");
            }
        }
        Ok(LeaseAnswer::Recall {
            verdict,
            retry_after_ms,
        }) => {
            assert_eq!(resp.status, Some(402), "only a 402 recalls");
            assert!(matches!(verdict.decision, Decision::Deny(_)));
            assert_eq!(verdict.max_age_s, None, "a recall is never cached");
            assert!((10..=1_000).contains(&retry_after_ms), "{retry_after_ms}");
        }
        Err(_) => {}
    }
});
