//! Header rules for forwarding (RFC 9110 §7.6.1): hop-by-hop fields stop at the gateway, the
//! client's credentials never reach an upstream, and the upstream learns who asked.
//!
//! Order matters (SPEC §4): the fields a client names in `Connection` are removed when the
//! request arrives, before anything reads it (`stack::handle`), so the gateway prices with the
//! headers the upstream will see; the pricing headers are then bound to the price
//! (`classify::bind_headers`), and [`prepare_request`] sets the gateway's own headers after its
//! last stripping. Method-override headers never reach an upstream.
//!
//! Who the client is ([`client_ip`]) is decided once, from the TCP peer: only a peer inside
//! `server.trusted_proxies` may name the client in `X-Forwarded-For` (the right-most entry that
//! is not itself a trusted proxy). From any other peer the client's `X-Forwarded-For`,
//! `Forwarded` and `X-Real-IP` are dropped on arrival ([`sanitize_forwarding`]), so the upstream
//! sees `x-forwarded-for: <peer>` and nothing the client wrote about itself.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::Forwarded;

/// Request id header, kept from the client or generated, and passed on.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The authenticated account, for the upstream.
pub const ACCOUNT: HeaderName = HeaderName::from_static("x-creditgate-account");
const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

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

/// What a client says about where it is: the gateway forwards none of it from a peer it does not
/// trust.
const CLIENT_SAID: [HeaderName; 3] = [header::FORWARDED, REAL_IP, FORWARDED_FOR];

/// Fields that no upstream gets from a client: the account (only the gateway sets it), and the
/// method overrides — headers some frameworks take as the real method: a `POST` priced as a chat
/// could be served as anything else, or a `GET` on a free route served as a priced `POST`.
static GATEWAY_SET: [HeaderName; 4] = [
    ACCOUNT,
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Whether `headers` has a field named in `names`. One pass over the few fields a request has,
/// comparing names, is cheaper than one hashed lookup per name — and on nearly every request
/// none of them is there, so the removals below are skipped.
fn has_any(headers: &HeaderMap, names: &[HeaderName]) -> bool {
    headers.keys().any(|k| names.contains(k))
}

/// Removes every field named in `names`.
fn remove_all(headers: &mut HeaderMap, names: &[HeaderName]) {
    if has_any(headers, names) {
        for n in names {
            headers.remove(n);
        }
    }
}

/// Which of [`HOP_BY_HOP`] `name` is. A `match` on the name's text: the strips run on every
/// request and answer, and comparing with the `const` array builds (and drops) the array at each
/// use and compares whole names one by one.
fn hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    })
}

/// Removes hop-by-hop fields, including any that a `Connection` line names (any case).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Which of the fixed ones are there, in one pass (most answers carry only `Connection`).
    let present = headers.keys().fold(0u16, |set, k| set | hop_index(k).map_or(0, |i| 1 << i));
    if present == 0 {
        return;
    }
    // Fields named by Connection are hop-by-hop too. Only those present matter, found by
    // comparing with the names there: nothing is parsed, and nothing allocated for the usual
    // `keep-alive` or `close` (a fixed name is removed below anyway).
    if present & 1 != 0 {
        let mut named: Vec<HeaderName> = Vec::new();
        for token in headers.get_all(header::CONNECTION).iter().flat_map(|v| v.to_str().unwrap_or_default().split(','))
        {
            let token = token.trim();
            // The usual token names a fixed field, which is removed below anyway.
            if token.eq_ignore_ascii_case("keep-alive") {
                continue;
            }
            let listed = |k: &&HeaderName| k.as_str().eq_ignore_ascii_case(token) && hop_index(k).is_none();
            named.extend(headers.keys().filter(listed).cloned());
        }
        for n in named {
            headers.remove(n);
        }
    }
    for (i, h) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(h);
        }
    }
}

// === client address ===

/// An address block (`10.0.0.0/8`, `2001:db8::/32`; a bare address is a single host), as
/// `server.trusted_proxies` lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` lies in the block (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => mask(u32::from(ip).into(), 32, self.prefix) == u32::from(net).into(),
            (IpAddr::V6(net), IpAddr::V6(ip)) => mask(ip.into(), 128, self.prefix) == u128::from(net),
            _ => false,
        }
    }
}

