//! The usage dashboard (`GET /dashboard`): one self-contained HTML file (inline CSS and JS)
//! embedded in the binary, served with headers that keep it from being framed, sniffed or
//! extended by injected markup.
//!
//! The Content-Security-Policy allows exactly the page's own inline `<script>` and `<style>`
//! by their SHA-256 — computed here from the embedded file, once, so editing the page can never
//! leave a stale hash behind — and fetches to its own origin; nothing else (no other script, no
//! inline `style=` attribute, no form target, no framing).

use std::sync::LazyLock;

use axum::response::{Html, IntoResponse, Response};
use base64::prelude::{BASE64_STANDARD, Engine};
use http::{HeaderName, HeaderValue, header};
use sha2::{Digest, Sha256};

/// The page.
const PAGE: &str = include_str!("index.html");

/// `GET /dashboard`.
pub async fn page() -> Response {
    let mut res = Html(PAGE).into_response();
    let headers = res.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, CSP.clone());
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // frame-ancestors covers current browsers; X-Frame-Options the ones before CSP level 2.
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin"));
    res
}

/// The page's Content-Security-Policy.
static CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    let policy = csp(PAGE);
    HeaderValue::from_str(&policy).expect("a CSP is header-safe")
});

/// The policy for `page`: its inline script and style by hash, fetches to the same origin.
fn csp(page: &str) -> String {
    format!(
        "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; img-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash_of(inline(page, "script")),
        hash_of(inline(page, "style")),
    )
}

/// The text of the one inline `<tag>…</tag>` element, exactly as the browser hashes it.
fn inline<'a>(page: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let start = page.find(&open).unwrap_or_else(|| panic!("the dashboard has no <{tag}>")) + open.len();
    let len = page[start..].find(&format!("</{tag}>")).unwrap_or_else(|| panic!("<{tag}> not closed"));
    assert!(!page[start + len..].contains(&open), "the dashboard must have one <{tag}>: the CSP allows one hash");
    &page[start..start + len]
}

/// A CSP hash source: `sha256-<base64 of SHA-256(text)>`.
fn hash_of(text: &str) -> String {
    format!("sha256-{}", BASE64_STANDARD.encode(Sha256::digest(text.as_bytes())))
}

#[cfg(test)]
mod tests {
    #[test]
    fn hash_source_matches_the_csp_spec_example() {
        // CSP Level 3 §8.3 example: the hash of `alert('Hello, world.');`.
        assert_eq!(super::hash_of("alert('Hello, world.');"), "sha256-qznLcsROx4GACP2dm0UCKCzCG+HiZ1guq6ZZDob/Tng=");
    }

    #[test]
    fn the_policy_names_the_inline_script_and_style_and_nothing_else() {
        let page = "<style>a{}</style><p>x</p><script>go()</script>";
        let csp = super::csp(page);
        assert!(csp.contains(&format!("script-src '{}';", super::hash_of("go()"))), "{csp}");
        assert!(csp.contains(&format!("style-src '{}';", super::hash_of("a{}"))), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        super::csp(super::PAGE);
    }
}
