//! The running configuration as an operator sees it: `GET /admin/v1/config` (the config as JSON
//! with every secret redacted, its hash and load time, and the upstream backends), and the
//! differences `creditgate check --config FILE --against URL` prints between a file and what a
//! gateway runs.
//!
//! What counts as secret: the config never holds the admin token, webhook, export or Stripe
//! secrets themselves, only the *names* of the variables (`*_env`), which are shown. Redacted are
//! literal upstream header values (an `env:NAME` value shows the name; the value it resolves to is
//! never in the config), the password (or the whole user part) of any URL such as
//! `redis://:pass@host`, every URL's query and fragment (webhook tokens live there), and any
//! string under a key that names a password, secret, token or API key, so that a field added
//! later is hidden by default.

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::state::Runtime;

/// What replaces a secret.
pub const REDACTED: &str = "[redacted]";

/// The config as JSON, keys in sorted order (`serde_json` maps are ordered), unredacted.
fn canonical(config: &Config) -> Value {
    serde_json::to_value(config).expect("the config tree serializes")
}

/// `sha256:<hex>` of the canonical JSON of the whole config (secrets included, so that changing
/// a literal header value changes the hash too; a hash does not reveal them).
pub fn config_hash(config: &Config) -> String {
    let bytes = serde_json::to_vec(&canonical(config)).expect("JSON values serialize");
    format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
}

/// The config as JSON with every secret replaced by [`REDACTED`].
pub fn redacted(config: &Config) -> Value {
    let mut v = canonical(config);
    redact(&mut v, Place::Other);
    v
}

/// What `GET /admin/v1/config` answers for the config generation in force.
pub fn view(rt: &Runtime, file: Option<&std::path::Path>) -> Value {
    let mut upstreams = Map::new();
    for name in rt.config.upstreams.keys() {
        let Some(up) = rt.upstreams.get(name) else { continue };
        let backends: Vec<Value> = up
            .pool
            .backends()
            .iter()
            .map(|b| json!({"url": &*b.label, "health": b.health().as_str(), "in_flight": b.in_flight()}))
            .collect();
        upstreams.insert(name.clone(), json!({ "backends": backends }));
    }
    json!({
        "hash": rt.config_hash,
        "loaded_at": rt.loaded_at,
        "file": file.map(|p| p.display().to_string()),
        "upstreams": upstreams,
        "config": redacted(&rt.config),
    })
}

/// Where a value sits, as far as redaction cares.
#[derive(Clone, Copy, PartialEq)]
enum Place {
    /// A value in `upstreams.NAME.headers`.
    Header,
    /// Under a key that names a secret.
    SecretKey,
    /// Anywhere else.
    Other,
}

fn redact(v: &mut Value, place: Place) {
    match v {
        Value::String(s) => {
            let hidden = match place {
                Place::Header => !s.starts_with("env:"),
                Place::SecretKey => true,
                Place::Other => false,
            };
            if hidden {
                *s = REDACTED.to_owned();
            } else if let Some(r) = redact_url(s) {
                *s = r;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| redact(i, place)),
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                let inner = match (place, key.as_str()) {
                    (Place::Header, _) => Place::Header,
                    (_, "headers") => Place::Header,
                    (_, k) if names_a_secret(k) => Place::SecretKey,
                    _ => place,
                };
                redact(item, inner);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// A key whose string value is a secret itself (`*_env` and `*_file` name where one is kept).
fn names_a_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    !k.ends_with("_env")
        && !k.ends_with("_file")
        && ["password", "passwd", "secret", "token", "api_key", "apikey", "credential"].iter().any(|s| k.contains(s))
}

/// A URL with its password (or whole user part when it has no `user:` form), query values and
/// fragment replaced; `None` when `s` is not a `scheme://` URL.
pub fn redact_url(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    if scheme.is_empty() || !scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)) {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{REDACTED}@{host}"),
            None => format!("{REDACTED}@{host}"),
        },
        None => authority.to_owned(),
    };
    let (tail, fragment) = tail.split_once('#').map_or((tail, None), |(t, _)| (t, Some(REDACTED)));
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|kv| kv.split_once('=').map_or_else(|| REDACTED.to_owned(), |(k, _)| format!("{k}={REDACTED}")))
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_owned(),
    };
    Some(format!("{scheme}://{authority}{tail}{}", fragment.map(|f| format!("#{f}")).unwrap_or_default()))
}

// === the differences a reload would make ===

