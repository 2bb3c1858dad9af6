//! E-mail delivery over SMTP (lettre), to the account's address.

use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::calendar::human_date;
use crate::config::SmtpConfig;
use crate::ledger::Event;

/// A configured SMTP sender.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    /// Builds the transport (no connection yet); `ca_file` is `tls.ca_file`, trusted besides
    /// the webpki roots for `notifications.smtp.tls`.
    pub fn new(c: &SmtpConfig, ca_file: Option<&str>) -> Result<Self, String> {
        use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
        // Plain SMTP (`tls = "none"`) is meant for a relay on the same host or network (README).
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&c.host).port(c.port);
        if c.tls != crate::config::SmtpTls::None {
            let mut params = TlsParameters::builder(c.host.clone());
            if let Some(file) = ca_file {
                let pem = std::fs::read(file).map_err(|e| format!("tls.ca_file {file}: {e}"))?;
                params =
                    params.add_root_certificate(Certificate::from_pem(&pem).map_err(|e| format!("tls.ca_file: {e}"))?);
            }
            let params = params.build_rustls().map_err(|e| format!("notifications.smtp.tls: {e}"))?;
            builder = builder.tls(match c.tls {
                crate::config::SmtpTls::Implicit => Tls::Wrapper(params),
                _ => Tls::Required(params),
            });
        }
        if let (Some(u), Some(p)) = (&c.username_env, &c.password_env)
            && let (Ok(user), Ok(pass)) = (std::env::var(u), std::env::var(p))
        {
            builder = builder.credentials(Credentials::new(user, pass));
        }
        let from = c.from.parse().map_err(|e| format!("notifications.smtp.from: {e}"))?;
        Ok(Mailer { transport: builder.build(), from })
    }

    /// Sends one event to `to`.
    pub async fn send(&self, to: &str, event: &Event) -> Result<(), String> {
        let to: Mailbox = to.parse().map_err(|e| format!("bad address {to:?}: {e}"))?;
        let (subject, text) = render(event);
        let msg = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .header(lettre::message::header::ContentType::TEXT_PLAIN)
            .body(text)
            .map_err(|e| e.to_string())?;
        self.transport.send(msg).await.map(|_| ()).map_err(|e| e.to_string())
    }
}

fn num(v: &serde_json::Value) -> String {
    thousands(v.as_u64().unwrap_or(0))
}

/// A whole number with thousands separators, as people read it: 1350 → "1,350".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn date(v: &serde_json::Value) -> String {
    v.as_str().and_then(crate::calendar::parse_rfc3339).map(human_date).unwrap_or_default()
}

/// Subject and plain-text body of an event's e-mail.
pub fn render(e: &Event) -> (String, String) {
    let d = &e.data;
    let (subject, body) = match e.kind.as_str() {
        "credits.low" => (
            format!("Your AI credits are running low: {} left", num(&d["remaining"])),
            format!(
                "Your account {} has {} of its {} monthly AI credits left ({}% threshold reached).\nThey renew on {}. You can buy a top-up at any time.",
                e.account_id,
                num(&d["remaining"]),
                num(&d["allocation"]),
                d["threshold"],
                date(&d["renews_at"])
            ),
        ),
        "credits.exhausted" => (
            "You're out of AI credits".to_owned(),
            format!(
                "Your account {} has used all its AI credits. AI features pause until they renew on {} — or buy a top-up.\nTranscriptions you send meanwhile are queued and run once credits are back.",
                e.account_id,
                date(&d["renews_at"])
            ),
        ),
        "credits.renewed" => (
            format!("Your AI credits have renewed: {} credits", num(&d["allocation"])),
            format!(
                "Your account {} has a fresh {} monthly AI credits (plan {}). Top-up credits left: {}. Next renewal: {}.",
                e.account_id,
                num(&d["allocation"]),
                d["plan"].as_str().unwrap_or(""),
                num(&d["topup_remaining"]),
                date(&d["renews_at"])
            ),
        ),
        "topup.completed" => (
            format!("Top-up received: {} credits", num(&d["credits"])),
            format!(
                "{} top-up credits were added to account {} (reference {}). Top-up credits now: {}. They never expire.",
                num(&d["credits"]),
                e.account_id,
                d["payment_ref"].as_str().unwrap_or(""),
                num(&d["topup_remaining"])
            ),
        ),
        "auto_topup.purchased" => (
            format!("Auto top-up: {} credits added", num(&d["credits"])),
            format!(
                "Your balance fell below your auto top-up threshold, so package {} ({} credits, €{}) was bought for account {}. Top-up credits now: {}.",
                d["package"].as_str().unwrap_or(""),
                num(&d["credits"]),
                d["price_eur"],
                e.account_id,
                num(&d["topup_remaining"])
            ),
        ),
        other => (format!("creditgate: {other}"), format!("Event {other} for account {}: {}", e.account_id, d)),
    };
    (subject, format!("{body}\n\nEvent id: {}\n", e.id))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn low_credit_mail_carries_the_figures() {
        let e = crate::ledger::Event {
            id: "evt_a_1".into(),
            kind: "credits.low".into(),
            account_id: "a".into(),
            created_at: 0,
            data: json!({"threshold": 20, "remaining": 1350, "allocation": 10000, "renews_at": "2026-12-15T00:00:00Z"}),
        };
        let (subject, body) = super::render(&e);
        assert_eq!(subject, "Your AI credits are running low: 1,350 left");
        assert!(body.contains("1,350 of its 10,000") && body.contains("15 Dec 2026") && body.contains("20%"));
    }
}
