//! Each call of the contract as one transaction script over [`Tx`], written
//! once for both backends. The caller runs a script inside one transaction
//! and commits it whatever the outcome (a script that only read, or that
//! only expired due leases, commits that too).
//!
//! Every script that changes an account first locks its row
//! ([`Tx::account_by_key`] / [`Tx::account`]), then reads what it decides
//! on, so its reads see every transaction that committed before it.

use super::rules::{self, AuthorizeStep, Period, SeqRule};
use super::{
    AccountSummary, AlertSettings, AuthorizeInput, AuthorizeOutcome, BudgetOutcome, BudgetSpec,
    BudgetState, CancelOutcome, ChargeRefund, ChargeRow, ChargeStatus, CreateOutcome, LeaseInput,
    LeaseOutcome, LeaseRefundInput, LeaseRefundOutcome, LeaseRefunded, LeaseRow, LeaseSettings,
    LeaseState, LeaseUsageOutcome, NewAccount, NewCharge, NewEvent, NewLeaseRefund, NewTopup,
    NewUsage, PaidCharge, PaidOutcome, PayRefusal, Payer, RefundOutcome, Result, SettleOutcome,
    Settled, StoreError, TopupOutcome, Tx, UsageItemRow, UsageLine, UsageOutcome, USAGE_ROUTE,
};
use crate::config::ExpiryPolicy;
use crate::util::{now_ms, random_hex, sha256_hex};
use serde_json::json;

/// The demo accounts created by `--seed-demo`: (account, key, balance, disabled).
pub const DEMO_ACCOUNTS: &[(&str, &str, i64, bool)] = &[
    ("acct_alice", "demo-key-alice", 100, false),
    ("acct_bob", "demo-key-bob", 3, false),
    ("acct_carol", "demo-key-carol", 50, true),
];

/// Adds `amount` (>= 0) to the balance; returns the new balance.
async fn credit<T: Tx>(tx: &mut T, account_id: &str, balance: i64, amount: i64) -> Result<i64> {
    if amount == 0 {
        return Ok(balance);
    }
    if balance.checked_add(amount).is_none() {
        return Err(StoreError::Overflow(account_id.to_owned()));
    }
    tx.add_balance(account_id, amount).await
}

pub async fn authorize<T: Tx>(
    tx: &mut T,
    input: &AuthorizeInput,
    alerts: &AlertSettings,
) -> Result<AuthorizeOutcome> {
    let key_hash = sha256_hex(input.credential.as_bytes());
    let Some(acct) = tx.account_by_key(&key_hash).await? else {
        return Ok(AuthorizeOutcome::UnknownCredential);
    };
    let existing = tx.charge(&input.request_id).await?;
    let same = existing.map(|c| c.account_id == acct.account_id);
    let account_id = acct.account_id;
    let balance = acct.balance;
    let now = now_ms();
    let step = rules::authorize_step(same, acct.disabled, balance, input.cost);
    let budget = match step {
        AuthorizeStep::Replay | AuthorizeStep::Free | AuthorizeStep::Debit => {
            budget_at(tx, &account_id, now).await?
        }
        AuthorizeStep::Conflict | AuthorizeStep::Disabled | AuthorizeStep::Denied => None,
    };
    Ok(match step {
        AuthorizeStep::Replay | AuthorizeStep::Free => AuthorizeOutcome::Allowed {
            account_id,
            balance,
            replay: step == AuthorizeStep::Replay,
            budget: budget.map(|b| b.state()),
        },
        AuthorizeStep::Conflict => AuthorizeOutcome::Conflict { account_id },
        AuthorizeStep::Disabled => AuthorizeOutcome::Disabled { account_id },
        AuthorizeStep::Denied => AuthorizeOutcome::Denied {
            account_id,
            balance,
        },
        AuthorizeStep::Debit => {
            if let Some(b) = budget.as_ref().filter(|b| input.cost > b.left()) {
                return Ok(AuthorizeOutcome::BudgetExceeded {
                    account_id,
                    balance,
                    budget: b.state(),
                });
            }
            tx.insert_charge(&NewCharge {
                request_id: &input.request_id,
                account_id: &account_id,
                cost: input.cost,
                route: &input.route,
                method: &input.method,
                path: &input.path,
                at: now,
            })
            .await?;
            let after = tx.add_balance(&account_id, -input.cost).await?;
            let budget = match budget {
                Some(b) => Some(spend(tx, alerts, b, input.cost, now).await?.state()),
                None => None,
            };
            low_balance(tx, alerts, &account_id, balance, after, now).await?;
            AuthorizeOutcome::Allowed {
                account_id,
                balance: after,
                replay: false,
                budget,
            }
        }
    })
}

