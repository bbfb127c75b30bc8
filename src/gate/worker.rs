//! The worker's timer: settling owned leases, renewals ahead of need, the outbox,
//! and the answers to calls made from the root context.

use std::cell::{Cell, RefCell};

use crate::balance_api::{
    call, lease_body, parse_lease, CalloutResponse, LeaseAnswer, LeaseRequest,
};
use crate::config::Config;
use crate::host::Host;
use crate::lease::{self, LeaseKey, LeaseRecord};
use crate::local_cache::LocalCache;
use crate::metrics::Metric;
use crate::outbox::{Finished, Job, Outbox};
use crate::shared_data::{self, Attempt};

use super::lease::{final_settle, read_lease, unlock};

/// State shared by every stream of one VM (one Envoy worker).
#[derive(Debug, Default)]
pub struct Worker {
    pub outbox: RefCell<Outbox>,
    /// Cached decisions (authorize mode), copied from shared data for this worker.
    pub(super) decisions: RefCell<LocalCache>,
    /// Leases this worker took and must settle.
    pub(super) owned: RefCell<Vec<Owned>>,
    pub(super) request_seq: Cell<u64>,
    /// Random, per worker: makes the ids it invents unique (see [`Worker::make_id`]).
    pub(super) tag: Cell<u64>,
    /// Names this Envoy process to the balance service when taking leases.
    pub holder: RefCell<String>,
    /// Renewals ahead of need, waiting for the timer to send them from the root
    /// context (a stream's own calls die with the stream).
    pub(super) renewals: RefCell<Vec<Renewal>>,
    /// Renewals sent, by call token.
    pub(super) renewing: RefCell<Vec<(u32, Renewal)>>,
}

/// At most this many renewals ahead of need per worker at once; past it, a
/// lease is renewed when it runs out instead.
pub(super) const MAX_RENEWALS: usize = 256;

#[derive(Debug)]
pub(super) struct Owned {
    pub(super) key: String,
    pub(super) lease_id: String,
    pub(super) spend_until_ms: u64,
    pub(super) next_settle_ms: u64,
    pub(super) settling: bool,
}

/// A lease call made ahead of need, for an account whose lease is running low.
#[derive(Debug)]
pub(super) struct Renewal {
    pub(super) slot: String,
    pub(super) key: LeaseKey,
    /// The credential, as the contract names the account by it. Never logged.
    pub(super) credential: String,
    pub(super) cost: u64,
    pub(super) request_id: String,
}

impl Worker {
    /// The root context's timer: settle owned leases that are due (a heartbeat
    /// even when nothing was spent, while units are unspent: that is how a recall
    /// reaches an idle holder), close expired ones, send renewals ahead of need,
    /// and send what the outbox holds.
    pub fn tick(&self, host: &impl Host, cfg: &Config) {
        let now = host.now_ms();
        let mut outbox = self.outbox.borrow_mut();
        self.owned.borrow_mut().retain_mut(|o| {
            if now < o.next_settle_ms.min(o.spend_until_ms) {
                return true;
            }
            let (current, cas) = read_lease(host, &o.key);
            let Some(record) = current.filter(|r| r.lease_id == o.lease_id) else {
                // Replaced: whoever replaced it settles it.
                return false;
            };
            if let Some((emptied, closed)) = lease::close(&record, &o.lease_id, now, false) {
                if !host.shared_set(&o.key, &lease::stored(&emptied), cas) {
                    return true; // raced with a spend; next tick
                }
                outbox.push(host, final_settle(&o.key, &closed));
                return false;
            }
            if o.settling || (record.used == record.reported && record.remaining() == 0) {
                o.next_settle_ms = now + cfg.lease.settle_interval_ms;
                return true;
            }
            let Some(numbered) = lease::next_seq(&record, &o.lease_id) else {
                return true;
            };
            if !host.shared_set(&o.key, &numbered.encode(), cas) {
                return true; // raced with a spend; next tick
            }
            o.next_settle_ms = now + cfg.lease.settle_interval_ms;
            o.settling = true;
            let job = Job::Settle {
                lease_key: o.key.clone(),
                lease_id: o.lease_id.clone(),
                used: record.used,
                last: false,
                seq: numbered.settle_seq,
            };
            outbox.push(host, job);
            true
        });
        drop(outbox);
        self.send_renewals(host, cfg);
        let mut outbox = self.outbox.borrow_mut();
        if !outbox.is_empty() {
            let finished = outbox.flush(host, cfg);
            drop(outbox);
            for f in finished {
                self.finished(host, cfg, f);
            }
        }
    }

    /// Whether a renewal ahead of need may be queued now.
    pub(super) fn renewals_open(&self) -> bool {
        self.renewals.borrow().len() + self.renewing.borrow().len() < MAX_RENEWALS
    }

    /// A request id made up here: unique across workers and Envoy processes (every
    /// VM lays out its memory alike, so neither an address nor the clock tells them
    /// apart; a random tag per worker does), as the service deduplicates by it.
    pub(super) fn make_id(&self, host: &impl Host) -> String {
        let seq = self.request_seq.get().wrapping_add(1);
        self.request_seq.set(seq);
        if self.tag.get() == 0 {
            // Without the host's randomness, the clock of the first id still tells
            // most workers apart.
            let tag = getrandom::u64().unwrap_or_else(|_| host.now_ms());
            self.tag.set(tag | 1);
        }
        format!("fbx-{:x}-{:016x}-{seq:x}", host.now_ms(), self.tag.get())
    }

