use super::*;
use crate::lease::{LeaseKey, LeaseRecord};

const LEASE: &str = r#"{"cluster": "balance", "mode": "lease", "lease_want": 3, "settle_interval_ms": 1000,
                            "lease_expiry_margin_ms": 2000, "timeout_ms": 300}"#;

fn grant(id: &str, granted: u64) -> CalloutResponse {
    answer(
        200,
        &[],
        json!({"lease_id": id, "granted": granted, "expires_in_ms": 30000, "account_id": "acct_l", "balance": 10}),
    )
}

fn record(host: &FakeHost) -> LeaseRecord {
    let key = LeaseKey::new("balance", "k").slot_key(16_384);
    let (bytes, _) = host
        .shared
        .borrow()
        .get(&key)
        .cloned()
        .expect("a lease slot");
    // An emptied slot holds nothing: no lease, no lock.
    if bytes.is_empty() {
        return LeaseRecord::default();
    }
    LeaseRecord::decode(&bytes).expect("a readable lease record")
}

fn fixture() -> Fixture {
    let fx = Fixture::new(LEASE);
    *fx.worker.holder.borrow_mut() = "envoy-test".into();
    fx
}

#[test]
fn take_spend_locally_and_renew() {
    let fx = fixture();
    let first = keyed("/a", "k");
    let mut gate = fx.gate();
    assert_eq!(
        gate.on_request_headers(&first),
        Flow::Pause(Some(first.last_call().token))
    );
    let call = first.last_call();
    assert_eq!(call.header(":path"), Some("/v1/leases"));
    assert_eq!(
        call.body,
        json!({"account": "k", "want": 3, "min": 1, "request_id": "req-1", "holder": "envoy-test"})
    );
    assert_eq!(
        gate.on_callout_response(&first, call.token, &grant("ls_1", 3)),
        Flow::Continue
    );
    assert_eq!(
        first.upstream_header("x-farebox-account").as_deref(),
        Some("acct_l")
    );
    assert_eq!((record(&first).used, record(&first).granted), (1, 3));

    // Two more requests, from another worker: spent locally, no call.
    for _ in 0..2 {
        let other = first.sibling("GET", "/a", &[("x-api-key", "k")]);
        assert_eq!(fx.gate().on_request_headers(&other), Flow::Continue);
        assert!(other.calls.borrow().is_empty());
        assert_eq!(
            other.upstream_header("x-farebox-account").as_deref(),
            Some("acct_l")
        );
    }
    assert_eq!(record(&first).used, 3);

    // The last unit went below the low-water mark: that spend queued a renewal
    // ahead of need, which the timer sends from the root context.
    let next = first.sibling("GET", "/a", &[("x-api-key", "k")]);
    let mut gate = fx.gate();
    assert_eq!(gate.on_request_headers(&next), Flow::Park);
    assert!(next.calls.borrow().is_empty(), "the renewal is already out");
    let root = first.sibling("GET", "/", &[]);
    fx.worker.tick(&root, &fx.cfg);
    let renew = root.last_call();
    assert_eq!(renew.header(":path"), Some("/v1/leases"));
    assert_eq!(renew.body["want"], json!(3));
    fx.worker
        .on_outbox_response(&root, &fx.cfg, renew.token, &grant("ls_2", 3));
    assert_eq!(root.count_of(Metric::LeaseRenewals), 1);
    assert_eq!(root.count_of(Metric::LeaseAheadRenewals), 1);
    assert_eq!(record(&first).lease_id, "ls_2");
    // The parked request spends from it; the old lease is settled with its exact total.
    assert_eq!(gate.on_wake(&next), Flow::Continue);
    assert_eq!(record(&first).used, 1);
    fx.worker.tick(&root, &fx.cfg);
    let settle = root.last_call();
    assert_eq!(settle.header(":path"), Some("/v1/leases/ls_1/settle"));
    assert_eq!(settle.body, json!({"used": 3, "final": true, "seq": 1}));
    assert_eq!(settle.header("x-request-id"), Some("ls_1-settle-1"));
}