pub async fn refund<T: Tx>(
    tx: &mut T,
    request_id: &str,
    credential: &str,
    upstream_status: Option<u16>,
) -> Result<RefundOutcome> {
    let key_hash = sha256_hex(credential.as_bytes());
    let Some(acct) = tx.account_by_key(&key_hash).await? else {
        return Ok(match tx.charge(request_id).await? {
            None => RefundOutcome::UnknownRequest,
            Some(_) => RefundOutcome::Conflict { account_id: None },
        });
    };
    let Some(charge) = tx.charge(request_id).await? else {
        return Ok(RefundOutcome::UnknownRequest);
    };
    let account_id = acct.account_id;
    if charge.account_id != account_id {
        return Ok(RefundOutcome::Conflict {
            account_id: Some(account_id),
        });
    }
    if charge.status == ChargeStatus::Refunded {
        return Ok(RefundOutcome::AlreadyRefunded {
            account_id,
            balance: acct.balance,
        });
    }
    let reserved = tx.reserved(&account_id).await?;
    if rules::credit_within(acct.balance, charge.cost, reserved).is_none() {
        return Ok(RefundOutcome::Overflow { account_id });
    }
    let balance = credit(tx, &account_id, acct.balance, charge.cost).await?;
    give_back(tx, &account_id, charge.at, charge.cost).await?;
    tx.mark_refunded(&ChargeRefund {
        request_id,
        status: upstream_status,
        at: now_ms(),
    })
    .await?;
    Ok(RefundOutcome::Refunded {
        account_id,
        balance,
    })
}

async fn create_in<T: Tx>(
    tx: &mut T,
    account_id: &str,
    key_hash: &str,
    balance: i64,
    disabled: bool,
) -> Result<CreateOutcome> {
    if tx.account(account_id).await?.is_some() {
        return Ok(CreateOutcome::AccountExists);
    }
    if tx.key_exists(key_hash).await? {
        return Ok(CreateOutcome::KeyExists);
    }
    tx.insert_account(&NewAccount {
        account_id,
        key_hash: Some(key_hash),
        balance,
        disabled,
        at: now_ms(),
    })
    .await?;
    Ok(CreateOutcome::Created)
}

pub async fn create_account<T: Tx>(
    tx: &mut T,
    account_id: &str,
    key: &str,
    balance: i64,
    disabled: bool,
) -> Result<CreateOutcome> {
    let key_hash = sha256_hex(key.as_bytes());
    create_in(tx, account_id, &key_hash, balance, disabled).await
}

pub async fn seed_demo<T: Tx>(tx: &mut T) -> Result<usize> {
    let mut created = 0;
    for (account_id, key, balance, disabled) in DEMO_ACCOUNTS {
        let key_hash = sha256_hex(key.as_bytes());
        if create_in(tx, account_id, &key_hash, *balance, *disabled).await?
            == CreateOutcome::Created
        {
            created += 1;
        }
    }
    Ok(created)
}

pub async fn topup<T: Tx>(
    tx: &mut T,
    account_id: &str,
    amount: i64,
    topup_id: Option<&str>,
) -> Result<TopupOutcome> {
    let Some(acct) = tx.account(account_id).await? else {
        return Ok(TopupOutcome::UnknownAccount);
    };
    if let Some(tid) = topup_id {
        if let Some(owner) = tx.topup_owner(tid).await? {
            if owner != account_id {
                return Ok(TopupOutcome::Conflict);
            }
            return Ok(TopupOutcome::Done {
                balance: acct.balance,
                replay: true,
            });
        }
    }
    // Keep balance + reserved within i64, so releasing a reservation can
    // never overflow.
    let reserved = tx.reserved(account_id).await?;
    if rules::credit_within(acct.balance, amount, reserved).is_none() {
        return Ok(TopupOutcome::Overflow);
    }
    tx.insert_topup(&NewTopup {
        topup_id,
        account_id,
        amount,
        at: now_ms(),
    })
    .await?;
    let balance = tx.add_balance(account_id, amount).await?;
    Ok(TopupOutcome::Done {
        balance,
        replay: false,
    })
}

pub async fn set_disabled<T: Tx>(tx: &mut T, account_id: &str, disabled: bool) -> Result<bool> {
    tx.set_disabled(account_id, disabled).await
}

pub async fn account<T: Tx>(
    tx: &mut T,
    account_id: &str,
    policy: ExpiryPolicy,
) -> Result<Option<AccountSummary>> {
    let Some(acct) = tx.account(account_id).await? else {
        return Ok(None);
    };
    let now = now_ms();
    expire_account(tx, account_id, now, policy).await?;
    let Some(acct) = tx.account(account_id).await?.or(Some(acct)) else {
        return Ok(None);
    };
    let t = tx.totals(account_id).await?;
    Ok(Some(AccountSummary {
        account_id: acct.account_id,
        balance: acct.balance,
        initial_balance: acct.initial_balance,
        topups: t.topups,
        disabled: acct.disabled,
        charged: t.charged.saturating_add(t.lease_charged),
        refunded: t.refunded.saturating_add(t.lease_refunded),
        charges: t.charges,
        reserved: t.reserved,
        leases: t.leases,
    }))
}

