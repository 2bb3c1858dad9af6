//! TLS to upstreams and to every other HTTPS destination (webhooks, usage export, Stripe): rustls
//! with the webpki roots, plus the CA of `tls.ca_file` when set; per upstream a private CA
//! (`ca_file`), a client certificate for mTLS (`client_cert_file` + `client_key_file`) and
//! HTTP/2 when the backend's ALPN offers it (`http2 = false` keeps HTTP/1.1). The server name
//! (SNI) and the name checked in its certificate are the URL's host.

use std::sync::Arc;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ConfigError;

/// What a connector trusts and presents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// Extra CA certificates (PEM files) trusted besides the webpki roots.
    pub ca_files: Vec<String>,
    /// Client certificate chain and key (PEM files), for mTLS.
    pub client_cert: Option<(String, String)>,
    /// Offer HTTP/2 in ALPN.
    pub http2: bool,
}

fn bad(key: &str, reason: String) -> ConfigError {
    ConfigError { key: key.into(), reason }
}

impl TlsSettings {
    /// The rustls client config; `key` names the config key a bad file is reported under.
    pub fn client_config(&self, key: &str) -> Result<rustls::ClientConfig, ConfigError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for file in &self.ca_files {
            let mut found = 0;
            for cert in CertificateDer::pem_file_iter(file).map_err(|e| bad(key, format!("cannot read {file}: {e}")))? {
                let cert = cert.map_err(|e| bad(key, format!("{file}: not a PEM certificate ({e})")))?;
                roots.add(cert).map_err(|e| bad(key, format!("{file}: not a usable CA certificate ({e})")))?;
                found += 1;
            }
            if found == 0 {
                return Err(bad(key, format!("{file} holds no PEM certificate")));
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(key, e.to_string()))?
            .with_root_certificates(roots);
        // ALPN (h2, http/1.1) is set by the connector builder from `http2`.
        let config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert_file, key_file)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
                    .map_err(|e| bad(key, format!("cannot read {cert_file}: {e}")))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| bad(key, format!("{cert_file}: not a PEM certificate ({e})")))?;
                let private = PrivateKeyDer::from_pem_file(key_file)
                    .map_err(|e| bad(key, format!("{key_file}: no PEM private key ({e})")))?;
                builder
                    .with_client_auth_cert(chain, private)
                    .map_err(|e| bad(key, format!("{cert_file} / {key_file}: {e}")))?
            }
        };
        Ok(config)
    }

    /// A connector for `http://` and `https://` URLs.
    pub fn connector(&self, http: HttpConnector, key: &str) -> Result<HttpsConnector<HttpConnector>, ConfigError> {
        let builder =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(self.client_config(key)?).https_or_http();
        Ok(if self.http2 {
            builder.enable_all_versions().wrap_connector(http)
        } else {
            builder.enable_http1().wrap_connector(http)
        })
    }
}

/// The acceptor of `server.tls`: the certificate chain and key read now (a bad file refuses the
/// config, naming the key), HTTP/1.1 by ALPN.
pub fn acceptor(tls: &crate::config::ListenerTls, key: &str) -> Result<tokio_rustls::TlsAcceptor, ConfigError> {
    let (cert_key, key_key) = (format!("{key}.cert_file"), format!("{key}.key_file"));
    let bad = |k: &str, reason: String| bad(if k.ends_with("cert_file") { &cert_key } else { &key_key }, reason);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert_file)
        .map_err(|e| bad("cert_file", format!("cannot read {}: {e}", tls.cert_file)))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad("cert_file", format!("{}: not a PEM certificate ({e})", tls.cert_file)))?;
    if chain.is_empty() {
        return Err(bad("cert_file", format!("{} holds no PEM certificate", tls.cert_file)));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| bad("key_file", format!("{}: no PEM private key ({e})", tls.key_file)))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("cert_file", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| bad("key_file", format!("does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
