//! Decisions the service let us keep: this worker's copy, the shared cache, and
//! writing and clearing entries.

use crate::balance_api::Verdict;
use crate::cache::{self, CacheKey, Entry, Lookup};
use crate::config::{Config, Mode};
use crate::decision::Decision;
use crate::host::{Host, HttpHost};
use crate::local_cache::LocalKey;
use crate::metrics::Metric;
use crate::response::Freshness;

use super::{Exchange, Flow};

impl Exchange {
    /// Acts on a fresh decision in this worker's copy of the cache, if it has one.
    /// Authorize mode only: in lease mode a cached refusal is cleared from shared data
    /// when credit arrives, which a copy would not see.
    pub(super) fn serve_local(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        key: LocalKey,
        route: &str,
    ) -> Option<Flow> {
        if cfg.mode != Mode::Authorize {
            return None;
        }
        let (entry, now) = self
            .worker
            .decisions
            .borrow_mut()
            .get(&cfg.fingerprint, key, || host.now_ms())?;
        Some(self.serve_entry(host, cfg, entry, now, route))
    }

    /// Acts on a cached decision (served from the cache: no balance shown again).
    pub(super) fn serve_entry(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        entry: Entry,
        now: u64,
        route: &str,
    ) -> Flow {
        host.count(Metric::CacheHits);
        self.access.cache_hit();
        let freshness = Freshness::Private(entry.remaining_s(now));
        // A balance from when the decision was cached is stale: not shown again.
        let decision = match entry.decision {
            Decision::Allow { account_id, .. } => Decision::allow(account_id, None),
            other => other,
        };
        self.act(host, cfg, route, decision, freshness, None)
    }

    /// Acts on a fresh cached decision, if there is one (a cached 402 only
    /// when `deny` says so), and copies it to this worker's cache under `local`.
    pub(super) fn serve_cached(
        &mut self,
        host: &impl HttpHost,
        cfg: &Config,
        key: Option<&CacheKey>,
        local: Option<LocalKey>,
        route: &str,
        deny: bool,
    ) -> Option<Flow> {
        let key = key?;
        let slot = key.slot_key(cfg.cache_max_entries);
        let (bytes, cas) = host.shared_get(&slot)?;
        let now = host.now_ms();
        match cache::lookup(key, &bytes, now) {
            Lookup::Fresh(entry) if deny || !matches!(entry.decision, Decision::Deny(_)) => {
                if let (Some(local), Mode::Authorize) = (local, cfg.mode) {
                    self.worker.decisions.borrow_mut().put(
                        &cfg.fingerprint,
                        cfg.cache_max_entries,
                        local,
                        entry.clone(),
                        now,
                    );
                }
                Some(self.serve_entry(host, cfg, entry, now, route))
            }
            // Clearing frees the value's memory; losing a CAS race to a fresh write is fine.
            Lookup::Expired => {
                host.shared_set(&slot, &[], cas);
                None
            }
            Lookup::Fresh(_) | Lookup::Miss => None,
        }
    }

    /// Caches a decision the service allowed us to keep; returns what to tell the client.
    pub(super) fn remember(
        &self,
        host: &impl Host,
        cfg: &Config,
        key: Option<&CacheKey>,
        v: &Verdict,
    ) -> Freshness {
        if !v.decision.cacheable() {
            return Freshness::NoStore;
        }
        if let (Some(key), Some(max_age)) = (key, v.max_age_s) {
            let expires_at_ms = host.now_ms().saturating_add(u64::from(max_age) * 1000);
            let entry = Entry {
                decision: v.decision.clone(),
                expires_at_ms,
            };
            // Last writer wins: both writers hold a decision the service just made.
            host.shared_set(
                &key.slot_key(cfg.cache_max_entries),
                &cache::encode(key, &entry),
                None,
            );
        }
        Freshness::from_max_age(v.max_age_s)
    }
}

/// Clears a cached decision for `key` (a refusal that no longer holds).
pub(super) fn forget(host: &impl Host, cfg: &Config, key: Option<&CacheKey>) {
    let Some(key) = key else { return };
    let slot = key.slot_key(cfg.cache_max_entries);
    if let Some((bytes, cas)) = host.shared_get(&slot) {
        if !matches!(cache::lookup(key, &bytes, 0), Lookup::Miss) {
            host.shared_set(&slot, &[], cas);
        }
    }
}
