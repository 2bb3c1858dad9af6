//! TLS where the internet is. Incoming: the public listener terminating TLS (`server.tls`) and
//! taking a renewed certificate on SIGHUP. Outgoing: `https://` upstreams trusted through a private CA
//! (`upstreams.NAME.ca_file`), HTTP/2 when the backend's ALPN offers it and not with
//! `http2 = false`, mTLS with a client certificate, a backend whose certificate no trusted CA
//! signed refused with 502 `upstream_unavailable` (refunded) and a log line that says why, and
//! webhooks delivered to an HTTPS receiver trusted through `tls.ca_file`. Every certificate is
//! made here (rcgen).

mod support;

use std::time::Duration;

use support::gateway::{ConfigBuilder, TestGateway};
use support::process::GatewayProcess;
use support::tls::{TestCa, TlsServer};

const CHAT: &str = "/v1/chat/completions";

/// The test config with the `ai` upstream at `url` and these extra lines in its table.
fn config_with_ai(url: &str, lines: &str) -> String {
    let text = ConfigBuilder::new("http://127.0.0.1:9").build();
    let from = "urls = [\"http://127.0.0.1:9\"]";
    let at = text.find(from).expect("the ai upstream");
    format!("{}urls = [\"{url}\"]\n{lines}{}", &text[..at], &text[at + from.len()..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_https_upstream_behind_a_private_ca_speaks_http2_when_offered() {
    let ca = TestCa::new("upstream");
    let backend = TlsServer::start(&ca.server("backend"), None).await;
    let ca_file = ca.cert_file().display().to_string();
    let gw = TestGateway::start(&config_with_ai(&backend.url(), &format!("ca_file = \"{ca_file}\"\n"))).await;
    let key = gw.account_with_key("tls", "big").await;
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!((res.status.as_u16(), res.charged()), (200, 1), "{}", res.text());
    assert_eq!(res.json()["ok"], true);
    assert_eq!(backend.requests(), vec![(http::Version::HTTP_2, CHAT.to_owned())], "h2 by ALPN");

    // `http2 = false`: HTTP/1.1 even though the backend offers h2.
    let backend = TlsServer::start(&ca.server("backend1"), None).await;
    let lines = format!("ca_file = \"{ca_file}\"\nhttp2 = false\n");
    let gw = TestGateway::start(&config_with_ai(&backend.url(), &lines)).await;
    let key = gw.account_with_key("tls1", "big").await;
    assert_eq!(gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await.status, 200);
    assert_eq!(backend.requests(), vec![(http::Version::HTTP_11, CHAT.to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_no_trusted_ca_signed_is_refused_refunded_and_logged() {
    let (ca, other) = (TestCa::new("real"), TestCa::new("other"));
    let backend = TlsServer::start(&ca.server("backend"), None).await;
    // Trusting another CA (and the webpki roots) only.
    let lines = format!("ca_file = \"{}\"\n", other.cert_file().display());
    let gw = GatewayProcess::start_logging(&config_with_ai(&backend.url(), &lines), "warn").await;
    let admin = |path: &str, body: serde_json::Value| {
        let (url, token) = (format!("{}{path}", gw.admin), format!("Bearer {}", support::gateway::ADMIN_TOKEN));
        async move {
            let headers = [("authorization", token.as_str()), ("content-type", "application/json")];
            support::http::send("POST", &url, &headers, body.to_string()).await
        }
    };
    assert_eq!(admin("/admin/v1/accounts", serde_json::json!({"id": "untrusted", "plan": "big"})).await.status, 201);
    let key = admin("/admin/v1/accounts/untrusted/keys", serde_json::json!({"role": "user"})).await.json()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let auth = format!("Bearer {key}");
    let res = support::http::send(
        "POST",
        &format!("{}{CHAT}", gw.public),
        &[("authorization", &auth), ("x-ai-tier", "powerful"), ("content-type", "application/json")],
        "{}",
    )
    .await;
    assert_eq!((res.status.as_u16(), res.error_type()), (502, "upstream_unavailable".into()), "{}", res.text());
    assert!(backend.requests().is_empty(), "nothing was sent over an untrusted connection");
    let credits =
        support::http::send("GET", &format!("{}/v1/credits", gw.public), &[("authorization", &auth)], "").await;
    assert_eq!(credits.json()["remaining"], 10_000, "refunded");
    let says_why = |log: &str| log.contains("UnknownIssuer") || log.contains("invalid peer certificate");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !says_why(&gw.log()) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = gw.log();
    assert!(says_why(&log), "the log says why: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mtls_presents_the_client_certificate_the_backend_requires() {
    let ca = TestCa::new("mtls");
    let backend = TlsServer::start(&ca.server("backend"), Some(&ca)).await;
    let ca_file = ca.cert_file().display().to_string();
    // Without a client certificate the backend refuses the handshake.
    let gw = TestGateway::start(&config_with_ai(&backend.url(), &format!("ca_file = \"{ca_file}\"\n"))).await;
    let key = gw.account_with_key("nocert", "big").await;
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!(res.status, 502, "{}", res.text());
    assert_eq!(gw.remaining(&key).await, 10_000, "refunded");
    // With one signed by the CA the backend trusts, it is served.
    let client = ca.client("gateway");
    let lines = format!(
        "ca_file = \"{ca_file}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
        client.cert_file.display(),
        client.key_file.display()
    );
    let gw = TestGateway::start(&config_with_ai(&backend.url(), &lines)).await;
    let key = gw.account_with_key("cert", "big").await;
    let res = gw.post(&key, CHAT, &[("x-ai-tier", "fast")], "{}").await;
    assert_eq!((res.status.as_u16(), res.charged()), (200, 1), "{}", res.text());
    assert_eq!(backend.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_go_to_an_https_receiver_trusted_through_tls_ca_file() {
    let ca = TestCa::new("hooks");
    let receiver = TlsServer::start(&ca.server("receiver"), None).await;
    let var = format!("CG_TLS_HOOK_{}", std::process::id());
    // SAFETY: a variable of this test's own, set before the gateway starts.
    unsafe { std::env::set_var(&var, "hook-secret") };
    let up = support::upstream::Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url())
        .notification(&format!("webhook_url = \"{}/hooks\"", receiver.url()))
        .notification(&format!("webhook_secret_env = \"{var}\""))
        .extra(&format!("[tls]\nca_file = \"{}\"", ca.cert_file().display()))
        .build();
    let gw = TestGateway::start(&config).await;
    gw.create_account("hooked", "fifty").await;
    assert_eq!(gw.topup("hooked", 10, "pay-tls").await.status, 201);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !receiver.requests().iter().any(|(_, path)| path == "/hooks") {
        assert!(std::time::Instant::now() < deadline, "no delivery over TLS within 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn bad_tls_files_refuse_the_config_naming_the_upstream() {
    let text = config_with_ai("https://localhost:1", "ca_file = \"/nonexistent/ca.pem\"\n");
    let config = creditgate::config::Config::parse(&text).expect("the file itself is valid");
    let err = creditgate::state::Runtime::with_env(config, |_| Some("x".into())).err().expect("refused");
    assert_eq!(err.key, "upstreams.ai");
    assert!(err.reason.contains("/nonexistent/ca.pem"), "{err}");
    let text = ConfigBuilder::new("http://127.0.0.1:9")
        .server("tls = { cert_file = \"/nonexistent/cert.pem\", key_file = \"/nonexistent/key.pem\" }")
        .build();
    let config = creditgate::config::Config::parse(&text).expect("the file itself is valid");
    let err = creditgate::state::Runtime::with_env(config, |_| Some("x".into())).err().expect("refused");
    assert_eq!(err.key, "server.tls.cert_file", "{err}");
}

/// A client of the gateway's TLS listener that trusts exactly `ca` (and the webpki roots).
fn client_trusting(ca: &TestCa) -> creditgate::proxy::Client {
    let settings = creditgate::proxy::tls::TlsSettings {
        ca_files: vec![ca.cert_file().display().to_string()],
        client_cert: None,
        http2: false,
    };
    creditgate::proxy::client(Duration::from_secs(2), &settings, "test").unwrap()
}

/// `GET url` with `client`: the status, or the error in words.
async fn get(client: &creditgate::proxy::Client, url: &str) -> Result<u16, String> {
    let req = http::Request::get(url).body(axum::body::Body::empty()).unwrap();
    match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
        Ok(Ok(res)) => Ok(res.status().as_u16()),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Err(_) => Err("timed out".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_public_listener_terminates_tls_and_takes_a_renewed_certificate_on_sighup() {
    let (first, second) = (TestCa::new("listener-1"), TestCa::new("listener-2"));
    let live = first.dir().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let install = |cert: &support::tls::Issued| {
        std::fs::copy(&cert.cert_file, live.join("cert.pem")).unwrap();
        std::fs::copy(&cert.key_file, live.join("key.pem")).unwrap();
    };
    install(&first.server("gateway"));
    let up = support::upstream::Upstream::echo().await;
    let tls_line = format!(
        "tls = {{ cert_file = \"{}\", key_file = \"{}\" }}",
        live.join("cert.pem").display(),
        live.join("key.pem").display()
    );
    let gw = GatewayProcess::start(&ConfigBuilder::new(&up.url()).server(&tls_line).build()).await;
    let https = gw.public.replace("http://", "https://") + "/dashboard";
    assert_eq!(get(&client_trusting(&first), &https).await, Ok(200), "served over TLS");
    assert!(get(&client_trusting(&second), &https).await.is_err(), "a certificate the client does not trust");
    let plain = get(&client_trusting(&first), &format!("{}/dashboard", gw.public)).await;
    assert!(plain.is_err(), "no plain HTTP on a TLS listener: {plain:?}");

    // The certificate is renewed on disk; SIGHUP makes new connections use it.
    install(&second.server("gateway"));
    gw.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while get(&client_trusting(&second), &https).await != Ok(200) {
        assert!(std::time::Instant::now() < deadline, "the renewed certificate was not taken within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(get(&client_trusting(&first), &https).await.is_err(), "the old certificate is gone");
}

/// A TLS front for a plain server at `target`: accepts TLS with `cert` and pipes the bytes on.
async fn tls_front(cert: &support::tls::Issued, target: std::net::SocketAddr) -> u16 {
    let tls = creditgate::config::ListenerTls {
        cert_file: cert.cert_file.display().to_string(),
        key_file: cert.key_file.display().to_string(),
    };
    let acceptor = creditgate::proxy::tls::acceptor(&tls, "test").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let (Ok(mut tls), Ok(mut plain)) =
                    (acceptor.accept(tcp).await, tokio::net::TcpStream::connect(target).await)
                else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mail_goes_to_a_relay_over_implicit_tls() {
    let ca = TestCa::new("smtp");
    let smtp = support::receivers::SmtpReceiver::start().await;
    let port = tls_front(&ca.server("relay"), smtp.addr).await;
    let up = support::upstream::Upstream::echo().await;
    let config = ConfigBuilder::new(&up.url())
        .notification(&format!(
            "smtp = {{ host = \"127.0.0.1\", port = {port}, from = \"creditgate <billing@example.test>\", tls = \"implicit\" }}"
        ))
        .extra(&format!("[tls]\nca_file = \"{}\"", ca.cert_file().display()))
        .build();
    let gw = TestGateway::start(&config).await;
    let body = serde_json::json!({"id": "mailed", "plan": "fifty", "email": "owner@example.test"});
    assert_eq!(gw.admin_call("POST", "/admin/v1/accounts", Some(body)).await.status, 201);
    assert_eq!(gw.topup("mailed", 10, "pay-smtp").await.status, 201);
    let mails = smtp
        .wait_until(Duration::from_secs(15), "a mail over TLS", |m| {
            m.iter().any(|m| m.to.iter().any(|t| t.contains("owner@")))
        })
        .await;
    assert!(
        mails.iter().any(|m| m.data.contains("top-up") || m.data.contains("Top-up")),
        "{:?}",
        mails.last().map(|m| &m.data)
    );
}
