//! The notifier: delivers outbox events (SPEC §7) to the webhook and by e-mail.
//!
//! Events are written by the ledger in the same atomic step as the change they report, into a
//! per-account outbox in the store. This task drains the outboxes: for each account with events,
//! oldest first, it POSTs each event to `notifications.webhook_url` (signed) and mails it when
//! SMTP is configured and the account has an e-mail address, then acknowledges it once every
//! channel has it. The channels progress independently: a mail relay that is down neither holds
//! back webhooks nor makes them repeat (this instance remembers which channel already has which
//! event). A failed delivery stops that channel for the account — later events wait, to keep
//! order — and the account is retried with exponential backoff, capped at `max_backoff_ms`;
//! events older than `event_ttl_hours` are dropped with a log line and counted
//! (`creditgate_events_expired_total`). Delivery is at least once — a crash between
//! delivery and acknowledgement, or two instances draining one outbox, can resend — so receivers
//! dedupe by the event `id`.
//!
//! With `[billing.stripe]` a third channel pays each `auto_topup.purchased` event
//! ([`crate::billing::pay_auto_topup`]); such an event is acknowledged only once paid or settled
//! as declined, and never dropped for its age while unpaid.

pub mod email;
pub mod export;
pub mod webhook;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::task::JoinHandle;

use crate::calendar::rfc3339;
use crate::ledger::{Event, Ledger};
use crate::state::AppState;

/// How often the outboxes are looked at.
pub const POLL: Duration = Duration::from_millis(500);
/// Events fetched per account per round.
const BATCH: usize = 100;

/// The JSON body of an event as delivered.
pub fn event_body(e: &Event) -> Vec<u8> {
    let v = json!({"id": e.id, "type": e.kind, "account_id": e.account_id, "created_at": rfc3339(e.created_at), "data": e.data});
    serde_json::to_vec(&v).unwrap_or_default()
}

struct Backoff {
    attempts: u32,
    next: Instant,
    /// Events left at the last attempt (counted in the gauge while the account waits).
    left: usize,
}

/// Which channels already have which undelivered event (process-local).
#[derive(Default)]
struct Progress {
    webhook: HashSet<String>,
    mail: HashSet<String>,
    payments: HashSet<String>,
}

/// Starts the dispatcher task; it ends when `shutdown` turns true.
pub fn spawn(state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff: HashMap<String, Backoff> = HashMap::new();
        let mut progress = Progress::default();
        let mut mailer: Option<(String, email::Mailer)> = None;
        // Accounts whose event was written but whose index entry was lost (a crash in between).
        if let crate::store::Store::Redis(r) = &*state.ledger {
            match r.sweep_outboxes().await {
                Ok(n) if n > 0 => tracing::info!(accounts = n, "notifier: re-indexed outboxes"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "notifier: outbox sweep failed"),
            }
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let rt = state.runtime.load_full();
            let n = &rt.config.notifications;
            let webhook =
                n.webhook_url.as_deref().zip(rt.webhook_secret.as_deref()).map(|(u, s)| webhook::Target::new(u, s));
            // Rebuild the SMTP transport only when its config changed (reload).
            let smtp_key = n.smtp.as_ref().map(|s| format!("{}:{}:{}:{:?}", s.host, s.port, s.from, s.tls));
            if mailer.as_ref().map(|m| &m.0) != smtp_key.as_ref() {
                mailer = n.smtp.as_ref().and_then(|s| match email::Mailer::new(s, rt.config.tls.ca_file.as_deref()) {
                    Ok(m) => Some((smtp_key.clone().unwrap_or_default(), m)),
                    Err(e) => {
                        tracing::error!(error = %e, "notifier: SMTP not usable");
                        None
                    }
                });
            }
            let accounts = match state.ledger.event_accounts().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "notifier: cannot read the outbox index");
                    continue;
                }
            };
            let channels = Channels {
                webhook: webhook.as_ref(),
                mailer: mailer.as_ref().map(|m| &m.1),
                payments: rt.stripe.as_deref(),
            };
            let ttl = n.event_ttl_hours as i64 * 3600;
            let max_backoff = Duration::from_millis(n.max_backoff_ms);
            let mut depth = 0;
            for account in accounts {
                if let Some(b) = backoff.get(&account).filter(|b| b.next > Instant::now()) {
                    depth += b.left;
                    continue;
                }
                let (ok, left) = drain(&state, &account, &channels, &mut progress, ttl).await;
                depth += left;
                if ok {
                    backoff.remove(&account);
                } else {
                    let b = backoff.entry(account).or_insert(Backoff { attempts: 0, next: Instant::now(), left: 0 });
                    b.attempts += 1;
                    b.left = left;
                    let wait = Duration::from_millis(250u64.saturating_mul(1 << b.attempts.min(16))).min(max_backoff);
                    b.next = Instant::now() + wait;
                }
            }
            state.metrics.outbox_depth.set(depth as i64);
            state.metrics.outbox_dropped.inc_by(state.ledger.take_dropped_events());
        }
    })
}

