//! The decision cache's per-worker copy, in the VM's own memory, in front of the shared
//! one ([`crate::cache`]): a hit costs no shared-data read (a crossing into Envoy and a
//! copy of the entry), no SHA-256 and no decoding.
//!
//! - Bounded: a fixed table of at most [`SLOTS`] entries; a key hashes to one slot and a
//!   newer entry takes it over.
//! - Expires on time: an entry is served while the shared entry it copies is fresh, and
//!   for at most [`HOLD_MS`] after it was copied, so a slot that another worker's fresher
//!   decision took over in shared data is seen here within that time.
//! - Keyed by the configuration: a table filled under another fingerprint is emptied.
//! - Never serves one account's decision to another: the key is a 128-bit SipHash of
//!   (route, cost, credential) under a key drawn at random per worker (so nobody can
//!   aim at a collision), compared in full. The credential itself is not kept. A worker
//!   the host gives no randomness keeps nothing here.

use siphasher::sip128::{Hasher128, SipHasher13};
use std::hash::Hasher;

use crate::cache::Entry;

/// At most this many entries per worker.
pub const SLOTS: usize = 512;
/// An entry is read again from shared data at least this often.
pub const HOLD_MS: u64 = 1000;

/// The per-worker key of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalKey(u64, u64);

struct Slot {
    key: LocalKey,
    entry: Entry,
    /// Copied at most [`HOLD_MS`] before this.
    hold_until_ms: u64,
}

pub struct LocalCache {
    fingerprint: [u8; 32],
    /// The SipHash key; `None` when the host's random source failed: a key that could
    /// be guessed would let a client aim at another account's entry, so then the cache
    /// holds nothing.
    secret: Option<[u8; 16]>,
    slots: Vec<Option<Slot>>,
}

impl Default for LocalCache {
    fn default() -> LocalCache {
        let mut secret = [0; 16];
        if getrandom::fill(&mut secret).is_err() {
            log::warn!("the host gave no random key: this worker keeps no local decisions");
            return LocalCache::with_secret(None);
        }
        LocalCache::with_secret(Some(secret))
    }
}

// Entries name accounts: not printed.
impl std::fmt::Debug for LocalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used = self.slots.iter().filter(|s| s.is_some()).count();
        write!(f, "LocalCache({used} entries)")
    }
}

impl LocalCache {
    fn with_secret(secret: Option<[u8; 16]>) -> LocalCache {
        LocalCache {
            fingerprint: [0; 32],
            secret,
            slots: Vec::new(),
        }
    }

    pub fn key(&self, route: &str, cost: u64, credential: &str) -> LocalKey {
        let mut h = SipHasher13::new_with_key(&self.secret.unwrap_or_default());
        // Lengths keep the parts apart: ("ab","c") and ("a","bc") hash differently.
        h.write_usize(route.len());
        h.write(route.as_bytes());
        h.write_u64(cost);
        h.write(credential.as_bytes());
        let digest = h.finish128();
        LocalKey(digest.h1, digest.h2)
    }

    fn index(key: LocalKey, slots: usize) -> usize {
        let slots = u64::try_from(slots.max(1)).unwrap_or(1);
        usize::try_from(key.0 % slots).unwrap_or(0)
    }

    /// A fresh entry for `key` under the configuration `fingerprint`, and the time it
    /// was found fresh at; the clock is read only when the key is there.
    pub fn get(
        &mut self,
        fingerprint: &[u8; 32],
        key: LocalKey,
        now_ms: impl FnOnce() -> u64,
    ) -> Option<(Entry, u64)> {
        self.secret?;
        if &self.fingerprint != fingerprint {
            self.fingerprint = *fingerprint;
            self.slots.clear();
            return None;
        }
        let i = Self::index(key, self.slots.len());
        let slot = self.slots.get_mut(i)?;
        let held = slot.as_ref().filter(|s| s.key == key)?;
        let now = now_ms();
        if now < held.hold_until_ms.min(held.entry.expires_at_ms) {
            return Some((held.entry.clone(), now));
        }
        *slot = None;
        None
    }