pub async fn charges<T: Tx>(tx: &mut T, account_id: &str) -> Result<Option<Vec<ChargeRow>>> {
    if tx.account(account_id).await?.is_none() {
        return Ok(None);
    }
    Ok(Some(tx.charges_of(account_id).await?))
}

pub async fn leases<T: Tx>(
    tx: &mut T,
    account_id: &str,
    policy: ExpiryPolicy,
) -> Result<Option<Vec<LeaseRow>>> {
    if tx.account(account_id).await?.is_none() {
        return Ok(None);
    }
    expire_account(tx, account_id, now_ms(), policy).await?;
    Ok(Some(tx.leases_of(account_id).await?))
}

// ------------------------------------------------------------ budgets and events

/// An account's budget in the period that contains a given time.
struct Budget {
    account_id: String,
    limit: i64,
    period: Period,
    time_zone: String,
    tz: jiff::tz::TimeZone,
    start: i64,
    end: i64,
    spent: i64,
}

impl Budget {
    fn left(&self) -> i64 {
        rules::budget_left(self.limit, self.spent)
    }

    fn state(&self) -> BudgetState {
        BudgetState {
            limit: self.limit,
            spent: self.spent,
            remaining: self.left(),
            period: self.period,
            time_zone: self.time_zone.clone(),
            period_start: rules::rfc3339_in(self.start, &self.tz),
            resets_at: rules::rfc3339_in(self.end, &self.tz),
        }
    }
}

/// The account's budget in the period containing `at`, with that period's
/// spend; `None` without a budget.
async fn budget_at<T: Tx>(tx: &mut T, account_id: &str, at: i64) -> Result<Option<Budget>> {
    let Some((limit, period, time_zone)) = tx.budget(account_id).await? else {
        return Ok(None);
    };
    let period = Period::parse(&period)
        .ok_or_else(|| StoreError::Corrupt(format!("budget period {period:?}")))?;
    let tz = rules::time_zone(&time_zone)
        .ok_or_else(|| StoreError::Corrupt(format!("budget time zone {time_zone:?}")))?;
    let (start, end) = rules::period_bounds(period, &tz, at)
        .ok_or_else(|| StoreError::Corrupt(format!("time {at} out of range")))?;
    let spent = tx.budget_spent(account_id, start).await?;
    Ok(Some(Budget {
        account_id: account_id.to_owned(),
        limit,
        period,
        time_zone,
        tz,
        start,
        end,
        spent,
    }))
}

/// Counts `units` against the budget's period and raises the
/// `budget.threshold` events the spend reached.
async fn spend<T: Tx>(
    tx: &mut T,
    alerts: &AlertSettings,
    mut b: Budget,
    units: i64,
    now: i64,
) -> Result<Budget> {
    if units <= 0 {
        return Ok(b);
    }
    let before = b.spent;
    b.spent = tx.add_budget_spent(&b.account_id, b.start, units).await?;
    for p in rules::crossed_percent(b.limit, before, b.spent, &alerts.budget_percent) {
        let state = b.state();
        let data = json!({
            "account_id": b.account_id,
            "threshold_percent": p,
            "limit": state.limit,
            "spent": state.spent,
            "remaining": state.remaining,
            "period": state.period.as_str(),
            "time_zone": state.time_zone,
            "period_start": state.period_start,
            "resets_at": state.resets_at,
        });
        emit(tx, alerts, "budget.threshold", &b.account_id, data, now).await?;
    }
    Ok(b)
}

/// Gives `units` back to the budget period that contains `charged_at` (the
/// time they were counted), if the account has a budget.
async fn give_back<T: Tx>(tx: &mut T, account_id: &str, charged_at: i64, units: i64) -> Result<()> {
    if units <= 0 {
        return Ok(());
    }
    if let Some(b) = budget_at(tx, account_id, charged_at).await? {
        tx.add_budget_spent(account_id, b.start, -units).await?;
    }
    Ok(())
}

/// Raises a `balance.low` event for each threshold a debit from `before` to
/// `after` crossed.
async fn low_balance<T: Tx>(
    tx: &mut T,
    alerts: &AlertSettings,
    account_id: &str,
    before: i64,
    after: i64,
    now: i64,
) -> Result<()> {
    for t in rules::crossed_down(before, after, &alerts.low_balance) {
        let data = json!({ "account_id": account_id, "balance": after, "threshold": t });
        emit(tx, alerts, "balance.low", account_id, data, now).await?;
    }
    Ok(())
}

