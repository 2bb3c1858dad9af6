//! Classification: (route, headers, body) → what the request is and what it costs.
//!
//! Pure rules, no I/O. [`Rules`] is compiled from the config once per (re)load; the request path
//! asks [`Rules::route`] for the first matching route and, for a priced one, [`Operation::price`]
//! for the cost. The body is needed only by rules that read it ([`Operation::needs_body`]): a
//! fixed-cost request streams through unread.
//!
//! One request has one price (SPEC §4): the `x-ai-tier` header and the body's `tier` must agree,
//! a pricing field may be given only once and in one spelling ([`json`]), a body-priced request
//! must not be content-encoded (the gateway would price bytes it cannot read), and the upstream
//! receives exactly the pricing headers that were priced ([`bind_headers`]).

pub mod json;
pub mod path;
pub mod spelling;

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method, header};

use crate::config::{Config, OnEmpty, OperationConfig};
use crate::ledger::Role;
use json::{Field, ProbeError};

/// Header naming a chat tier; must agree with the body's `tier` field when both are given.
pub const TIER_HEADER: &str = "x-ai-tier";
/// Header marking an automatic (system-triggered) refresh.
pub const TRIGGER_HEADER: &str = "x-trigger";
// The same as names, for the request path: a `&str` name is parsed and hashed again at every use.
const TIER: HeaderName = HeaderName::from_static(TIER_HEADER);
const TRIGGER: HeaderName = HeaderName::from_static(TRIGGER_HEADER);

/// A request the classifier refuses; the message is a sentence for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    /// Malformed or unpriceable: bad JSON, unknown tier, missing field, bad path (400 `bad_request`).
    #[error("{0}")]
    Invalid(String),
    /// The `x-ai-tier` header and the body's `tier` (or two headers) disagree (400 `tier_mismatch`).
    #[error("{0}")]
    TierMismatch(String),
    /// A pricing field given twice or in another spelling (400 `ambiguous_body`).
    #[error("{0}")]
    Ambiguous(String),
    /// A body-priced request whose body is content-encoded (415 `unsupported_media_type`).
    #[error("{0}")]
    Encoded(String),
}

impl From<ProbeError> for ClassifyError {
    fn from(e: ProbeError) -> Self {
        match e {
            ProbeError::Invalid(m) => ClassifyError::Invalid(m),
            ProbeError::Ambiguous { name, spelling } if name == spelling => ClassifyError::Ambiguous(format!(
                "The body gives the field \"{name}\" more than once; backends differ on which one they read."
            )),
            ProbeError::Ambiguous { name, spelling } => ClassifyError::Ambiguous(format!(
                "The body has a field \"{spelling}\", which a backend that ignores letter case reads as \"{name}\"; \
                 send \"{name}\" once, spelled exactly so."
            )),
        }
    }
}

/// How a route's path is matched.
#[derive(Debug, Clone)]
enum PathMatch {
    Exact(String),
    Prefix(String),
}

/// One compiled `[[routes]]` entry.
#[derive(Debug, Clone)]
pub struct Route {
    method: Option<Method>,
    path: PathMatch,
    /// Upstream name.
    pub upstream: Arc<str>,
    /// Index into [`Rules::operations`], `None` for a free route.
    pub operation: Option<usize>,
}

/// How an operation is priced.
#[derive(Debug, Clone)]
enum Pricing {
    Fixed(u64),
    Tiers {
        costs: Vec<(String, u64)>,
        default: usize,
        upstreams: Vec<Option<Arc<str>>>,
        /// The model each tier asks the backend for (`None`: the body's `model` is forwarded).
        models: Vec<Option<Arc<str>>>,
        /// More names for a tier as a `model`, with the tier's index.
        aliases: Vec<(String, usize)>,
        allow_other_models: bool,
    },
    PerItem {
        per_item: u64,
        field: String,
    },
    Campaign {
        base: u64,
        per_step: u64,
        per_variant: u64,
        per_channel: u64,
        min: u64,
        max: u64,
    },
}

/// One compiled `[operations.NAME]` entry.
#[derive(Debug, Clone)]
pub struct Operation {
    /// Operation name, e.g. `ai_chat`.
    pub name: Arc<str>,
    /// Usage category, e.g. `AI Chat`.
    pub category: Arc<str>,
    /// Behaviour at zero credits.
    pub on_empty: OnEmpty,
    /// Upstream failures that are refunded.
    pub refund_on: Vec<crate::config::RefundOn>,
    automatic_free: bool,
    /// Most free automatic refreshes per account and period (`None`: no limit).
    pub automatic_free_max: Option<u64>,
    pricing: Pricing,
}

/// The price of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    /// Credits; 0 means the request is free (an automatic refresh).
    pub cost: u64,
    /// The tier, for tiered operations.
    pub tier: Option<String>,
    /// Upstream override for the tier, if configured.
    pub upstream: Option<Arc<str>>,
    /// Free because `x-trigger: automatic` came from a `system` key.
    pub automatic: bool,
    /// The model the forwarded body's `model` must be set to (the tier's), when it is not already.
    pub model: Option<Arc<str>>,
}