    /// Keeps a copy of a fresh shared entry; `capacity` is the shared cache's size
    /// (a worker never holds more entries than the process-wide cache).
    pub fn put(
        &mut self,
        fingerprint: &[u8; 32],
        capacity: u32,
        key: LocalKey,
        entry: Entry,
        now_ms: u64,
    ) {
        if self.secret.is_none() {
            return;
        }
        if &self.fingerprint != fingerprint {
            self.fingerprint = *fingerprint;
            self.slots.clear();
        }
        if self.slots.is_empty() {
            let n = usize::try_from(capacity).unwrap_or(SLOTS).clamp(1, SLOTS);
            self.slots.resize_with(n, || None);
        }
        let i = Self::index(key, self.slots.len());
        if let Some(slot) = self.slots.get_mut(i) {
            *slot = Some(Slot {
                key,
                entry,
                hold_until_ms: now_ms.saturating_add(HOLD_MS),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Decision;

    fn entry(account: &str, expires_at_ms: u64) -> Entry {
        Entry {
            decision: Decision::allow(account, None),
            expires_at_ms,
        }
    }

    #[test]
    fn served_while_fresh_and_held() {
        let fp = [7; 32];
        let mut c = LocalCache::default();
        let k = c.key("r", 1, "alice");
        assert_eq!(c.get(&fp, k, || 0).map(|(e, _)| e), None);
        c.put(&fp, 16, k, entry("acct_a", 60_000), 1_000);
        assert_eq!(
            c.get(&fp, k, || 1_999).map(|(e, _)| e),
            Some(entry("acct_a", 60_000))
        );
        assert_eq!(
            c.get(&fp, k, || 2_000).map(|(e, _)| e),
            None,
            "held at most HOLD_MS"
        );
        c.put(&fp, 16, k, entry("acct_a", 2_500), 2_000);
        assert_eq!(
            c.get(&fp, k, || 2_499)
                .map(|(e, _)| e)
                .map(|e| e.expires_at_ms),
            Some(2_500)
        );
        assert_eq!(
            c.get(&fp, k, || 2_500).map(|(e, _)| e),
            None,
            "never past the shared entry's life"
        );
    }

    #[test]
    fn never_another_accounts_or_configurations() {
        let fp = [7; 32];
        let mut c = LocalCache::default();
        let alice = c.key("r", 1, "alice");
        // One slot: every key collides, so only the full digest keeps them apart.
        c.put(&fp, 1, alice, entry("acct_a", 60_000), 0);
        for other in [
            c.key("r", 1, "mallory"),
            c.key("r", 2, "alice"),
            c.key("ra", 1, "lice"),
        ] {
            assert_ne!(other, alice);
            assert_eq!(c.get(&fp, other, || 1).map(|(e, _)| e), None);
        }
        assert!(c.get(&fp, alice, || 1).map(|(e, _)| e).is_some());
        assert_eq!(
            c.get(&[8; 32], alice, || 1).map(|(e, _)| e),
            None,
            "another configuration"
        );
        assert_eq!(
            c.get(&fp, alice, || 1).map(|(e, _)| e),
            None,
            "emptied with it"
        );
    }

    #[test]
    fn keeps_nothing_without_a_random_key() {
        let fp = [7; 32];
        let mut c = LocalCache::with_secret(None);
        let k = c.key("r", 1, "alice");
        c.put(&fp, 16, k, entry("acct_a", 60_000), 0);
        assert_eq!(c.get(&fp, k, || 1).map(|(e, _)| e), None);
        assert!(c.slots.is_empty());
        // Two workers draw different keys.
        let (a, b) = (LocalCache::default(), LocalCache::default());
        assert!(a.secret.is_some());
        assert_ne!(a.key("r", 1, "alice"), b.key("r", 1, "alice"));
    }

    #[test]
    fn bounded_by_the_shared_size_and_slots() {
        let fp = [1; 32];
        let mut c = LocalCache::default();
        for i in 0..10_000u64 {
            let k = c.key("r", i, "k");
            c.put(&fp, 100_000, k, entry("a", u64::MAX), 0);
        }
        assert!(c.slots.len() <= SLOTS);
        let mut small = LocalCache::default();
        let k = small.key("r", 1, "k");
        small.put(&fp, 3, k, entry("acct_secret", u64::MAX), 0);
        assert_eq!(small.slots.len(), 3);
        assert!(
            !format!("{small:?}").contains("acct_secret"),
            "no account in Debug"
        );
    }
}