    pub(super) fn send_renewals(&self, host: &impl Host, cfg: &Config) {
        let queued = std::mem::take(&mut *self.renewals.borrow_mut());
        if queued.is_empty() {
            return; // the common tick: no holder id to copy
        }
        let holder = self.holder.borrow().clone();
        for r in queued {
            let body = lease_body(&LeaseRequest {
                account: &r.credential,
                want: lease::want(cfg.lease.want, r.cost),
                min: r.cost,
                request_id: &r.request_id,
                holder: &holder,
            });
            match call(host, cfg, &cfg.lease.path, &r.request_id, &body) {
                Ok(token) => {
                    host.count(Metric::Callouts);
                    self.renewing.borrow_mut().push((token, r));
                }
                Err(e) => {
                    host.count(Metric::CalloutFailures);
                    log::warn!("renewal ahead of need not dispatched: {e}");
                    let retry_at = host.now_ms() + cfg.lease.settle_interval_ms;
                    unlock(host, &r.slot, &r.key, retry_at);
                }
            }
        }
    }

    /// An answer to a call made from the root context: a renewal or an outbox job.
    pub fn on_outbox_response(
        &self,
        host: &impl Host,
        cfg: &Config,
        token: u32,
        resp: &CalloutResponse,
    ) {
        let renewal = {
            let mut renewing = self.renewing.borrow_mut();
            renewing
                .iter()
                .position(|(t, _)| *t == token)
                .map(|i| renewing.swap_remove(i).1)
        };
        if let Some(r) = renewal {
            self.renewed(host, cfg, r, resp);
            return;
        }
        let finished = self.outbox.borrow_mut().on_response(host, token, resp);
        if let Some(f) = finished {
            self.finished(host, cfg, f);
        }
    }

    /// The answer to a renewal ahead of need. Nobody waits for it: a refusal or
    /// failure only means the lease is renewed when it runs out instead.
    pub(super) fn renewed(
        &self,
        host: &impl Host,
        cfg: &Config,
        r: Renewal,
        resp: &CalloutResponse,
    ) {
        match parse_lease(resp, r.cost, cfg.cache_max_ttl_s) {
            Ok(LeaseAnswer::Granted(grant)) => {
                if self
                    .install_grant(host, cfg, &r.slot, &r.key, &grant, 0)
                    .is_some()
                {
                    host.count(Metric::LeaseAheadRenewals);
                }
            }
            Ok(LeaseAnswer::Decided(_) | LeaseAnswer::Recall { .. }) => {
                // No more credit for now: not again for this lease.
                unlock(host, &r.slot, &r.key, u64::MAX);
            }
            Err(failure) => {
                host.count(Metric::CalloutFailures);
                log::warn!("renewal ahead of need failed: {failure}");
                let retry_at = host.now_ms() + cfg.lease.settle_interval_ms;
                unlock(host, &r.slot, &r.key, retry_at);
                self.outbox.borrow_mut().push(
                    host,
                    Job::Cancel {
                        request_id: r.request_id,
                    },
                );
            }
        }
    }

    pub(super) fn finished(&self, host: &impl Host, cfg: &Config, f: Finished) {
        let Job::Settle {
            lease_key,
            lease_id,
            used,
            last: false,
            ..
        } = f.job
        else {
            return;
        };
        if let Some(o) = self
            .owned
            .borrow_mut()
            .iter_mut()
            .find(|o| o.lease_id == lease_id)
        {
            o.settling = false;
        }
        if !f.ok {
            return;
        }
        let recalled = shared_data::update(host, &lease_key, |stored| {
            let Some(current) = stored
                .and_then(LeaseRecord::decode)
                .filter(|r| r.lease_id == lease_id)
            else {
                return Attempt::Leave(None); // replaced or closed meanwhile: its final settle is on its way
            };
            let next = if f.recall {
                // Another gateway needs the credit: stop spending and give the rest back now.
                lease::close(&current, &lease_id, host.now_ms(), true).map(|(e, c)| (e, Some(c)))
            } else {
                lease::acknowledge(&current, &lease_id, used).map(|r| (r, None))
            };
            match next {
                Some((record, closed)) => Attempt::Write(lease::stored(&record), closed),
                None => Attempt::Leave(None),
            }
        });
        if let Some(closed) = recalled.flatten() {
            host.count(Metric::LeaseRecalls);
            log::info!(
                "lease {lease_id} recalled by the balance service: settled at {} of {} units",
                closed.used,
                closed.granted
            );
            self.owned.borrow_mut().retain(|o| o.lease_id != lease_id);
            self.outbox
                .borrow_mut()
                .push(host, final_settle(&lease_key, &closed));
            // Sent at the next tick at the latest; now if the outbox can.
            let finished = self.outbox.borrow_mut().flush(host, cfg);
            for f in finished {
                self.finished(host, cfg, f);
            }
        }
    }
}
