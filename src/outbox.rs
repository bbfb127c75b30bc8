//! Calls to the balance service that must outlive the request that caused
//! them: refunds, lease settlements and lease cancellations.
//!
//! They are sent from the root context's timer, not from the request's own
//! context: Envoy cancels a context's pending calls when its stream ends. Each
//! of them is idempotent on the service side, so retrying is always safe.

use std::collections::VecDeque;

use crate::balance_api::{
    call, cancel_body, classify_outcome, lease_refund_body, lease_usage_body, refund_body,
    settle_body, settle_recalls, usage_body, CallOutcome, CalloutResponse, UsageLine,
};
use crate::config::Config;
use crate::host::Host;
use crate::metrics::Metric;

/// Attempts before a job is given up (and logged as lost): the retries wait
/// 1, 2, 4, 8, 16 and 32 s (63 s in all) after the first attempt fails.
pub const MAX_ATTEMPTS: u32 = 7;
pub const FIRST_BACKOFF_MS: u64 = 1_000;
/// Jobs waiting beyond this are dropped oldest first (and logged), so a dead
/// service cannot make the queue grow without bound.
pub const MAX_QUEUED: usize = 10_000;
const MAX_IN_FLIGHT: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Give back a charged request the upstream did not serve.
    Refund {
        request_id: String,
        /// The credential, as the contract identifies the payer by it. Never logged.
        account: String,
        cost: u64,
        status: u16,
        /// Undoing a call whose answer was lost: the charge may not be committed yet,
        /// so "unknown request" is retried before it is believed.
        undo: bool,
    },
    /// Report a lease's total use; `last` closes it and returns the rest.
    Settle {
        lease_key: String,
        lease_id: String,
        used: u64,
        last: bool,
        /// The contract's settle sequence number: a retry sends the same one.
        seq: u64,
    },
    /// Credit units of a request whose lease is no longer the current one.
    LeaseRefund {
        lease_id: String,
        request_id: String,
        units: u64,
        status: u16,
    },
    /// Release a lease whose grant we never saw (the answer was lost).
    Cancel { request_id: String },
    /// The final price of a usage-priced request (its hold was the estimate), with its
    /// usage line so the ledger can itemise it.
    Usage {
        request_id: String,
        account: String,
        actual: u64,
        line: Option<UsageLine>,
    },
    /// The usage line of a request paid from a lease: what the lease's settles pay for.
    LeaseUsage {
        lease_id: String,
        request_id: String,
        units: u64,
        line: UsageLine,
    },
}

impl Job {
    fn failure_metric(&self) -> Metric {
        match self {
            Job::Refund { .. } | Job::LeaseRefund { .. } => Metric::RefundFailures,
            Job::Usage { .. } | Job::LeaseUsage { .. } => Metric::UsageAdjustFailures,
            Job::Settle { .. } | Job::Cancel { .. } => Metric::SettleFailures,
        }
    }

    fn success_metric(&self) -> Metric {
        match self {
            Job::Refund { .. } | Job::LeaseRefund { .. } => Metric::Refunds,
            Job::Usage { .. } | Job::LeaseUsage { .. } => Metric::UsageAdjusted,
            Job::Settle { .. } | Job::Cancel { .. } => Metric::Settles,
        }
    }

    /// A periodic settle is superseded by the next one, so it is never retried.
    fn retried(&self) -> bool {
        !matches!(self, Job::Settle { last: false, .. })
    }