/// Writes one webhook event to the outbox (in the caller's transaction).
async fn emit<T: Tx>(
    tx: &mut T,
    alerts: &AlertSettings,
    kind: &str,
    account_id: &str,
    data: serde_json::Value,
    now: i64,
) -> Result<()> {
    if !alerts.enabled {
        return Ok(());
    }
    let event_id = format!("evt_{}", random_hex(16));
    let body = json!({
        "id": event_id,
        "type": kind,
        "created_at": rules::rfc3339(now),
        "data": data,
    })
    .to_string();
    tx.insert_event(&NewEvent {
        event_id: &event_id,
        kind,
        account_id,
        body: &body,
        at: now,
    })
    .await
}

pub async fn set_budget<T: Tx>(
    tx: &mut T,
    account_id: &str,
    spec: &BudgetSpec,
) -> Result<BudgetOutcome> {
    if tx.account(account_id).await?.is_none() {
        return Ok(BudgetOutcome::UnknownAccount);
    }
    let now = now_ms();
    tx.put_budget(account_id, spec, now).await?;
    get_budget(tx, account_id).await
}

pub async fn get_budget<T: Tx>(tx: &mut T, account_id: &str) -> Result<BudgetOutcome> {
    if tx.account(account_id).await?.is_none() {
        return Ok(BudgetOutcome::UnknownAccount);
    }
    Ok(match budget_at(tx, account_id, now_ms()).await? {
        Some(b) => BudgetOutcome::Budget(b.state()),
        None => BudgetOutcome::NoBudget,
    })
}

/// Removes the budget and its spend counts; `NoBudget` if there was none.
pub async fn clear_budget<T: Tx>(tx: &mut T, account_id: &str) -> Result<BudgetOutcome> {
    if tx.account(account_id).await?.is_none() {
        return Ok(BudgetOutcome::UnknownAccount);
    }
    let before = get_budget(tx, account_id).await?;
    tx.delete_budget(account_id).await?;
    Ok(before)
}

// ------------------------------------------------------------ leases

/// Expires the account's open leases whose `expires_at <= now`, applying the
/// expiry policy. The caller holds (or this takes) the account's row lock.
/// Returns how many expired.
pub async fn expire_account<T: Tx>(
    tx: &mut T,
    account_id: &str,
    now: i64,
    policy: ExpiryPolicy,
) -> Result<usize> {
    let Some(acct) = tx.account(account_id).await? else {
        return Ok(0);
    };
    let due = tx.due_leases(account_id, now).await?;
    let mut balance = acct.balance;
    for mut l in due.iter().cloned() {
        let base = rules::expiry_charge(policy, l.granted, l.used);
        balance = close_lease(tx, &mut l, balance, base, LeaseState::Expired, now).await?;
    }
    Ok(due.len())
}

/// Closes an open lease as `state` (settled or expired) with charge `base`
/// less its pending refunds; credits the rest of `granted` back. Returns
/// the new balance.
async fn close_lease<T: Tx>(
    tx: &mut T,
    l: &mut LeaseRow,
    balance: i64,
    base: i64,
    state: LeaseState,
    now: i64,
) -> Result<i64> {
    let (charged, refunded) = rules::close_charge(base, l.refund_pending);
    let balance = credit(tx, &l.account_id, balance, l.granted - charged).await?;
    // The grant counted in full against the budget of its period; what it
    // did not charge goes back there.
    give_back(tx, &l.account_id, l.created_at, l.granted - charged).await?;
    l.state = state;
    l.charged = charged;
    l.refunded = refunded;
    l.refund_pending = 0;
    l.closed_at = Some(now);
    tx.update_lease(l).await?;
    Ok(balance)
}

/// A fresh `ls_<32 hex>` id not used by any lease.
async fn new_lease_id<T: Tx>(tx: &mut T) -> Result<String> {
    loop {
        let id = format!("ls_{}", random_hex(16));
        if tx.lease_by_id(&id).await?.is_none() {
            return Ok(id);
        }
    }
}