#[test]
fn requests_wait_for_the_one_lease_call() {
    let fx = fixture();
    let first = keyed("/a", "k");
    let mut taker = fx.gate();
    assert_eq!(
        taker.on_request_headers(&first),
        Flow::Pause(Some(first.last_call().token))
    );
    let mut waiters: Vec<(FakeHost, Gate)> = Vec::new();
    for _ in 0..5 {
        let host = first.sibling("GET", "/a", &[("x-api-key", "k")]);
        let mut gate = fx.gate();
        assert_eq!(gate.on_request_headers(&host), Flow::Park);
        assert_eq!(gate.on_request_body(&host, 0, false), Flow::Pause(None));
        assert!(
            host.calls.borrow().is_empty(),
            "one lease call per account at a time"
        );
        waiters.push((host, gate));
    }
    // Still renewing: a wake changes nothing.
    let (h0, g0) = &mut waiters[0];
    assert_eq!(g0.on_wake(h0), Flow::Park);
    assert_eq!(
        taker.on_callout_response(&first, first.last_call().token, &grant("ls_1", 4)),
        Flow::Continue
    );
    let flows: Vec<Flow> = waiters.iter_mut().map(|(h, g)| g.on_wake(h)).collect();
    // 4 units: the taker's and three waiters'. The last of those queued a renewal
    // ahead of need; the other two wait for it, with no call of their own.
    assert_eq!(flows[..3], [Flow::Continue; 3]);
    assert_eq!(flows[3..], [Flow::Park; 2]);
    assert!(waiters.iter().all(|(h, _)| h.calls.borrow().is_empty()));
    assert_eq!(fx.worker.renewals.borrow().len(), 1);
}

#[test]
fn a_waiter_is_not_left_hanging() {
    let fx = fixture();
    let first = keyed("/a", "k");
    fx.gate().on_request_headers(&first);
    let host = first.sibling("GET", "/a", &[("x-api-key", "k")]);
    let mut gate = fx.gate();
    assert_eq!(gate.on_request_headers(&host), Flow::Park);
    host.advance(1_000);
    assert_eq!(gate.on_wake(&host), Flow::Park);
    host.advance(10_000);
    assert_eq!(gate.on_wake(&host), Flow::Pause(None));
    assert_eq!(host.reply().unwrap().status, 503);
}

#[test]
fn lease_denied_is_402_and_frees_the_lock() {
    let fx = fixture();
    let deny = answer(
        402,
        &[("cache-control", "max-age=5")],
        json!({"balance": 0, "price": 1}),
    );
    let (host, _) = with_answer(&fx, keyed("/a", "k"), deny);
    assert_eq!(host.reply().unwrap().status, 402);
    assert_eq!(record(&host).renewing_until_ms, 0);
    assert_eq!(
        reply_header(&host, "cache-control").as_deref(),
        Some("no-store"),
        "a lease 402 holds only for this moment"
    );
    // Not served from the cache to a new request: it asks again, so that a top-up
    // while other gateways hold leases is usable at once.
    let again = host.sibling("GET", "/a", &[("x-api-key", "k")]);
    assert_eq!(
        fx.gate().on_request_headers(&again),
        Flow::Pause(Some(again.last_call().token))
    );
    assert_eq!(again.last_call().header(":path"), Some("/v1/leases"));
}

#[test]
fn lost_lease_answer_is_cancelled() {
    let fx = fixture();
    let (host, _) = with_answer(&fx, keyed("/a", "k"), answer(504, &[], Value::Null));
    assert_eq!(host.reply().unwrap().status, 503);
    assert_eq!(record(&host).renewing_until_ms, 0);
    let root = host.sibling("GET", "/", &[]);
    fx.worker.tick(&root, &fx.cfg);
    let cancel = root.last_call();
    assert_eq!(cancel.header(":path"), Some("/v1/leases/cancel"));
    assert_eq!(cancel.body, json!({"request_id": "req-1"}));
    assert_eq!(
        cancel.header("x-request-id"),
        Some("req-1"),
        "the same id as the body's"
    );
    // A client that leaves while the lease call is in flight: the same.
    let host = keyed("/a", "k");
    let mut gate = fx.gate();
    gate.on_request_headers(&host);
    gate.on_log(&host);
    assert_eq!(record(&host).renewing_until_ms, 0);
    // The first cancel is in flight, this one waits for the next tick.
    assert_eq!(fx.queued_refunds(), 2);
}

