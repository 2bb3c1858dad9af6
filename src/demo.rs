//! `creditgate demo` and the `[demo]` config section: a built-in fake OpenAI-style backend on
//! loopback, plus a seeded account and key, so the whole gateway can be tried with curl.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::stream;
use http::{HeaderValue, header};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::auth::generate_key;
use crate::ledger::{KeyRecord, Ledger, NewAccount, Role};
use crate::state::AppState;

/// Words the fake model streams back.
const WORDS: [&str; 8] = ["Hello", " from", " the", " creditgate", " demo", " backend", ".", " 👋"];

/// Starts the fake backend on `addr` (port 0 picks a free one); returns the bound address.
pub async fn start_backend(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new().route("/v1/chat/completions", post(chat)).fallback(echo);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(bound)
}

async fn chat(body: Bytes) -> Response {
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = req["model"].as_str().unwrap_or("demo-model").to_owned();
    if req["stream"].as_bool() == Some(true) {
        let chunks = stream::unfold(0usize, move |i| {
            let model = model.clone();
            async move {
                if i > WORDS.len() {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(120)).await;
                let line = if i == WORDS.len() {
                    "data: [DONE]\n\n".to_owned()
                } else {
                    let chunk = json!({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
                        "choices": [{"index": 0, "delta": {"content": WORDS[i]}}]});
                    format!("data: {chunk}\n\n")
                };
                Some((Ok::<_, std::io::Error>(Bytes::from(line)), i + 1))
            }
        });
        let mut res = Body::from_stream(chunks).into_response();
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return res;
    }
    axum::Json(json!({
        "id": "chatcmpl-demo", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": WORDS.concat()}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17}
    }))
    .into_response()
}

/// The largest body [`echo`] reads.
const ECHO_MAX_BODY: usize = 16 << 20;

/// Answers any other route with what it was asked, once the request's body arrived whole (as a
/// real backend does: one that answers first and leaves the body unread makes hyper close the
/// connection after its answer, without saying so).
async fn echo(req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, ECHO_MAX_BODY).await {
        Ok(body) => body,
        Err(e) if crate::error::cause_ref::<http_body_util::LengthLimitError>(&e).is_some() => {
            return http::StatusCode::PAYLOAD_TOO_LARGE.into_response();
        }
        Err(_) => return http::StatusCode::BAD_REQUEST.into_response(),
    };
    axum::Json(json!({"ok": true, "method": parts.method.as_str(), "path": parts.uri.path(), "body_len": body.len(),
        "account": parts.headers.get("x-creditgate-account").and_then(|v| v.to_str().ok())}))
    .into_response()
}

/// Creates the demo account (if missing) and a fresh `user` key; returns the plaintext key.
pub async fn seed(state: &AppState, account: &str, plan: &str) -> Result<String, crate::ledger::LedgerError> {
    let allocation = state.runtime.load().config.plans.get(plan).map_or(0, |p| p.monthly_credits);
    let now = crate::calendar::now();
    let new = NewAccount { id: account.to_owned(), plan: plan.to_owned(), allocation, anchor: now, email: None };
    state.ledger.create_account(new).await?;
    let k = generate_key();
    let record = KeyRecord {
        key_id: k.key_id,
        account: account.to_owned(),
        role: Role::User,
        hash: k.hash,
        prefix: k.prefix,
        created_at: now,
    };
    state.ledger.create_key(record).await?;
    Ok(k.key)
}

/// The tour printed after start-up.
pub fn banner(public: SocketAddr, admin: Option<SocketAddr>, admin_token: &str, key: &str, account: &str) -> String {
    let chat = |tier: &str, extra: &str| {
        format!(
            "curl -s http://{public}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'x-ai-tier: {tier}' \\\n     -H 'content-type: application/json' -d '{{\"model\":\"demo\",{extra}\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}' -i"
        )
    };
    let admin_line = match admin {
        Some(a) => format!(
            "Admin API:  curl -s http://{a}/admin/v1/accounts/{account} -H 'Authorization: Bearer {admin_token}'\n"
        ),
        None => String::new(),
    };
    format!(
        "\n=== creditgate demo ===\n\
         Gateway:    http://{public}   (embedded memory store; balances vanish on exit)\n\
         {admin_line}\
         Account:    {account} (plan pro: 2,000 monthly credits)\n\
         API key:    {key}\n\n\
         # 1. a fast chat — costs 1 credit (see the x-credits-charged / x-credits-remaining headers)\n{}\n\n\
         # 2. a powerful chat — costs 5 credits\n{}\n\n\
         # 3. a streaming chat (SSE, chunk by chunk) — balanced tier, costs 3 credits\n{}\n\n\
         # your balance\ncurl -s http://{public}/v1/credits -H 'Authorization: Bearer {key}'\n\n\
         Dashboard:  http://{public}/dashboard#key={key}\n\
         Press Ctrl-C to stop.\n",
        chat("fast", ""),
        chat("powerful", ""),
        chat("balanced", "\"stream\":true,").replace(" -i", " -N"),
    )
}
