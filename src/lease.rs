//! Credit leases: a slice of an account's balance reserved by the balance
//! service for this Envoy process, spent locally with no callout.
//!
//! The lease lives in shared data, so every worker spends from the same one.
//! Every change is a compare-and-swap on the record: two workers can never
//! spend the same unit, and whoever replaces or closes a lease reads its final
//! `used` in the same swap, so the settled total is exact.
//!
//! Shared data never evicts, so leases live in a fixed table of
//! `lease_max_entries` slots, like the decision cache: an account's digest
//! picks its slot, and the record carries 128 bits of that digest. A slot
//! holding no lease and no live renewal lock is free for any account (an
//! unknown credential leaves its slot empty again once refused). A slot whose
//! lease belongs to another account is *occupied*: that request is paid by a
//! per-request authorize instead (rare with the default table size).

use sha2::{Digest, Sha256};

const FORMAT_VERSION: u8 = 2;
const KEY_PREFIX: &str = "farebox:lease2:";
/// A lease is renewed ahead of need once fewer than this share of its grant is left.
const LOW_WATER_DIVISOR: u64 = 4;

/// Digest of (cluster, credential): two balance services never share a lease,
/// and the credential itself is never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseKey([u8; 32]);

impl LeaseKey {
    pub fn new(cluster: &str, credential: &str) -> LeaseKey {
        let mut h = Sha256::new();
        h.update((cluster.len() as u64).to_le_bytes());
        h.update(cluster);
        h.update(credential);
        LeaseKey(h.finalize().into())
    }

    fn slot(&self, slots: u32) -> u64 {
        let mut n = [0u8; 8];
        n.copy_from_slice(self.0.get(..8).unwrap_or(&[0; 8]));
        u64::from_le_bytes(n) % u64::from(slots.max(1))
    }

    pub fn owner(&self) -> [u8; 16] {
        let mut o = [0u8; 16];
        o.copy_from_slice(self.0.get(8..24).unwrap_or(&[0; 16]));
        o
    }

    /// The shared-data key of this account's slot.
    pub fn slot_key(&self, slots: u32) -> String {
        // Built by hand rather than with format!: this runs on every lease spend.
        let mut number = itoa::Buffer::new();
        let slot = number.format(self.slot(slots));
        let mut key = String::with_capacity(KEY_PREFIX.len() + slot.len());
        key.push_str(KEY_PREFIX);
        key.push_str(slot);
        key
    }
}

/// One account's lease as kept in its slot. An empty `lease_id` means no lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Which account's digest this record belongs to.
    pub owner: [u8; 16],
    pub lease_id: String,
    pub account_id: String,
    pub granted: u64,
    /// Units spent locally so far (refunds take units back while the lease is current).
    pub used: u64,
    /// The `used` total the service has acknowledged.
    pub reported: u64,
    /// Local deadline: spending stops here, a safety margin before the service's expiry.
    pub spend_until_ms: u64,
    /// A worker is taking a new lease until this time (0: nobody). Others wait
    /// only if the current lease cannot pay; otherwise they keep spending.
    pub renewing_until_ms: u64,
    /// The highest settle `seq` handed out for this lease (the contract's 4.3 ordering).
    pub settle_seq: u64,
    /// No renewal ahead of need before this time (after one failed or was refused).
    pub ahead_not_before_ms: u64,
    /// The account's unreserved balance when the lease was granted.
    pub balance: Option<i64>,
}

/// What a slot holds for one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// This account's record, or `None` when the slot is free for it.
    Mine(Option<LeaseRecord>),
    /// Another account's live lease or renewal: not ours to touch.
    Occupied,
}

/// Reads a slot for `key`. Empty, unreadable, and other accounts' idle records
/// count as free: nothing in them is owed to anyone.
pub fn view(key: &LeaseKey, stored: Option<&[u8]>, now_ms: u64) -> View {
    let Some(record) = stored.and_then(LeaseRecord::decode) else {
        return View::Mine(None);
    };
    if record.owner == key.owner() {
        return View::Mine(Some(record));
    }
    if record.has_lease() || record.renewing_until_ms > now_ms {
        View::Occupied
    } else {
        View::Mine(None)
    }
}