#[test]
fn periodic_settle_then_final_at_expiry() {
    let fx = fixture();
    let (host, _) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 3));
    let root = host.sibling("GET", "/", &[]);
    fx.worker.tick(&root, &fx.cfg);
    assert!(root.calls.borrow().is_empty(), "not due yet");
    root.advance(1_000);
    fx.worker.tick(&root, &fx.cfg);
    let settle = root.last_call();
    assert_eq!(settle.body, json!({"used": 1, "final": false, "seq": 1}));
    fx.worker
        .on_outbox_response(&root, &fx.cfg, settle.token, &status_only(Some(200)));
    assert_eq!(record(&host).reported, 1);
    // Nothing new spent, but units unspent: a heartbeat at the next interval,
    // with the next seq (so that a recall reaches an idle holder).
    root.advance(1_000);
    fx.worker.tick(&root, &fx.cfg);
    let beat = root.last_call();
    assert_eq!(beat.body, json!({"used": 1, "final": false, "seq": 2}));
    assert_eq!(beat.header("x-request-id"), Some("ls_1-settle-2"));
    fx.worker
        .on_outbox_response(&root, &fx.cfg, beat.token, &status_only(Some(200)));
    // Past the spend deadline (30 s - 2 s margin): closed and settled for good.
    root.advance(27_000);
    fx.worker.tick(&root, &fx.cfg);
    let last = root.last_call();
    assert_eq!(last.body, json!({"used": 1, "final": true, "seq": 3}));
    assert!(!record(&host).has_lease());
    // And a request now needs a new lease.
    let later = host.sibling("GET", "/a", &[("x-api-key", "k")]);
    later.advance(29_000);
    assert_eq!(
        fx.gate().on_request_headers(&later),
        Flow::Pause(Some(later.last_call().token))
    );
    assert_eq!(later.last_call().header(":path"), Some("/v1/leases"));
}

#[test]
fn unserved_requests_give_their_units_back() {
    let fx = fixture();
    let (host, mut gate) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 3));
    assert_eq!(record(&host).used, 1);
    host.set_status(503);
    gate.on_response_headers(&host);
    assert_eq!(record(&host).used, 0);
    assert_eq!(host.count_of(Metric::Refunds), 1);
    assert_eq!(fx.queued_refunds(), 0, "a lease refund is local");
}

#[test]
fn a_recalled_lease_is_given_back_at_once() {
    let fx = fixture();
    let (host, _) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 3));
    let root = host.sibling("GET", "/", &[]);
    root.advance(1_000);
    fx.worker.tick(&root, &fx.cfg);
    let beat = root.last_call();
    assert_eq!(beat.body, json!({"used": 1, "final": false, "seq": 1}));
    let recall = answer(
        200,
        &[],
        json!({"lease_id": "ls_1", "state": "open", "used": 1, "recall": true}),
    );
    fx.worker
        .on_outbox_response(&root, &fx.cfg, beat.token, &recall);
    assert!(!record(&host).has_lease(), "no more spending from it");
    assert_eq!(root.count_of(Metric::LeaseRecalls), 1);
    // The final settle goes out at once, with the exact total and the next seq.
    let last = root.last_call();
    assert_eq!(last.header(":path"), Some("/v1/leases/ls_1/settle"));
    assert_eq!(last.body, json!({"used": 1, "final": true, "seq": 2}));
    // A retry of it sends the same seq.
    fx.worker
        .on_outbox_response(&root, &fx.cfg, last.token, &status_only(Some(503)));
    root.advance(1_000);
    fx.worker.tick(&root, &fx.cfg);
    assert_eq!(root.last_call().body, last.body);
    assert_ne!(root.last_call().token, last.token);
    // The next request takes a new lease.
    let next = host.sibling("GET", "/a", &[("x-api-key", "k")]);
    next.advance(1_000);
    assert_eq!(
        fx.gate().on_request_headers(&next),
        Flow::Pause(Some(next.last_call().token))
    );
    assert_eq!(next.last_call().header(":path"), Some("/v1/leases"));
}