/// The top `prefix` bits of a `width`-bit address.
fn mask(bits: u128, width: u8, prefix: u8) -> u128 {
    let host_bits = u32::from(width - prefix);
    bits.checked_shr(host_bits).and_then(|b| b.checked_shl(host_bits)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let network: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address block like 10.0.0.0/8 or 2001:db8::/32"))?;
        let width = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= width)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {width}"))?,
        };
        let bits = match network {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        };
        if mask(bits, width, prefix) != bits {
            return Err(format!("{s:?} has bits set past its /{prefix}; write the network address"));
        }
        Ok(Cidr { network, prefix })
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        format!("{}/{}", c.network, c.prefix)
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

fn is_trusted(ip: IpAddr, trusted: &[Cidr]) -> bool {
    trusted.iter().any(|c| c.contains(ip))
}

/// The client's address: the TCP `peer`, or — only when the peer is a trusted proxy — the
/// right-most `X-Forwarded-For` entry that is not a trusted proxy itself (entries left of it
/// were written by whoever the client is, and prove nothing). An unreadable entry stops the walk
/// at the last trusted hop. `None` (a request that came through no socket) reads as `0.0.0.0`.
pub fn client_ip(peer: Option<SocketAddr>, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let Some(peer) = peer.map(|p| p.ip().to_canonical()) else { return IpAddr::from([0, 0, 0, 0]) };
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let hops = headers.get_all(&FORWARDED_FOR).iter().rev().flat_map(|v| {
        let entries: Vec<&str> = v.to_str().unwrap_or("?").split(',').collect();
        entries.into_iter().rev()
    });
    let mut client = peer;
    for hop in hops {
        let Some(ip) = parse_hop(hop.trim()) else { break };
        client = ip;
        if !is_trusted(ip, trusted) {
            break;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, maybe with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let ip = hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))?;
    Some(ip.to_canonical())
}

/// Drops the forwarding headers the gateway does not vouch for, before anything reads or stores
/// the request: `Forwarded` and `X-Real-IP` always, and `X-Forwarded-For` unless `peer` is a
/// trusted proxy (whose trail [`prepare_request`] then extends with the peer).
pub fn sanitize_forwarding(headers: &mut HeaderMap, peer: Option<SocketAddr>, trusted: &[Cidr]) {
    if !has_any(headers, &CLIENT_SAID) {
        return;
    }
    headers.remove(header::FORWARDED);
    headers.remove(REAL_IP);
    if !peer.is_some_and(|p| is_trusted(p.ip(), trusted)) {
        headers.remove(FORWARDED_FOR);
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
    remove_all(headers, &GATEWAY_SET);
    if let Some(host) = headers.remove(header::HOST) {
        headers.insert(FORWARDED_HOST, host);
    }
    for (k, v) in upstream_headers {
        headers.insert(k.clone(), v.clone());
    }
    if let Ok(v) = HeaderValue::from_str(fwd.request_id) {
        headers.insert(REQUEST_ID, v);
    }
    if let Some(account) = fwd.account.and_then(account_value) {
        headers.insert(ACCOUNT, account);
    }
    if let Some(addr) = fwd.client_addr {
        let ip = addr.ip().to_canonical();
        let value = if headers.contains_key(&FORWARDED_FOR) {
            // Whatever trail is left came from a trusted proxy (`sanitize_forwarding`): extend
            // it, joining every line of it into one.
            let mut trail: Vec<&str> = headers.get_all(&FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect();
            let ip = ip.to_string();
            trail.push(&ip);
            HeaderValue::from_str(&trail.join(", ")).ok()
        } else {
            Some(address_value(ip))
        };
        if let Some(v) = value {
            headers.insert(FORWARDED_FOR, v);
        }
    }
}

/// `ip` as a header value. The last one is kept per thread: the requests of a keep-alive
/// connection (and of a busy client) come from one address, and a clone of the kept value costs
/// a reference count instead of formatting and an allocation.
fn address_value(ip: IpAddr) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((kept, value)) if *kept == ip => value.clone(),
        _ => {
            let value = HeaderValue::from_str(&ip.to_string()).expect("an address is a valid header value");
            *last = Some((ip, value.clone()));
            value
        }
    })
}

