//! Lease mode: spending from the account's lease, taking and installing a new one,
//! and the shared-data slot operations on lease records.

use crate::balance_api::{lease_body, parse_lease, CalloutResponse, LeaseAnswer, LeaseRequest};
use crate::cache::CacheKey;
use crate::config::Config;
use crate::decision::Decision;
use crate::host::{Host, HttpHost};
use crate::lease::{self, Grant, LeaseKey, LeaseRecord, Step, View};
use crate::metrics::Metric;
use crate::outbox::Job;
use crate::response::Freshness;
use crate::shared_data::{self, Attempt};

use super::authorize::CallKind;
use super::cached::forget;
use super::worker::{Owned, Renewal, Worker};
use super::{Charge, Exchange, Flow, Pending, Stage, LEASE_DENY_MAX_AGE_S};

impl Exchange {
    /// Lease mode: pay from the account's lease, or take the renewal lock and ask
    /// for a new one, or wait for whoever holds the lock.
    pub(super) fn spend_from_lease(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        mut p: Pending,
    ) -> Flow {
        let Some(credential) = p.credential.clone() else {
            return self.fail(host, cfg, None);
        };
        let key = LeaseKey::new(&cfg.cluster, &credential);
        let slot = key.slot_key(cfg.lease.max_entries);
        let lock_ms = lock_ms(cfg);
        /// What the slot said, acted on once the update is over.
        enum Next {
            /// Another account's lease holds this slot.
            Occupied,
            Spent {
                record: LeaseRecord,
                renew: bool,
            },
            /// Answered from the cache.
            Served(Flow),
            /// The renewal lock is ours: ask for a lease.
            Locked,
            Wait,
        }
        let next = shared_data::update(host, &slot, |stored| {
            let now = host.now_ms();
            let current = match lease::view(&key, stored, now) {
                View::Mine(current) => current,
                View::Occupied => return Attempt::Leave(Next::Occupied),
            };
            let may_renew = self.worker.renewals_open();
            match lease::step(
                key.owner(),
                current.as_ref(),
                p.cost,
                now,
                lock_ms,
                may_renew,
            ) {
                Step::Spend { record, renew } => {
                    Attempt::Write(record.encode(), Next::Spent { record, renew })
                }
                Step::Lock { record } => {
                    // No lease can pay. A refusal the service let us cache answers first:
                    // a 401/403 always; a 402 only to a request that waited for the very
                    // lease call that was refused. A new request asks again, so that a
                    // top-up while other gateways hold leases is usable at once.
                    if p.cache_key.is_none() && cfg.cache_max_entries > 0 {
                        p.cache_key = Some(CacheKey::new(
                            &cfg.fingerprint,
                            &p.route,
                            p.cost,
                            &credential,
                        ));
                    }
                    let waited = p.parked_since_ms != 0 && p.recall_since_ms == 0;
                    match self.serve_cached(host, cfg, p.cache_key.as_ref(), None, &p.route, waited)
                    {
                        Some(flow) => Attempt::Leave(Next::Served(flow)),
                        None => Attempt::Write(record.encode(), Next::Locked),
                    }
                }
                Step::Wait => Attempt::Leave(Next::Wait),
            }
        });
        match next {
            Some(Next::Occupied) => {
                // Another account's lease holds this slot: this request is paid
                // per request instead (the lease table is full there).
                host.count(Metric::LeaseSlotBusy);
                if p.request_id.is_empty() {
                    p.request_id = self.request_id(host);
                }
                self.authorize(host, cfg, p)
            }
            Some(Next::Spent { record, renew }) => {
                host.add(Metric::LeaseUnitsSpent, p.cost);
                if renew {
                    let request_id = self.worker.make_id(host);
                    self.worker.renewals.borrow_mut().push(Renewal {
                        slot: slot.clone(),
                        key,
                        credential: credential.clone(),
                        cost: p.cost,
                        request_id,
                    });
                }
                let charge = Charge::Leased {
                    key: slot,
                    lease_id: record.lease_id.clone(),
                    request_id: p.request_id,
                    credential,
                    cost: p.cost,
                };
                let allow = Decision::allow(record.account_id, None);
                self.act(host, cfg, &p.route, allow, Freshness::NoStore, Some(charge))
            }
            Some(Next::Served(flow)) => flow,
            Some(Next::Locked) => self.take_lease(host, cfg, slot, &credential, p),
            Some(Next::Wait) | None => {
                if p.parked_since_ms == 0 {
                    host.count(Metric::LeaseWaits);
                    p.parked_since_ms = host.now_ms();
                }
                self.stage = Stage::Parked(Box::new(p));
                Flow::Park
            }
        }
    }