fn recall_402() -> CalloutResponse {
    answer(
        402,
        &[("cache-control", "no-store")],
        json!({"balance": 0, "price": 1, "recall": true, "retry_after_ms": 100}),
    )
}

#[test]
fn a_recall_402_waits_for_the_credit() {
    let fx = fixture();
    let host = keyed("/a", "k");
    let mut gate = fx.gate();
    assert_eq!(
        gate.on_request_headers(&host),
        Flow::Pause(Some(host.last_call().token))
    );
    let first = host.last_call();
    assert_eq!(
        gate.on_callout_response(&host, first.token, &recall_402()),
        Flow::Park
    );
    assert!(host.reply().is_none(), "no 402 while credit is recalled");
    assert_eq!(record(&host).renewing_until_ms, 0, "lock released");
    host.advance(50);
    assert_eq!(gate.on_wake(&host), Flow::Park);
    assert_eq!(host.calls.borrow().len(), 1, "not before retry_after_ms");
    host.advance(50);
    assert_eq!(
        gate.on_wake(&host),
        Flow::Pause(Some(host.last_call().token))
    );
    let second = host.last_call();
    assert_ne!(second.token, first.token);
    assert_eq!(second.header(":path"), Some("/v1/leases"));
    assert_eq!(
        gate.on_callout_response(&host, second.token, &grant("ls_1", 3)),
        Flow::Continue
    );
    assert_eq!(host.count_of(Metric::LeaseRecallWaits), 1);
}

#[test]
fn a_recall_402_that_never_frees_credit_ends_in_402() {
    let fx = fixture();
    // lease_recall_wait_ms defaults to 2 x 1000 + 500.
    assert_eq!(fx.cfg.lease.recall_wait_ms, 2_500);
    let host = keyed("/a", "k");
    let mut gate = fx.gate();
    gate.on_request_headers(&host);
    let start = host.now_ms();
    let mut flow = gate.on_callout_response(&host, host.last_call().token, &recall_402());
    let mut calls = 1;
    while flow == Flow::Park {
        host.advance(10);
        if let Flow::Pause(Some(token)) = gate.on_wake(&host) {
            calls += 1;
            flow = gate.on_callout_response(&host, token, &recall_402());
        }
        assert!(host.now_ms() - start <= 2_500, "waited past the bound");
    }
    assert_eq!(host.reply().unwrap().status, 402);
    assert!(host.now_ms() - start >= 2_400, "gave up early");
    assert!(
        (20..=26).contains(&calls),
        "one call per retry_after_ms: {calls}"
    );
}

#[test]
fn units_of_a_closed_lease_go_back_through_its_refund_call() {
    let fx = fixture();
    let (host, mut gate) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 3));
    // The lease closes while the request is upstream (its spend deadline passed).
    let root = host.sibling("GET", "/", &[]);
    root.advance(28_000);
    fx.worker.tick(&root, &fx.cfg);
    assert_eq!(root.last_call().body["final"], json!(true));
    assert_eq!(root.last_call().body["used"], json!(1));
    host.set_status(504);
    gate.on_response_headers(&host);
    assert_eq!(
        fx.queued_refunds(),
        2,
        "final settle in flight, refund queued"
    );
    fx.worker.tick(&root, &fx.cfg);
    let refund = root.last_call();
    assert_eq!(refund.header(":path"), Some("/v1/leases/ls_1/refund"));
    let rid = refund.body["request_id"].as_str().unwrap().to_string();
    assert_eq!(
        refund.body,
        json!({"request_id": rid, "units": 1, "status": 504})
    );
    assert_eq!(refund.header("x-request-id"), Some(rid.as_str()));
    // 404: final, nothing to refund; counted and logged.
    fx.worker
        .on_outbox_response(&root, &fx.cfg, refund.token, &status_only(Some(404)));
    assert_eq!(root.count_of(Metric::RefundFailures), 1);
}

