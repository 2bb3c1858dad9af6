//! The usage dashboard (`GET /dashboard`): one self-contained HTML file (inline CSS and JS)
//! embedded in the binary, served with headers that keep it from being framed, sniffed or
//! extended by injected markup.
//!
//! The Content-Security-Policy allows exactly the page's own inline `<script>` and `<style>`
//! by their SHA-256 — computed here from the embedded file, once, so editing the page can never
//! leave a stale hash behind — and fetches to its own origin; nothing else (no other script, no
//! inline `style=` attribute, no form target, no framing). With `[billing.stripe]` the policy
//! also lets in Stripe.js (`js_url`'s origin: the script and the card field's frames) and its
//! calls to Stripe's API (`api_base`'s origin) — the top-up card's Buy flow.

use std::sync::LazyLock;

use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use base64::prelude::{BASE64_STANDARD, Engine};
use http::{HeaderName, HeaderValue, header};
use sha2::{Digest, Sha256};

use crate::state::AppState;

/// The page.
const PAGE: &str = include_str!("index.html");

/// `GET /dashboard`: the usage page (it asks for the API key and calls the customer API).
#[utoipa::path(get, path = "/dashboard", tag = "dashboard",
    responses((status = 200, description = "The page", body = String, content_type = "text/html")))]
pub async fn page(State(state): State<AppState>) -> Response {
    let mut res = Html(PAGE).into_response();
    let headers = res.headers_mut();
    let policy = match &state.runtime.load().stripe {
        None => CSP.clone(),
        Some(stripe) => HeaderValue::from_str(&with_stripe(&CSP_TEXT, stripe.js_origin(), stripe.api_origin()))
            .unwrap_or_else(|_| CSP.clone()),
    };
    headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // frame-ancestors covers current browsers; X-Frame-Options the ones before CSP level 2.
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin"));
    res
}

/// The page's Content-Security-Policy.
static CSP_TEXT: LazyLock<String> = LazyLock::new(|| csp(PAGE));
static CSP: LazyLock<HeaderValue> = LazyLock::new(|| HeaderValue::from_str(&CSP_TEXT).expect("a CSP is header-safe"));

/// `policy` letting in Stripe.js from `js` (script and frames) and its calls to `api`
/// (origins, `scheme://host[:port]`).
fn with_stripe(policy: &str, js: &str, api: &str) -> String {
    policy
        .replacen("script-src ", &format!("script-src {js} "), 1)
        .replacen("connect-src 'self'", &format!("connect-src 'self' {api} {js}"), 1)
        .replacen("default-src 'none';", &format!("default-src 'none'; frame-src {js};"), 1)
}

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
    fn stripe_is_let_in_only_where_it_runs() {
        let p = super::with_stripe(
            &super::csp("<script>go()</script><style>s</style>"),
            "https://js.stripe.com",
            "https://api.stripe.com",
        );
        assert!(
            p.starts_with(
                "default-src 'none'; frame-src https://js.stripe.com; script-src https://js.stripe.com 'sha256-"
            ),
            "{p}"
        );
        assert!(p.contains("connect-src 'self' https://api.stripe.com https://js.stripe.com;"), "{p}");
        assert!(p.contains("form-action 'none'; frame-ancestors 'none'"), "{p}");
    }

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