/// Sets the pricing headers an upstream receives: exactly the priced `x-ai-tier` (none when
/// nothing tiered was priced), and `x-trigger: automatic` only when it made the request free.
/// Whatever the client sent under those names is dropped. `None` is a free route.
pub fn bind_headers(headers: &mut HeaderMap, price: Option<&Price>) {
    // Absent from most requests: one look over the fields costs less than two hashed lookups.
    // A tiered request usually names its tier once, as priced: then there is nothing to change.
    let priced_tier = price.filter(|p| !p.automatic).and_then(|p| p.tier.as_deref());
    let (mut tiers, mut as_priced, mut trigger) = (0, true, false);
    for (k, v) in headers.iter() {
        if k == TIER {
            tiers += 1;
            as_priced &= priced_tier.is_some_and(|t| v.as_bytes() == t.as_bytes());
        } else if k == TRIGGER {
            trigger = true;
        }
    }
    if tiers == 1 && as_priced && !trigger {
        return;
    }
    if tiers > 0 || trigger {
        headers.remove(TIER);
        headers.remove(TRIGGER);
    }
    let Some(price) = price else { return };
    if let Some(tier) = price.tier.as_deref().and_then(|t| HeaderValue::from_str(t).ok()) {
        headers.insert(TIER, tier);
    }
    if price.automatic {
        headers.insert(TRIGGER, HeaderValue::from_static("automatic"));
    }
}

/// The compiled route table and price list.
#[derive(Debug, Clone)]
pub struct Rules {
    routes: Vec<Route>,
    /// Operations referenced by [`Route::operation`].
    pub operations: Vec<Operation>,
}

impl Rules {
    /// Compiles a validated config.
    pub fn new(config: &Config) -> Self {
        let names: Vec<&String> = config.operations.keys().collect();
        let operations = config.operations.iter().map(|(name, op)| Operation::new(name, op)).collect();
        let routes = config
            .routes
            .iter()
            .map(|r| Route {
                method: r.method.as_deref().map(|m| Method::from_bytes(m.as_bytes()).expect("validated")),
                path: match (&r.path, &r.path_prefix) {
                    (Some(p), _) => PathMatch::Exact(p.clone()),
                    (None, Some(p)) => PathMatch::Prefix(p.clone()),
                    (None, None) => unreachable!("validated"),
                },
                upstream: r.upstream.as_str().into(),
                operation: r.operation.as_ref().map(|o| names.iter().position(|n| *n == o).expect("validated")),
            })
            .collect();
        Rules { routes, operations }
    }

    /// The first route matching `method` and `path`. A metered route matches its path in any
    /// letter case ([`spelling`]): a backend that ignores case would serve `/V1/chat/completions`
    /// as the chat route, so the gateway prices it as one (and [`Route::respell`] forwards it as
    /// the route spells it). A free route matches exactly.
    pub fn route(&self, method: &Method, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.method.as_ref().is_none_or(|m| m == method) && r.matched_len(path).is_some())
    }

    /// The operation with that name, if the running config still has it.
    pub fn operation_named(&self, name: &str) -> Option<&Operation> {
        self.operations.iter().find(|op| op.name.as_ref() == name)
    }

    /// The operation a route prices, if any.
    pub fn operation(&self, route: &Route) -> Option<&Operation> {
        route.operation.map(|i| &self.operations[i])
    }

    /// One line per free route that sends traffic to an upstream a metered route also uses: a path
    /// no metered route lists reaches that (AI) backend for free (for `creditgate check`).
    pub fn shared_upstream_warnings(&self) -> Vec<String> {
        let mut metered: Vec<(&str, &str)> = Vec::new();
        for r in &self.routes {
            if let Some(op) = self.operation(r) {
                metered.push((&r.upstream, &op.name));
                if let Pricing::Tiers { upstreams, .. } = &op.pricing {
                    metered.extend(upstreams.iter().flatten().map(|u| (&**u, &*op.name)));
                }
            }
        }
        let table = self.table();
        let mut lines = Vec::new();
        for (r, (shown, _, _)) in self.routes.iter().zip(&table) {
            if r.operation.is_some() {
                continue;
            }
            let mut ops: Vec<&str> = metered.iter().filter(|(u, _)| *u == &*r.upstream).map(|(_, o)| *o).collect();
            ops.dedup();
            if !ops.is_empty() {
                lines.push(format!(
                    "warning: free route {shown} shares upstream \"{}\" with metered operations ({}): \
                     any path there that no metered route lists reaches it for free",
                    r.upstream,
                    ops.join(", ")
                ));
            }
        }
        lines
    }

    /// Every route with its operation and a human description of its cost (for `creditgate check`).
    pub fn table(&self) -> Vec<(String, String, String)> {
        self.routes
            .iter()
            .map(|r| {
                let method = r.method.as_ref().map_or("*", Method::as_str);
                let path = match &r.path {
                    PathMatch::Exact(p) => p.clone(),
                    PathMatch::Prefix(p) => format!("{p}*"),
                };
                let (op, cost) = match self.operation(r) {
                    Some(op) => (op.name.to_string(), op.describe()),
                    None => ("-".to_owned(), "free".to_owned()),
                };
                (format!("{method} {path} → {}", r.upstream), op, cost)
            })
            .collect()
    }
}

impl Route {
    /// The route's path as configured.
    fn configured(&self) -> &str {
        match &self.path {
            PathMatch::Exact(p) | PathMatch::Prefix(p) => p,
        }
    }