#[test]
fn a_slot_held_by_another_account_pays_per_request() {
    let fx = Fixture::new(r#"{"cluster": "balance", "mode": "lease", "lease_max_entries": 1}"#);
    let (host, _) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 100));
    assert_eq!(host.reply(), None);
    let other = host.sibling("GET", "/a", &[("x-api-key", "k2")]);
    let mut gate = fx.gate();
    assert_eq!(
        gate.on_request_headers(&other),
        Flow::Pause(Some(other.last_call().token))
    );
    assert_eq!(other.last_call().header(":path"), Some("/v1/authorize"));
    assert_eq!(other.count_of(Metric::LeaseSlotBusy), 1);
    respond(
        &mut gate,
        &other,
        other.last_call().token,
        &allow("acct_2", 9),
    );
    assert_eq!(other.resumed.get(), 1);
    // The first account's lease is untouched.
    let again = host.sibling("GET", "/a", &[("x-api-key", "k")]);
    assert_eq!(fx.gate().on_request_headers(&again), Flow::Continue);
}

/// Issue 12's memory check, deterministic: 200,000 distinct unknown keys in
/// lease mode leave shared data bounded by the two fixed tables, and the
/// lease table holds no bytes at all for them.
#[test]
fn unknown_keys_leave_no_lasting_lease_state() {
    let fx = Fixture::new(
        r#"{"cluster": "balance", "mode": "lease", "lease_max_entries": 4096, "cache_max_entries": 1000}"#,
    );
    let root = FakeHost::request("GET", "/", &[]);
    let unknown = answer(
        401,
        &[("cache-control", "max-age=60")],
        json!({"error": "unknown"}),
    );
    for i in 0..200_000u32 {
        let key = format!("fbk-unknown-{i:08x}");
        let host = root.sibling("GET", "/a", &[("x-api-key", &key)]);
        let mut gate = fx.gate();
        assert_eq!(
            gate.on_request_headers(&host),
            Flow::Pause(Some(host.last_call().token))
        );
        respond(&mut gate, &host, host.last_call().token, &unknown);
        assert_eq!(host.reply().map(|r| r.status), Some(401));
        gate.on_log(&host);
    }
    let shared = root.shared.borrow();
    let lease_keys = shared
        .keys()
        .filter(|k| k.starts_with("farebox:lease2:"))
        .count();
    let lease_bytes: usize = shared
        .iter()
        .filter(|(k, _)| k.starts_with("farebox:lease2:"))
        .map(|(_, (v, _))| v.len())
        .sum();
    let all_bytes: usize = shared.iter().map(|(k, (v, _))| k.len() + v.len()).sum();
    eprintln!(
        "200000 unknown keys: {} shared keys ({lease_keys} lease slots, {lease_bytes} bytes in them), {all_bytes} bytes of keys and values",
        shared.len()
    );
    assert!(lease_keys <= 4096);
    assert_eq!(lease_bytes, 0, "a refused credential leaves an empty slot");
    assert!(shared.len() <= 4096 + 1000, "{} keys", shared.len());
    assert!(all_bytes <= 4096 * 24 + 1000 * 96, "{all_bytes} bytes");
    assert!(fx.worker.owned.borrow().is_empty());
}

#[test]
fn many_workers_never_overspend_a_lease() {
    let fx = fixture();
    let (host, _) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 3));
    let mut allowed = 1;
    let mut calls = 0;
    for _ in 0..20 {
        let other = host.sibling("GET", "/a", &[("x-api-key", "k")]);
        match fx.gate().on_request_headers(&other) {
            Flow::Continue => allowed += 1,
            Flow::Pause(_) => calls += other.calls.borrow().len(),
            Flow::Park => {}
        }
    }
    assert_eq!(allowed, 3, "exactly the granted units");
    assert_eq!(calls, 0, "the rest wait for the one renewal");
    assert_eq!(fx.worker.renewals.borrow().len(), 1);
}