    pub(super) fn take_lease(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        slot: String,
        credential: &str,
        mut p: Pending,
    ) -> Flow {
        if p.request_id.is_empty() {
            p.request_id = self.request_id(host);
        }
        let holder = self.worker.holder.borrow().clone();
        // An account whose credit had to be recalled from other gateways is short
        // against the fleet: ask for this request only, and leave the rest unreserved
        // for the others (taking it all would only make them recall it back).
        let want = if p.recall_since_ms != 0 {
            p.cost
        } else {
            lease::want(cfg.lease.want, p.cost)
        };
        let body = lease_body(&LeaseRequest {
            account: credential,
            want,
            min: p.cost,
            request_id: &p.request_id,
            holder: &holder,
        });
        let key = LeaseKey::new(&cfg.cluster, credential);
        self.start_call(host, cfg, CallKind::Lease, &body, p, || {
            unlock(host, &slot, &key, 0)
        })
    }

    /// A parked request's timer tick: try again. Returns how it went, like
    /// [`Gate::on_request_headers`]; `Park` means still waiting.
    pub(super) fn on_wake(&mut self, host: &impl HttpHost, cfg: Option<&Config>) -> Flow {
        let Some(cfg) = cfg else {
            return Flow::Pause(None);
        };
        // A wake for a stream that is not parked (a stale timer) leaves it as it is: a
        // pending decision dropped here would let the request through unpaid.
        let p = match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Parked(p) => p,
            other => {
                self.stage = other;
                return Flow::Pause(None);
            }
        };
        let now = host.now_ms();
        if now < p.wake_at_ms {
            self.stage = Stage::Parked(p);
            return Flow::Park;
        }
        // The lock holder has the call timeout to finish, and a recall its wait; past
        // that (plus slack) something is wrong, and this request is answered as a
        // service failure rather than hang.
        let limit = u64::try_from(cfg.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_mul(2)
            .saturating_add(1_000)
            .saturating_add(cfg.lease.recall_wait_ms);
        if now.saturating_sub(p.parked_since_ms) > limit {
            host.count(Metric::CalloutFailures);
            log::warn!("request {} waited too long for a lease", p.request_id);
            return self.fail(host, cfg, None);
        }
        self.spend_from_lease(host, cfg, *p)
    }

