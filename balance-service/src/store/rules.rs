//! The money rules, as pure functions of the values read in a transaction.
//! Both backends apply them through [`super::ops`]; nothing here touches a
//! database, so each rule is unit-tested on its own.

use crate::config::ExpiryPolicy;

/// What authorize does with a known credential (`docs/balance-service.md` 2.2,
/// steps 2–6), given the owner of an existing charge with the same request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorizeStep {
    /// Already charged to this account: answer 200 again, debit nothing.
    Replay,
    /// Request id charged to another account.
    Conflict,
    Disabled,
    Denied,
    /// Cost 0: allow, record nothing.
    Free,
    Debit,
}

pub fn authorize_step(
    charged_to_same: Option<bool>,
    disabled: bool,
    balance: i64,
    cost: i64,
) -> AuthorizeStep {
    match charged_to_same {
        Some(true) => AuthorizeStep::Replay,
        Some(false) => AuthorizeStep::Conflict,
        None if disabled => AuthorizeStep::Disabled,
        None if balance < cost => AuthorizeStep::Denied,
        None if cost == 0 => AuthorizeStep::Free,
        None => AuthorizeStep::Debit,
    }
}

/// The grant of a new lease (4.2 step 6): a fair share of what is available
/// among the holders with open leases on the account (`others`: how many
/// distinct other holders), capped by `want` and `max_units`, never below
/// `min`. The caller guarantees `1 <= min <= available`, so never above
/// `available`.
pub fn fair_share_grant(
    want: i64,
    min: i64,
    available: i64,
    max_units: Option<i64>,
    others: i64,
) -> i64 {
    let fair = available / others.saturating_add(1).max(1);
    let capped = want
        .min(available)
        .min(fair)
        .min(max_units.unwrap_or(i64::MAX));
    capped.max(min)
}

/// A closing lease's `(charged, refunded)`: its `base` charge (the final
/// `used`, or the expiry charge) minus the refunds recorded while it was
/// open, never below 0.
pub fn close_charge(base: i64, pending: i64) -> (i64, i64) {
    let refunded = pending.clamp(0, base);
    (base - refunded, refunded)
}

/// How a settle's `seq` relates to the lease's stored `settle_seq` (4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqRule {
    /// Older than the stored one: answered, nothing changes.
    Stale,
    /// Equal, with the same `used` and `final`: a retry (processed as usual,
    /// which changes nothing).
    Replay,
    /// Newer, equal with another report, or absent: processed as usual.
    Process,
}

pub fn settle_seq_rule(stored: i64, seq: Option<i64>, same_report: bool) -> SeqRule {
    match seq {
        Some(n) if n < stored => SeqRule::Stale,
        Some(n) if n == stored && same_report => SeqRule::Replay,
        _ => SeqRule::Process,
    }
}

/// What an expired open lease is charged under `policy` (4.4).
pub fn expiry_charge(policy: ExpiryPolicy, granted: i64, used: i64) -> i64 {
    match policy {
        ExpiryPolicy::Full => granted,
        ExpiryPolicy::Reported => used,
    }
}

/// The balance after crediting `amount` (>= 0), if `balance + amount` and
/// `balance + amount + reserved` both fit an `i64` — the limit that keeps
/// every later release of a reservation from overflowing.
pub fn credit_within(balance: i64, amount: i64, reserved: i64) -> Option<i64> {
    balance
        .checked_add(amount)
        .filter(|b| b.checked_add(reserved).is_some())
}

/// The balance after a usage adjustment of `delta` (= estimate − actual; may
/// be negative: usage beyond the hold is owed and may take the balance below
/// 0). A credit must keep `balance + reserved` within `i64`.
pub fn usage_adjusted(balance: i64, delta: i64, reserved: i64) -> Option<i64> {
    balance
        .checked_add(delta)
        .filter(|b| delta <= 0 || b.checked_add(reserved).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorize_order() {
        use AuthorizeStep::*;
        // A replay wins over disabled and over the balance.
        assert_eq!(authorize_step(Some(true), true, 0, 5), Replay);
        assert_eq!(authorize_step(Some(false), false, 100, 5), Conflict);
        assert_eq!(authorize_step(None, true, 100, 5), Disabled);
        assert_eq!(authorize_step(None, false, 4, 5), Denied);
        assert_eq!(authorize_step(None, false, -3, 0), Denied);
        assert_eq!(authorize_step(None, false, 0, 0), Free);
        assert_eq!(authorize_step(None, false, 5, 5), Debit);
    }

    #[test]
    fn grants() {
        assert_eq!(fair_share_grant(30, 5, 100, None, 0), 30);
        assert_eq!(fair_share_grant(10, 2, 3, None, 0), 3);
        assert_eq!(fair_share_grant(50, 2, 100, Some(4), 0), 4);
        // The cap never goes below the minimum.
        assert_eq!(fair_share_grant(50, 9, 100, Some(4), 0), 9);
        // (want, min, available, cap, others) -> granted
        for (args, want) in [
            ((100, 1, 100, None, 0), 100),
            ((100, 1, 100, None, 1), 50),
            ((100, 1, 99, None, 3), 24),
            ((10, 1, 100, None, 1), 10),
            ((100, 1, 100, Some(8), 1), 8),
            ((100, 5, 6, None, 3), 5),
            ((100, 1, 1, None, 9), 1),
        ] {
            let (w, m, a, c, o) = args;
            assert_eq!(fair_share_grant(w, m, a, c, o), want, "{args:?}");
        }
    }

    #[test]
    fn close_charge_and_seq_rules() {
        assert_eq!(close_charge(10, 0), (10, 0));
        assert_eq!(close_charge(10, 3), (7, 3));
        assert_eq!(close_charge(10, 12), (0, 10));
        assert_eq!(settle_seq_rule(3, Some(2), true), SeqRule::Stale);
        assert_eq!(settle_seq_rule(3, Some(2), false), SeqRule::Stale);
        assert_eq!(settle_seq_rule(3, Some(3), true), SeqRule::Replay);
        assert_eq!(settle_seq_rule(3, Some(3), false), SeqRule::Process);
        assert_eq!(settle_seq_rule(3, Some(4), true), SeqRule::Process);
        assert_eq!(settle_seq_rule(3, None, true), SeqRule::Process);
    }

    #[test]
    fn expiry() {
        assert_eq!(expiry_charge(ExpiryPolicy::Full, 20, 7), 20);
        assert_eq!(expiry_charge(ExpiryPolicy::Reported, 20, 7), 7);
    }

    #[test]
    fn overflow_limits() {
        assert_eq!(credit_within(i64::MAX - 1, 1, 0), Some(i64::MAX));
        assert_eq!(credit_within(i64::MAX - 1, 2, 0), None);
        assert_eq!(credit_within(i64::MAX - 20, 10, 11), None);
        assert_eq!(credit_within(i64::MAX - 20, 10, 10), Some(i64::MAX - 10));
        assert_eq!(usage_adjusted(5, -10, i64::MAX), Some(-5));
        assert_eq!(usage_adjusted(i64::MAX - 1, 1, 1), None);
        assert_eq!(usage_adjusted(i64::MIN, -1, 0), None);
    }
}