/// The settle calls `root` has made so far.
fn settles(root: &FakeHost) -> Vec<Value> {
    root.calls
        .borrow()
        .iter()
        .filter(|c| c.header(":path").is_some_and(|p| p.ends_with("/settle")))
        .map(|c| c.body.clone())
        .collect()
}

#[test]
fn a_settle_in_flight_is_not_repeated_and_the_interval_restarts_after_it() {
    let fx = fixture();
    let (host, _) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 3));
    let root = host.sibling("GET", "/", &[]);
    root.advance(1_000);
    fx.worker.tick(&root, &fx.cfg);
    let first = root.last_call();
    assert_eq!(settles(&root).len(), 1);
    // Unanswered at 1.5 s and when the next one would be due: nothing more is sent.
    for at in [1_500, 2_000] {
        root.advance(500);
        fx.worker.tick(&root, &fx.cfg);
        assert_eq!(settles(&root).len(), 1, "at {at} ms");
    }
    fx.worker
        .on_outbox_response(&root, &fx.cfg, first.token, &status_only(Some(200)));
    // The heartbeat comes one interval after the tick that found the call out.
    for (at, step) in [(2_000, 0), (2_500, 500)] {
        root.advance(step);
        fx.worker.tick(&root, &fx.cfg);
        assert_eq!(settles(&root).len(), 1, "at {at} ms");
    }
    root.advance(500);
    fx.worker.tick(&root, &fx.cfg);
    assert_eq!(
        settles(&root),
        vec![
            json!({"used": 1, "final": false, "seq": 1}),
            json!({"used": 1, "final": false, "seq": 2})
        ]
    );
}

#[test]
fn a_spent_out_lease_once_reported_needs_no_heartbeat() {
    let fx = fixture();
    let (host, _) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 1));
    assert_eq!(record(&host).remaining(), 0);
    let root = host.sibling("GET", "/", &[]);
    root.advance(1_000);
    fx.worker.tick(&root, &fx.cfg);
    let settle = root
        .calls
        .borrow()
        .iter()
        .find(|c| c.header(":path").is_some_and(|p| p.ends_with("/settle")))
        .map(|c| c.token)
        .expect("the spend is reported");
    fx.worker
        .on_outbox_response(&root, &fx.cfg, settle, &status_only(Some(200)));
    root.advance(1_000);
    fx.worker.tick(&root, &fx.cfg);
    assert_eq!(
        settles(&root),
        vec![json!({"used": 1, "final": false, "seq": 1})],
        "nothing unspent, nothing unreported: no call until it closes"
    );
}

/// Spends a lease of 3 to its last unit with `out` renewals ahead of need already
/// sent; returns whether the timer then sends one for this account.
fn renews_ahead_with(out: usize) -> bool {
    let fx = fixture();
    for i in 0..out {
        let renewal = super::worker::Renewal {
            slot: format!("slot-{i}"),
            key: LeaseKey::new("balance", &format!("other-{i}")),
            credential: format!("other-{i}"),
            cost: 1,
            request_id: format!("r-{i}"),
        };
        fx.worker
            .renewing
            .borrow_mut()
            .push((90_000 + i as u32, renewal));
    }
    let (host, _) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 3));
    for _ in 0..2 {
        let other = host.sibling("GET", "/a", &[("x-api-key", "k")]);
        assert_eq!(fx.gate().on_request_headers(&other), Flow::Continue);
    }
    assert_eq!(record(&host).used, 3);
    let root = host.sibling("GET", "/", &[]);
    fx.worker.tick(&root, &fx.cfg);
    let leases = root
        .calls
        .borrow()
        .iter()
        .filter(|c| c.header(":path") == Some("/v1/leases"))
        .count();
    leases == 1
}

#[test]
fn renewals_ahead_of_need_are_bounded_per_worker() {
    assert!(renews_ahead_with(0));
    assert!(renews_ahead_with(super::worker::MAX_RENEWALS - 1));
    assert!(
        !renews_ahead_with(super::worker::MAX_RENEWALS),
        "past the bound the lease is renewed when it runs out"
    );
}