    pub(super) fn leased(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        mut p: Pending,
        resp: &CalloutResponse,
    ) -> Flow {
        log::debug!(
            "request {}: lease call {} answered {:?}",
            p.request_id,
            p.token,
            resp.status
        );
        let credential = p.credential.clone().unwrap_or_default();
        let key = LeaseKey::new(&cfg.cluster, &credential);
        let slot = key.slot_key(cfg.lease.max_entries);
        match parse_lease(resp, p.cost, cfg.cache_max_ttl_s) {
            Ok(LeaseAnswer::Granted(grant)) => {
                forget(host, cfg, p.cache_key.as_ref());
                match self
                    .worker
                    .install_grant(host, cfg, &slot, &key, &grant, p.cost)
                {
                    Some(_) => {
                        host.add(Metric::LeaseUnitsSpent, p.cost);
                        let charge = Charge::Leased {
                            key: slot,
                            lease_id: grant.lease_id.clone(),
                            request_id: p.request_id,
                            credential,
                            cost: p.cost,
                        };
                        let allow = Decision::Allow {
                            account_id: grant.account_id.clone(),
                            balance: grant.balance,
                            budget: grant.budget,
                            paid: None,
                        };
                        self.act(host, cfg, &p.route, allow, Freshness::NoStore, Some(charge))
                    }
                    None => self.fail(host, cfg, None),
                }
            }
            Ok(LeaseAnswer::Decided(mut verdict)) => {
                unlock(host, &slot, &key, 0);
                // A 402 in lease mode holds only for a moment (the account may be topped
                // up while other gateways hold leases): kept at most a second, for the
                // requests that waited for this call, and the client is not told to keep it.
                let deny = matches!(verdict.decision, Decision::Deny(_));
                if deny {
                    verdict.max_age_s = verdict.max_age_s.map(|s| s.min(LEASE_DENY_MAX_AGE_S));
                }
                let freshness = self.remember(host, cfg, p.cache_key.as_ref(), &verdict);
                let freshness = if deny { Freshness::NoStore } else { freshness };
                // A lease call never debits without a grant, so there is no charge to keep.
                self.act(host, cfg, &p.route, verdict.decision, freshness, None)
            }
            Ok(LeaseAnswer::Recall {
                verdict,
                retry_after_ms,
            }) => {
                unlock(host, &slot, &key, 0);
                // An older refusal no longer holds: the account has credit, held elsewhere.
                forget(host, cfg, p.cache_key.as_ref());
                let now = host.now_ms();
                let since = match (p.recall_since_ms, p.parked_since_ms) {
                    (0, 0) => now,
                    (0, parked) => parked,
                    (recalled, _) => recalled,
                };
                let wake_at = now.saturating_add(retry_after_ms);
                if wake_at > since.saturating_add(cfg.lease.recall_wait_ms) {
                    log::info!(
                        "request {}: recalled credit did not arrive within {} ms",
                        p.request_id,
                        cfg.lease.recall_wait_ms
                    );
                    return self.act(
                        host,
                        cfg,
                        &p.route,
                        verdict.decision,
                        Freshness::NoStore,
                        None,
                    );
                }
                host.count(Metric::LeaseRecallWaits);
                p.recall_since_ms = since;
                p.wake_at_ms = wake_at;
                if p.parked_since_ms == 0 {
                    p.parked_since_ms = now;
                }
                self.stage = Stage::Parked(Box::new(p));
                Flow::Park
            }
            Err(failure) => {
                host.count(Metric::CalloutFailures);
                log::warn!("lease for request {} failed: {failure}", p.request_id);
                unlock(host, &slot, &key, 0);
                // The service may have granted a lease we will never use: release it.
                self.worker.outbox.borrow_mut().push(
                    host,
                    Job::Cancel {
                        request_id: p.request_id,
                    },
                );
                self.fail(host, cfg, None)
            }
        }
    }
}

impl Worker {
    /// Installs a granted lease in its slot (`cost` already spent from it), and
    /// settles the lease it replaces. `None` when it could not be stored: it is
    /// then given back whole.
    pub(super) fn install_grant(
        &self,
        host: &impl Host,
        cfg: &Config,
        slot: &str,
        key: &LeaseKey,
        grant: &Grant,
        cost: u64,
    ) -> Option<LeaseRecord> {
        let installed = shared_data::update(host, slot, |stored| {
            let now = host.now_ms();
            let current = match lease::view(key, stored, now) {
                View::Mine(current) => current,
                View::Occupied => return Attempt::Leave(None),
            };
            let (record, replaced) = lease::install(
                key.owner(),
                current.as_ref(),
                grant,
                cost,
                now,
                cfg.lease.expiry_margin_ms,
            );
            Attempt::Write(record.encode(), Some((record, replaced, now)))
        });
        if let Some((record, replaced, now)) = installed.flatten() {
            host.count(Metric::LeasesTaken);
            let mut outbox = self.outbox.borrow_mut();
            if let Some(old) = replaced {
                host.count(Metric::LeaseRenewals);
                outbox.push(host, final_settle(slot, &old));
            }
            self.owned.borrow_mut().push(Owned {
                key: slot.to_string(),
                lease_id: grant.lease_id.clone(),
                spend_until_ms: record.spend_until_ms,
                next_settle_ms: now + cfg.lease.settle_interval_ms,
                settling: false,
            });
            return Some(record);
        }
        // Never installed: give the whole lease back.
        log::error!("lease {} could not be stored; releasing it", grant.lease_id);
        let release = Job::Settle {
            lease_key: slot.to_string(),
            lease_id: grant.lease_id.clone(),
            used: 0,
            last: true,
            seq: 1,
        };
        self.outbox.borrow_mut().push(host, release);
        None
    }
}