/// The bytes to store for `record`: nothing at all once it holds neither a
/// lease nor a lock, so a refused credential leaves an empty slot behind.
pub fn stored(record: &LeaseRecord) -> Vec<u8> {
    if !record.has_lease() && record.renewing_until_ms == 0 {
        Vec::new()
    } else {
        record.encode()
    }
}

impl LeaseRecord {
    pub fn has_lease(&self) -> bool {
        !self.lease_id.is_empty()
    }

    pub fn remaining(&self) -> u64 {
        self.granted.saturating_sub(self.used)
    }

    fn usable_for(&self, cost: u64, now_ms: u64) -> bool {
        self.has_lease() && now_ms < self.spend_until_ms && self.remaining() >= cost
    }

    /// The low-water mark: below it, the lease is renewed before it runs out.
    fn low_water(&self, cost: u64) -> u64 {
        cost.max(self.granted / LOW_WATER_DIVISOR)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(112);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.owner);
        put_str(&mut out, &self.lease_id);
        put_str(&mut out, &self.account_id);
        for n in [
            self.granted,
            self.used,
            self.reported,
            self.spend_until_ms,
            self.renewing_until_ms,
            self.settle_seq,
            self.ahead_not_before_ms,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        match self.balance {
            Some(b) => {
                out.push(1);
                out.extend_from_slice(&b.to_le_bytes());
            }
            None => out.push(0),
        }
        out
    }

    /// `None` for anything malformed; the caller treats that as "no lease".
    pub fn decode(bytes: &[u8]) -> Option<LeaseRecord> {
        let mut r = bytes;
        if take(&mut r, 1)? != [FORMAT_VERSION] {
            return None;
        }
        let owner: [u8; 16] = take(&mut r, 16)?.try_into().ok()?;
        let lease_id = get_str(&mut r)?;
        let account_id = get_str(&mut r)?;
        let mut nums = [0u64; 7];
        for n in nums.iter_mut() {
            *n = u64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?);
        }
        let balance = match take(&mut r, 1)? {
            [0] => None,
            [1] => Some(i64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?)),
            _ => return None,
        };
        if !r.is_empty() {
            return None;
        }
        let [granted, used, reported, spend_until_ms, renewing_until_ms, settle_seq, ahead_not_before_ms] =
            nums;
        Some(LeaseRecord {
            owner,
            lease_id,
            account_id,
            granted,
            used,
            reported,
            spend_until_ms,
            renewing_until_ms,
            settle_seq,
            ahead_not_before_ms,
            balance,
        })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes().get(..usize::from(len)).unwrap_or(&[]));
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if r.len() < n {
        return None;
    }
    let (head, rest) = r.split_at(n);
    *r = rest;
    Some(head)
}

fn get_str(r: &mut &[u8]) -> Option<String> {
    let len = u16::from_le_bytes(take(r, 2)?.try_into().ok()?);
    String::from_utf8(take(r, usize::from(len))?.to_vec()).ok()
}

/// What one attempt at a record decided. The caller writes `record` with the
/// CAS token it read, and starts over if the swap fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Spent from the current lease. `renew`: this spend also took the renewal
    /// lock, to renew ahead of need in the background (the request does not wait).
    Spend { record: LeaseRecord, renew: bool },
    /// No usable lease and nobody renewing: we take the renewal lock and call the service.
    Lock { record: LeaseRecord },
    /// Another request (any worker) is taking a lease for this account: wait for it.
    Wait,
}

/// Decides how a request of `cost` gets paid from `current` (`None`: no record
/// yet). `may_renew`: a background renewal can be started now.
pub fn step(
    owner: [u8; 16],
    current: Option<&LeaseRecord>,
    cost: u64,
    now_ms: u64,
    lock_ms: u64,
    may_renew: bool,
) -> Step {
    let mut record = current.cloned().unwrap_or_default();
    record.owner = owner;
    if record.usable_for(cost, now_ms) {
        record.used += cost;
        // Renew ahead once below the low-water mark, when nobody else is, and when
        // the account had more than this lease when it was granted (otherwise a
        // renewal could only recall other gateways' credit, not add any).
        let renew = may_renew
            && record.remaining() < record.low_water(cost)
            && record.renewing_until_ms <= now_ms
            && record.ahead_not_before_ms <= now_ms
            && record
                .balance
                .is_none_or(|b| b >= i64::try_from(cost).unwrap_or(i64::MAX));
        if renew {
            record.renewing_until_ms = now_ms.saturating_add(lock_ms);
        }
        return Step::Spend { record, renew };
    }
    if record.renewing_until_ms > now_ms {
        return Step::Wait;
    }
    record.renewing_until_ms = now_ms.saturating_add(lock_ms);
    Step::Lock { record }
}