/// A lease of 3 spent to its last unit: a renewal ahead of need is queued. Returns
/// the fixture, the request's host and the root context's.
fn renewal_queued() -> (Fixture, FakeHost, FakeHost) {
    let fx = fixture();
    let (host, _) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 3));
    for _ in 0..2 {
        let other = host.sibling("GET", "/a", &[("x-api-key", "k")]);
        assert_eq!(fx.gate().on_request_headers(&other), Flow::Continue);
    }
    let root = host.sibling("GET", "/", &[]);
    (fx, host, root)
}

#[test]
fn a_failed_renewal_ahead_of_need_is_tried_again_one_interval_later() {
    let (fx, host, root) = renewal_queued();
    fx.worker.tick(&root, &fx.cfg);
    let renew = root.last_call();
    assert_eq!(renew.header(":path"), Some("/v1/leases"));
    let now = root.now.get();
    fx.worker
        .on_outbox_response(&root, &fx.cfg, renew.token, &status_only(Some(500)));
    assert_eq!(record(&host).ahead_not_before_ms, now + 1_000);
}

#[test]
fn an_undispatchable_renewal_ahead_of_need_is_tried_again_one_interval_later() {
    let (fx, host, root) = renewal_queued();
    root.refuse_dispatch.set(true);
    fx.worker.tick(&root, &fx.cfg);
    assert_eq!(root.count_of(Metric::CalloutFailures), 1);
    assert_eq!(record(&host).ahead_not_before_ms, root.now.get() + 1_000);
}

#[test]
fn an_answer_for_another_lease_call_is_ignored() {
    let fx = fixture();
    let host = keyed("/a", "k");
    let mut gate = fx.gate();
    gate.on_request_headers(&host);
    let token = host.last_call().token;
    assert_eq!(
        gate.on_callout_response(&host, token + 1, &grant("ls_1", 3)),
        Flow::Pause(None)
    );
    assert_eq!(host.upstream_header("x-farebox-account"), None);
    assert_eq!(
        gate.on_callout_response(&host, token, &grant("ls_1", 3)),
        Flow::Continue,
        "the real answer still counts"
    );
}

/// The first answer to a request's lease call is a recall 402 that asks to retry
/// after 1 s, under a recall wait of `recall_wait_ms`: what the gate does with it.
fn first_recall_waiting(recall_wait_ms: u64) -> (Flow, FakeHost) {
    let fx = Fixture::new(&LEASE.replace(
        "\"timeout_ms\": 300",
        &format!("\"timeout_ms\": 300, \"lease_recall_wait_ms\": {recall_wait_ms}"),
    ));
    *fx.worker.holder.borrow_mut() = "envoy-test".into();
    let host = keyed("/a", "k");
    let mut gate = fx.gate();
    gate.on_request_headers(&host);
    let recall = answer(
        402,
        &[("cache-control", "no-store")],
        json!({"balance": 0, "price": 1, "recall": true, "retry_after_ms": 1_000}),
    );
    let flow = gate.on_callout_response(&host, host.last_call().token, &recall);
    (flow, host)
}

#[test]
fn a_recall_may_ask_to_wait_up_to_the_recall_wait_and_no_longer() {
    let (flow, host) = first_recall_waiting(1_000);
    assert_eq!(
        flow,
        Flow::Park,
        "a retry exactly at the bound is waited for"
    );
    assert!(host.reply().is_none());
    let (_, host) = first_recall_waiting(999);
    assert_eq!(host.reply().expect("a refusal").status, 402);
}

#[test]
fn a_waiter_waits_up_to_its_bound_and_no_longer() {
    // The bound: two call timeouts (300 ms), a second, and the recall wait (2,500 ms).
    let fx = fixture();
    let first = keyed("/a", "k");
    fx.gate().on_request_headers(&first);
    let host = first.sibling("GET", "/a", &[("x-api-key", "k")]);
    let mut gate = fx.gate();
    assert_eq!(gate.on_request_headers(&host), Flow::Park);
    // Lease calls that never end keep the lock taken (1,300 ms each) meanwhile.
    for step in [1_400, 1_350, 1_310] {
        host.advance(step);
        let other = host.sibling("GET", "/a", &[("x-api-key", "k")]);
        let flow = fx.gate().on_request_headers(&other);
        assert_eq!(flow, Flow::Pause(Some(other.last_call().token)));
    }
    host.advance(40);
    assert_eq!(
        gate.on_wake(&host),
        Flow::Park,
        "at the bound it still waits"
    );
    assert!(host.reply().is_none());
    host.advance(1);
    assert_eq!(gate.on_wake(&host), Flow::Pause(None));
    assert_eq!(host.reply().unwrap().status, 503);
}