/// The final settle of a lease that was closed or replaced (its `settle_seq` is the final one).
pub(super) fn final_settle(slot: &str, closed: &LeaseRecord) -> Job {
    Job::Settle {
        lease_key: slot.to_string(),
        lease_id: closed.lease_id.clone(),
        used: closed.used,
        last: true,
        seq: closed.settle_seq,
    }
}

/// How long the renewal lock is held at most: a call's timeout, plus slack.
pub(super) fn lock_ms(cfg: &Config) -> u64 {
    u64::try_from(cfg.timeout.as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1_000)
}

/// The record in a slot, whoever it belongs to (callers match it by lease id,
/// which the service makes unique).
pub(super) fn read_lease(host: &impl Host, slot: &str) -> (Option<LeaseRecord>, Option<u32>) {
    match host.shared_get(slot) {
        Some((bytes, cas)) => (LeaseRecord::decode(&bytes), cas),
        None => (None, None),
    }
}

/// Drops the renewal lock (keeping the lease) so the next request can try; a
/// slot left with neither is emptied. `ahead_not_before_ms`: no renewal ahead of
/// need before then.
pub(super) fn unlock(host: &impl Host, slot: &str, key: &LeaseKey, ahead_not_before_ms: u64) {
    let unlocked = shared_data::update(host, slot, |stored| {
        let View::Mine(current) = lease::view(key, stored, host.now_ms()) else {
            return Attempt::Leave(()); // another account's now: our lock is long gone
        };
        let record = lease::unlock(current.as_ref(), ahead_not_before_ms);
        Attempt::Write(lease::stored(&record), ())
    });
    if unlocked.is_none() {
        log::warn!("lease lock not released; it expires by itself");
    }
}

/// Gives `cost` back to the lease it was spent from, if that lease is still
/// current. `false`: it is not (replaced, closed or settled).
pub(super) fn refund_lease(host: &impl Host, slot: &str, lease_id: &str, cost: u64) -> bool {
    let refunded = change_lease(host, slot, |r| lease::refund(r, lease_id, cost));
    if refunded {
        host.count(Metric::Refunds);
    }
    refunded
}

/// Spends `extra` more units from lease `lease_id`, if it is current and can cover them.
pub(super) fn spend_extra(host: &impl Host, key: &str, lease_id: &str, extra: u64) -> bool {
    let spent = change_lease(host, key, |r| lease::spend_extra(r, lease_id, extra));
    if spent {
        host.add(Metric::LeaseUnitsSpent, extra);
    }
    spent
}

/// Replaces the lease record in `slot` with what `change` makes of it. `false` when
/// there is none, `change` declines (`None`), or every write lost a race.
fn change_lease(
    host: &impl Host,
    slot: &str,
    change: impl Fn(&LeaseRecord) -> Option<LeaseRecord>,
) -> bool {
    let changed = shared_data::update(host, slot, |stored| {
        match stored
            .and_then(LeaseRecord::decode)
            .as_ref()
            .and_then(&change)
        {
            Some(record) => Attempt::Write(record.encode(), true),
            None => Attempt::Leave(false),
        }
    });
    changed == Some(true)
}
