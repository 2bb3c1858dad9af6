//! creditgate: a reverse-proxy metering gateway for AI backends.
//!
//! # Layout
//!
//! * [`config`] — the typed TOML configuration, validated at load.
//! * [`calendar`] — billing-anchor arithmetic (periods, month-end clamping).
//! * [`ledger`] — the [`ledger::Ledger`] seam and its stores; every balance change is one atomic step.
#![warn(missing_docs)]

pub mod auth;
pub mod calendar;
pub mod classify;
pub mod config;
pub mod error;
pub mod ledger;
