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

// ------------------------------------------------------------ budgets

/// The length of a budget period. Stored as its lower-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    /// Monday to Monday.
    Week,
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    pub fn parse(s: &str) -> Option<Period> {
        match s {
            "day" => Some(Period::Day),
            "week" => Some(Period::Week),
            "month" => Some(Period::Month),
            _ => None,
        }
    }
}

/// The IANA time zone `name` (from the bundled zone database, so the answer
/// does not depend on the host's tzdata).
pub fn time_zone(name: &str) -> Option<jiff::tz::TimeZone> {
    jiff::tz::TimeZone::get(name).ok()
}

/// The period of `period` in `tz` that contains `at_ms`: `(start, end)` in
/// Unix ms, `start <= at_ms < end`. A period starts at local midnight (a
/// week on Monday, a month on its first day); where a DST change skips
/// midnight, at the first local time after the gap. So a day is 23 or 25
/// hours long across a DST change. `None` only for times outside jiff's
/// range (years beyond ±9999).
pub fn period_bounds(period: Period, tz: &jiff::tz::TimeZone, at_ms: i64) -> Option<(i64, i64)> {
    use jiff::ToSpan;
    let now = jiff::Timestamp::from_millisecond(at_ms)
        .ok()?
        .to_zoned(tz.clone());
    let date = now.date();
    let first = match period {
        Period::Day => date,
        Period::Week => date
            .checked_sub(i64::from(date.weekday().to_monday_zero_offset()).days())
            .ok()?,
        Period::Month => date.first_of_month(),
    };
    let next = match period {
        Period::Day => first.checked_add(1.day()).ok()?,
        Period::Week => first.checked_add(1.week()).ok()?,
        Period::Month => first.checked_add(1.month()).ok()?,
    };
    let start = first
        .to_zoned(tz.clone())
        .ok()?
        .timestamp()
        .as_millisecond();
    let end = next.to_zoned(tz.clone()).ok()?.timestamp().as_millisecond();
    Some((start, end))
}

/// `ms` as RFC 3339 with the UTC offset `tz` has then (e.g.
/// `2026-11-01T00:00:00+01:00`); UTC if out of range.
pub fn rfc3339_in(ms: i64, tz: &jiff::tz::TimeZone) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => t.display_with_offset(tz.to_offset(t)).to_string(),
        Err(_) => rfc3339(ms),
    }
}

/// `ms` as RFC 3339 in UTC (`…Z`, with milliseconds when not whole seconds).
pub fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// What is left of a budget of `limit` with `spent` counted (never below 0:
/// usage beyond an estimate may take `spent` over the limit).
pub fn budget_left(limit: i64, spent: i64) -> i64 {
    limit.saturating_sub(spent).max(0)
}

/// The low-balance thresholds a debit from `before` to `after` crossed
/// (`before >= t > after`), in the order given.
pub fn crossed_down(before: i64, after: i64, thresholds: &[i64]) -> Vec<i64> {
    thresholds
        .iter()
        .copied()
        .filter(|t| before >= *t && after < *t)
        .collect()
}

