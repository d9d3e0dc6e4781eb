//! Tocsin turns a security incident into lawful, timely, provable notice: to every affected
//! merchant, to the public when individual notice fails, and to regulators on their clocks.
//!
//! The flow, one module per stage:
//! [`ingest`] events -> [`incident`] state machine -> [`scope`] and classify -> [`draft`]
//! notices -> approval (four eyes, in [`engine`]) -> [`dispatch`] outbox over [`channels`] ->
//! [`bulletin`] for the unreachable -> [`filing`] for regulators; every change goes into the
//! hash-chained [`ledger`]. [`store`] owns all SQL; [`http`] and [`cli`] only translate.
//! [`engine::Tocsin`] is the entry point for host applications.

pub mod auth;
pub mod bench;
pub mod bulletin;
pub mod channels;
pub mod classify;
pub mod cli;
pub mod clocks;
pub mod completeness;
pub mod config;
pub mod demo;
pub mod directory;
pub mod dispatch;
pub mod domain;
pub mod draft;
pub mod engine;
pub mod evidence;
pub mod filing;
pub mod http;
pub mod incident;
pub mod ingest;
mod input;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod ocsf;
pub mod redact;
pub mod scheduler;
pub mod scope;
pub mod store;
pub mod submission;
pub mod taxonomy;
pub mod templates;
pub mod time;
pub mod watchdog;

pub use engine::{EngineError, Tocsin};

/// Installs the process-wide TLS crypto provider (ring) once; reqwest and lettre need one.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