/// A lease the service granted, as installed over whatever the record held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub lease_id: String,
    pub account_id: String,
    pub granted: u64,
    pub expires_in_ms: u64,
    pub balance: Option<i64>,
    /// What is left of the account's budget after this grant, if it has one
    /// (shown to the client of the request that took the grant).
    pub budget: Option<i64>,
}

/// The new record (with the taker's own `cost` already spent; 0 for a renewal
/// ahead of need) and, if a lease was replaced, that lease with its final
/// `used` and the `seq` of its final settle.
pub fn install(
    owner: [u8; 16],
    current: Option<&LeaseRecord>,
    grant: &Grant,
    cost: u64,
    now_ms: u64,
    margin_ms: u64,
) -> (LeaseRecord, Option<LeaseRecord>) {
    // Stop spending a margin before the service expires the lease, so the final
    // settle reaches it in time; for short leases, halfway.
    let margin = margin_ms.min(grant.expires_in_ms / 2);
    let record = LeaseRecord {
        owner,
        lease_id: grant.lease_id.clone(),
        account_id: grant.account_id.clone(),
        granted: grant.granted,
        used: cost,
        reported: 0,
        spend_until_ms: now_ms.saturating_add(grant.expires_in_ms - margin),
        renewing_until_ms: 0,
        settle_seq: 0,
        ahead_not_before_ms: 0,
        balance: grant.balance,
    };
    let replaced = current
        .filter(|r| r.has_lease() && r.lease_id != grant.lease_id)
        .map(|r| LeaseRecord {
            settle_seq: r.settle_seq.saturating_add(1),
            ..r.clone()
        });
    (record, replaced)
}

/// Drops the renewal lock after a failed lease call, keeping any lease.
/// `ahead_not_before_ms`: when a background renewal may be tried again.
pub fn unlock(current: Option<&LeaseRecord>, ahead_not_before_ms: u64) -> LeaseRecord {
    let mut record = current.cloned().unwrap_or_default();
    record.renewing_until_ms = 0;
    record.ahead_not_before_ms = record.ahead_not_before_ms.max(ahead_not_before_ms);
    record
}

/// Closes lease `lease_id` for its final settle: when it is past its spend
/// deadline, or at once when `now` is set (the service recalled it).
/// Returns the record to write (no lease, lock kept) and the closed lease,
/// whose `settle_seq` is the one for its final settle.
pub fn close(
    current: &LeaseRecord,
    lease_id: &str,
    now_ms: u64,
    at_once: bool,
) -> Option<(LeaseRecord, LeaseRecord)> {
    if current.lease_id != lease_id || (!at_once && now_ms < current.spend_until_ms) {
        return None;
    }
    let emptied = LeaseRecord {
        owner: current.owner,
        renewing_until_ms: current.renewing_until_ms,
        ..LeaseRecord::default()
    };
    let closed = LeaseRecord {
        settle_seq: current.settle_seq.saturating_add(1),
        ..current.clone()
    };
    Some((emptied, closed))
}

/// Hands out the next settle `seq` for a periodic settle of `lease_id`.
pub fn next_seq(current: &LeaseRecord, lease_id: &str) -> Option<LeaseRecord> {
    if current.lease_id != lease_id {
        return None;
    }
    let mut record = current.clone();
    record.settle_seq = record.settle_seq.saturating_add(1);
    Some(record)
}

/// Gives back `cost` to lease `lease_id` (the upstream did not serve the request).
/// `None` when that lease is no longer the current one: the service must credit it.
pub fn refund(current: &LeaseRecord, lease_id: &str, cost: u64) -> Option<LeaseRecord> {
    if current.lease_id != lease_id || current.used < cost {
        return None;
    }
    let mut record = current.clone();
    record.used -= cost;
    Some(record)
}

/// Spends `extra` more units from lease `lease_id` (a usage overage), if it can.
pub fn spend_extra(current: &LeaseRecord, lease_id: &str, extra: u64) -> Option<LeaseRecord> {
    if current.lease_id != lease_id || current.remaining() < extra {
        return None;
    }
    let mut record = current.clone();
    record.used += extra;
    Some(record)
}

