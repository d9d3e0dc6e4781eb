//! Storage: the one place that owns SQL. The stages talk to the [`Store`] trait; each database
//! has its own implementation beside this file (SQLite now, PostgreSQL later), chosen once at
//! start from the database URL.
//!
//! Every method that changes state also appends its audit ledger entry in the same
//! transaction, so a state change and its record cannot be separated by a crash.

mod sqlite;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::*;
use crate::model::*;

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error while {doing}: {source}")]
    Database {
        doing: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrating the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("creating the data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("stored row is corrupt ({what}): {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    /// A compare-and-set lost: the row is no longer in the expected state.
    #[error("{what} {id} changed concurrently: {reason}")]
    Conflict {
        what: &'static str,
        id: String,
        reason: String,
    },
}

/// Shorthand used by the implementations: attach what was being done to a sqlx error.
pub(crate) trait Doing<T> {
    fn doing(self, doing: &'static str) -> Result<T, StoreError>;
}

impl<T> Doing<T> for Result<T, sqlx::Error> {
    fn doing(self, doing: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Database { doing, source })
    }
}

/// Counts from a directory import.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct UpsertCounts {
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
}

/// What happened to an ingested event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum IngestOutcome {
    /// The same (source, external id) was seen before; nothing changed.
    Duplicate { event_id: EventId, incident_id: IncidentId },
    /// The event joined the open incident with its correlation key.
    Joined { event_id: EventId, incident_id: IncidentId },
    /// The event opened a new incident in triage.
    Opened {
        event_id: EventId,
        incident_id: IncidentId,
        reference: String,
    },
}

/// One state change of an incident, as recorded in its timeline and in the ledger.
#[derive(Debug, Clone)]
pub struct Step<'a> {
    pub to: IncidentState,
    pub actor: &'a Actor,
    pub reason: &'a str,
    /// Facts for the ledger: ids, counts, hashes; never personal data.
    pub detail: serde_json::Value,
}

/// Changes that accompany an incident transition.
#[derive(Debug, Clone, Default)]
pub struct IncidentChanges {
    pub facts: Option<IncidentFacts>,
    pub scope_rule: Option<ScopeRule>,
    /// Replaces the affected merchants (scoping).
    pub affected: Option<Vec<AffectedMerchant>>,
}

/// A delivery to be put in the outbox (id and times are set by the store).
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub incident_id: IncidentId,
    pub draft_id: DraftId,
    pub notice_id: NoticeId,
    pub merchant_id: MerchantId,
    pub channel: Channel,
    pub address: String,
    pub plan_position: i64,
}

/// The outcome of one send attempt, stored against its delivery.
#[derive(Debug, Clone)]
pub enum AttemptOutcome {
    Sent { provider_message_id: Option<String> },
    Retry { error: String, at: DateTime<Utc> },
    Failed { error: String, class: ErrorClass },
}

/// What an attempt's outcome means for the merchant.
#[derive(Debug, Clone)]
pub enum Followup {
    /// Nothing changes (a retry is scheduled).
    Nothing,
    /// The merchant was reached on the delivery's channel.
    Reached,
    /// The channel failed for good: queue the next channel of the plan.
    Fallback(NewDelivery),
    /// The channel failed for good and the plan is exhausted.
    Unreachable,
}

#[async_trait]
pub trait Store: Send + Sync {
    // Directory
    async fn upsert_merchants(&self, merchants: &[Merchant]) -> Result<UpsertCounts, StoreError>;
    async fn merchants(&self) -> Result<Vec<Merchant>, StoreError>;
    async fn merchant(&self, id: &MerchantId) -> Result<Option<Merchant>, StoreError>;

    // Events and incidents
    /// Stores the event, joining the open incident with its correlation key or opening one.
    /// New incidents are numbered `<reference_prefix>-<year>-<n>`.
    async fn ingest_event(
        &self,
        event: &SecurityEvent,
        reference_prefix: &str,
        actor: &Actor,
    ) -> Result<IngestOutcome, StoreError>;
    async fn incident(&self, id_or_reference: &str) -> Result<Option<Incident>, StoreError>;
    async fn incidents(&self) -> Result<Vec<Incident>, StoreError>;
    async fn incident_events(&self, id: &IncidentId) -> Result<Vec<SecurityEvent>, StoreError>;
    async fn transitions(&self, id: &IncidentId) -> Result<Vec<Transition>, StoreError>;
    /// Moves an incident from `from` to `to` (compare-and-set), with its changes and ledger entry.
    async fn transition(
        &self,
        id: &IncidentId,
        from: IncidentState,
        step: Step<'_>,
        changes: IncidentChanges,
    ) -> Result<(), StoreError>;