pub async fn lease<T: Tx>(
    tx: &mut T,
    input: &LeaseInput,
    settings: LeaseSettings,
    alerts: &AlertSettings,
) -> Result<LeaseOutcome> {
    let key_hash = sha256_hex(input.credential.as_bytes());
    let now = now_ms();
    let Some(acct) = tx.account_by_key(&key_hash).await? else {
        return Ok(LeaseOutcome::UnknownCredential);
    };
    let account_id = acct.account_id;
    expire_account(tx, &account_id, now, settings.policy).await?;
    let Some(acct) = tx.account(&account_id).await? else {
        return Ok(LeaseOutcome::UnknownCredential);
    };
    let balance = acct.balance;
    let budget = budget_at(tx, &account_id, now).await?;
    if let Some(l) = tx.lease_by_request(&input.request_id).await? {
        return Ok(if l.account_id != account_id {
            LeaseOutcome::Conflict { account_id }
        } else if l.state == LeaseState::Open && l.holder != input.holder {
            LeaseOutcome::HolderConflict { account_id }
        } else if l.state != LeaseState::Open {
            LeaseOutcome::Closed {
                account_id,
                lease_id: l.lease_id,
                state: l.state,
            }
        } else {
            LeaseOutcome::Granted {
                lease_id: l.lease_id,
                granted: l.granted,
                expires_in_ms: l.expires_at.saturating_sub(now).max(1),
                account_id,
                balance,
                replay: true,
                budget: budget.map(|b| b.state()),
            }
        });
    }
    if acct.disabled {
        return Ok(LeaseOutcome::Disabled { account_id });
    }
    // A grant reserves budget as it reserves balance: both must cover `min`.
    let left = budget.as_ref().map_or(i64::MAX, Budget::left);
    if balance < input.min || left < input.min {
        // Unspent units of open leases come back to the balance and to the
        // budget when their holders settle: worth a retry.
        let recall = tx.recall_unspent(&account_id, now).await? > 0;
        return Ok(match budget {
            Some(b) if !recall && balance >= input.min => LeaseOutcome::BudgetExceeded {
                account_id,
                balance,
                budget: b.state(),
            },
            _ => LeaseOutcome::Denied {
                account_id,
                balance,
                recall,
            },
        });
    }
    let others = tx.other_holders(&account_id, &input.holder).await?;
    let granted = rules::fair_share_grant(
        input.want,
        input.min,
        balance.min(left),
        settings.max_units,
        others,
    );
    let lease_id = new_lease_id(tx).await?;
    let expires_at = now.saturating_add(settings.ttl_ms);
    tx.insert_lease(&LeaseRow {
        lease_id: lease_id.clone(),
        account_id: account_id.clone(),
        holder: input.holder.clone(),
        request_id: input.request_id.clone(),
        granted,
        used: 0,
        state: LeaseState::Open,
        charged: 0,
        created_at: now,
        expires_at,
        closed_at: None,
        refunded: 0,
        refund_pending: 0,
        settle_seq: 0,
        recalled_at: None,
    })
    .await?;
    let after = tx.add_balance(&account_id, -granted).await?;
    let budget = match budget {
        Some(b) => Some(spend(tx, alerts, b, granted, now).await?.state()),
        None => None,
    };
    low_balance(tx, alerts, &account_id, balance, after, now).await?;
    Ok(LeaseOutcome::Granted {
        lease_id,
        granted,
        expires_in_ms: expires_at - now,
        account_id,
        balance: after,
        replay: false,
        budget,
    })
}

/// Finds a lease, locks its account, expires the account's due leases and
/// reads the lease again (it may have just expired).
async fn locked_lease<T: Tx>(
    tx: &mut T,
    found: Option<LeaseRow>,
    now: i64,
    policy: ExpiryPolicy,
) -> Result<Option<(LeaseRow, i64)>> {
    let Some(l) = found else {
        return Ok(None);
    };
    expire_account(tx, &l.account_id, now, policy).await?;
    let Some(l) = tx.lease_by_id(&l.lease_id).await? else {
        return Ok(None);
    };
    let balance = match tx.account(&l.account_id).await? {
        Some(a) => a.balance,
        None => return Ok(None),
    };
    Ok(Some((l, balance)))
}

