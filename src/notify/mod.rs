//! The notifier: delivers outbox events (SPEC §7) to the webhook and by e-mail.
//!
//! Events are written by the ledger in the same atomic step as the change they report, into a
//! per-account outbox in the store. This task drains the outboxes: for each account with events,
//! oldest first, it POSTs each event to `notifications.webhook_url` (signed) and mails it when
//! SMTP is configured and the account has an e-mail address, then acknowledges it. A failed
//! delivery leaves the event (and the ones after it, to keep order) in the outbox and retries the
//! account with exponential backoff; events older than `event_ttl_hours` are dropped with a log
//! line. Delivery is at least once — a crash between delivery and acknowledgement resends — so
//! receivers dedupe by the event `id`.

pub mod email;
pub mod webhook;

use std::collections::HashMap;
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
}

/// Starts the dispatcher task; it ends when `shutdown` turns true.
pub fn spawn(state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff: HashMap<String, Backoff> = HashMap::new();
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
                n.webhook_url.as_deref().map(|url| webhook::Target::new(url, n.webhook_secret_env.as_deref()));
            // Rebuild the SMTP transport only when its config changed (reload).
            let smtp_key = n.smtp.as_ref().map(|s| format!("{}:{}:{}", s.host, s.port, s.from));
            if mailer.as_ref().map(|m| &m.0) != smtp_key.as_ref() {
                mailer = n
                    .smtp
                    .as_ref()
                    .and_then(|s| email::Mailer::new(s).ok().map(|m| (smtp_key.clone().unwrap_or_default(), m)));
            }
            let accounts = match state.ledger.event_accounts().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "notifier: cannot read the outbox index");
                    continue;
                }
            };
            let ttl = n.event_ttl_hours as i64 * 3600;
            let max_backoff = Duration::from_millis(n.max_backoff_ms);
            for account in accounts {
                if backoff.get(&account).is_some_and(|b| b.next > Instant::now()) {
                    continue;
                }
                let ok = drain(&state, &account, webhook.as_ref(), mailer.as_ref().map(|m| &m.1), ttl).await;
                if ok {
                    backoff.remove(&account);
                } else {
                    let b = backoff.entry(account).or_insert(Backoff { attempts: 0, next: Instant::now() });
                    b.attempts += 1;
                    let wait = Duration::from_millis(250u64.saturating_mul(1 << b.attempts.min(16))).min(max_backoff);
                    b.next = Instant::now() + wait;
                }
            }
        }
    })
}

/// Delivers one account's pending events in order; false when a delivery failed.
async fn drain(
    state: &AppState,
    account: &str,
    webhook: Option<&webhook::Target>,
    mailer: Option<&email::Mailer>,
    ttl_secs: i64,
) -> bool {
    let events = match state.ledger.pending_events(account, BATCH).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, account, "notifier: cannot read the outbox");
            return false;
        }
    };
    if events.is_empty() {
        return true;
    }
    let now = crate::calendar::now();
    let mut done = Vec::new();
    let mut all_ok = true;
    let mut address: Option<Option<String>> = None;
    for event in &events {
        if event.created_at + ttl_secs < now {
            tracing::warn!(event_id = %event.id, kind = %event.kind, account, "notifier: event expired undelivered; dropping");
            done.push(event.id.clone());
            continue;
        }
        if webhook.is_none() && mailer.is_none() {
            // Nowhere to deliver yet: keep it until a channel is configured or it expires.
            continue;
        }
        if let Some(target) = webhook
            && let Err(e) = target.deliver(&state.client, event).await
        {
            tracing::warn!(event_id = %event.id, error = %e, "notifier: webhook delivery failed; will retry");
            all_ok = false;
            break;
        }
        if let Some(mailer) = mailer {
            if address.is_none() {
                address = Some(state.ledger.account(account).await.ok().flatten().and_then(|a| a.email));
            }
            if let Some(Some(to)) = &address
                && let Err(e) = mailer.send(to, event).await
            {
                tracing::warn!(event_id = %event.id, error = %e, "notifier: e-mail delivery failed; will retry");
                all_ok = false;
                break;
            }
        }
        tracing::info!(event_id = %event.id, kind = %event.kind, account, "event delivered");
        done.push(event.id.clone());
    }
    if !done.is_empty()
        && let Err(e) = state.ledger.ack_events(account, &done).await
    {
        tracing::warn!(error = %e, account, "notifier: acknowledging events failed; they will be sent again");
        return false;
    }
    all_ok
}