/// The configured delivery channels.
struct Channels<'a> {
    webhook: Option<&'a webhook::Target<'a>>,
    mailer: Option<&'a email::Mailer>,
    /// With `[billing.stripe]`: `auto_topup.purchased` events are paid ([`crate::billing`]).
    payments: Option<&'a crate::billing::stripe::Stripe>,
}

/// The event that asks for a payment (with `[billing.stripe]`).
const PAYMENT_EVENT: &str = "auto_topup.purchased";

/// Delivers one account's pending events in order, each channel on its own; returns whether
/// every channel got everything, and how many events are left in the outbox.
async fn drain(
    state: &AppState,
    account: &str,
    ch: &Channels<'_>,
    progress: &mut Progress,
    ttl_secs: i64,
) -> (bool, usize) {
    let events = match state.ledger.pending_events(account, BATCH).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, account, "notifier: cannot read the outbox");
            return (false, 0);
        }
    };
    if events.is_empty() {
        return (true, 0);
    }
    if ch.webhook.is_none() && ch.mailer.is_none() && ch.payments.is_none() {
        // Nowhere to deliver yet: keep events until a channel is configured or they expire.
        let now = crate::calendar::now();
        let expired: Vec<String> =
            events.iter().filter(|e| e.created_at + ttl_secs < now).map(|e| e.id.clone()).collect();
        if state.ledger.ack_events(account, &expired).await.is_ok() && !expired.is_empty() {
            tracing::warn!(
                events = expired.len(),
                account,
                "notifier: events expired undelivered (no channel configured); dropped"
            );
            state.metrics.events_expired.inc_by(expired.len() as u64);
        }
        return (true, events.len() - expired.len());
    }
    let now = crate::calendar::now();
    let mut done = Vec::new();
    let mut expired = 0;
    let (mut webhook_ok, mut mail_ok, mut payments_ok) = (true, true, true);
    let mut address: Option<Option<String>> = None;
    for event in &events {
        let unpaid = ch.payments.is_some() && event.kind == PAYMENT_EVENT && !progress.payments.contains(&event.id);
        if event.created_at + ttl_secs < now && !unpaid {
            tracing::warn!(event_id = %event.id, kind = %event.kind, account, "notifier: event expired undelivered; dropping");
            expired += 1;
            done.push(event.id.clone());
            continue;
        }
        let mut delivered = true;
        if let Some(stripe) = ch.payments.filter(|_| unpaid) {
            // An unpaid purchase never expires: it is paid (or settled as declined) first.
            if payments_ok && crate::billing::pay_auto_topup(state, stripe, event).await.inspect_err(|e| {
                tracing::warn!(event_id = %event.id, error = %e, "notifier: auto top-up payment not made; will retry");
            }).is_ok()
            {
                progress.payments.insert(event.id.clone());
            } else {
                payments_ok = false;
                delivered = false;
            }
        }
        if ch.webhook.is_none() && ch.mailer.is_none() {
            // Nowhere to deliver yet: kept (paid first) until a channel is configured or it expires.
            continue;
        }
        if let Some(target) = ch.webhook
            && !progress.webhook.contains(&event.id)
        {
            if webhook_ok && target.deliver(state.clients.get(), event).await.inspect_err(|e| {
                tracing::warn!(event_id = %event.id, error = %e, "notifier: webhook delivery failed; will retry");
            }).is_ok()
            {
                progress.webhook.insert(event.id.clone());
            } else {
                webhook_ok = false;
                delivered = false;
            }
        }
        if let Some(mailer) = ch.mailer
            && !progress.mail.contains(&event.id)
        {
            if address.is_none() {
                address = Some(state.ledger.account(account).await.ok().flatten().and_then(|a| a.email));
            }
            if let Some(Some(to)) = &address {
                if mail_ok && mailer.send(to, event).await.inspect_err(|e| {
                    tracing::warn!(event_id = %event.id, error = %e, "notifier: e-mail delivery failed; will retry");
                }).is_ok()
                {
                    progress.mail.insert(event.id.clone());
                } else {
                    mail_ok = false;
                    delivered = false;
                }
            }
        }
        if delivered {
            tracing::info!(event_id = %event.id, kind = %event.kind, account, "event delivered");
            done.push(event.id.clone());
        }
    }
    if !done.is_empty() {
        if let Err(e) = state.ledger.ack_events(account, &done).await {
            tracing::warn!(error = %e, account, "notifier: acknowledging events failed; they will be sent again");
            return (false, events.len());
        }
        state.metrics.events_expired.inc_by(expired);
        for id in &done {
            progress.webhook.remove(id);
            progress.mail.remove(id);
            progress.payments.remove(id);
        }
    }
    (webhook_ok && mail_ok && payments_ok, events.len() - done.len())
}