    fn describe(&self) -> String {
        match self {
            Job::Refund {
                request_id,
                cost,
                status,
                ..
            } => {
                format!("refund of request {request_id} ({cost} units, upstream status {status})")
            }
            Job::Settle {
                lease_id,
                used,
                last,
                ..
            } => {
                format!(
                    "{} settle of lease {lease_id} ({used} units used)",
                    if *last { "final" } else { "periodic" }
                )
            }
            Job::Cancel { request_id } => {
                format!("cancel of the lease taken by request {request_id}")
            }
            Job::LeaseRefund {
                lease_id,
                request_id,
                units,
                status,
            } => format!(
                "refund to lease {lease_id} of request {request_id} ({units} units, upstream status {status})"
            ),
            Job::Usage {
                request_id, actual, ..
            } => {
                format!("usage of request {request_id} ({actual} units)")
            }
            Job::LeaseUsage {
                lease_id,
                request_id,
                units,
                ..
            } => format!("usage line of request {request_id} on lease {lease_id} ({units} units)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Task {
    job: Job,
    attempts: u32,
    due_ms: u64,
}

/// A job the service has answered for good (or that was given up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub job: Job,
    pub ok: bool,
    /// A settle answer asked for the lease back (contract 4.3, recall).
    pub recall: bool,
}

#[derive(Debug, Default)]
pub struct Outbox {
    waiting: VecDeque<Task>,
    in_flight: Vec<(u32, Task)>,
}

impl Outbox {
    pub fn push(&mut self, host: &impl Host, job: Job) {
        if self.waiting.len() >= MAX_QUEUED {
            if let Some(dropped) = self.waiting.pop_front() {
                host.count(dropped.job.failure_metric());
                log::error!("outbox full: {} dropped", dropped.job.describe());
            }
        }
        self.waiting.push_back(Task {
            job,
            attempts: 0,
            due_ms: 0,
        });
    }

    pub fn len(&self) -> usize {
        self.waiting.len() + self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sends the jobs that are due. Returns the ones given up for good.
    pub fn flush(&mut self, host: &impl Host, cfg: &Config) -> Vec<Finished> {
        let now = host.now_ms();
        let mut later = VecDeque::new();
        let mut finished = Vec::new();
        while let Some(task) = self.waiting.pop_front() {
            if task.due_ms > now || self.in_flight.len() >= MAX_IN_FLIGHT {
                later.push_back(task);
                continue;
            }
            let (path, body, request_id) = match &task.job {
                Job::Refund {
                    request_id,
                    account,
                    cost,
                    status,
                    ..
                } => (
                    cfg.refund_path.clone(),
                    refund_body(request_id, account, *cost, *status),
                    request_id.clone(),
                ),
                Job::Settle {
                    lease_id,
                    used,
                    last,
                    seq,
                    ..
                } => (
                    format!("{}/{lease_id}/settle", cfg.lease.path),
                    settle_body(*used, *last, *seq),
                    format!("{lease_id}-settle-{seq}"),
                ),
                Job::LeaseRefund {
                    lease_id,
                    request_id,
                    units,
                    status,
                } => (
                    format!("{}/{lease_id}/refund", cfg.lease.path),
                    lease_refund_body(request_id, *units, *status),
                    request_id.clone(),
                ),
                Job::Usage {
                    request_id,
                    account,
                    actual,
                    line,
                } => (
                    cfg.usage_path.clone(),
                    usage_body(request_id, account, *actual, line.as_ref()),
                    format!("{request_id}-usage"),
                ),
                Job::LeaseUsage {
                    lease_id,
                    request_id,
                    units,
                    line,
                } => (
                    format!("{}/{lease_id}/usage", cfg.lease.path),
                    lease_usage_body(request_id, *units, line),
                    format!("{request_id}-usage"),
                ),
                Job::Cancel { request_id } => (
                    format!("{}/cancel", cfg.lease.path),
                    cancel_body(request_id),
                    request_id.clone(),
                ),
            };
            match call(host, cfg, &path, &request_id, &body) {
                Ok(token) => self.in_flight.push((token, task)),
                Err(e) => {
                    log::warn!("{} not sent: {e}", task.job.describe());
                    finished.extend(self.retry_later(host, task, now, &mut later));
                }
            }
        }
        self.waiting = later;
        finished
    }

    /// The service answered (or the call failed) for the job sent with `token`.
    /// `None` when the token is not ours or the job will be retried.
    pub fn on_response(
        &mut self,
        host: &impl Host,
        token: u32,
        resp: &CalloutResponse,
    ) -> Option<Finished> {
        let pos = self.in_flight.iter().position(|(t, _)| *t == token)?;
        let (_, task) = self.in_flight.swap_remove(pos);
        match classify_outcome(resp.status) {
            CallOutcome::Done => {
                host.count(task.job.success_metric());
                log::info!("{} done", task.job.describe());
                let recall =
                    matches!(task.job, Job::Settle { last: false, .. }) && settle_recalls(resp);
                Some(Finished {
                    job: task.job,
                    ok: true,
                    recall,
                })
            }
            // A lost authorize may commit after our undo arrives: ask again later.
            CallOutcome::Rejected(404)
                if matches!(task.job, Job::Refund { undo: true, .. })
                    && task.attempts + 1 < MAX_ATTEMPTS =>
            {
                let mut task = task;
                task.attempts += 1;
                task.due_ms = host.now_ms() + (FIRST_BACKOFF_MS << (task.attempts - 1).min(16));
                self.waiting.push_back(task);
                None
            }
            // 404 on a refund or cancel: nothing was charged or granted; nothing is lost.
            CallOutcome::Rejected(404)
                if !matches!(
                    task.job,
                    Job::Settle { .. } | Job::LeaseRefund { .. } | Job::LeaseUsage { .. }
                ) =>
            {
                log::debug!("{}: nothing to undo", task.job.describe());
                Some(Finished {
                    job: task.job,
                    ok: true,
                    recall: false,
                })
            }
            CallOutcome::Rejected(s) => {
                host.count(task.job.failure_metric());
                log::error!(
                    "{} rejected by the balance service (status {s})",
                    task.job.describe()
                );
                Some(Finished {
                    job: task.job,
                    ok: false,
                    recall: false,
                })
            }
            CallOutcome::Retry(s) => {
                log::warn!("{} failed (status {s:?})", task.job.describe());
                let mut later = VecDeque::new();
                let given_up = self.retry_later(host, task, host.now_ms(), &mut later);
                self.waiting.extend(later);
                given_up
            }
        }
    }

    fn retry_later(
        &mut self,
        host: &impl Host,
        mut task: Task,
        now: u64,
        into: &mut VecDeque<Task>,
    ) -> Option<Finished> {
        host.count(task.job.failure_metric());
        task.attempts += 1;
        if !task.job.retried() {
            return Some(Finished {
                job: task.job,
                ok: false,
                recall: false,
            });
        }
        if task.attempts >= MAX_ATTEMPTS {
            log::error!(
                "{} given up after {} attempts",
                task.job.describe(),
                task.attempts
            );
            return Some(Finished {
                job: task.job,
                ok: false,
                recall: false,
            });
        }
        task.due_ms = now + (FIRST_BACKOFF_MS << (task.attempts - 1).min(16));
        into.push_back(task);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeHost;

    fn cfg() -> Config {
        Config::parse(br#"{"cluster": "balance"}"#).unwrap()
    }

    fn refund(id: &str, undo: bool) -> Job {
        Job::Refund {
            request_id: id.into(),
            account: "k".into(),
            cost: 3,
            status: 503,
            undo,
        }
    }

    /// A settle of lease `ls_1`: periodic, or `last` (closing it).
    fn settle(last: bool) -> Job {
        Job::Settle {
            lease_key: "k".into(),
            lease_id: "ls_1".into(),
            used: 2,
            last,
            seq: 1,
        }
    }

    fn status(s: Option<u16>) -> CalloutResponse {
        CalloutResponse {
            status: s,
            ..CalloutResponse::default()
        }
    }

    /// Sends what is due and answers it with `s`; the tokens sent.
    fn answer_all(outbox: &mut Outbox, host: &FakeHost, s: Option<u16>) -> Vec<Finished> {
        let before = host.calls.borrow().len();
        outbox.flush(host, &cfg());
        let tokens: Vec<u32> = host.calls.borrow()[before..]
            .iter()
            .map(|c| c.token)
            .collect();
        tokens
            .into_iter()
            .filter_map(|t| outbox.on_response(host, t, &status(s)))
            .collect()
    }

    #[test]
    fn a_full_queue_drops_its_oldest_job_and_counts_it() {
        let host = FakeHost::request("GET", "/", &[]);
        let mut outbox = Outbox::default();
        for i in 0..MAX_QUEUED {
            outbox.push(&host, refund(&format!("r{i}"), false));
        }
        assert_eq!(outbox.len(), MAX_QUEUED);
        assert_eq!(host.count_of(Metric::RefundFailures), 0);
        outbox.push(&host, refund("newest", false));
        assert_eq!(outbox.len(), MAX_QUEUED);
        assert_eq!(host.count_of(Metric::RefundFailures), 1);
        assert_eq!(
            outbox.waiting.front().map(|t| &t.job),
            Some(&refund("r1", false))
        );
        assert_eq!(
            outbox.waiting.back().map(|t| &t.job),
            Some(&refund("newest", false))
        );
    }

    #[test]
    fn at_most_max_in_flight_are_sent_at_once() {
        let host = FakeHost::request("GET", "/", &[]);
        let mut outbox = Outbox::default();
        for i in 0..MAX_IN_FLIGHT + 3 {
            outbox.push(&host, refund(&format!("r{i}"), false));
        }
        outbox.flush(&host, &cfg());
        assert_eq!(host.calls.borrow().len(), MAX_IN_FLIGHT);
        assert_eq!(outbox.len(), MAX_IN_FLIGHT + 3);
        assert!(!outbox.is_empty());
    }

    #[test]
    fn retries_back_off_1_2_4_seconds_then_give_up() {
        let host = FakeHost::request("GET", "/", &[]);
        let mut outbox = Outbox::default();
        outbox.push(&host, refund("r", false));
        let start = host.now_ms();
        let mut waits = Vec::new();
        let mut finished = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            finished = answer_all(&mut outbox, &host, Some(503));
            if let Some(due) = outbox.waiting.front().map(|t| t.due_ms) {
                waits.push(due - host.now_ms());
                // Not sent before it is due.
                host.now.set(due - 1);
                assert!(answer_all(&mut outbox, &host, Some(200)).is_empty());
                assert_eq!(outbox.len(), 1);
                host.now.set(due);
            }
        }
        assert_eq!(waits, vec![1_000, 2_000, 4_000, 8_000, 16_000, 32_000]);
        assert_eq!(host.now_ms() - start, 63_000);
        assert_eq!(finished.len(), 1);
        assert!(!finished[0].ok);
        assert!(outbox.is_empty());
        assert_eq!(
            host.count_of(Metric::RefundFailures),
            u64::from(MAX_ATTEMPTS)
        );
        assert_eq!(host.count_of(Metric::Refunds), 0);
    }

    #[test]
    fn an_undo_answered_404_is_asked_again_with_backoff_until_the_last_attempt() {
        let host = FakeHost::request("GET", "/", &[]);
        let mut outbox = Outbox::default();
        outbox.push(&host, refund("r", true));
        let mut waits = Vec::new();
        let mut finished = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            finished = answer_all(&mut outbox, &host, Some(404));
            if let Some(due) = outbox.waiting.front().map(|t| t.due_ms) {
                waits.push(due - host.now_ms());
                host.now.set(due);
            }
        }
        assert_eq!(waits, vec![1_000, 2_000, 4_000, 8_000, 16_000, 32_000]);
        // The last 404 is believed: nothing was charged.
        assert_eq!(finished.len(), 1);
        assert!(finished[0].ok);
        assert!(outbox.is_empty());
        assert_eq!(host.count_of(Metric::RefundFailures), 0);
        // A plain refund's 404 is believed at once.
        outbox.push(&host, refund("p", false));
        let done = answer_all(&mut outbox, &host, Some(404));
        assert!(done.len() == 1 && done[0].ok);
    }

    #[test]
    fn a_periodic_settle_is_never_retried_and_a_404_on_it_is_a_failure() {
        let host = FakeHost::request("GET", "/", &[]);
        let mut outbox = Outbox::default();
        outbox.push(&host, settle(false));
        let done = answer_all(&mut outbox, &host, None);
        assert!(done.len() == 1 && !done[0].ok);
        assert!(outbox.is_empty());
        assert_eq!(host.count_of(Metric::SettleFailures), 1);
        outbox.push(&host, settle(true));
        assert!(answer_all(&mut outbox, &host, None).is_empty());
        assert_eq!(outbox.len(), 1, "a final settle is retried");
        host.advance(1_000);
        let done = answer_all(&mut outbox, &host, Some(404));
        assert!(done.len() == 1 && !done[0].ok);
        assert_eq!(host.count_of(Metric::SettleFailures), 3);
        outbox.push(
            &host,
            Job::Cancel {
                request_id: "c".into(),
            },
        );
        let done = answer_all(&mut outbox, &host, Some(200));
        assert!(done.len() == 1 && done[0].ok);
        assert_eq!(host.count_of(Metric::Settles), 1);
    }

    #[test]
    fn an_answer_for_another_call_is_not_taken() {
        let host = FakeHost::request("GET", "/", &[]);
        let mut outbox = Outbox::default();
        outbox.push(&host, refund("r", false));
        outbox.flush(&host, &cfg());
        let token = host.last_call().token;
        assert_eq!(
            outbox.on_response(&host, token + 1, &status(Some(200))),
            None
        );
        assert_eq!(outbox.len(), 1);
        let done = outbox.on_response(&host, token, &status(Some(200)));
        assert!(done.is_some_and(|f| f.ok && f.job == refund("r", false)));
        assert_eq!(host.count_of(Metric::Refunds), 1);
    }

    #[test]
    fn every_job_names_itself_in_the_log() {
        let jobs = [
            refund("r1", false),
            Job::Settle {
                lease_key: "k".into(),
                lease_id: "ls_9".into(),
                used: 4,
                last: true,
                seq: 2,
            },
            Job::LeaseRefund {
                lease_id: "ls_9".into(),
                request_id: "r2".into(),
                units: 1,
                status: 500,
            },
            Job::Cancel {
                request_id: "r3".into(),
            },
            Job::Usage {
                request_id: "r4".into(),
                account: "k".into(),
                actual: 7,
                line: None,
            },
        ];
        for (job, needle) in jobs.iter().zip(["r1", "ls_9", "r2", "r3", "r4"]) {
            assert!(job.describe().contains(needle), "{}", job.describe());
        }
    }

    #[test]
    fn only_a_periodic_settle_can_be_told_to_give_its_lease_back() {
        let host = FakeHost::request("GET", "/", &[]);
        let mut outbox = Outbox::default();
        let recall = CalloutResponse {
            status: Some(200),
            body: br#"{"recall": true}"#.to_vec(),
            ..CalloutResponse::default()
        };
        let mut answer = |job: Job, resp: &CalloutResponse| {
            outbox.push(&host, job);
            outbox.flush(&host, &cfg());
            let token = host.last_call().token;
            outbox.on_response(&host, token, resp)
        };
        let periodic = answer(settle(false), &recall).unwrap();
        assert!(periodic.ok && periodic.recall);
        let plain = answer(settle(false), &status(Some(200))).unwrap();
        assert!(plain.ok && !plain.recall);
        // A final settle already gives the lease back, and a refund holds none.
        let last = answer(settle(true), &recall).unwrap();
        assert!(last.ok && !last.recall);
        let refunded = answer(refund("r", false), &recall).unwrap();
        assert!(refunded.ok && !refunded.recall);
    }
}