#[test]
fn a_grant_clears_the_refusal_kept_for_waiters() {
    // A refused lease call's 402 is kept a moment for the requests that waited for
    // it; once a later call is granted, that refusal no longer holds.
    let fx = fixture();
    let deny = answer(
        402,
        &[("cache-control", "max-age=5")],
        json!({"balance": 0, "price": 1}),
    );
    let (host, _) = with_answer(&fx, keyed("/a", "k"), deny);
    let lease_slot = LeaseKey::new("balance", "k").slot_key(16_384);
    let kept = |h: &FakeHost| {
        h.shared
            .borrow()
            .iter()
            .filter(|(k, (v, _))| **k != lease_slot && !v.is_empty())
            .count()
    };
    assert_eq!(kept(&host), 1, "the refusal is kept");
    let again = host.sibling("GET", "/a", &[("x-api-key", "k")]);
    let (again, _) = with_answer(&fx, again, grant("ls_1", 3));
    assert!(again.reply().is_none());
    assert_eq!(kept(&again), 0, "the refusal is gone");
}

#[test]
fn without_a_decision_cache_a_lease_refusal_is_never_kept() {
    // `cache_max_entries: 0` turns the cache off in lease mode too: a 401 the service
    // would let us keep is asked about again by the next request.
    let fx = Fixture::new(&LEASE.replace(
        r#""mode": "lease""#,
        r#""mode": "lease", "cache_max_entries": 0"#,
    ));
    let refusal = answer(401, &[("cache-control", "max-age=60")], Value::Null);
    let (host, _) = with_answer(&fx, keyed("/a", "k"), refusal);
    assert_eq!(host.reply().map(|r| r.status), Some(401));
    let again = host.sibling("GET", "/a", &[("x-api-key", "k")]);
    assert_eq!(
        fx.gate().on_request_headers(&again),
        Flow::Pause(Some(again.last_call().token)),
        "asked again, not served from a cache that is off"
    );
    assert_eq!(again.count_of(Metric::CacheHits), 0);
}

#[test]
fn a_recall_drops_only_the_recalled_lease_from_the_workers_care() {
    let fx = fixture();
    let (host, _) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 3));
    let other = host.sibling(
        "GET",
        "/a",
        &[("x-api-key", "k2"), ("x-request-id", "req-2")],
    );
    let mut gate = fx.gate();
    gate.on_request_headers(&other);
    respond(
        &mut gate,
        &other,
        other.last_call().token,
        &grant("ls_2", 3),
    );
    let root = host.sibling("GET", "/", &[]);
    root.advance(1_000);
    fx.worker.tick(&root, &fx.cfg);
    let settle_of = |lease: &str| {
        root.calls
            .borrow()
            .iter()
            .rev()
            .find(|c| c.header(":path") == Some(&format!("/v1/leases/{lease}/settle")))
            .cloned()
            .expect("a settle of the lease")
    };
    let (first, second) = (settle_of("ls_1"), settle_of("ls_2"));
    let recall = answer(
        200,
        &[],
        json!({"lease_id": "ls_1", "state": "open", "used": 1, "recall": true}),
    );
    fx.worker
        .on_outbox_response(&root, &fx.cfg, first.token, &recall);
    fx.worker
        .on_outbox_response(&root, &fx.cfg, second.token, &status_only(Some(200)));
    // The other lease is still this worker's to settle: its heartbeat comes.
    root.advance(1_000);
    fx.worker.tick(&root, &fx.cfg);
    assert_eq!(
        settle_of("ls_2").body,
        json!({"used": 1, "final": false, "seq": 2})
    );
}
