//! Counters, visible in Envoy's admin `/stats` as `wasmcustom.farebox_<name>`.

/// Declares [`Metric`], [`Metric::ALL`] and [`Metric::name`] from one list, so a metric
/// cannot be added to the enum and be missing from `ALL` (the glue defines the host
/// metrics from `ALL` and would silently drop a count for any other variant).
macro_rules! metrics {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)+) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Metric {
            $($(#[$doc])* $variant,)+
        }

        impl Metric {
            /// Every metric, in declaration (= [`Metric::index`]) order.
            pub const ALL: [Metric; [$(Metric::$variant),+].len()] = [$(Metric::$variant),+];

            pub fn name(self) -> &'static str {
                match self {
                    $(Metric::$variant => $name,)+
                }
            }
        }
    };
}

metrics! {
    /// Requests let through after an allow (fresh or cached).
    Allowed => "farebox_allowed",
    /// 402 answers.
    Denied => "farebox_denied",
    /// 401 answers (no, malformed or unknown credential).
    Unauthenticated => "farebox_unauthenticated",
    /// 403 answers.
    Forbidden => "farebox_forbidden",
    /// 429 answers.
    RateLimited => "farebox_rate_limited",
    /// Requests on free routes (cost 0).
    Free => "farebox_free",
    /// Decisions served from the cache, with no callout.
    CacheHits => "farebox_cache_hits",
    /// Authorize callouts started.
    Callouts => "farebox_callouts",
    /// Callouts that failed: not dispatched, unreachable, timed out, 5xx, unreadable answer.
    CalloutFailures => "farebox_callout_failures",
    /// Requests let through unpaid because the service failed (`failure_mode: open`).
    FailOpen => "farebox_fail_open",
    /// 503 answers because the service failed (`failure_mode: closed`).
    FailClosed => "farebox_fail_closed",
    /// Refunds the service confirmed.
    Refunds => "farebox_refunds",
    /// Refund attempts that failed (each attempt counts).
    RefundFailures => "farebox_refund_failures",
    /// Paid MCP calls the server answered with a JSON-RPC error, given back.
    McpErrorRefunds => "farebox_mcp_error_refunds",
    /// Leases granted (lease mode).
    LeasesTaken => "farebox_leases_taken",
    /// Leases granted that replaced a lease still held (exhausted or expiring).
    LeaseRenewals => "farebox_lease_renewals",
    /// Requests that waited for another request's lease call.
    LeaseWaits => "farebox_lease_waits",
    /// Settle and cancel calls the service accepted.
    Settles => "farebox_settles",
    /// Settle and cancel attempts that failed (each attempt counts).
    SettleFailures => "farebox_settle_failures",
    /// Units spent locally from leases.
    LeaseUnitsSpent => "farebox_lease_units_spent",
    /// Usage-priced responses whose usage was read.
    UsageMetered => "farebox_usage_metered",
    /// Usage-priced responses charged at the hold (no usage found, or abandoned).
    UsageUnread => "farebox_usage_unread",
    /// Final usage prices the service accepted.
    UsageAdjusted => "farebox_usage_adjusted",
    /// Attempts to send a final usage price that failed (each attempt counts).
    UsageAdjustFailures => "farebox_usage_adjust_failures",
    /// Request bodies over `max_body_bytes` (413).
    BodyTooLarge => "farebox_body_too_large",
    /// Lease requests paid by authorize because another account's lease held their slot.
    LeaseSlotBusy => "farebox_lease_slot_busy",
    /// Times a request was parked because the service was recalling credit for it.
    LeaseRecallWaits => "farebox_lease_recall_waits",
    /// Leases given back early because the service recalled them.
    LeaseRecalls => "farebox_lease_recalls",
    /// Leases renewed ahead of need (nobody waited for them).
    LeaseAheadRenewals => "farebox_lease_ahead_renewals",
    /// Requests refused 400 for a model missing from the route's price table.
    UnknownModel => "farebox_unknown_model",
    /// MCP requests refused 400 because their `Mcp-Method`/`Mcp-Name` headers did not match the body.
    McpHeaderMismatch => "farebox_mcp_header_mismatch",
    /// Streaming Chat Completions requests sent with `stream_options.include_usage` added.
    IncludeUsageAdded => "farebox_include_usage_added",
}

impl Metric {
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
