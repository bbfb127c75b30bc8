//! Counters, visible in Envoy's admin `/stats` as `wasmcustom.farebox_<name>`.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Requests let through after an allow (fresh or cached).
    Allowed,
    /// 402 answers.
    Denied,
    /// 401 answers (no, malformed or unknown credential).
    Unauthenticated,
    /// 403 answers.
    Forbidden,
    /// 429 answers.
    RateLimited,
    /// Requests on free routes (cost 0).
    Free,
    /// Decisions served from the cache, with no callout.
    CacheHits,
    /// Authorize callouts started.
    Callouts,
    /// Callouts that failed: not dispatched, unreachable, timed out, 5xx, unreadable answer.
    CalloutFailures,
    /// Requests let through unpaid because the service failed (`failure_mode: open`).
    FailOpen,
    /// 503 answers because the service failed (`failure_mode: closed`).
    FailClosed,
    /// Refunds the service confirmed.
    Refunds,
    /// Refund attempts that failed (each attempt counts).
    RefundFailures,
    /// Leases granted (lease mode).
    LeasesTaken,
    /// Leases granted that replaced a lease still held (exhausted or expiring).
    LeaseRenewals,
    /// Requests that waited for another request's lease call.
    LeaseWaits,
    /// Settle and cancel calls the service accepted.
    Settles,
    /// Settle and cancel attempts that failed (each attempt counts).
    SettleFailures,
    /// Units spent locally from leases.
    LeaseUnitsSpent,
    /// Usage-priced responses whose usage was read.
    UsageMetered,
    /// Usage-priced responses charged at the hold (no usage found, or abandoned).
    UsageUnread,
    /// Final usage prices the service accepted.
    UsageAdjusted,
    /// Attempts to send a final usage price that failed (each attempt counts).
    UsageAdjustFailures,
    /// Request bodies over `max_body_bytes` (413).
    BodyTooLarge,
    /// Lease requests paid by authorize because another account's lease held their slot.
    LeaseSlotBusy,
    /// Times a request was parked because the service was recalling credit for it.
    LeaseRecallWaits,
    /// Leases given back early because the service recalled them.
    LeaseRecalls,
    /// Leases renewed ahead of need (nobody waited for them).
    LeaseAheadRenewals,
}

impl Metric {
    pub const ALL: [Metric; 28] = [
        Metric::Allowed,
        Metric::Denied,
        Metric::Unauthenticated,
        Metric::Forbidden,
        Metric::RateLimited,
        Metric::Free,
        Metric::CacheHits,
        Metric::Callouts,
        Metric::CalloutFailures,
        Metric::FailOpen,
        Metric::FailClosed,
        Metric::Refunds,
        Metric::RefundFailures,
        Metric::LeasesTaken,
        Metric::LeaseRenewals,
        Metric::LeaseWaits,
        Metric::Settles,
        Metric::SettleFailures,
        Metric::LeaseUnitsSpent,
        Metric::UsageMetered,
        Metric::UsageUnread,
        Metric::UsageAdjusted,
        Metric::UsageAdjustFailures,
        Metric::BodyTooLarge,
        Metric::LeaseSlotBusy,
        Metric::LeaseRecallWaits,
        Metric::LeaseRecalls,
        Metric::LeaseAheadRenewals,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Allowed => "farebox_allowed",
            Metric::Denied => "farebox_denied",
            Metric::Unauthenticated => "farebox_unauthenticated",
            Metric::Forbidden => "farebox_forbidden",
            Metric::RateLimited => "farebox_rate_limited",
            Metric::Free => "farebox_free",
            Metric::CacheHits => "farebox_cache_hits",
            Metric::Callouts => "farebox_callouts",
            Metric::CalloutFailures => "farebox_callout_failures",
            Metric::FailOpen => "farebox_fail_open",
            Metric::FailClosed => "farebox_fail_closed",
            Metric::Refunds => "farebox_refunds",
            Metric::RefundFailures => "farebox_refund_failures",
            Metric::LeasesTaken => "farebox_leases_taken",
            Metric::LeaseRenewals => "farebox_lease_renewals",
            Metric::LeaseWaits => "farebox_lease_waits",
            Metric::Settles => "farebox_settles",
            Metric::SettleFailures => "farebox_settle_failures",
            Metric::LeaseUnitsSpent => "farebox_lease_units_spent",
            Metric::UsageMetered => "farebox_usage_metered",
            Metric::UsageUnread => "farebox_usage_unread",
            Metric::UsageAdjusted => "farebox_usage_adjusted",
            Metric::UsageAdjustFailures => "farebox_usage_adjust_failures",
            Metric::BodyTooLarge => "farebox_body_too_large",
            Metric::LeaseSlotBusy => "farebox_lease_slot_busy",
            Metric::LeaseRecallWaits => "farebox_lease_recall_waits",
            Metric::LeaseRecalls => "farebox_lease_recalls",
            Metric::LeaseAheadRenewals => "farebox_lease_ahead_renewals",
        }
    }

    /// Position in [`Metric::ALL`], for a table of host metric ids.
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_complete_and_in_index_order() {
        for (i, m) in Metric::ALL.iter().enumerate() {
            assert_eq!(m.index(), i);
            assert!(m.name().starts_with("farebox_"));
        }
        let names: std::collections::HashSet<_> = Metric::ALL.iter().map(|m| m.name()).collect();
        assert_eq!(names.len(), Metric::ALL.len());
    }
}
