//! creditgate: a reverse-proxy metering gateway for AI backends.
//!
//! It works out what each request is, debits prepaid credits atomically in the store, forwards
//! the request, streams the answer back, and refunds when the backend fails.
//!
//! # Layout
//!
//! The request path, in order (assembled in [`stack`], which documents every step):
//!
//! * [`auth`] — `Authorization: Bearer` API key → [`auth::Principal`]; hashed keys, cached lookups.
//! * [`ratelimit`] — per-account request rate by plan, failed authentication per client address
//!   (governor), and the sweep that keeps their tables bounded.
//! * [`classify`] — route + headers + body → operation and cost; pure rules.
//! * [`meter`] — the one path for every money movement (proxy and job runner): one ledger step
//!   per request, refunds by the operation's `refund_on`, kept answers for Idempotency-Key
//!   replays ([`meter::MeteredBody`], [`meter::DeliveryBody`]).
//! * [`proxy`] — pooled hyper client, streaming both ways, hop-by-hop header rules.
//!
//! Around it:
//!
//! * [`config`] — the typed TOML configuration, validated at load; [`state`] holds the current
//!   generation, swapped atomically on reload.
//! * [`ledger`] — the [`ledger::Ledger`] seam and its stores; [`store`] picks one from the config.
//! * [`calendar`] — billing-anchor arithmetic (periods, month-end clamping).
//! * [`error`] — `GatewayError` and the one mapping to HTTP answers (SPEC §6).
//! * [`billing`] — top-ups bought and auto top-ups paid through Stripe (`[billing.stripe]`).
//! * [`api`] — the customer API (`/v1/credits…`); [`admin`] — the admin listener; [`extract`] —
//!   body reading shared by both and the proxy path; [`dashboard`] — the usage page and its
//!   security headers.
//! * [`jobs`] — runs queued requests once their account can pay.
//! * [`notify`] — delivers outbox events (webhook, e-mail); [`metrics`] — Prometheus metrics.
//! * [`server`] — start-up, graceful shutdown, config reload; [`listener`] — the bounded accept
//!   loop (connection cap, header/idle/body timeouts); [`demo`] — the fake backend and tour.
//! * [`running`] — the running config as `GET /admin/v1/config` shows it (secrets redacted, hash,
//!   load time) and the differences a reload of a file would make.
//! * [`openapi`] — the OpenAPI 3.1 document of both listeners, generated from the handlers'
//!   types, served at `/openapi.json`.
//! * [`cli`] — the client side of the `creditgate` command: `admin …` and `check --against`,
//!   over the admin API.
#![warn(missing_docs)]

pub mod admin;
pub mod api;
pub mod auth;
pub mod billing;
pub mod calendar;
pub mod classify;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod demo;
pub mod error;
pub mod extract;
pub mod jobs;
pub mod ledger;
pub mod listener;
pub mod meter;
pub mod metrics;
pub mod notify;
pub mod openapi;
pub mod proxy;
pub mod ratelimit;
pub mod running;
pub mod server;
pub mod stack;
pub mod state;
pub mod store;