/// One difference between the running config and a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `+` added by the file, `-` removed by it, `~` changed.
    pub sign: char,
    /// `route`, `price`, `operation`, `plan`, `package`, `upstream` or `setting`.
    pub what: &'static str,
    /// What changes, e.g. `ai_chat tiers.fast: 1 → 2`.
    pub text: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:<9} {}", self.sign, self.what, self.text)
    }
}

/// The fields of an operation that decide what a request costs.
const PRICE_FIELDS: [&str; 12] = [
    "cost",
    "tiers",
    "default_tier",
    "per_item",
    "base",
    "per_step",
    "per_variant",
    "per_channel",
    "min",
    "max",
    "automatic_free",
    "automatic_free_max_per_period",
];

/// Sections compared entry by entry; every other top-level key is compared setting by setting.
const NAMED: [(&str, &str); 4] =
    [("operations", "operation"), ("plans", "plan"), ("topup_packages", "package"), ("upstreams", "upstream")];

/// What reloading `file` would change in `running` (both as [`redacted`] gives them): routes,
/// then prices and operations, plans, packages, upstreams, then any other setting.
pub fn diff(running: &Value, file: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    route_changes(running.get("routes"), file.get("routes"), &mut out);
    for (section, what) in NAMED {
        let (a, b) = (object(running.get(section)), object(file.get(section)));
        for name in union(&a, &b) {
            match (a.get(name), b.get(name)) {
                (None, Some(new)) => out.push(Change { sign: '+', what, text: format!("{name} {new}") }),
                (Some(_), None) => out.push(Change { sign: '-', what, text: name.to_owned() }),
                (Some(old), Some(new)) => {
                    let mut leaves = Vec::new();
                    leaf_changes(String::new(), Some(old), Some(new), &mut leaves);
                    for (path, old, new) in leaves {
                        let field = path.split('.').next().unwrap_or_default();
                        let what =
                            if section == "operations" && PRICE_FIELDS.contains(&field) { "price" } else { what };
                        out.push(Change { sign: '~', what, text: format!("{name} {path}: {old} → {new}") });
                    }
                }
                (None, None) => {}
            }
        }
    }
    let (a, b) = (object(Some(running)), object(Some(file)));
    for key in union(&a, &b) {
        if key == "routes" || NAMED.iter().any(|(s, _)| *s == key) {
            continue;
        }
        let mut leaves = Vec::new();
        leaf_changes(key.to_owned(), a.get(key), b.get(key), &mut leaves);
        for (path, old, new) in leaves {
            let restart = path.starts_with("store.") || path == "server.listen" || path == "server.admin_listen";
            let note = if restart { " (applies only after a restart)" } else { "" };
            out.push(Change { sign: '~', what: "setting", text: format!("{path}: {old} → {new}{note}") });
        }
    }
    out
}

fn object(v: Option<&Value>) -> Map<String, Value> {
    v.and_then(Value::as_object).cloned().unwrap_or_default()
}