/// Records that the service acknowledged `used` for `lease_id`.
pub fn acknowledge(current: &LeaseRecord, lease_id: &str, used: u64) -> Option<LeaseRecord> {
    if current.lease_id != lease_id || current.reported == used {
        return None;
    }
    let mut record = current.clone();
    record.reported = used;
    Some(record)
}

/// How many units to ask for: the configured amount, but no less than this request needs.
pub fn want(configured: u64, cost: u64) -> u64 {
    configured.max(cost)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: [u8; 16] = [7; 16];

    fn grant(id: &str, granted: u64) -> Grant {
        Grant {
            lease_id: id.into(),
            account_id: "acct".into(),
            granted,
            expires_in_ms: 30_000,
            balance: Some(400),
            budget: None,
        }
    }

    fn spent(s: Step) -> LeaseRecord {
        match s {
            Step::Spend { record, .. } => record,
            other => panic!("not a spend: {other:?}"),
        }
    }

    #[test]
    fn record_round_trip_and_garbage() {
        let (rec, _) = install(ME, None, &grant("ls_1", 100), 3, 1_000, 2_000);
        let bytes = rec.encode();
        assert_eq!(LeaseRecord::decode(&bytes), Some(rec.clone()));
        for cut in 0..bytes.len() {
            assert_eq!(LeaseRecord::decode(&bytes[..cut]), None);
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(LeaseRecord::decode(&longer), None);
        assert_eq!(LeaseRecord::decode(b""), None);
        assert_eq!(
            LeaseRecord::decode(&LeaseRecord::default().encode()),
            Some(LeaseRecord::default())
        );
    }

    #[test]
    fn take_spend_exhaust_renew() {
        let now = 10_000;
        // Nothing yet: lock and call.
        let Step::Lock { record: locked } = step(ME, None, 1, now, 1_500, true) else {
            panic!()
        };
        assert_eq!(locked.renewing_until_ms, now + 1_500);
        // A second request meanwhile waits.
        assert_eq!(
            step(ME, Some(&locked), 1, now + 10, 1_500, true),
            Step::Wait
        );
        // The grant arrives: the taker's own unit is spent.
        let (rec, replaced) = install(ME, Some(&locked), &grant("ls_1", 3), 1, now, 2_000);
        assert_eq!(
            (rec.used, rec.remaining(), rec.renewing_until_ms, replaced),
            (1, 2, 0, None)
        );
        assert_eq!(rec.spend_until_ms, now + 28_000);
        let rec = spent(step(ME, Some(&rec), 1, now, 1_500, false));
        let rec = spent(step(ME, Some(&rec), 1, now, 1_500, false));
        assert_eq!(rec.remaining(), 0);
        // Exhausted: the next request renews, and the old lease comes back for its final settle.
        let Step::Lock { record: locked } = step(ME, Some(&rec), 1, now, 1_500, true) else {
            panic!()
        };
        assert_eq!(
            locked.lease_id, "ls_1",
            "the old lease stays while the new one is taken"
        );
        let (new, replaced) = install(ME, Some(&locked), &grant("ls_2", 100), 1, now, 2_000);
        assert_eq!(new.lease_id, "ls_2");
        assert_eq!(
            replaced.map(|r| (r.lease_id, r.used, r.settle_seq)),
            Some(("ls_1".to_string(), 3, 1))
        );
    }

    #[test]
    fn renews_ahead_at_the_low_water_mark_while_spending_goes_on() {
        let (mut rec, _) = install(ME, None, &grant("ls_1", 100), 0, 0, 0);
        for _ in 0..75 {
            match step(ME, Some(&rec), 1, 0, 500, true) {
                Step::Spend { record, renew } => {
                    assert!(!renew, "above the mark at {}", record.used);
                    rec = record;
                }
                other => panic!("{other:?}"),
            }
        }
        // 24 left < 100/4: this spend takes the lock for a background renewal.
        let Step::Spend { record, renew } = step(ME, Some(&rec), 1, 0, 500, true) else {
            panic!()
        };
        assert!(renew);
        assert_eq!(record.renewing_until_ms, 500);
        // Others keep spending while it runs, and do not start another.
        let Step::Spend { record, renew } = step(ME, Some(&record), 1, 10, 500, true) else {
            panic!()
        };
        assert!(!renew);
        assert_eq!(record.used, 77);
        // After a refused renewal, none before the back-off.
        let backed = unlock(Some(&record), 1_000);
        assert!(matches!(
            step(ME, Some(&backed), 1, 999, 500, true),
            Step::Spend { renew: false, .. }
        ));
        assert!(matches!(
            step(ME, Some(&backed), 1, 1_000, 500, true),
            Step::Spend { renew: true, .. }
        ));
        // No background renewal when the account had nothing more when granted.
        let poor = LeaseRecord {
            balance: Some(0),
            ..backed
        };
        assert!(matches!(
            step(ME, Some(&poor), 1, 1_000, 500, true),
            Step::Spend { renew: false, .. }
        ));
    }

    #[test]
    fn a_lease_that_cannot_cover_the_cost_is_renewed() {
        let (rec, _) = install(ME, None, &grant("ls_1", 5), 1, 0, 0);
        assert!(matches!(
            step(ME, Some(&rec), 5, 0, 100, true),
            Step::Lock { .. }
        ));
        assert!(matches!(
            step(ME, Some(&rec), 4, 0, 100, true),
            Step::Spend { .. }
        ));
    }

    #[test]
    fn expiry_or_recall_stops_spending_and_closes() {
        let (rec, _) = install(ME, None, &grant("ls_1", 100), 1, 0, 2_000);
        assert!(matches!(
            step(ME, Some(&rec), 1, 27_999, 100, false),
            Step::Spend { .. }
        ));
        assert!(matches!(
            step(ME, Some(&rec), 1, 28_000, 100, false),
            Step::Lock { .. }
        ));
        assert_eq!(close(&rec, "ls_1", 27_999, false), None);
        assert_eq!(close(&rec, "other", 28_000, false), None);
        let (emptied, closed) = close(&rec, "ls_1", 28_000, false).unwrap();
        assert!(!emptied.has_lease());
        assert!(stored(&emptied).is_empty(), "an empty slot stores nothing");
        assert_eq!((closed.lease_id.as_str(), closed.used), ("ls_1", 1));
        // A recall closes at once, with the next seq.
        let rec = next_seq(&rec, "ls_1").unwrap();
        let (_, closed) = close(&rec, "ls_1", 0, true).unwrap();
        assert_eq!(closed.settle_seq, 2);
        // Short leases stop halfway rather than at once.
        let short = Grant {
            expires_in_ms: 1_000,
            ..grant("s", 10)
        };
        let (rec, _) = install(ME, None, &short, 1, 0, 2_000);
        assert_eq!(rec.spend_until_ms, 500);
    }

    #[test]
    fn a_stale_lock_is_taken_over() {
        let Step::Lock { record: locked } = step(ME, None, 1, 0, 1_000, true) else {
            panic!()
        };
        assert_eq!(step(ME, Some(&locked), 1, 999, 1_000, true), Step::Wait);
        assert!(matches!(
            step(ME, Some(&locked), 1, 1_000, 1_000, true),
            Step::Lock { .. }
        ));
        assert_eq!(unlock(Some(&locked), 0).renewing_until_ms, 0);
        assert!(stored(&unlock(Some(&locked), 0)).is_empty());
    }

    #[test]
    fn slots_are_shared_only_when_idle() {
        let a = LeaseKey::new("balance", "a");
        let b = LeaseKey::new("balance", "b");
        let (rec, _) = install(a.owner(), None, &grant("ls_1", 10), 1, 0, 0);
        let bytes = rec.encode();
        assert_eq!(view(&a, Some(&bytes), 0), View::Mine(Some(rec.clone())));
        assert_eq!(view(&b, Some(&bytes), 0), View::Occupied);
        assert_eq!(view(&b, None, 0), View::Mine(None));
        assert_eq!(view(&b, Some(b""), 0), View::Mine(None));
        // Another account's expired lock holds nothing: free.
        let Step::Lock { record } = step(a.owner(), None, 1, 0, 100, true) else {
            panic!()
        };
        assert_eq!(view(&b, Some(&record.encode()), 99), View::Occupied);
        assert_eq!(view(&b, Some(&record.encode()), 100), View::Mine(None));
        assert_eq!(a.slot_key(1), b.slot_key(1));
        assert!(a.slot_key(16_384).starts_with("farebox:lease2:"));
    }

    #[test]
    fn refund_and_acknowledge_only_touch_the_current_lease() {
        let (rec, _) = install(ME, None, &grant("ls_1", 10), 4, 0, 0);
        assert_eq!(refund(&rec, "ls_1", 3).map(|r| r.used), Some(1));
        assert_eq!(refund(&rec, "ls_1", 5), None);
        assert_eq!(refund(&rec, "ls_0", 1), None);
        assert_eq!(acknowledge(&rec, "ls_1", 4).map(|r| r.reported), Some(4));
        assert_eq!(acknowledge(&rec, "ls_0", 4), None);
        assert_eq!(next_seq(&rec, "ls_0"), None);
    }

    /// Two workers racing on one record through CAS never spend the same unit twice.
    #[test]
    fn cas_conflict_never_double_spends() {
        let (rec, _) = install(ME, None, &grant("ls_1", 10), 0, 0, 0);
        let mut stored = (rec.encode(), 1u32);
        let mut spent = 0;
        let mut conflicts = 0;
        // Interleave: both workers read, then both try to write.
        for _ in 0..20 {
            let a = (LeaseRecord::decode(&stored.0).unwrap(), stored.1);
            let b = (LeaseRecord::decode(&stored.0).unwrap(), stored.1);
            for (read, cas) in [a, b] {
                if let Step::Spend { record, .. } = step(ME, Some(&read), 1, 0, 100, false) {
                    if cas == stored.1 {
                        stored = (record.encode(), stored.1 + 1);
                        spent += 1;
                    } else {
                        conflicts += 1;
                    }
                }
            }
        }
        assert_eq!(spent, 10);
        assert_eq!(LeaseRecord::decode(&stored.0).unwrap().used, 10);
        assert!(conflicts >= 10);
    }

    #[test]
    fn keys_separate_accounts_and_services() {
        let k = |c, a| LeaseKey::new(c, a);
        assert_ne!(k("balance", "a").owner(), k("balance", "b").owner());
        assert_ne!(k("balance", "a").owner(), k("other", "a").owner());
        assert_eq!(k("balance", "a"), k("balance", "a"));
        assert!(!k("balance", "secret-key").slot_key(10).contains("secret"));
    }

    #[test]
    fn want_covers_the_request() {
        assert_eq!(want(100, 1), 100);
        assert_eq!(want(100, 250), 250);
    }

    #[test]
    fn an_overage_spends_up_to_what_is_left_of_the_current_lease() {
        let (rec, _) = install(ME, None, &grant("ls_1", 10), 4, 0, 0);
        assert_eq!(spend_extra(&rec, "ls_1", 6).map(|r| r.used), Some(10));
        assert_eq!(spend_extra(&rec, "ls_1", 2).map(|r| r.used), Some(6));
        assert_eq!(spend_extra(&rec, "ls_1", 7), None, "more than is left");
        assert_eq!(
            spend_extra(&rec, "ls_0", 1),
            None,
            "a lease no longer current"
        );
    }

    #[test]
    fn a_refund_can_give_back_everything_spent() {
        let (rec, _) = install(ME, None, &grant("ls_1", 10), 4, 0, 0);
        assert_eq!(refund(&rec, "ls_1", 4).map(|r| r.used), Some(0));
    }

    #[test]
    fn closing_a_lease_keeps_the_slot_owner_and_a_renewal_under_way() {
        let (rec, _) = install(ME, None, &grant("ls_1", 10), 1, 0, 0);
        let renewing = LeaseRecord {
            renewing_until_ms: 700,
            ..rec
        };
        let (emptied, _) = close(&renewing, "ls_1", 0, true).unwrap();
        assert!(!emptied.has_lease());
        assert_eq!((emptied.owner, emptied.renewing_until_ms), (ME, 700));
        // Others keep waiting for that renewal rather than taking the lock themselves.
        assert_eq!(step(ME, Some(&emptied), 1, 10, 500, true), Step::Wait);
    }

    #[test]
    fn lease_slots_are_bounded_and_spread() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..2000 {
            let slot = LeaseKey::new("balance", &format!("k{i}")).slot(64);
            assert!(slot < 64);
            seen.insert(slot);
        }
        assert_eq!(
            seen.len(),
            64,
            "2000 keys should touch every one of 64 slots"
        );
        assert_eq!(LeaseKey::new("balance", "k").slot(0), 0);
    }
}
