//! The decision cache in proxy-wasm shared data (one map per Envoy process,
//! shared by every worker).
//!
//! Shared data never evicts, so the cache is a fixed table of
//! `max_entries` slots: a key hashes to one slot, and a newer decision simply
//! takes the slot over. Memory is therefore bounded by the slot count whatever
//! the traffic. Each entry carries 128 bits of its own key digest and is only
//! served when they match, so a decision is never served to another account
//! (or route, or configuration) that happens to share the slot.

use crate::decision::{Decision, Denial};
use sha2::{Digest, Sha256};

// 2: a refusal carries the account the service named.
const FORMAT_VERSION: u8 = 2;
const KEY_PREFIX: &str = "farebox:d1:";

/// Digest of (configuration, route, cost, credential). The credential itself is never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    pub fn new(fingerprint: &[u8; 32], route: &str, cost: u64, credential: &str) -> CacheKey {
        let mut h = Sha256::new();
        // Lengths keep the parts apart: ("ab","c") and ("a","bc") hash differently.
        h.update(fingerprint);
        h.update((route.len() as u64).to_le_bytes());
        h.update(route);
        h.update(cost.to_le_bytes());
        h.update(credential);
        CacheKey(h.finalize().into())
    }

    fn slot(&self, max_entries: u32) -> u64 {
        let mut n = [0u8; 8];
        n.copy_from_slice(self.0.get(..8).unwrap_or(&[0; 8]));
        u64::from_le_bytes(n) % u64::from(max_entries.max(1))
    }

    fn check(&self) -> &[u8] {
        self.0.get(8..24).unwrap_or(&[])
    }

    /// The shared-data key of the slot this key lives in.
    pub fn slot_key(&self, max_entries: u32) -> String {
        format!("{KEY_PREFIX}{}", self.slot(max_entries))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub decision: Decision,
    pub expires_at_ms: u64,
}

impl Entry {
    /// Whole seconds of life left, for `Cache-Control: max-age` on what we serve from it.
    pub fn remaining_s(&self, now_ms: u64) -> u32 {
        u32::try_from(self.expires_at_ms.saturating_sub(now_ms) / 1000).unwrap_or(u32::MAX)
    }
}

/// What a slot holds for a key right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Fresh(Entry),
    /// Our entry, but past its life: the slot should be cleared.
    Expired,
    /// Empty, another key's entry, or unreadable (written by another version).
    Miss,
}

pub fn lookup(key: &CacheKey, stored: &[u8], now_ms: u64) -> Lookup {
    match decode(key, stored) {
        Some(e) if e.expires_at_ms > now_ms => Lookup::Fresh(e),
        Some(_) => Lookup::Expired,
        None => Lookup::Miss,
    }
}

const ALLOW: u8 = 0;
const DENY: u8 = 1;
const UNAUTHENTICATED: u8 = 2;
const FORBIDDEN: u8 = 3;
const RATE_LIMITED: u8 = 4;

pub fn encode(key: &CacheKey, entry: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(key.check());
    out.extend_from_slice(&entry.expires_at_ms.to_le_bytes());
    match &entry.decision {
        Decision::Allow {
            account_id,
            balance,
            ..
        } => {
            out.push(ALLOW);
            put_opt_i64(&mut out, *balance);
            put_str(&mut out, account_id);
        }
        Decision::Deny(d) => {
            out.push(DENY);
            put_opt_i64(&mut out, d.balance);
            out.extend_from_slice(&d.price.to_le_bytes());
            put_opt_u32(&mut out, d.retry_after_s);
            put_str(&mut out, &d.detail);
            put_str(&mut out, d.account_id.as_deref().unwrap_or_default());
        }
        Decision::Unauthenticated => out.push(UNAUTHENTICATED),
        Decision::Forbidden => out.push(FORBIDDEN),
        Decision::RateLimited { retry_after_s } => {
            out.push(RATE_LIMITED);
            put_opt_u32(&mut out, *retry_after_s);
        }
    }
    out
}

/// `None` for anything but a well-formed entry of this key: bytes in shared data
/// may come from an older build or another plugin, and are never trusted blindly.
pub fn decode(key: &CacheKey, bytes: &[u8]) -> Option<Entry> {
    let mut r = Reader(bytes);
    if r.u8()? != FORMAT_VERSION || r.take(16)? != key.check() {
        return None;
    }
    let expires_at_ms = r.u64()?;
    let decision = match r.u8()? {
        ALLOW => {
            let balance = r.opt_i64()?;
            // The budget is not kept: a cached decision shows neither it nor the
            // balance again.
            Decision::Allow {
                account_id: r.string()?,
                balance,
                budget: None,
                paid: None,
            }
        }
        DENY => {
            let balance = r.opt_i64()?;
            let price = r.u64()?;
            let retry_after_s = r.opt_u32()?;
            Decision::Deny(Denial {
                balance,
                price,
                retry_after_s,
                detail: r.string()?,
                offer: Default::default(),
                account_id: Some(r.string()?).filter(|a| !a.is_empty()),
                problem: None,
            })
        }
        UNAUTHENTICATED => Decision::Unauthenticated,
        FORBIDDEN => Decision::Forbidden,
        RATE_LIMITED => Decision::RateLimited {
            retry_after_s: r.opt_u32()?,
        },
        _ => return None,
    };
    if !r.0.is_empty() {
        return None;
    }
    Some(Entry {
        decision,
        expires_at_ms,
    })
}