/// The keys of both maps, sorted, once each.
fn union<'a>(a: &'a Map<String, Value>, b: &'a Map<String, Value>) -> Vec<&'a str> {
    let mut keys: Vec<&str> = a.keys().chain(b.keys()).map(String::as_str).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Every leaf (a non-object value) that differs under `path`, as `(path, old, new)` texts.
fn leaf_changes(path: String, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<(String, String, String)>) {
    if let (Some(Value::Object(x)), Some(Value::Object(y))) = (a, b) {
        for key in union(x, y) {
            let sub = if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
            leaf_changes(sub, x.get(key), y.get(key), out);
        }
    } else if a != b {
        let text = |v: Option<&Value>| v.map_or_else(|| "(unset)".to_owned(), Value::to_string);
        out.push((path, text(a), text(b)));
    }
}

/// A route's match (`POST /v1/chat/completions`, `* /v1/*`) and target (`ai (ai_chat)`, `app (free)`).
fn route_parts(r: &Value) -> (String, String) {
    let method = r["method"].as_str().unwrap_or("*");
    let path = match (r["path"].as_str(), r["path_prefix"].as_str()) {
        (Some(p), _) => p.to_owned(),
        (None, Some(prefix)) => format!("{prefix}*"),
        (None, None) => "?".to_owned(),
    };
    let target = format!("{} ({})", r["upstream"].as_str().unwrap_or("?"), r["operation"].as_str().unwrap_or("free"));
    (format!("{method} {path}"), target)
}

fn route_changes(running: Option<&Value>, file: Option<&Value>, out: &mut Vec<Change>) {
    let list = |v: Option<&Value>| -> Vec<(String, String)> {
        v.and_then(Value::as_array).map(|a| a.iter().map(route_parts).collect()).unwrap_or_default()
    };
    let (old, new) = (list(running), list(file));
    let find = |l: &[(String, String)], m: &str| l.iter().find(|(k, _)| k == m).map(|(_, t)| t.clone());
    for (matcher, target) in &new {
        match find(&old, matcher) {
            None => out.push(Change { sign: '+', what: "route", text: format!("{matcher} → {target}") }),
            Some(was) if &was != target => {
                out.push(Change { sign: '~', what: "route", text: format!("{matcher}: {was} → {target}") })
            }
            Some(_) => {}
        }
    }
    for (matcher, target) in &old {
        if find(&new, matcher).is_none() {
            out.push(Change { sign: '-', what: "route", text: format!("{matcher} → {target}") });
        }
    }
    // First match wins: the same routes in another order route differently.
    let kept = |l: &[(String, String)], other: &[(String, String)]| -> Vec<String> {
        l.iter().filter(|(m, _)| find(other, m).is_some()).map(|(m, _)| m.clone()).collect()
    };
    if kept(&old, &new) != kept(&new, &old) {
        out.push(Change { sign: '~', what: "route", text: "order changed (the first matching route wins)".into() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_passwords_queries_and_fragments() {
        assert_eq!(redact_url("redis://:hunter2@10.0.0.1:6379/0").unwrap(), "redis://:[redacted]@10.0.0.1:6379/0");
        assert_eq!(redact_url("redis://default:pw@h").unwrap(), "redis://default:[redacted]@h");
        assert_eq!(redact_url("https://tok@h/x").unwrap(), "https://[redacted]@h/x");
        assert_eq!(
            redact_url("https://h/hook?token=abc&v=1#f").unwrap(),
            "https://h/hook?token=[redacted]&v=[redacted]#[redacted]"
        );
        assert_eq!(redact_url("http://127.0.0.1:8000").unwrap(), "http://127.0.0.1:8000");
        assert_eq!(redact_url("env:X"), None);
    }

    #[test]
    fn headers_and_secret_keys_are_redacted_names_are_not() {
        let mut v = json!({
            "upstreams": {"ai": {"headers": {"authorization": "Bearer sk-1", "x-key": "env:AI_KEY"}, "urls": ["http://u:p@h"]}},
            "server": {"admin_token_env": "TOKEN_VAR"},
            "smtp": {"password": "pw", "password_env": "PW_VAR"},
        });
        redact(&mut v, Place::Other);
        assert_eq!(v["upstreams"]["ai"]["headers"]["authorization"], REDACTED);
        assert_eq!(v["upstreams"]["ai"]["headers"]["x-key"], "env:AI_KEY");
        assert_eq!(v["upstreams"]["ai"]["urls"][0], "http://u:[redacted]@h");
        assert_eq!(v["server"]["admin_token_env"], "TOKEN_VAR");
        assert_eq!(v["smtp"]["password"], REDACTED);
        assert_eq!(v["smtp"]["password_env"], "PW_VAR");
    }

    #[test]
    fn diff_names_each_change() {
        let old = json!({
            "routes": [{"method": "POST", "path": "/a", "upstream": "ai", "operation": "x"}, {"path_prefix": "/", "upstream": "app"}],
            "operations": {"x": {"tiers": {"fast": 1}, "category": "C"}},
            "plans": {"pro": {"monthly_credits": 2000}},
            "server": {"upstream_timeout_ms": 1},
        });
        let new = json!({
            "routes": [{"path_prefix": "/", "upstream": "app"}, {"method": "POST", "path": "/b", "upstream": "ai", "operation": "x"}],
            "operations": {"x": {"tiers": {"fast": 2}, "category": "D"}},
            "plans": {"pro": {"monthly_credits": 2000}, "gold": {"monthly_credits": 1}},
            "server": {"upstream_timeout_ms": 2},
        });
        let lines: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "+ route     POST /b → ai (x)",
                "- route     POST /a → ai (x)",
                "~ operation x category: \"C\" → \"D\"",
                "~ price     x tiers.fast: 1 → 2",
                "+ plan      gold {\"monthly_credits\":1}",
                "~ setting   server.upstream_timeout_ms: 1 → 2",
            ]
        );
        assert!(diff(&old, &old).is_empty());
    }
}