    // Scope
    async fn affected(&self, id: &IncidentId) -> Result<Vec<AffectedMerchant>, StoreError>;
    async fn affected_merchant(
        &self,
        id: &IncidentId,
        merchant: &MerchantId,
    ) -> Result<Option<AffectedMerchant>, StoreError>;
    async fn set_reachability(
        &self,
        id: &IncidentId,
        merchant: &MerchantId,
        reachability: Reachability,
        channel: Option<Channel>,
    ) -> Result<(), StoreError>;

    // Drafts and notices
    /// Stores a draft and its notices, moving the incident to `drafted`.
    async fn insert_draft(&self, draft: &Draft, notices: &[Notice], from: IncidentState) -> Result<(), StoreError>;
    async fn drafts(&self, incident: &IncidentId) -> Result<Vec<Draft>, StoreError>;
    async fn draft(&self, id: &DraftId) -> Result<Option<Draft>, StoreError>;
    async fn notices(&self, draft: &DraftId) -> Result<Vec<Notice>, StoreError>;
    async fn notice(&self, id: &NoticeId) -> Result<Option<Notice>, StoreError>;
    /// Freezes a draft as approved and moves the incident to `approved`.
    async fn approve_draft(&self, draft: &DraftId, approver: &Actor, at: DateTime<Utc>) -> Result<(), StoreError>;

    // Outbox
    /// Inserts deliveries whose idempotency key is new; returns how many were new.
    async fn enqueue(&self, deliveries: &[NewDelivery]) -> Result<u64, StoreError>;
    /// Claims up to `limit` due deliveries for `lease` (their status becomes `sending`).
    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError>;
    /// Stores an attempt's outcome together with what follows from it for the merchant,
    /// in one transaction, so a crash cannot record a failure and lose the fallback.
    /// Returns `false`, storing nothing, if the delivery's claim is no longer this attempt's
    /// (its lease ran out and another worker took it over).
    async fn record_attempt(
        &self,
        delivery: &Delivery,
        outcome: &AttemptOutcome,
        followup: &Followup,
    ) -> Result<bool, StoreError>;
    async fn deliveries(&self, incident: &IncidentId) -> Result<Vec<Delivery>, StoreError>;
    async fn delivery_tally(&self, incident: &IncidentId) -> Result<Vec<ChannelTally>, StoreError>;
    /// Deliveries not yet final (pending or sending), for any incident if `None`.
    async fn open_deliveries(&self, incident: Option<&IncidentId>) -> Result<u64, StoreError>;
    /// The earliest time a pending delivery becomes due.
    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError>;

    // Bulletins
    async fn bulletins(&self, incident: &IncidentId) -> Result<Vec<Bulletin>, StoreError>;
    async fn insert_bulletin(
        &self,
        bulletin: &Bulletin,
        covered: &[MerchantId],
        actor: &Actor,
    ) -> Result<(), StoreError>;
    async fn bulletin_coverage(&self, bulletin: &BulletinId) -> Result<Vec<MerchantId>, StoreError>;

    // Filings
    async fn filings(&self, incident: &IncidentId) -> Result<Vec<Filing>, StoreError>;
    /// Claims the right to submit a filing until `until`; `false` if it was submitted or another
    /// process holds an unexpired claim. Two submitters can then not both send it.
    async fn claim_filing(&self, id: &FilingId, now: DateTime<Utc>, until: DateTime<Utc>) -> Result<bool, StoreError>;
    async fn insert_filing(&self, filing: &Filing, actor: &Actor) -> Result<(), StoreError>;
    async fn mark_filing_submitted(
        &self,
        id: &FilingId,
        at: DateTime<Utc>,
        location: &str,
        actor: &Actor,
    ) -> Result<(), StoreError>;

    // Ledger
    async fn append_ledger(&self, entry: &NewLedgerEntry) -> Result<(), StoreError>;
    /// Entries in order, for one incident or the whole ledger.
    async fn ledger_entries(&self, incident: Option<&IncidentId>) -> Result<Vec<LedgerEntry>, StoreError>;
}

/// Opens the embedded store in `data_dir` (creating it), migrated and ready.
pub async fn open_embedded(data_dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
    Ok(Arc::new(SqliteStore::open(data_dir).await?))
}