pub async fn settle<T: Tx>(
    tx: &mut T,
    lease_id: &str,
    used: i64,
    is_final: bool,
    seq: Option<i64>,
    policy: ExpiryPolicy,
) -> Result<SettleOutcome> {
    let now = now_ms();
    let found = tx.lease_by_id(lease_id).await?;
    let Some((mut l, balance)) = locked_lease(tx, found, now, policy).await? else {
        return Ok(SettleOutcome::UnknownLease);
    };
    let same_report = used == l.used && is_final == (l.state == LeaseState::Settled);
    let rule = rules::settle_seq_rule(l.settle_seq, seq, same_report);
    // The answer of an accepted (200) settle.
    let done = |l: LeaseRow, balance: i64| {
        SettleOutcome::Done(Settled {
            recall: l.state == LeaseState::Open && l.recalled_at.is_some(),
            lease_id: l.lease_id,
            account_id: l.account_id,
            request_id: l.request_id,
            state: l.state,
            used: l.used,
            granted: l.granted,
            balance,
            seq: l.settle_seq,
            stale: rule == SeqRule::Stale,
            replay: rule == SeqRule::Replay,
        })
    };
    // A late retry of an older settle: nothing changes, in any state.
    if rule == SeqRule::Stale {
        return Ok(done(l, balance));
    }
    if used > l.granted {
        return Ok(SettleOutcome::TooMuch {
            account_id: l.account_id,
            request_id: l.request_id,
            granted: l.granted,
        });
    }
    let new_seq = l.settle_seq.max(seq.unwrap_or(0));
    Ok(match l.state {
        LeaseState::Open => {
            l.used = used;
            l.settle_seq = new_seq;
            let balance = if is_final {
                close_lease(tx, &mut l, balance, used, LeaseState::Settled, now).await?
            } else {
                tx.update_lease(&l).await?;
                balance
            };
            done(l, balance)
        }
        LeaseState::Settled if l.used == used => {
            if new_seq != l.settle_seq {
                l.settle_seq = new_seq;
                tx.update_lease(&l).await?;
            }
            done(l, balance)
        }
        LeaseState::Settled => SettleOutcome::AlreadySettled {
            account_id: l.account_id,
            request_id: l.request_id,
            used: l.used,
        },
        LeaseState::Expired => SettleOutcome::Expired {
            account_id: l.account_id,
            request_id: l.request_id,
            charged: l.charged,
        },
        LeaseState::Cancelled => SettleOutcome::Cancelled {
            account_id: l.account_id,
            request_id: l.request_id,
        },
    })
}

pub async fn cancel<T: Tx>(
    tx: &mut T,
    request_id: &str,
    policy: ExpiryPolicy,
) -> Result<CancelOutcome> {
    let now = now_ms();
    let found = tx.lease_by_request(request_id).await?;
    let Some((mut l, balance)) = locked_lease(tx, found, now, policy).await? else {
        return Ok(CancelOutcome::UnknownLease);
    };
    Ok(match l.state {
        LeaseState::Cancelled => CancelOutcome::AlreadyCancelled {
            lease_id: l.lease_id,
            account_id: l.account_id,
            balance,
        },
        LeaseState::Open if l.used == 0 && l.refund_pending == 0 => {
            let balance = credit(tx, &l.account_id, balance, l.granted).await?;
            give_back(tx, &l.account_id, l.created_at, l.granted).await?;
            l.state = LeaseState::Cancelled;
            l.charged = 0;
            l.closed_at = Some(now);
            tx.update_lease(&l).await?;
            CancelOutcome::Cancelled {
                lease_id: l.lease_id,
                account_id: l.account_id,
                balance,
            }
        }
        LeaseState::Open => CancelOutcome::InUse {
            lease_id: l.lease_id,
            account_id: l.account_id,
            used: l.used,
        },
        LeaseState::Settled | LeaseState::Expired => CancelOutcome::Closed {
            lease_id: l.lease_id,
            account_id: l.account_id,
            state: l.state,
        },
    })
}

pub async fn lease_refund<T: Tx>(
    tx: &mut T,
    input: &LeaseRefundInput,
    policy: ExpiryPolicy,
) -> Result<LeaseRefundOutcome> {
    let now = now_ms();
    let found = tx.lease_by_id(&input.lease_id).await?;
    let Some((mut l, balance)) = locked_lease(tx, found, now, policy).await? else {
        return Ok(LeaseRefundOutcome::UnknownLease);
    };
    let answer = |l: &LeaseRow, balance: i64, replay: bool| {
        let charged = (l.state != LeaseState::Open).then_some(l.charged);
        LeaseRefundOutcome::Done(LeaseRefunded {
            lease_id: l.lease_id.clone(),
            account_id: l.account_id.clone(),
            units: input.units,
            balance,
            charged,
            pending: charged.is_none(),
            replay,
        })
    };
    match tx.lease_refund(&input.request_id).await? {
        Some((lease, units)) if lease == l.lease_id && units == input.units => {
            return Ok(answer(&l, balance, true));
        }
        Some(_) => {
            return Ok(LeaseRefundOutcome::Conflict {
                account_id: l.account_id,
            })
        }
        None => {}
    }
    let balance = match l.state {
        LeaseState::Settled | LeaseState::Expired if input.units > l.charged => {
            return Ok(LeaseRefundOutcome::ExceedsCharge {
                account_id: l.account_id,
            });
        }
        // Closed: credited back at once.
        LeaseState::Settled | LeaseState::Expired => {
            let reserved = tx.reserved(&l.account_id).await?;
            if rules::credit_within(balance, input.units, reserved).is_none() {
                return Ok(LeaseRefundOutcome::Overflow {
                    account_id: l.account_id,
                });
            }
            let balance = credit(tx, &l.account_id, balance, input.units).await?;
            give_back(tx, &l.account_id, l.created_at, input.units).await?;
            l.charged -= input.units;
            l.refunded += input.units;
            tx.update_lease(&l).await?;
            balance
        }
        // A lease never charges more than it granted.
        LeaseState::Open if l.refund_pending.saturating_add(input.units) > l.granted => {
            return Ok(LeaseRefundOutcome::ExceedsCharge {
                account_id: l.account_id,
            });
        }
        // Open: pending, applied when the lease closes.
        LeaseState::Open => balance,
        LeaseState::Cancelled => {
            return Ok(LeaseRefundOutcome::Cancelled {
                account_id: l.account_id,
            })
        }
    };
    tx.insert_lease_refund(&NewLeaseRefund {
        input,
        account_id: &l.account_id,
        at: now,
    })
    .await?;
    Ok(answer(&l, balance, false))
}