    /// How many bytes at the start of `path` this route's path matches, if it matches.
    fn matched_len(&self, path: &str) -> Option<usize> {
        let (p, exact) = match &self.path {
            PathMatch::Exact(p) => (p.as_str(), true),
            PathMatch::Prefix(p) => (p.as_str(), false),
        };
        let n = if self.operation.is_some() {
            spelling::prefix_len(path, p)?
        } else {
            path.starts_with(p).then_some(p.len())?
        };
        (!exact || n == path.len()).then_some(n)
    }

    /// `path` with the part this route matched spelled as the route spells it, when it differs:
    /// the upstream serves exactly the route that was priced.
    pub fn respell(&self, path: &str) -> Option<String> {
        let n = self.matched_len(path)?;
        let p = self.configured();
        (path[..n] != *p).then(|| format!("{p}{}", &path[n..]))
    }
}

impl Operation {
    fn new(name: &str, c: &OperationConfig) -> Self {
        let pricing = if let Some(cost) = c.cost {
            Pricing::Fixed(cost)
        } else if let Some(tiers) = &c.tiers {
            let costs: Vec<(String, u64)> = tiers.iter().map(|(t, c)| (t.clone(), c.cost())).collect();
            let default = costs.iter().position(|(t, _)| Some(t) == c.default_tier.as_ref()).expect("validated");
            let upstreams = tiers
                .iter()
                .map(|(t, tier)| tier.upstream().or(c.tier_upstreams.get(t).map(String::as_str)).map(Into::into))
                .collect();
            let models = tiers.values().map(|tier| tier.model().map(Into::into)).collect();
            let aliases = tiers
                .values()
                .enumerate()
                .flat_map(|(i, tier)| tier.aliases().iter().map(move |a| (a.clone(), i)))
                .collect();
            Pricing::Tiers { costs, default, upstreams, models, aliases, allow_other_models: c.allow_other_models }
        } else if let (Some(per_item), Some(field)) = (c.per_item, &c.items) {
            Pricing::PerItem { per_item, field: field.clone() }
        } else {
            Pricing::Campaign {
                base: c.base.unwrap_or(0),
                per_step: c.per_step.unwrap_or(0),
                per_variant: c.per_variant.unwrap_or(0),
                per_channel: c.per_channel.unwrap_or(0),
                min: c.min.expect("validated"),
                max: c.max.expect("validated"),
            }
        };
        Operation {
            name: name.into(),
            category: c.category.as_str().into(),
            on_empty: c.on_empty,
            refund_on: c.refund_on.clone(),
            automatic_free: c.automatic_free,
            automatic_free_max: c.automatic_free_max_per_period,
            pricing,
        }
    }

    /// Whether automatic refreshes by a `system` key are free for this operation.
    pub fn has_automatic_free(&self) -> bool {
        self.automatic_free
    }