/// The budget thresholds (percent of `limit`) that spend going from
/// `before` to `after` reached: the level `ceil(limit × p / 100)` with
/// `before < level <= after`. A limit of 0 has no levels.
pub fn crossed_percent(limit: i64, before: i64, after: i64, percents: &[u32]) -> Vec<u32> {
    if limit <= 0 {
        return Vec::new();
    }
    percents
        .iter()
        .copied()
        .filter(|p| {
            let level = (i128::from(limit) * i128::from(*p) + 99) / 100;
            i128::from(before) < level && level <= i128::from(after)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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

    fn ms(s: &str) -> i64 {
        s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn periods_in_time_zones() {
        let berlin = time_zone("Europe/Berlin").unwrap();
        let utc = time_zone("UTC").unwrap();
        assert!(time_zone("Mars/Olympus").is_none());
        let at = ms("2026-12-01T13:06:29Z");
        assert_eq!(
            period_bounds(Period::Day, &utc, at),
            Some((ms("2026-12-01T00:00:00Z"), ms("2026-12-02T00:00:00Z")))
        );
        // Berlin is UTC+1 in winter.
        assert_eq!(
            period_bounds(Period::Month, &berlin, at),
            Some((ms("2026-11-30T23:00:00Z"), ms("2026-12-31T23:00:00Z")))
        );
        // 2026-12-01 is a Tuesday: the week began on Monday 2026-11-30.
        assert_eq!(
            period_bounds(Period::Week, &berlin, at),
            Some((ms("2026-11-29T23:00:00Z"), ms("2026-12-06T23:00:00Z")))
        );
        // Just before local midnight is still the old day.
        let late = ms("2026-12-01T22:59:59.999Z");
        assert_eq!(
            period_bounds(Period::Day, &berlin, late).map(|b| b.1),
            Some(ms("2026-12-01T23:00:00Z"))
        );
        // DST: 2026-03-29 in Berlin has 23 hours, 2026-10-25 has 25; the
        // month of March ends at CEST midnight.
        let (s, e) = period_bounds(Period::Day, &berlin, ms("2026-03-29T12:00:00Z")).unwrap();
        assert_eq!((s, e - s), (ms("2026-03-28T23:00:00Z"), 23 * 3_600_000));
        let (s, e) = period_bounds(Period::Day, &berlin, ms("2026-10-25T12:00:00Z")).unwrap();
        assert_eq!((s, e - s), (ms("2026-10-24T22:00:00Z"), 25 * 3_600_000));
        assert_eq!(
            period_bounds(Period::Month, &berlin, ms("2026-03-15T00:00:00Z")),
            Some((ms("2026-02-28T23:00:00Z"), ms("2026-03-31T22:00:00Z")))
        );
        // A week across a DST change is 167 or 169 hours; the reset is named
        // with the offset in force then (what the 402 detail and
        // `resets_at` show).
        let (s, e) = period_bounds(Period::Week, &berlin, ms("2026-03-29T12:00:00Z")).unwrap();
        assert_eq!((s, e - s), (ms("2026-03-22T23:00:00Z"), 167 * 3_600_000));
        assert_eq!(rfc3339_in(e, &berlin), "2026-03-30T00:00:00+02:00");
        let (s, e) = period_bounds(Period::Week, &berlin, ms("2026-10-20T12:00:00Z")).unwrap();
        assert_eq!((s, e - s), (ms("2026-10-18T22:00:00Z"), 169 * 3_600_000));
        assert_eq!(rfc3339_in(e, &berlin), "2026-10-26T00:00:00+01:00");
        let new_york = time_zone("America/New_York").unwrap();
        let (s, e) = period_bounds(Period::Week, &new_york, ms("2026-03-05T12:00:00Z")).unwrap();
        assert_eq!(
            (rfc3339_in(s, &new_york), rfc3339_in(e, &new_york)),
            (
                "2026-03-02T00:00:00-05:00".to_owned(),
                "2026-03-09T00:00:00-04:00".to_owned()
            )
        );
        let (_, e) = period_bounds(Period::Month, &berlin, ms("2026-03-15T00:00:00Z")).unwrap();
        assert_eq!(rfc3339_in(e, &berlin), "2026-04-01T00:00:00+02:00");
        // A zone whose DST change skips midnight (Santiago, 2026-09-06
        // 00:00 -> 01:00): the day starts at 01:00 local.
        let santiago = time_zone("America/Santiago").unwrap();
        let (s, _) = period_bounds(Period::Day, &santiago, ms("2026-09-06T12:00:00Z")).unwrap();
        assert_eq!(rfc3339_in(s, &santiago), "2026-09-06T01:00:00-03:00");
        assert_eq!(
            rfc3339_in(ms("2026-12-31T23:00:00Z"), &berlin),
            "2027-01-01T00:00:00+01:00"
        );
        assert_eq!(
            rfc3339(ms("2026-12-01T00:00:00.250Z")),
            "2026-12-01T00:00:00.25Z"
        );
        for p in [Period::Day, Period::Week, Period::Month] {
            assert_eq!(Period::parse(p.as_str()), Some(p));
        }
        assert_eq!(Period::parse("year"), None);
    }

    #[test]
    fn thresholds() {
        assert_eq!(budget_left(10, 3), 7);
        assert_eq!(budget_left(10, 12), 0);
        assert_eq!(crossed_down(12, 8, &[10, 5]), vec![10]);
        assert_eq!(crossed_down(10, 4, &[10, 5]), vec![10, 5]);
        assert_eq!(crossed_down(9, 4, &[10, 5]), vec![5]);
        assert_eq!(crossed_down(4, 1, &[10, 5]), Vec::<i64>::new());
        // 80 % of 7 is 5.6: reached at 6.
        assert_eq!(crossed_percent(7, 5, 6, &[80, 100]), vec![80]);
        assert_eq!(crossed_percent(7, 6, 7, &[80, 100]), vec![100]);
        assert_eq!(crossed_percent(10, 0, 10, &[50, 100]), vec![50, 100]);
        assert_eq!(crossed_percent(10, 8, 12, &[50]), Vec::<u32>::new());
        assert_eq!(crossed_percent(0, 0, 5, &[50]), Vec::<u32>::new());
    }
}