// ------------------------------------------------------------ usage and payments

/// Records `line` for `request_id` unless a line is recorded already (a retry, or
/// a first call that carried none): the first line of a request stands.
async fn record_line<T: Tx>(
    tx: &mut T,
    request_id: &str,
    account_id: &str,
    line: Option<&UsageLine>,
    units: i64,
) -> Result<()> {
    let Some(line) = line else { return Ok(()) };
    if tx.usage_item(request_id).await?.is_some() {
        return Ok(());
    }
    tx.insert_usage_item(&UsageItemRow {
        request_id: request_id.to_owned(),
        account_id: account_id.to_owned(),
        lease_id: None,
        line: line.clone(),
        units,
        at: now_ms(),
    })
    .await
}

pub async fn usage<T: Tx>(
    tx: &mut T,
    request_id: &str,
    credential: &str,
    actual: i64,
    line: Option<&UsageLine>,
    alerts: &AlertSettings,
) -> Result<UsageOutcome> {
    let key_hash = sha256_hex(credential.as_bytes());
    let Some(acct) = tx.account_by_key(&key_hash).await? else {
        return Ok(UsageOutcome::UnknownCredential);
    };
    let account_id = acct.account_id;
    let now = now_ms();
    let mut charged_at = now;
    let estimate = match tx.charge(request_id).await? {
        Some(c) if c.account_id != account_id => {
            return Ok(UsageOutcome::Conflict { account_id });
        }
        Some(c) if c.status == ChargeStatus::Refunded => {
            return Ok(UsageOutcome::Refunded { account_id });
        }
        Some(c) => match tx.usage_actual(request_id).await? {
            Some(done) if done == actual => {
                record_line(tx, request_id, &account_id, line, actual).await?;
                return Ok(UsageOutcome::Settled {
                    account_id,
                    balance: acct.balance,
                    replay: true,
                });
            }
            Some(done) => {
                return Ok(UsageOutcome::Final {
                    account_id,
                    cost: done,
                });
            }
            None => {
                charged_at = c.at;
                Some(c.cost)
            }
        },
        None => None,
    };
    // Both amounts are in 0..=i64::MAX, so the difference fits.
    let delta = estimate.unwrap_or(0) - actual;
    let reserved = tx.reserved(&account_id).await?;
    if rules::usage_adjusted(acct.balance, delta, reserved).is_none() {
        return Ok(UsageOutcome::Overflow { account_id });
    }
    if estimate.is_some() {
        tx.set_charge_cost(request_id, actual).await?;
    } else {
        tx.insert_charge(&NewCharge {
            request_id,
            account_id: &account_id,
            cost: actual,
            route: USAGE_ROUTE,
            method: "-",
            path: "-",
            at: now,
        })
        .await?;
    }
    tx.insert_usage(&NewUsage {
        request_id,
        account_id: &account_id,
        estimate,
        actual,
        at: now,
    })
    .await?;
    record_line(tx, request_id, &account_id, line, actual).await?;
    let balance = if delta == 0 {
        acct.balance
    } else {
        tx.add_balance(&account_id, delta).await?
    };
    // The budget follows the cost, in the period the charge was made: usage
    // beyond the estimate is owed, so it counts even past the limit.
    if delta < 0 {
        if let Some(b) = budget_at(tx, &account_id, charged_at).await? {
            spend(tx, alerts, b, -delta, now).await?;
        }
        low_balance(tx, alerts, &account_id, acct.balance, balance, now).await?;
    } else {
        give_back(tx, &account_id, charged_at, delta).await?;
    }
    Ok(UsageOutcome::Settled {
        account_id,
        balance,
        replay: false,
    })
}