    fn is_free_automatic(&self, headers: &HeaderMap, role: Role) -> bool {
        self.automatic_free
            && role == Role::System
            && headers.get(TRIGGER).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"automatic"))
    }

    /// Whether pricing this request reads its body. A tiered request reads it even with an
    /// `x-ai-tier` header, because a body `tier` must agree with the header; only a body known to
    /// be empty (`Content-Length: 0`) cannot carry one and is skipped. (hyper drops a
    /// `Content-Length` that came with `Transfer-Encoding`, so the length is the body's.)
    pub fn needs_body(&self, headers: &HeaderMap, role: Role) -> bool {
        // With an allowance, a refresh beyond it is priced from its body like any request.
        if self.is_free_automatic(headers, role) && self.automatic_free_max.is_none() {
            return false;
        }
        match &self.pricing {
            Pricing::Fixed(_) => false,
            Pricing::Tiers { .. } => {
                let empty = headers.get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() == b"0");
                !(empty && headers.contains_key(TIER))
            }
            Pricing::PerItem { .. } | Pricing::Campaign { .. } => true,
        }
    }

    /// Prices a request; `body` is `Some` whenever [`Self::needs_body`] said so.
    pub fn price(&self, headers: &HeaderMap, role: Role, body: Option<&[u8]>) -> Result<Price, ClassifyError> {
        if self.is_free_automatic(headers, role) {
            return Ok(Price { cost: 0, tier: None, upstream: None, automatic: true, model: None });
        }
        self.price_paid(headers, body)
    }

    /// The price of a request that pays, whatever its trigger (an automatic refresh beyond its
    /// period's free allowance).
    pub fn price_paid(&self, headers: &HeaderMap, body: Option<&[u8]>) -> Result<Price, ClassifyError> {
        let fixed = |cost| Ok(Price { cost, tier: None, upstream: None, automatic: false, model: None });
        if !matches!(self.pricing, Pricing::Fixed(_)) {
            refuse_encoded(headers)?;
        }
        match &self.pricing {
            Pricing::Fixed(cost) => fixed(*cost),
            Pricing::Tiers { costs, default, upstreams, models, aliases, allow_other_models } => {
                let from_header = match header_tier(headers)? {
                    Some(name) => Some((name, self.tier_index(costs, name)?)),
                    None => None,
                };
                // An empty body carries no tier (it may have been read for an Idempotency-Key).
                let (body_tier, body_model) = match body.filter(|b| !(b.is_empty() && from_header.is_some())) {
                    None => (Field::Missing, Field::Missing),
                    Some(body) => {
                        let [tier, model] = json::probe(body, ["tier", "model"])?;
                        (tier, model)
                    }
                };
                let from_body = match body_tier {
                    Field::Missing => None,
                    Field::Str(name) => Some((self.tier_index(costs, &name)?, name)),
                    _ => return Err(ClassifyError::Invalid("The body field \"tier\" must be a string.".into())),
                };
                // A `model` may name a tier (or an alias): the way OpenAI SDK users pick one.
                let model = match &body_model {
                    Field::Missing => None,
                    Field::Str(m) => Some(m.as_ref()),
                    _ => return Err(ClassifyError::Invalid("The body field \"model\" must be a string.".into())),
                };
                let from_model = model.and_then(|m| {
                    costs
                        .iter()
                        .position(|(t, _)| t == m)
                        .or_else(|| aliases.iter().find(|(a, _)| a == m).map(|(_, i)| *i))
                });
                // The tier each place names, in this order; a place is described only in a refusal.
                let named = [from_header.map(|(_, i)| i), from_body.as_ref().map(|(i, _)| *i), from_model];
                let describe = |place: usize| match place {
                    0 => format!("x-ai-tier header says \"{}\"", from_header.map_or("", |(h, _)| h)),
                    1 => format!("body's \"tier\" says \"{}\"", from_body.as_ref().map_or("", |(_, b)| &**b)),
                    _ => format!("body's \"model\" says \"{}\"", model.unwrap_or_default()),
                };
                let mut said = named.iter().enumerate().filter_map(|(place, i)| Some((place, (*i)?)));
                let first = said.next();
                let mut last = first;
                for (place, i) in said {
                    if let Some((before, j)) = last
                        && j != i
                    {
                        return Err(ClassifyError::TierMismatch(format!(
                            "The {} but the {}; send one, or make them agree.",
                            describe(before),
                            describe(place)
                        )));
                    }
                    last = Some((place, i));
                }
                let index = first.map_or(*default, |(_, i)| i);
                let (tier, cost) = &costs[index];
                // A `model` that is not a tier's name must be this tier's model, unless the
                // operation lets any model through.
                let mut set_model = models[index].clone();
                if let (Some(m), None) = (model, from_model) {
                    match models.iter().position(|x| x.as_deref() == Some(m)) {
                        Some(i) if i == index => set_model = None, // already what was paid for
                        _ if *allow_other_models => set_model = None,
                        Some(i) => {
                            return Err(ClassifyError::TierMismatch(format!(
                                "The body's \"model\" \"{m}\" is tier \"{}\"'s model, but this request is priced as tier \"{tier}\"; \
                                 send that tier, or its name as the model.",
                                costs[i].0
                            )));
                        }
                        None if models.iter().any(Option::is_some) => {
                            return Err(ClassifyError::Invalid(format!(
                                "Unknown model \"{m}\" for {}; send a tier as the model: {}.",
                                self.name,
                                costs.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>().join(", ")
                            )));
                        }
                        None => {} // no tier names a model: the body's is forwarded as sent
                    }
                }
                Ok(Price {
                    cost: *cost,
                    tier: Some(tier.clone()),
                    upstream: upstreams[index].clone(),
                    automatic: false,
                    model: set_model,
                })
            }
            Pricing::PerItem { per_item, field } => {
                let [items] = json::probe(body.unwrap_or_default(), [field.as_str()])?;
                match items {
                    Field::Array(n) if n > 0 => fixed(n.saturating_mul(*per_item)),
                    Field::Array(_) => {
                        Err(ClassifyError::Invalid(format!("The body field \"{field}\" is an empty list.")))
                    }
                    Field::Missing => {
                        Err(ClassifyError::Invalid(format!("The body needs a field \"{field}\" with a list.")))
                    }
                    _ => Err(ClassifyError::Invalid(format!("The body field \"{field}\" must be a list."))),
                }
            }
            Pricing::Campaign { base, per_step, per_variant, per_channel, min, max } => {
                let counts = json::probe(body.unwrap_or_default(), ["steps", "variants", "channels"])?;
                let mut n = [0u64; 3];
                for (i, (field, name)) in counts.iter().zip(["steps", "variants", "channels"]).enumerate() {
                    n[i] = match field {
                        Field::Missing => 0,
                        f => f.count().ok_or_else(|| {
                            ClassifyError::Invalid(format!(
                                "The body field \"{name}\" must be a list or a whole number."
                            ))
                        })?,
                    };
                }
                let raw = base
                    .saturating_add(per_step.saturating_mul(n[0]))
                    .saturating_add(per_variant.saturating_mul(n[1]))
                    .saturating_add(per_channel.saturating_mul(n[2]));
                fixed(raw.clamp(*min, *max))
            }
        }
    }

    fn tier_index(&self, costs: &[(String, u64)], name: &str) -> Result<usize, ClassifyError> {
        costs.iter().position(|(t, _)| t == name).ok_or_else(|| {
            let known: Vec<&str> = costs.iter().map(|(t, _)| t.as_str()).collect();
            ClassifyError::Invalid(format!(
                "Unknown tier \"{name}\" for {}; use one of: {}.",
                self.name,
                known.join(", ")
            ))
        })
    }

    /// Human description of the pricing rule.
    pub fn describe(&self) -> String {
        let mut s = match &self.pricing {
            Pricing::Fixed(c) => format!("{c}"),
            Pricing::Tiers { costs, default, .. } => costs
                .iter()
                .enumerate()
                .map(|(i, (t, c))| format!("{t}={c}{}", if i == *default { " (default)" } else { "" }))
                .collect::<Vec<_>>()
                .join(", "),
            Pricing::PerItem { per_item, field } => format!("{per_item} per item in `{field}`"),
            Pricing::Campaign { base, per_step, per_variant, per_channel, min, max } => format!(
                "clamp({base} + {per_step}·steps + {per_variant}·variants + {per_channel}·channels, {min}, {max})"
            ),
        };
        if self.automatic_free {
            s.push_str("; automatic refresh by a system key free");
        }
        if self.on_empty == OnEmpty::Queue {
            s.push_str("; queued when out of credits");
        }
        s
    }

    /// Cost of each tier (`messages_left` in `GET /v1/credits`); empty for untiered operations.
    pub fn tier_costs(&self) -> &[(String, u64)] {
        match &self.pricing {
            Pricing::Tiers { costs, .. } => costs,
            _ => &[],
        }
    }
}