fn put_opt_i64(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_le_bytes());
        }
        None => out.push(0),
    }
}

fn put_opt_u32(out: &mut Vec<u8>, v: Option<u32>) {
    match v {
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_le_bytes());
        }
        None => out.push(0),
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Strings we store (account ids, details) are capped far below 64 KiB when parsed.
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes().get(..usize::from(len)).unwrap_or(&[]));
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.array()?))
    }
    fn opt_i64(&mut self) -> Option<Option<i64>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(i64::from_le_bytes(self.array()?))),
            _ => None,
        }
    }
    fn opt_u32(&mut self) -> Option<Option<u32>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(u32::from_le_bytes(self.array()?))),
            _ => None,
        }
    }
    fn string(&mut self) -> Option<String> {
        let len = u16::from_le_bytes(self.array()?);
        String::from_utf8(self.take(usize::from(len))?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: [u8; 32] = [7; 32];

    fn all_decisions() -> Vec<Decision> {
        vec![
            Decision::Allow {
                account_id: "acct_a".into(),
                balance: Some(-3),
                budget: None,
                paid: None,
            },
            Decision::Allow {
                account_id: "a".into(),
                balance: None,
                budget: None,
                paid: None,
            },
            Decision::Deny(Denial {
                balance: Some(2),
                price: 5,
                detail: "top up".into(),
                retry_after_s: Some(9),
                offer: Default::default(),
                account_id: Some("acct_d".into()),
                problem: None,
            }),
            Decision::Deny(Denial {
                balance: None,
                price: u64::MAX,
                detail: String::new(),
                retry_after_s: None,
                offer: Default::default(),
                account_id: None,
                problem: None,
            }),
            Decision::Unauthenticated,
            Decision::Forbidden,
            Decision::RateLimited {
                retry_after_s: Some(1),
            },
            Decision::RateLimited {
                retry_after_s: None,
            },
        ]
    }

    #[test]
    fn round_trip() {
        let key = CacheKey::new(&FP, "infer", 5, "key-1");
        for decision in all_decisions() {
            let entry = Entry {
                decision,
                expires_at_ms: 1_000_000,
            };
            let bytes = encode(&key, &entry);
            assert_eq!(decode(&key, &bytes), Some(entry.clone()));
            assert_eq!(lookup(&key, &bytes, 999_999), Lookup::Fresh(entry.clone()));
            assert_eq!(lookup(&key, &bytes, 1_000_000), Lookup::Expired);
            // Every strict prefix and any trailing byte is rejected, never misread.
            for cut in 0..bytes.len() {
                assert_eq!(decode(&key, &bytes[..cut]), None, "cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(decode(&key, &longer), None);
        }
    }

    #[test]
    fn another_key_never_reads_an_entry() {
        let alice = CacheKey::new(&FP, "infer", 5, "alice-key");
        let entry = Entry {
            decision: all_decisions()[0].clone(),
            expires_at_ms: u64::MAX,
        };
        let bytes = encode(&alice, &entry);
        for other in [
            CacheKey::new(&FP, "infer", 5, "mallory-key"),
            CacheKey::new(&FP, "other", 5, "alice-key"),
            CacheKey::new(&FP, "infer", 6, "alice-key"),
            CacheKey::new(&[8; 32], "infer", 5, "alice-key"),
            // Moving bytes between the parts changes the key.
            CacheKey::new(&FP, "infe", 5, "ralice-key"),
        ] {
            assert_ne!(other, alice);
            assert_eq!(lookup(&other, &bytes, 0), Lookup::Miss);
        }
    }

    #[test]
    fn slots_are_bounded_and_spread() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..2000 {
            let key = CacheKey::new(&FP, "r", 1, &format!("k{i}"));
            let slot = key.slot(64);
            assert!(slot < 64);
            seen.insert(slot);
            assert!(key.slot_key(64).starts_with(KEY_PREFIX));
        }
        assert_eq!(
            seen.len(),
            64,
            "2000 keys should touch every one of 64 slots"
        );
        assert_eq!(CacheKey::new(&FP, "r", 1, "k").slot(0), 0);
    }

    #[test]
    fn garbage_is_a_miss() {
        let key = CacheKey::new(&FP, "r", 1, "k");
        assert_eq!(lookup(&key, b"", 0), Lookup::Miss);
        assert_eq!(lookup(&key, b"\x02garbage", 0), Lookup::Miss);
        let mut bytes = encode(
            &key,
            &Entry {
                decision: Decision::Forbidden,
                expires_at_ms: 5,
            },
        );
        let kind = 1 + 16 + 8;
        bytes[kind] = 99;
        assert_eq!(decode(&key, &bytes), None);
    }

    #[test]
    fn remaining_life() {
        let e = Entry {
            decision: Decision::Forbidden,
            expires_at_ms: 10_500,
        };
        assert_eq!(e.remaining_s(0), 10);
        assert_eq!(e.remaining_s(10_000), 0);
        assert_eq!(e.remaining_s(20_000), 0);
    }
}