pub async fn lease_usage<T: Tx>(
    tx: &mut T,
    lease_id: &str,
    request_id: &str,
    units: i64,
    line: &UsageLine,
) -> Result<LeaseUsageOutcome> {
    let Some(lease) = tx.lease_by_id(lease_id).await? else {
        return Ok(LeaseUsageOutcome::UnknownLease);
    };
    // Lock the account row like every other write of its ledger.
    let account_id = match tx.account(&lease.account_id).await? {
        Some(a) => a.account_id,
        None => return Ok(LeaseUsageOutcome::UnknownLease),
    };
    if let Some(done) = tx.usage_item(request_id).await? {
        return Ok(if done.same_as(Some(lease_id), line, units) {
            LeaseUsageOutcome::Recorded {
                account_id,
                replay: true,
            }
        } else {
            LeaseUsageOutcome::Conflict { account_id }
        });
    }
    tx.insert_usage_item(&UsageItemRow {
        request_id: request_id.to_owned(),
        account_id: account_id.clone(),
        lease_id: Some(lease_id.to_owned()),
        line: line.clone(),
        units,
        at: now_ms(),
    })
    .await?;
    Ok(LeaseUsageOutcome::Recorded {
        account_id,
        replay: false,
    })
}

pub async fn usage_items<T: Tx>(tx: &mut T, account_id: &str) -> Result<Option<Vec<UsageItemRow>>> {
    if tx.account(account_id).await?.is_none() {
        return Ok(None);
    }
    Ok(Some(tx.usage_items_of(account_id).await?))
}

pub async fn payment_use<T: Tx>(
    tx: &mut T,
    payment_id: &str,
    request_id: &str,
) -> Result<Option<bool>> {
    let Some(owner) = tx.topup_owner(payment_id).await? else {
        return Ok(None);
    };
    Ok(Some(
        tx.charge(request_id)
            .await?
            .is_some_and(|c| c.account_id == owner),
    ))
}

/// Why a payment of `request_id` for `payer` must not be settled, asked
/// before it is: a settled payment cannot be given back.
pub async fn pay_refusal<T: Tx>(
    tx: &mut T,
    payer: &Payer,
    request_id: &str,
) -> Result<Option<PayRefusal>> {
    let account_id = match payer {
        Payer::Key(credential) => match tx
            .account_by_key(&sha256_hex(credential.as_bytes()))
            .await?
        {
            Some(a) => a.account_id,
            None => return Ok(Some(PayRefusal::UnknownCredential)),
        },
        Payer::Account(id) => id.clone(),
    };
    // The caller asked `payment_use` first: a charge of this request is not
    // this payment's, so settling would charge the request twice.
    Ok(tx.charge(request_id).await?.map(|c| {
        if c.account_id == account_id {
            PayRefusal::AlreadyCharged { account_id }
        } else {
            PayRefusal::OtherAccount {
                account_id: c.account_id,
            }
        }
    }))
}

pub async fn pay<T: Tx>(tx: &mut T, p: &PaidCharge) -> Result<PaidOutcome> {
    let now = now_ms();
    let acct = match &p.payer {
        Payer::Key(credential) => {
            let Some(a) = tx
                .account_by_key(&sha256_hex(credential.as_bytes()))
                .await?
            else {
                return Ok(PaidOutcome::UnknownCredential);
            };
            a
        }
        Payer::Account(id) => match tx.account(id).await? {
            Some(a) => a,
            None => {
                tx.insert_account(&NewAccount {
                    account_id: id.as_str(),
                    key_hash: None,
                    balance: 0,
                    disabled: false,
                    at: now,
                })
                .await?;
                tx.account(id)
                    .await?
                    .ok_or_else(|| StoreError::Corrupt("payer account vanished".to_owned()))?
            }
        },
    };
    let account_id = acct.account_id.as_str();
    let replay = match tx.charge(&p.request_id).await? {
        Some(c) if c.account_id != account_id => {
            return Ok(PaidOutcome::Conflict {
                account_id: c.account_id,
            });
        }
        Some(_) => true,
        None => false,
    };
    if !replay {
        // One payment pays one request: its id is the top-up's, which is unique.
        if let Some(pid) = p.payment_id.as_deref() {
            if tx.topup_owner(pid).await?.is_some() {
                return Ok(PaidOutcome::PaymentUsed {
                    account_id: account_id.to_owned(),
                });
            }
        }
    }
    if !replay && p.cost > 0 {
        // The payment is a top-up and the charge spends it: balance unchanged.
        tx.insert_topup(&NewTopup {
            topup_id: p.payment_id.as_deref(),
            account_id,
            amount: p.cost,
            at: now,
        })
        .await?;
        tx.insert_charge(&NewCharge {
            request_id: &p.request_id,
            account_id,
            cost: p.cost,
            route: &p.route,
            method: &p.method,
            path: &p.path,
            at: now,
        })
        .await?;
    }
    Ok(PaidOutcome::Paid {
        account_id: account_id.to_owned(),
        balance: acct.balance,
        replay,
    })
}