/// The tier the `x-ai-tier` header names, trimmed of surrounding whitespace; several header
/// lines must all name the same tier.
fn header_tier(headers: &HeaderMap) -> Result<Option<&str>, ClassifyError> {
    let mut tier = None;
    for v in headers.get_all(TIER) {
        let name = v.to_str().map_err(|_| ClassifyError::Invalid("The x-ai-tier header is not text.".into()))?.trim();
        match tier {
            Some(first) if first != name => {
                return Err(ClassifyError::TierMismatch(format!(
                    "Two x-ai-tier headers name different tiers, \"{first}\" and \"{name}\"; send one."
                )));
            }
            _ => tier = Some(name),
        }
    }
    Ok(tier)
}

/// Refuses a content-encoded body on a body-priced route: the gateway would price the encoded
/// bytes while the backend decodes and reads another body. `identity` (or an empty list) is fine.
fn refuse_encoded(headers: &HeaderMap) -> Result<(), ClassifyError> {
    for v in headers.get_all(header::CONTENT_ENCODING) {
        let plain = v
            .to_str()
            .is_ok_and(|s| s.split(',').map(str::trim).all(|c| c.is_empty() || c.eq_ignore_ascii_case("identity")));
        if !plain {
            let shown = String::from_utf8_lossy(v.as_bytes());
            return Err(ClassifyError::Encoded(format!(
                "This request is priced from its body, which must be sent uncompressed; \
                 Content-Encoding \"{shown}\" is not accepted here."
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules::new(&Config::parse(include_str!("../../config/gateway.toml")).unwrap())
    }

    fn price_of(
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        role: Role,
        body: &str,
    ) -> Result<Price, ClassifyError> {
        let rules = rules();
        let route = rules.route(&Method::from_bytes(method.as_bytes()).unwrap(), path).unwrap();
        let op = rules.operation(route).expect("metered route");
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        let body = op.needs_body(&h, role).then_some(body.as_bytes());
        op.price(&h, role, body)
    }

    fn cost(path: &str, headers: &[(&str, &str)], body: &str) -> u64 {
        price_of("POST", path, headers, Role::User, body).unwrap().cost
    }

    #[test]
    fn chat_tiers_from_header_body_or_default() {
        let p = "/v1/chat/completions";
        assert_eq!(cost(p, &[], "{}"), 3);
        assert_eq!(cost(p, &[], r#"{"tier":"fast"}"#), 1);
        assert_eq!(cost(p, &[], r#"{"tier":"powerful"}"#), 5);
        assert_eq!(cost(p, &[("x-ai-tier", "powerful")], r#"{"messages":[]}"#), 5);
        assert_eq!(cost(p, &[("x-ai-tier", " powerful ")], r#"{"tier":"powerful"}"#), 5, "agreeing, header trimmed");
        assert_eq!(cost(p, &[("x-ai-tier", "fast"), ("content-length", "0")], ""), 1, "an empty body is not read");
        let tier = price_of("POST", p, &[], Role::User, "{}").unwrap().tier;
        assert_eq!(tier.as_deref(), Some("balanced"));
    }

    #[test]
    fn header_and_body_tier_must_agree() {
        let p = "/v1/chat/completions";
        let e = price_of("POST", p, &[("x-ai-tier", "fast")], Role::User, r#"{"tier":"powerful"}"#).unwrap_err();
        let ClassifyError::TierMismatch(m) = e else { panic!("{e:?}") };
        assert!(m.contains("\"fast\"") && m.contains("\"powerful\""), "names both: {m}");
        // Case counts in both places: "Fast" is no tier at all, not a mismatch.
        let e = price_of("POST", p, &[("x-ai-tier", "Fast")], Role::User, r#"{"tier":"fast"}"#).unwrap_err();
        assert!(matches!(e, ClassifyError::Invalid(_)), "{e:?}");
        // With a header the body is still read, so it must be JSON, and its tier one spelling.
        let e = price_of("POST", p, &[("x-ai-tier", "fast")], Role::User, "not json").unwrap_err();
        assert!(matches!(e, ClassifyError::Invalid(_)), "{e:?}");
        let e = price_of("POST", p, &[("x-ai-tier", "fast")], Role::User, r#"{"TIER":"powerful"}"#).unwrap_err();
        assert!(matches!(e, ClassifyError::Ambiguous(_)), "{e:?}");
    }

    #[test]
    fn two_tier_headers_must_agree() {
        let rules = rules();
        let op = rules.operation(rules.route(&Method::POST, "/v1/chat/completions").unwrap()).unwrap();
        let mut h = HeaderMap::new();
        h.append(TIER_HEADER, "fast".parse().unwrap());
        h.append(TIER_HEADER, "fast ".parse().unwrap());
        assert_eq!(op.price(&h, Role::User, Some(b"{}")).unwrap().cost, 1);
        h.append(TIER_HEADER, "powerful".parse().unwrap());
        assert!(matches!(op.price(&h, Role::User, Some(b"{}")), Err(ClassifyError::TierMismatch(_))));
    }

    #[test]
    fn pricing_fields_given_twice_are_ambiguous() {
        for (path, body) in [
            ("/v1/chat/completions", r#"{"tier":"fast","TIER":"powerful"}"#),
            ("/v1/chat/completions", r#"{"tier":"fast","tier":"fast"}"#),
            ("/v1/leads/enrich", r#"{"leads":[1],"LEADS":[1,2,3]}"#),
            ("/v1/leads/enrich", r#"{"Leads":[1,2,3]}"#),
            ("/v1/campaigns/generate", r#"{"steps":1,"Steps":9}"#),
            ("/v1/campaigns/generate", r#"{"CHANNELS":9}"#),
        ] {
            let e = price_of("POST", path, &[], Role::User, body).unwrap_err();
            assert!(matches!(e, ClassifyError::Ambiguous(_)), "{body}: {e:?}");
        }
    }

    #[test]
    fn body_priced_operations_refuse_encoded_bodies() {
        let gz = [("content-encoding", "gzip")];
        for (path, body) in [("/v1/chat/completions", "{}"), ("/v1/leads/enrich", r#"{"leads":[1]}"#)] {
            let e = price_of("POST", path, &gz, Role::User, body).unwrap_err();
            assert!(matches!(e, ClassifyError::Encoded(_)), "{path}: {e:?}");
            assert!(price_of("POST", path, &[("content-encoding", "Identity")], Role::User, body).is_ok());
        }
        let e = price_of(
            "POST",
            "/v1/chat/completions",
            &[("x-ai-tier", "fast"), ("content-encoding", "br")],
            Role::User,
            "x",
        );
        assert!(matches!(e, Err(ClassifyError::Encoded(_))), "a header tier does not make the body irrelevant");
        assert_eq!(price_of("POST", "/v1/sentiment", &gz, Role::User, "").unwrap().cost, 1, "fixed cost: body unread");
    }

    #[test]
    fn pricing_headers_are_bound_to_the_price() {
        let mut h = HeaderMap::new();
        h.append(TIER_HEADER, "fast".parse().unwrap());
        h.append(TIER_HEADER, "powerful".parse().unwrap());
        h.insert(TRIGGER_HEADER, "automatic".parse().unwrap());
        let chat = Price { cost: 3, tier: Some("balanced".into()), upstream: None, automatic: false, model: None };
        bind_headers(&mut h, Some(&chat));
        assert_eq!(h.get_all(TIER_HEADER).iter().collect::<Vec<_>>(), ["balanced"]);
        assert!(!h.contains_key(TRIGGER_HEADER), "x-trigger did not make this free");

        let auto = Price { cost: 0, tier: None, upstream: None, automatic: true, model: None };
        h.insert(TRIGGER_HEADER, "AUTOMATIC".parse().unwrap());
        bind_headers(&mut h, Some(&auto));
        assert_eq!((h.get(TIER_HEADER), &h[TRIGGER_HEADER]), (None, &HeaderValue::from_static("automatic")));

        bind_headers(&mut h, None);
        assert!(h.is_empty(), "a free route forwards no pricing header");

        // The usual request: one header naming the priced tier, kept as it is; any other
        // spelling, a second line or an x-trigger is rewritten.
        let fast = Price { cost: 1, tier: Some("fast".into()), upstream: None, automatic: false, model: None };
        for sent in [&["fast"][..], &["fast "], &["FAST"], &["fast", "fast"], &["balanced"]] {
            for trigger in [false, true] {
                let mut h = HeaderMap::new();
                for v in sent {
                    h.append(TIER_HEADER, v.parse().unwrap());
                }
                if trigger {
                    h.insert(TRIGGER_HEADER, "automatic".parse().unwrap());
                }
                h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
                bind_headers(&mut h, Some(&fast));
                assert_eq!(h.get_all(TIER_HEADER).iter().collect::<Vec<_>>(), ["fast"], "{sent:?} {trigger}");
                assert!(!h.contains_key(TRIGGER_HEADER) && h.len() == 2, "{sent:?} {trigger}");
            }
        }
    }

    #[test]
    fn unknown_tier_is_an_error_not_a_default() {
        let p = "/v1/chat/completions";
        let e = price_of("POST", p, &[("x-ai-tier", "turbo")], Role::User, "{}").unwrap_err();
        let m = e.to_string();
        assert!(m.contains("\"turbo\"") && m.contains("balanced, fast, powerful"), "{m}");
        assert!(price_of("POST", p, &[], Role::User, r#"{"tier":"turbo"}"#).is_err());
        assert!(price_of("POST", p, &[], Role::User, r#"{"tier":3}"#).is_err());
        assert!(price_of("POST", p, &[], Role::User, "{bad json").is_err());
    }

    #[test]
    fn per_item_counts_leads() {
        assert_eq!(cost("/v1/leads/enrich", &[], r#"{"leads":[1,2,3,4]}"#), 4);
        assert_eq!(cost("/v1/icebreakers", &[], r#"{"leads":[{"id":1},{"id":2}]}"#), 2);
        for body in [r#"{"leads":[]}"#, r#"{}"#, r#"{"leads":"x"}"#, "[]"] {
            let e = price_of("POST", "/v1/leads/enrich", &[], Role::User, body).unwrap_err();
            let m = e.to_string();
            assert!(m.contains("leads") || m.contains("JSON"), "{body}: {e}");
        }
    }

    #[test]
    fn campaign_formula_is_clamped() {
        let p = "/v1/campaigns/generate";
        assert_eq!(cost(p, &[], "{}"), 3, "clamped up to min");
        assert_eq!(cost(p, &[], r#"{"steps":2,"variants":2,"channels":1}"#), 5);
        assert_eq!(cost(p, &[], r#"{"steps":["a","b","c"],"variants":[1,2],"channels":["email"]}"#), 6);
        assert_eq!(cost(p, &[], r#"{"steps":20,"variants":3,"channels":3}"#), 10, "clamped down to max");
        assert!(price_of("POST", p, &[], Role::User, r#"{"steps":-1}"#).is_err());
    }

    #[test]
    fn fixed_costs() {
        assert_eq!(cost("/v1/calls/transcribe", &[], ""), 2);
        assert_eq!(cost("/v1/insights/position", &[], ""), 5);
        assert_eq!(cost("/v1/insights/competitive", &[], ""), 5);
        assert_eq!(cost("/v1/sentiment", &[], ""), 1);
    }

    #[test]
    fn automatic_scoring_is_free_only_for_system_keys() {
        let p = "/v1/leads/score";
        let body = r#"{"leads":[1,2,3]}"#;
        let auto = [("x-trigger", "automatic")];
        assert_eq!(price_of("POST", p, &auto, Role::System, body).unwrap().cost, 0);
        assert_eq!(price_of("POST", p, &auto, Role::User, body).unwrap().cost, 3);
        assert_eq!(price_of("POST", p, &[], Role::System, body).unwrap().cost, 3);
    }

    #[test]
    fn routes_first_match_wins_and_methods_matter() {
        let r = rules();
        let chat = r.route(&Method::POST, "/v1/chat/completions").unwrap();
        assert_eq!(r.operation(chat).unwrap().name.as_ref(), "ai_chat");
        let get = r.route(&Method::GET, "/v1/chat/completions").unwrap();
        assert!(r.operation(get).is_none(), "GET falls through to the free catch-all");
        let deals = r.route(&Method::POST, "/v1/deals").unwrap();
        assert!(r.operation(deals).is_none());
        assert_eq!(deals.upstream.as_ref(), "app");
    }

    #[test]
    fn metered_routes_match_in_any_letter_case_and_are_respelled() {
        let r = rules();
        for p in ["/V1/chat/completions", "/v1/CHAT/Completions", "/v1/chat/completıons"] {
            let route = r.route(&Method::POST, p).unwrap();
            assert_eq!(r.operation(route).unwrap().name.as_ref(), "ai_chat", "{p}");
            assert_eq!(route.respell(p).as_deref(), Some("/v1/chat/completions"));
        }
        let chat = r.route(&Method::POST, "/v1/chat/completions").unwrap();
        assert_eq!(chat.respell("/v1/chat/completions"), None, "already spelled so");
        // Free routes keep matching exactly and forward the path as sent.
        let free = r.route(&Method::GET, "/V1/Deals").unwrap();
        assert!(r.operation(free).is_none());
        assert_eq!(free.respell("/V1/Deals"), None);
    }

    #[test]
    fn check_warns_about_free_routes_to_metered_upstreams() {
        assert_eq!(rules().shared_upstream_warnings(), Vec::<String>::new(), "the shipped config is clean");
        let text = include_str!("../../config/gateway.toml").replacen(
            "path_prefix = \"/\"\nupstream = \"app\"",
            "path_prefix = \"/\"\nupstream = \"ai\"",
            1,
        );
        let w = Rules::new(&Config::parse(&text).unwrap()).shared_upstream_warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("* /*") && w[0].contains("\"ai\"") && w[0].contains("ai_chat"), "{}", w[0]);
    }

    #[test]
    fn table_lists_every_route() {
        let t = rules().table();
        assert_eq!(t.len(), 10);
        assert!(t[0].2.contains("balanced=3 (default)"));
    }

    /// The shipped config with `ai_chat`'s tiers choosing models (`extra` added to the table).
    fn with_models(extra: &str) -> Rules {
        let text = include_str!("../../config/gateway.toml").replace(
            "tiers = { fast = 1, balanced = 3, powerful = 5 }",
            &format!(
                "tiers = {{ fast = {{ cost = 1, model = \"small-1\", aliases = [\"mini\"] }}, balanced = 3, \
                 powerful = {{ cost = 5, model = \"large-9\" }} }}{extra}"
            ),
        );
        assert!(text.contains("large-9"), "the shipped ai_chat tiers changed shape");
        Rules::new(&Config::parse(&text).unwrap())
    }

    fn chat(rules: &Rules, headers: &[(&str, &str)], body: &str) -> Result<Price, ClassifyError> {
        let route = rules.route(&Method::POST, "/v1/chat/completions").unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        rules.operation(route).unwrap().price(&h, Role::User, Some(body.as_bytes()))
    }

    #[test]
    fn a_tier_with_a_model_asks_the_backend_for_exactly_that_model() {
        let r = with_models("");
        let p = |h: &[(&str, &str)], b: &str| {
            chat(&r, h, b).map(|p| (p.cost, p.tier.unwrap(), p.model.map(|m| m.to_string())))
        };
        let some = |c, t: &str, m: Option<&str>| Ok((c, t.to_owned(), m.map(str::to_owned)));
        // The tier picked by its name as the model (OpenAI SDK style), or by an alias.
        assert_eq!(p(&[], r#"{"model":"powerful"}"#), some(5, "powerful", Some("large-9")));
        assert_eq!(p(&[], r#"{"model":"mini"}"#), some(1, "fast", Some("small-1")));
        // By header or tier field: a missing model is set; the tier's own model is left alone.
        assert_eq!(p(&[("x-ai-tier", "powerful")], r#"{"messages":[]}"#), some(5, "powerful", Some("large-9")));
        assert_eq!(p(&[], r#"{"tier":"powerful","model":"large-9"}"#), some(5, "powerful", None));
        assert_eq!(p(&[], r#"{"tier":"fast","model":"fast"}"#), some(1, "fast", Some("small-1")));
        // A tier without a model forwards the body's as sent — unless it names another tier's.
        assert_eq!(p(&[], r#"{"messages":[]}"#), some(3, "balanced", None));
        // Asking for more than was paid for.
        let e = chat(&r, &[], r#"{"model":"large-9"}"#).unwrap_err();
        assert!(matches!(&e, ClassifyError::TierMismatch(m) if m.contains("\"powerful\"'s model")), "{e:?}");
        let e = chat(&r, &[("x-ai-tier", "fast")], r#"{"model":"powerful"}"#).unwrap_err();
        assert!(
            matches!(&e, ClassifyError::TierMismatch(m) if m.starts_with("The x-ai-tier header says \"fast\" but the body's \"model\" says \"powerful\"")),
            "{e:?}"
        );
        let e = chat(&r, &[], r#"{"tier":"fast","model":"large-9"}"#).unwrap_err();
        assert!(matches!(e, ClassifyError::TierMismatch(_)), "{e:?}");
        let e = chat(&r, &[], r#"{"model":"gpt-5"}"#).unwrap_err();
        assert!(matches!(&e, ClassifyError::Invalid(m) if m.contains("Unknown model \"gpt-5\"")), "{e:?}");
        let e = chat(&r, &[], r#"{"model":7}"#).unwrap_err();
        assert!(matches!(e, ClassifyError::Invalid(_)), "{e:?}");
        // Two spellings of `model`: a backend could read the other one.
        let e = chat(&r, &[], r#"{"model":"fast","MODEL":"large-9"}"#).unwrap_err();
        assert!(matches!(e, ClassifyError::Ambiguous(_)), "{e:?}");
        let e = chat(&r, &[], r#"{"model":"fast","model":"powerful"}"#).unwrap_err();
        assert!(matches!(e, ClassifyError::Ambiguous(_)), "{e:?}");
    }

    #[test]
    fn allow_other_models_lets_unknown_models_through_as_sent() {
        let r = with_models("\nallow_other_models = true");
        let p = chat(&r, &[], r#"{"model":"gpt-5"}"#).unwrap();
        assert_eq!((p.cost, p.tier.as_deref(), p.model), (3, Some("balanced"), None));
        let p = chat(&r, &[], r#"{"model":"powerful"}"#).unwrap();
        assert_eq!((p.cost, p.model.as_deref()), (5, Some("large-9")), "a tier name still picks and sets");
    }

    #[test]
    fn model_names_are_checked_at_load() {
        let base = include_str!("../../config/gateway.toml");
        let shipped = "tiers = { fast = 1, balanced = 3, powerful = 5 }";
        for (tiers, key) in [
            (
                "tiers = { fast = { cost = 1, model = \"m\" }, balanced = 3, powerful = { cost = 5, model = \"m\" } }",
                "operations.ai_chat.tiers.powerful.model",
            ),
            (
                "tiers = { fast = { cost = 1, aliases = [\"balanced\"] }, balanced = 3, powerful = 5 }",
                "operations.ai_chat.tiers.fast.aliases",
            ),
            (
                "tiers = { fast = { cost = 1, model = \"powerful\" }, balanced = 3, powerful = 5 }",
                "operations.ai_chat.tiers.powerful",
            ),
            ("tiers = { fast = { cost = 0 }, balanced = 3, powerful = 5 }", "operations.ai_chat.tiers.fast.cost"),
            (
                "tiers = { fast = { cost = 1, upstream = \"nope\" }, balanced = 3, powerful = 5 }",
                "operations.ai_chat.tiers.fast.upstream",
            ),
        ] {
            let text = base.replace(shipped, tiers);
            assert_ne!(text, base);
            let e = Config::parse(&text).expect_err(tiers);
            assert_eq!(e.key, key, "{tiers}: {e}");
        }
    }
}
