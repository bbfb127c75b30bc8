//! Credit leases: a slice of an account's balance reserved by the balance
//! service for this Envoy process, spent locally with no callout.
//!
//! The lease lives in shared data, so every worker spends from the same one.
//! Every change is a compare-and-swap on the record: two workers can never
//! spend the same unit, and whoever replaces or closes a lease reads its final
//! `used` in the same swap, so the settled total is exact.

use crate::sha256::{hex, Sha256};

const FORMAT_VERSION: u8 = 1;
const KEY_PREFIX: &str = "farebox:lease1:";
/// How many times a spend retries after losing a CAS race before it gives up.
pub const MAX_CAS_RETRIES: u32 = 64;

/// Shared-data key of an account's lease: a digest of the cluster (so two
/// balance services never share a lease) and the credential.
pub fn lease_key(cluster: &str, credential: &str) -> String {
    let mut h = Sha256::new();
    h.update(&(cluster.len() as u64).to_le_bytes())
        .update(cluster.as_bytes())
        .update(credential.as_bytes());
    let digest = h.finish();
    format!("{KEY_PREFIX}{}", hex(digest.get(..16).unwrap_or(&digest)))
}

/// One account's lease as kept in shared data. An empty `lease_id` means no lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseRecord {
    pub lease_id: String,
    pub account_id: String,
    pub granted: u64,
    /// Units spent locally so far (refunds take units back while the lease is current).
    pub used: u64,
    /// The `used` total the service has acknowledged.
    pub reported: u64,
    /// Local deadline: spending stops here, a safety margin before the service's expiry.
    pub spend_until_ms: u64,
    /// A worker is taking a new lease until this time (0: nobody). Others wait.
    pub renewing_until_ms: u64,
    /// The account's unreserved balance when the lease was granted.
    pub balance: Option<i64>,
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

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        out.push(FORMAT_VERSION);
        put_str(&mut out, &self.lease_id);
        put_str(&mut out, &self.account_id);
        for n in [
            self.granted,
            self.used,
            self.reported,
            self.spend_until_ms,
            self.renewing_until_ms,
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
        let lease_id = get_str(&mut r)?;
        let account_id = get_str(&mut r)?;
        let mut nums = [0u64; 5];
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
        let [granted, used, reported, spend_until_ms, renewing_until_ms] = nums;
        Some(LeaseRecord {
            lease_id,
            account_id,
            granted,
            used,
            reported,
            spend_until_ms,
            renewing_until_ms,
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
    /// Spent from the current lease.
    Spend { record: LeaseRecord },
    /// No usable lease and nobody renewing: we take the renewal lock and call the service.
    Lock { record: LeaseRecord },
    /// Another request (any worker) is taking a lease for this account: wait for it.
    Wait,
}

/// Decides how a request of `cost` gets paid from `current` (`None`: no record yet).
pub fn step(current: Option<&LeaseRecord>, cost: u64, now_ms: u64, lock_ms: u64) -> Step {
    let mut record = current.cloned().unwrap_or_default();
    if record.usable_for(cost, now_ms) {
        record.used += cost;
        return Step::Spend { record };
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
}

/// The new record (with the taker's own `cost` already spent) and, if a lease
/// was replaced, that lease with its final `used`, to be settled.
pub fn install(
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
        lease_id: grant.lease_id.clone(),
        account_id: grant.account_id.clone(),
        granted: grant.granted,
        used: cost,
        reported: 0,
        spend_until_ms: now_ms.saturating_add(grant.expires_in_ms - margin),
        renewing_until_ms: 0,
        balance: grant.balance,
    };
    let replaced = current
        .filter(|r| r.has_lease() && r.lease_id != grant.lease_id)
        .cloned();
    (record, replaced)
}

/// Drops the renewal lock after a failed lease call, keeping any lease.
pub fn unlock(current: Option<&LeaseRecord>) -> LeaseRecord {
    let mut record = current.cloned().unwrap_or_default();
    record.renewing_until_ms = 0;
    record
}

/// Closes the lease for its final settle (when it is past its spend deadline).
/// Returns the record to write (no lease, lock kept) and the closed lease.
pub fn close_if_expired(
    current: &LeaseRecord,
    lease_id: &str,
    now_ms: u64,
) -> Option<(LeaseRecord, LeaseRecord)> {
    if current.lease_id != lease_id || now_ms < current.spend_until_ms {
        return None;
    }
    let emptied = LeaseRecord {
        renewing_until_ms: current.renewing_until_ms,
        ..LeaseRecord::default()
    };
    Some((emptied, current.clone()))
}

/// Gives back `cost` to lease `lease_id` (the upstream did not serve the request).
/// `None` when that lease is no longer the current one: its total is settled already.
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

    fn grant(id: &str, granted: u64) -> Grant {
        Grant {
            lease_id: id.into(),
            account_id: "acct".into(),
            granted,
            expires_in_ms: 30_000,
            balance: Some(400),
        }
    }

    #[test]
    fn record_round_trip_and_garbage() {
        let (rec, _) = install(None, &grant("ls_1", 100), 3, 1_000, 2_000);
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
        let Step::Lock { record: locked } = step(None, 1, now, 1_500) else {
            panic!()
        };
        assert_eq!(locked.renewing_until_ms, now + 1_500);
        // A second request meanwhile waits.
        assert_eq!(step(Some(&locked), 1, now + 10, 1_500), Step::Wait);
        // The grant arrives: the taker's own unit is spent.
        let (rec, replaced) = install(Some(&locked), &grant("ls_1", 3), 1, now, 2_000);
        assert_eq!(
            (rec.used, rec.remaining(), rec.renewing_until_ms, replaced),
            (1, 2, 0, None)
        );
        assert_eq!(rec.spend_until_ms, now + 28_000);
        let Step::Spend { record: rec } = step(Some(&rec), 1, now, 1_500) else {
            panic!()
        };
        let Step::Spend { record: rec } = step(Some(&rec), 1, now, 1_500) else {
            panic!()
        };
        assert_eq!(rec.remaining(), 0);
        // Exhausted: the next request renews, and the old lease comes back for its final settle.
        let Step::Lock { record: locked } = step(Some(&rec), 1, now, 1_500) else {
            panic!()
        };
        assert_eq!(
            locked.lease_id, "ls_1",
            "the old lease stays while the new one is taken"
        );
        let (new, replaced) = install(Some(&locked), &grant("ls_2", 100), 1, now, 2_000);
        assert_eq!(new.lease_id, "ls_2");
        assert_eq!(
            replaced.map(|r| (r.lease_id, r.used)),
            Some(("ls_1".to_string(), 3))
        );
    }

    #[test]
    fn a_lease_that_cannot_cover_the_cost_is_renewed() {
        let (rec, _) = install(None, &grant("ls_1", 5), 1, 0, 0);
        assert!(matches!(step(Some(&rec), 5, 0, 100), Step::Lock { .. }));
        assert!(matches!(step(Some(&rec), 4, 0, 100), Step::Spend { .. }));
    }

    #[test]
    fn expiry_stops_spending_and_closes() {
        let (rec, _) = install(None, &grant("ls_1", 100), 1, 0, 2_000);
        assert!(matches!(
            step(Some(&rec), 1, 27_999, 100),
            Step::Spend { .. }
        ));
        assert!(matches!(
            step(Some(&rec), 1, 28_000, 100),
            Step::Lock { .. }
        ));
        assert_eq!(close_if_expired(&rec, "ls_1", 27_999), None);
        assert_eq!(close_if_expired(&rec, "other", 28_000), None);
        let (emptied, closed) = close_if_expired(&rec, "ls_1", 28_000).unwrap();
        assert!(!emptied.has_lease());
        assert_eq!((closed.lease_id.as_str(), closed.used), ("ls_1", 1));
        // Short leases stop halfway rather than at once.
        let short = Grant {
            expires_in_ms: 1_000,
            ..grant("s", 10)
        };
        let (rec, _) = install(None, &short, 1, 0, 2_000);
        assert_eq!(rec.spend_until_ms, 500);
    }

    #[test]
    fn a_stale_lock_is_taken_over() {
        let Step::Lock { record: locked } = step(None, 1, 0, 1_000) else {
            panic!()
        };
        assert_eq!(step(Some(&locked), 1, 999, 1_000), Step::Wait);
        assert!(matches!(
            step(Some(&locked), 1, 1_000, 1_000),
            Step::Lock { .. }
        ));
        assert_eq!(unlock(Some(&locked)).renewing_until_ms, 0);
    }

    #[test]
    fn refund_and_acknowledge_only_touch_the_current_lease() {
        let (rec, _) = install(None, &grant("ls_1", 10), 4, 0, 0);
        assert_eq!(refund(&rec, "ls_1", 3).map(|r| r.used), Some(1));
        assert_eq!(refund(&rec, "ls_1", 5), None);
        assert_eq!(refund(&rec, "ls_0", 1), None);
        assert_eq!(acknowledge(&rec, "ls_1", 4).map(|r| r.reported), Some(4));
        assert_eq!(acknowledge(&rec, "ls_0", 4), None);
    }

    /// Two workers racing on one record through CAS never spend the same unit twice.
    #[test]
    fn cas_conflict_never_double_spends() {
        let (rec, _) = install(None, &grant("ls_1", 10), 0, 0, 0);
        let mut stored = (rec.encode(), 1u32);
        let mut spent = 0;
        let mut conflicts = 0;
        // Interleave: both workers read, then both try to write.
        for _ in 0..20 {
            let a = (LeaseRecord::decode(&stored.0).unwrap(), stored.1);
            let b = (LeaseRecord::decode(&stored.0).unwrap(), stored.1);
            for (read, cas) in [a, b] {
                if let Step::Spend { record } = step(Some(&read), 1, 0, 100) {
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
        assert_ne!(lease_key("balance", "a"), lease_key("balance", "b"));
        assert_ne!(lease_key("balance", "a"), lease_key("other", "a"));
        assert_eq!(lease_key("balance", "a"), lease_key("balance", "a"));
        assert!(!lease_key("balance", "secret-key").contains("secret"));
    }

    #[test]
    fn want_covers_the_request() {
        assert_eq!(want(100, 1), 100);
        assert_eq!(want(100, 250), 250);
    }
}
