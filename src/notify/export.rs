//! Usage export: every ledger entry (charge, refund, top-up, auto top-up, renewal, plan change)
//! delivered at least once to `export.url`, so that trimming the history (`history.max_entries`)
//! loses nothing.
//!
//! Each instance runs an exporter. A pass looks at the accounts with entries not yet exported
//! (the store's export index), reads the oldest of them, POSTs them as one CloudEvents 1.0 JSON
//! batch (`application/cloudevents-batch+json`, the shape OpenMeter's ingest endpoint accepts),
//! signed like webhooks, and on a 2xx answer moves the account's export mark past them. While
//! export is on the store trims only exported entries, so a receiver that is down delays the
//! trimming, never the ledger. A failing receiver is retried with exponential backoff per
//! account; `creditgate_export_pending_entries` shows how many entries wait, which is how far
//! the history has grown past `history.max_entries` meanwhile. Delivery is at least once (a crash between the POST and the mark, or two instances
//! exporting one account, can resend a batch): each event's `id` (`<account>:<seq>`) is unique
//! and stable, so receivers dedupe by it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::body::Body;
use http::{Method, Request, header};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::calendar::rfc3339;
use crate::ledger::{HistoryEntry, Ledger};
use crate::state::AppState;

/// How often the exporter looks for entries to export.
pub const POLL: Duration = Duration::from_millis(500);
/// How often it also sweeps the store for accounts whose mark was lost.
const SWEEP: Duration = Duration::from_secs(600);
/// Time allowed for one delivery.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The CloudEvents 1.0 form of one ledger entry.
pub fn cloud_event(source: &str, account: &str, e: &HistoryEntry) -> Value {
    json!({
        "specversion": "1.0",
        "id": format!("{account}:{}", e.seq),
        "source": source,
        "type": format!("creditgate.{}", e.kind),
        "subject": account,
        "time": rfc3339(e.at),
        "datacontenttype": "application/json",
        "data": e,
    })
}

/// Starts the exporter; it ends when `shutdown` turns true. Does nothing while `export.url` is
/// unset (a reload can switch it on).
pub fn spawn(state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff: HashMap<String, (u32, Instant)> = HashMap::new();
        // Entries each account had left to export when last tried (the gauge is their sum).
        let mut pending: HashMap<String, u64> = HashMap::new();
        let mut last_sweep: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let rt = state.runtime.load_full();
            let (Some(url), Some(secret)) = (rt.config.export.url.as_deref(), rt.export_secret.as_deref()) else {
                continue;
            };
            if last_sweep.is_none_or(|t| t.elapsed() >= SWEEP) {
                last_sweep = Some(Instant::now());
                if let crate::store::Store::Redis(r) = &*state.ledger {
                    match r.sweep_exports().await {
                        Ok(n) if n > 0 => tracing::info!(accounts = n, "exporter: re-indexed accounts"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "exporter: sweep failed"),
                    }
                }
            }
            let accounts = match state.ledger.export_accounts().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "exporter: cannot read the export index");
                    continue;
                }
            };
            let cfg = &rt.config.export;
            {
                let listed: std::collections::HashSet<&str> = accounts.iter().map(String::as_str).collect();
                pending.retain(|account, _| listed.contains(account.as_str()));
            }
            for account in accounts {
                if backoff.get(&account).is_some_and(|(_, next)| *next > Instant::now()) {
                    continue;
                }
                match export(&state, url, secret, &cfg.source, cfg.batch_size, &account).await {
                    Ok(left) => {
                        backoff.remove(&account);
                        pending.insert(account, left);
                    }
                    Err(e) => {
                        // How much waits (acknowledging seq 0 moves nothing); on a store error the
                        // last count stands.
                        if let Ok(left) = state.ledger.ack_export(&account, 0).await {
                            pending.insert(account.clone(), left);
                        }
                        let (attempts, next) = backoff.entry(account.clone()).or_insert((0, Instant::now()));
                        *attempts += 1;
                        let wait = Duration::from_millis(250u64.saturating_mul(1 << (*attempts).min(16)))
                            .min(Duration::from_millis(cfg.max_backoff_ms));
                        *next = Instant::now() + wait;
                        state.metrics.export_failures.inc();
                        tracing::warn!(%account, error = %e, retry_in_ms = wait.as_millis() as u64, "export failed");
                    }
                }
            }
            state.metrics.export_pending.set(pending.values().sum::<u64>() as i64);
        }
    })
}

/// Exports an account's waiting entries, batch after batch, until none are left; returns how
/// many are still waiting (more than ten batches' worth, or appended meanwhile).
async fn export(
    state: &AppState,
    url: &str,
    secret: &[u8],
    source: &str,
    batch: usize,
    account: &str,
) -> Result<u64, String> {
    // Bounded per pass, so one busy account cannot hold the others back.
    let mut left = 0;
    for _ in 0..10 {
        let entries = state.ledger.unexported(account, batch).await.map_err(|e| e.to_string())?;
        let Some(last) = entries.last().map(|e| e.seq) else {
            return state.ledger.ack_export(account, 0).await.map_err(|e| e.to_string());
        };
        let events: Vec<Value> = entries.iter().map(|e| cloud_event(source, account, e)).collect();
        let body = serde_json::to_vec(&events).map_err(|e| e.to_string())?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(url)
            .header(header::CONTENT_TYPE, "application/cloudevents-batch+json")
            .header("x-creditgate-signature", super::webhook::signature(secret, crate::calendar::now(), &body))
            .body(Body::from(body))
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(TIMEOUT, state.clients.get().request(req)).await {
            Err(_) => return Err("timed out".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(res)) if !res.status().is_success() => return Err(format!("answered {}", res.status())),
            Ok(Ok(_)) => {}
        }
        state.metrics.exported_entries.inc_by(entries.len() as u64);
        left = state.ledger.ack_export(account, last).await.map_err(|e| e.to_string())?;
        if left == 0 {
            return Ok(0);
        }
    }
    Ok(left)
}