/// `account` as a header value (`None` if it cannot be one), kept per thread for the last
/// account like [`address_value`]: a keep-alive connection's requests come from one key.
fn account_value(account: &str) -> Option<HeaderValue> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Box<str>, HeaderValue)>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((kept, value)) if **kept == *account => Some(value.clone()),
        _ => {
            let value = HeaderValue::from_str(account).ok()?;
            *last = Some((account.into(), value.clone()));
            Some(value)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_index_names_the_fixed_fields_in_order() {
        for (i, h) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_index(h), Some(i), "{h}");
        }
        for other in [header::CONTENT_TYPE, header::HOST, FORWARDED_FOR, HeaderName::from_static("x-te")] {
            assert_eq!(hop_index(&other), None, "{other}");
        }
    }

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
        for m in &GATEWAY_SET[1..] {
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

    #[test]
    fn the_account_header_follows_the_account() {
        for account in ["acme", "acme", "globex", "bad\naccount", "acme", "globex"] {
            let mut h = HeaderMap::new();
            prepare_request(&mut h, &[], Forwarded { request_id: "r", account: Some(account), client_addr: None });
            match HeaderValue::from_str(account) {
                Ok(v) => assert_eq!(h[ACCOUNT], v),
                Err(_) => assert!(!h.contains_key(ACCOUNT), "{account:?}"),
            }
        }
    }

    #[test]
    fn the_forwarded_address_follows_the_peer() {
        for peer in ["127.0.0.1:9", "127.0.0.1:10", "[::ffff:10.0.0.7]:1", "[2001:db8::5]:1", "127.0.0.1:9"] {
            let mut h = HeaderMap::new();
            prepare_request(&mut h, &[], Forwarded { request_id: "r", account: None, client_addr: peer.parse().ok() });
            let ip = peer.parse::<SocketAddr>().unwrap().ip().to_canonical().to_string();
            assert_eq!(h[FORWARDED_FOR], ip.as_str());
        }
    }

    #[test]
    fn address_blocks_parse_and_match() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()), "IPv4-mapped counts as IPv4");
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let host: Cidr = "127.0.0.2".parse().unwrap();
        assert!(host.contains("127.0.0.2".parse().unwrap()) && !host.contains("127.0.0.1".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()) && !v6.contains("2001:db9::".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        for bad in ["10.1.0.1/16", "10.0.0.0/33", "example.com", "10.0.0.0/", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad} accepted");
        }
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(FORWARDED_FOR, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_client_is_the_right_most_untrusted_hop_behind_a_trusted_peer() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let lb: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let outsider: SocketAddr = "198.51.100.7:4000".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let chain = xff(&["1.1.1.1, 203.0.113.9", "10.0.0.9"]);
        assert_eq!(client_ip(Some(lb), &chain, &trusted), ip("203.0.113.9"), "spoofed 1.1.1.1 ignored");
        assert_eq!(client_ip(Some(outsider), &chain, &trusted), ip("198.51.100.7"), "untrusted peer: XFF ignored");
        assert_eq!(client_ip(Some(lb), &HeaderMap::new(), &trusted), ip("10.0.0.5"));
        assert_eq!(client_ip(Some(lb), &xff(&["garbage, 10.0.0.9"]), &trusted), ip("10.0.0.9"));
        assert_eq!(client_ip(Some(lb), &xff(&["203.0.113.9:5555"]), &trusted), ip("203.0.113.9"));
        assert_eq!(client_ip(Some(lb), &xff(&["[2001:db8::1]:80"]), &trusted), ip("2001:db8::1"));
        assert_eq!(client_ip(Some(lb), &chain, &[]), ip("10.0.0.5"), "no trusted proxies: the peer");
        assert_eq!(client_ip(None, &chain, &trusted), ip("0.0.0.0"));
    }

    #[test]
    fn forwarding_headers_are_replaced_unless_the_peer_is_trusted() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let client_said = || {
            let mut h = xff(&["1.1.1.1"]);
            h.insert(header::FORWARDED, "for=1.1.1.1".parse().unwrap());
            h.insert(REAL_IP, "1.1.1.1".parse().unwrap());
            h
        };
        let fwd = |peer: &str| Forwarded { request_id: "r", account: None, client_addr: Some(peer.parse().unwrap()) };
        let mut h = client_said();
        sanitize_forwarding(&mut h, Some("198.51.100.7:1".parse().unwrap()), &trusted);
        prepare_request(&mut h, &[], fwd("198.51.100.7:1"));
        assert_eq!(h.get_all(FORWARDED_FOR).iter().collect::<Vec<_>>(), ["198.51.100.7"]);
        assert!(!h.contains_key(header::FORWARDED) && !h.contains_key(REAL_IP));

        let mut h = client_said();
        sanitize_forwarding(&mut h, Some("10.0.0.5:1".parse().unwrap()), &trusted);
        prepare_request(&mut h, &[], fwd("10.0.0.5:1"));
        assert_eq!(h[FORWARDED_FOR], "1.1.1.1, 10.0.0.5", "a trusted proxy's trail is extended");
        assert!(!h.contains_key(header::FORWARDED) && !h.contains_key(REAL_IP));
    }
}
