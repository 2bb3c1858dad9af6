//! Header rules for forwarding (RFC 9110 §7.6.1): hop-by-hop fields stop at the gateway, the
//! client's credentials never reach an upstream, and the upstream learns who asked.
//!
//! Order matters (SPEC §4): the fields a client names in `Connection` are removed when the
//! request arrives, before anything reads it (`stack::handle`), so the gateway prices with the
//! headers the upstream will see; the pricing headers are then bound to the price
//! (`classify::bind_headers`), and [`prepare_request`] sets the gateway's own headers after its
//! last stripping. Method-override headers never reach an upstream.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::Forwarded;

/// Request id header, kept from the client or generated, and passed on.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The authenticated account, for the upstream.
pub const ACCOUNT: HeaderName = HeaderName::from_static("x-creditgate-account");
const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers some frameworks take as the real method: a `POST` priced as a chat could be served as
/// anything else, or a `GET` on a free route served as a priced `POST`.
const METHOD_OVERRIDE: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// The fixed hop-by-hop fields.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop fields, including any that a `Connection` line names (any case).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Fields named by Connection are hop-by-hop too; collect first (rare, so the Vec is fine).
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or_default().split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
}

/// Drops headers only the gateway may set (`x-credits-*`, `x-idempotent-replay`) from an upstream
/// answer, so a backend can never show a client a balance or a charge.
pub fn strip_gateway_owned(headers: &mut HeaderMap) {
    let owned = |n: &HeaderName| n.as_str().starts_with("x-credits-") || n.as_str() == "x-idempotent-replay";
    if headers.keys().any(owned) {
        let names: Vec<HeaderName> = headers.keys().filter(|n| owned(n)).cloned().collect();
        for n in names {
            headers.remove(n);
        }
    }
}

/// Prepares a client request's headers for an upstream: strips, then sets the gateway's own
/// headers (upstream credentials, request id, account, forwarding trail) last.
pub fn prepare_request(headers: &mut HeaderMap, upstream_headers: &[(HeaderName, HeaderValue)], fwd: Forwarded<'_>) {
    strip_hop_by_hop(headers);
    headers.remove(header::AUTHORIZATION);
    headers.remove(ACCOUNT);
    for h in &METHOD_OVERRIDE {
        headers.remove(h);
    }
    if let Some(host) = headers.remove(header::HOST) {
        headers.insert(FORWARDED_HOST, host);
    }
    for (k, v) in upstream_headers {
        headers.insert(k.clone(), v.clone());
    }
    if let Ok(v) = HeaderValue::from_str(fwd.request_id) {
        headers.insert(REQUEST_ID, v);
    }
    if let Some(account) = fwd.account.and_then(|a| HeaderValue::from_str(a).ok()) {
        headers.insert(ACCOUNT, account);
    }
    if let Some(addr) = fwd.client_addr {
        let ip = addr.ip().to_string();
        let value = match headers.get(&FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prior) => format!("{prior}, {ip}"),
            None => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(FORWARDED_FOR, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_fields_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn every_connection_line_counts_and_names_are_case_insensitive() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, "keep-alive".parse().unwrap());
        h.append(header::CONNECTION, "X-AI-Tier , X-Other".parse().unwrap());
        h.insert("x-ai-tier", "fast".parse().unwrap());
        h.insert("x-other", "1".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn gateway_set_headers_survive_a_connection_that_names_them() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "x-request-id, x-creditgate-account, x-http-method-override".parse().unwrap());
        h.insert(REQUEST_ID, "client".parse().unwrap());
        h.insert("x-http-method-override", "DELETE".parse().unwrap());
        h.insert("x-method-override", "DELETE".parse().unwrap());
        h.insert("x-http-method", "DELETE".parse().unwrap());
        prepare_request(&mut h, &[], Forwarded { request_id: "rid", account: Some("acme"), client_addr: None });
        assert_eq!(
            (&h[REQUEST_ID], &h[ACCOUNT]),
            (&HeaderValue::from_static("rid"), &HeaderValue::from_static("acme"))
        );
        for m in &METHOD_OVERRIDE {
            assert!(!h.contains_key(m), "{m} forwarded");
        }
    }

    #[test]
    fn gateway_owned_headers_are_dropped_from_upstream_answers() {
        let mut h = HeaderMap::new();
        h.insert("x-credits-low", "true".parse().unwrap());
        h.insert("x-credits-remaining", "99".parse().unwrap());
        h.insert("x-idempotent-replay", "true".parse().unwrap());
        h.insert("x-credit-note", "kept".parse().unwrap());
        strip_gateway_owned(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-credit-note"));
    }

    #[test]
    fn client_credentials_are_replaced_and_identity_added() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer cg_client".parse().unwrap());
        h.insert(ACCOUNT, "spoofed".parse().unwrap());
        h.insert(header::HOST, "gateway.example".parse().unwrap());
        let up = [(header::AUTHORIZATION, HeaderValue::from_static("Bearer backend"))];
        let fwd =
            Forwarded { request_id: "rid-1", account: Some("acme"), client_addr: Some(([127, 0, 0, 1], 9).into()) };
        prepare_request(&mut h, &up, fwd);
        assert_eq!(h[header::AUTHORIZATION], "Bearer backend");
        assert_eq!(h[ACCOUNT], "acme");
        assert_eq!(h[REQUEST_ID], "rid-1");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-host"], "gateway.example");
        assert!(!h.contains_key(header::HOST));

        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer cg_client".parse().unwrap());
        prepare_request(&mut h, &[], Forwarded { request_id: "r", account: None, client_addr: None });
        assert!(!h.contains_key(header::AUTHORIZATION), "never passed on, even with no replacement");
    }
}
