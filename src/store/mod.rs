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

use crate::channels::{ReceiptKey, ReceiptStatus};
use crate::config::LimitSettings;
use crate::domain::*;
use crate::model::*;
use serde::Serialize;

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
}

/// What finishing a scope stores beside the affected rows.
#[derive(Debug, Clone)]
pub struct ScopeResult<'a> {
    pub rule: &'a ScopeRule,
    pub basis: ScopeBasis,
    pub suggestion: &'a GradeSuggestion,
    /// The facts, when scoping changed them (an unexplained grade replaced by the suggestion).
    pub facts: Option<&'a IncidentFacts>,
}

/// The classes of an incident's scope and which merchants fall in each, as the database
/// applies them: the rule selects merchants, a merchant's holdings pick its class.
#[derive(Debug, Clone)]
pub struct ScopeInsert<'a> {
    pub rule: &'a ScopeRule,
    /// Holdings (as stored: a JSON array of category ids) to the class they fall in; merchants
    /// whose holdings are not listed hold none of the exposed categories and are not affected.
    pub holdings_class: &'a [(String, i64)],
    pub classes: &'a [ScopeClass],
    pub channel_order: &'a [Channel],
    /// Classes whose exposure makes the merchant itself (if a natural person or individual
    /// business), an enterprise's representative, its contact persons, its sub-account
    /// employees count as affected people.
    pub person_classes: PersonClasses,
}

#[derive(Debug, Clone, Default)]
pub struct PersonClasses {
    /// The merchant itself, when a natural person or individual business.
    pub merchant: Vec<i64>,
    /// An enterprise's legal representative (by `representative_key`, else the merchant).
    pub representative: Vec<i64>,
    pub contacts: Vec<i64>,
    pub sub_accounts: Vec<i64>,
}

/// What a scope holds: the distinct natural persons and the counts a responder checks.
#[derive(Debug, Clone, Default)]
pub struct ScopeTotals {
    pub natural_persons: u64,
    /// By risk, language, first channel, notice decision and reachability; overrides applied.
    pub counts: Vec<ScopeCount>,
}

/// Writes a new scope in one transaction: the previous one is gone only once `finish` commits;
/// dropping the writer without finishing (a dry run) leaves everything as it was.
#[async_trait]
pub trait ScopeWriter: Send {
    /// The distinct holdings in the directory that include any of `categories`, with how many
    /// merchants hold each: what classification works on (the rule is applied afterwards).
    /// Read inside the scope's transaction, so a merchant imported meanwhile cannot slip
    /// between the classes and the insert.
    async fn holdings(&mut self, categories: &[CategoryId]) -> Result<Vec<(String, i64)>, StoreError>;
    /// Inserts the classes and the affected merchants, and counts them.
    async fn insert(&mut self, scope: &ScopeInsert<'_>) -> Result<ScopeTotals, StoreError>;
    /// Stores the rule and the grade suggestion, moves the incident to `scoped` and commits.
    async fn finish(
        self: Box<Self>,
        from: IncidentState,
        step: Step<'_>,
        result: ScopeResult<'_>,
    ) -> Result<(), StoreError>;
}

/// One group of notices that render alike: a class of exposed categories in one language for
/// recipients in one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariantGroup {
    pub class_no: i64,
    pub locale: Locale,
    pub region: String,
    pub merchants: i64,
}

/// Scope counts by the dimensions a responder checks before notifying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeCount {
    pub risk: RiskLevel,
    pub locale: Locale,
    pub first_channel: Option<Channel>,
    pub notice_required: bool,
    pub reachability: Reachability,
    pub merchants: i64,
}

/// A new draft version and everything frozen with it.
#[derive(Debug, Clone)]
pub struct NewDraft<'a> {
    pub draft: &'a Draft,
    pub inputs: &'a DraftInputs,
    pub template_sources: &'a str,
    pub variants: &'a [DraftVariant],
    pub from: IncidentState,
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
    /// The provider accepted it. With `receipt_due_at` the merchant counts as reached only
    /// when a receipt confirms delivery, and moves on if none comes by then.
    Accepted {
        provider_message_id: Option<String>,
        content_hash: String,
        receipt_due_at: Option<DateTime<Utc>>,
    },
    /// A transient failure: try again at `at`.
    Retry {
        error: String,
        kind: FailureKind,
        at: DateTime<Utc>,
    },
    /// A permanent failure of this channel for this merchant.
    Failed { error: String, kind: FailureKind },
    /// Transient failures used up the attempts: kept as a dead letter for re-driving.
    Dead { error: String, kind: FailureKind },
}

/// What an attempt's or receipt's outcome means for the merchant.
#[derive(Debug, Clone)]
pub enum Followup {
    /// Nothing changes (a retry is scheduled, or a receipt is awaited).
    Nothing,
    /// The merchant was reached on the delivery's channel.
    Reached,
    /// The channel failed for good: queue the next channel of the plan.
    Fallback(NewDelivery),
    /// The channel failed for good and the plan is exhausted.
    Unreachable,
}

/// One attempt to record: the claimed delivery, the provider used, the outcome and follow-up.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub delivery: Delivery,
    pub provider: String,
    pub outcome: AttemptOutcome,
    pub followup: Followup,
}

/// How a provider fared in a recorded batch, for its circuit breaker.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthUpdate {
    pub provider: String,
    pub successes: u32,
    /// Failures that count against the provider, with the last one's kind.
    pub failures: u32,
    pub last_failure: Option<FailureKind>,
    pub threshold: u32,
    pub cooldown: chrono::Duration,
}

/// How many deliveries of one channel and provider are in one status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeliveryCount {
    pub channel: String,
    /// `None` before the first attempt.
    pub provider: Option<String>,
    pub status: String,
    pub count: i64,
}

/// A provider's circuit-breaker state as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProviderHealth {
    pub provider: String,
    pub consecutive_failures: i64,
    pub open_until: Option<DateTime<Utc>>,
    pub last_failure_at: Option<DateTime<Utc>>,
    pub last_error_kind: Option<String>,
}

/// A claim for one provider of one channel, within the provider's limits.
#[derive(Debug, Clone)]
pub struct ProviderClaim<'a> {
    pub channel: Channel,
    pub provider: &'a str,
    pub want: u32,
    pub limits: &'a LimitSettings,
    pub now: DateTime<Utc>,
    pub lease_until: DateTime<Utc>,
}

/// What a claim got, and when the provider's limits let more through if they held some back.
#[derive(Debug, Clone, Default)]
pub struct Claimed {
    pub deliveries: Vec<Delivery>,
    pub limited_until: Option<DateTime<Utc>>,
}

/// Which dead letters (or deliveries) a command means.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeliveryFilter {
    pub incident: Option<IncidentId>,
    pub channel: Option<Channel>,
    pub provider: Option<String>,
    /// `transient`, `permanent`, or a failure kind such as `network` or `throttled`.
    pub error_class: Option<String>,
}

/// One entry of a delivery's history: an attempt, a receipt, a re-drive.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeliveryEvent {
    pub delivery_id: String,
    pub at: DateTime<Utc>,
    pub event: String,
    pub attempt: i64,
    pub provider: Option<String>,
    pub outcome: String,
    pub error_kind: Option<String>,
    pub detail: Option<String>,
}

#[async_trait]
pub trait Store: Send + Sync {
    // Directory
    async fn upsert_merchants(&self, merchants: &[Merchant]) -> Result<UpsertCounts, StoreError>;
    async fn merchants(&self) -> Result<Vec<Merchant>, StoreError>;
    /// Merchants in id order after `after`, at most `limit`: large directories are read in pages.
    async fn merchants_page(&self, after: Option<&MerchantId>, limit: u32) -> Result<Vec<Merchant>, StoreError>;
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
    /// The holdings of an incident's cohort (its affected merchants), for reclassifying it.
    async fn cohort_holdings(&self, id: &IncidentId) -> Result<Vec<(String, i64)>, StoreError>;
    /// Puts the same cohort into new classes (after the facts they depend on changed).
    async fn reclassify(
        &self,
        id: &IncidentId,
        holdings_class: &[(String, i64)],
        classes: &[ScopeClass],
        basis: &ScopeBasis,
        actor: &Actor,
    ) -> Result<(), StoreError>;
    /// Merchant ids the rule names that the directory does not hold.
    async fn unknown_merchants(&self, ids: &[MerchantId]) -> Result<Vec<MerchantId>, StoreError>;
    /// Starts replacing the incident's scope (see [`ScopeWriter`]).
    async fn begin_scope(&self, id: &IncidentId) -> Result<Box<dyn ScopeWriter>, StoreError>;
    async fn scope_classes(&self, id: &IncidentId) -> Result<Vec<ScopeClass>, StoreError>;
    async fn scope_counts(&self, id: &IncidentId) -> Result<Vec<ScopeCount>, StoreError>;
    /// Records a responder's decision on notifying one merchant (kept across re-scoping).
    async fn set_notice_override(&self, id: &IncidentId, o: &NoticeOverride) -> Result<(), StoreError>;
    async fn notice_overrides(&self, id: &IncidentId) -> Result<Vec<NoticeOverride>, StoreError>;
    /// Every affected merchant, with its class and any override applied.
    async fn affected(&self, id: &IncidentId) -> Result<Vec<AffectedMerchant>, StoreError>;
    /// Affected merchants in merchant order after `after`, with their class (exposure, risk and
    /// its reasons) and notice decision; only those with the given decision if set.
    async fn affected_page(
        &self,
        id: &IncidentId,
        after: Option<&MerchantId>,
        limit: u32,
        notice_required: Option<bool>,
    ) -> Result<Vec<AffectedMerchant>, StoreError>;
    /// Affected merchants in one reachability state (the bulletin covers the unreachable).
    async fn affected_ids(&self, id: &IncidentId, reachability: Reachability) -> Result<Vec<MerchantId>, StoreError>;
    /// The salt of the lookup's client hashes (made with the database).
    async fn lookup_salt(&self) -> Result<String, StoreError>;
    /// Lookups by `client` since `since` (for its rate limit).
    async fn lookups_since(&self, client: &str, since: DateTime<Utc>) -> Result<u64, StoreError>;
    async fn record_lookup(&self, l: &Lookup) -> Result<(), StoreError>;
    /// The lookups made on an incident's bulletin, newest first.
    async fn lookups(&self, reference: &str) -> Result<Vec<Lookup>, StoreError>;
    /// Stores reminders not stored yet (a row already there for the same clock, point and
    /// recipient is kept as it is); returns how many were new.
    async fn add_reminders(&self, reminders: &[ClockReminder], at: DateTime<Utc>) -> Result<u64, StoreError>;
    /// Reminders stored but not yet sent, oldest first.
    async fn pending_reminders(&self) -> Result<Vec<ClockReminder>, StoreError>;
    /// Records a send: `Ok(at)` marks the reminder sent, `Err(reason)` counts a failed attempt.
    async fn finish_reminder(
        &self,
        r: &ClockReminder,
        outcome: Result<DateTime<Utc>, String>,
    ) -> Result<(), StoreError>;
    /// Every reminder of an incident, in the order stored.
    async fn reminders(&self, id: &IncidentId) -> Result<Vec<ClockReminder>, StoreError>;
    /// The affected merchants who must be notified (whatever their reachability).
    async fn affected_ids_requiring_notice(&self, id: &IncidentId) -> Result<Vec<MerchantId>, StoreError>;
    /// The distinct regions of an incident's affected merchants (what regulators' triggers test).
    async fn affected_regions(&self, id: &IncidentId) -> Result<Vec<String>, StoreError>;
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
    /// The notice groups of the merchants that must be notified (overrides applied).
    async fn variant_groups(&self, id: &IncidentId) -> Result<Vec<VariantGroup>, StoreError>;
    /// Stores a draft version with its frozen inputs and one notice per merchant that must be
    /// notified, queues each notice's first delivery as `held` (released by dispatch after
    /// approval), supersedes the held deliveries of earlier unapproved versions, and moves the
    /// incident to `drafted`. Returns the number of notices.
    async fn create_draft(&self, new: NewDraft<'_>) -> Result<i64, StoreError>;
    async fn drafts(&self, incident: &IncidentId) -> Result<Vec<Draft>, StoreError>;
    async fn draft(&self, id: &DraftId) -> Result<Option<Draft>, StoreError>;
    async fn draft_inputs(&self, id: &DraftId) -> Result<Option<DraftInputs>, StoreError>;
    async fn draft_variants(&self, id: &DraftId) -> Result<Vec<DraftVariant>, StoreError>;
    /// Template sources (JSON object) by content hash.
    async fn template_set(&self, hash: &str) -> Result<Option<String>, StoreError>;
    /// A draft's notices in merchant order after `after`, at most `limit`.
    async fn notice_records(
        &self,
        draft: &DraftId,
        after: Option<&MerchantId>,
        limit: u32,
    ) -> Result<Vec<NoticeRecord>, StoreError>;
    /// The records of several notices at once (the send path reads a claimed batch in one go).
    async fn notice_records_by_id(&self, ids: &[NoticeId]) -> Result<Vec<NoticeRecord>, StoreError>;
    async fn notice_record(&self, id: &NoticeId) -> Result<Option<NoticeRecord>, StoreError>;
    async fn notice_for(&self, draft: &DraftId, merchant: &MerchantId) -> Result<Option<NoticeRecord>, StoreError>;
    async fn notice_by_token(&self, token: &str) -> Result<Option<NoticeRecord>, StoreError>;
    /// When a draft's notices were first sent, if any was.
    async fn first_sent(&self, draft: &DraftId) -> Result<Option<DateTime<Utc>>, StoreError>;
    /// Freezes a draft as approved and moves the incident to `approved`.
    async fn approve_draft(&self, draft: &DraftId, approver: &Actor, at: DateTime<Utc>) -> Result<(), StoreError>;

    // Outbox
    /// Releases an approved draft's held deliveries, supersedes still-open deliveries of earlier
    /// versions (an update replaces what was not yet sent), records merchants without a delivery
    /// as unreachable and those not to be notified as such, and moves the incident from `from`
    /// to `notifying`. Returns how many deliveries were released.
    async fn release_draft(
        &self,
        incident: &IncidentId,
        draft: &DraftId,
        from: IncidentState,
        actor: &Actor,
    ) -> Result<u64, StoreError>;
    /// Inserts deliveries whose idempotency key is new; returns how many were new.
    async fn enqueue(&self, deliveries: &[NewDelivery]) -> Result<u64, StoreError>;
    /// Claims up to `claim.want` due deliveries of a channel for one provider, as many as the
    /// provider's limits allow (token bucket, sliding window, in flight across all instances);
    /// their status becomes `sending` until `lease_until`. Rows whose lease ran out (a worker
    /// died mid-send) are taken over.
    async fn claim_for_provider(&self, claim: &ProviderClaim<'_>) -> Result<Claimed, StoreError>;
    /// Stores a batch of attempts' outcomes with what follows from each for its merchant, the
    /// attempt history, the ledger entries and the providers' health, in one transaction, so a
    /// crash cannot record a failure and lose the fallback. Returns, per record, `false` if its
    /// claim was no longer this attempt's (its lease ran out and another worker took it over):
    /// nothing was stored for it.
    async fn record_attempts(
        &self,
        records: &[AttemptRecord],
        health: &[HealthUpdate],
    ) -> Result<Vec<bool>, StoreError>;
    /// Puts claimed deliveries that were never sent back in the outbox as they were (a worker
    /// stopping); returns how many were still this claim's.
    async fn release_claims(&self, deliveries: &[Delivery]) -> Result<u64, StoreError>;
    /// Circuit-breaker state of every provider that has any.
    async fn provider_health(&self) -> Result<Vec<ProviderHealth>, StoreError>;
    /// The delivery a receipt refers to (by provider message id, or by our delivery id), among
    /// those last sent through one of `providers`: a provider's callback can only speak for
    /// its own messages.
    async fn delivery_for_receipt(&self, key: &ReceiptKey, providers: &[&str]) -> Result<Option<Delivery>, StoreError>;
    /// Stores a receipt: `Delivered` confirms (the merchant is reached), `Failed` ends the
    /// channel with `followup`, `InProgress` is only recorded. Returns `false` if the receipt
    /// changes nothing (a repeat, or a delivery no longer waiting for it).
    async fn record_receipt(
        &self,
        delivery: &Delivery,
        status: ReceiptStatus,
        detail: &str,
        followup: &Followup,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// Accepted deliveries whose receipt window closed without a receipt.
    async fn receipts_overdue(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Delivery>, StoreError>;
    /// The channels a merchant already has a delivery of this notice version on.
    async fn version_channels(&self, draft: &DraftId, merchant: &MerchantId) -> Result<Vec<Channel>, StoreError>;
    /// Dead letters matching `filter`, in id order after `after`.
    async fn dead_letters(
        &self,
        filter: &DeliveryFilter,
        after: Option<&DeliveryId>,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError>;
    /// Puts the dead letters matching `filter` back in the outbox with fresh attempts; returns
    /// how many. Recorded in the ledger with the filter and the actor.
    async fn redrive(&self, filter: &DeliveryFilter, actor: &Actor, now: DateTime<Utc>) -> Result<u64, StoreError>;
    /// A delivery's history of attempts and receipts.
    async fn delivery_events(&self, delivery: &DeliveryId) -> Result<Vec<DeliveryEvent>, StoreError>;
    async fn delivery(&self, id: &DeliveryId) -> Result<Option<Delivery>, StoreError>;
    async fn deliveries(&self, incident: &IncidentId) -> Result<Vec<Delivery>, StoreError>;
    /// An incident's deliveries in id order after `after`.
    async fn deliveries_page(
        &self,
        incident: &IncidentId,
        after: Option<&DeliveryId>,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError>;
    async fn delivery_tally(&self, incident: &IncidentId) -> Result<Vec<ChannelTally>, StoreError>;
    /// Every delivery counted by channel, provider (of the latest attempt) and status.
    async fn delivery_counts(&self) -> Result<Vec<DeliveryCount>, StoreError>;
    /// A round trip to the database, for readiness checks.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Deliveries not yet final (pending or sending), for any incident if `None`.
    async fn open_deliveries(&self, incident: Option<&IncidentId>) -> Result<u64, StoreError>;
    /// Accepted deliveries still waiting for their receipt: the incident is not settled yet.
    async fn awaiting_receipts(&self, incident: &IncidentId) -> Result<u64, StoreError>;
    /// The earliest time a pending delivery becomes due.
    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError>;

    // Bulletins
    async fn bulletins(&self, incident: &IncidentId) -> Result<Vec<Bulletin>, StoreError>;
    /// Records that the external status page took a bulletin version.
    async fn mark_bulletin_pushed(&self, id: &BulletinId, at: DateTime<Utc>) -> Result<(), StoreError>;
    async fn insert_bulletin(
        &self,
        bulletin: &Bulletin,
        covered: &[MerchantId],
        actor: &Actor,
    ) -> Result<(), StoreError>;
    async fn bulletin_coverage(&self, bulletin: &BulletinId) -> Result<Vec<MerchantId>, StoreError>;

    // API tokens
    /// Stores a new token by its hash (the token itself is never stored), with a ledger entry.
    async fn insert_token(&self, token: &crate::auth::ApiToken, hash: &str) -> Result<(), StoreError>;
    async fn token_by_hash(&self, hash: &str) -> Result<Option<crate::auth::ApiToken>, StoreError>;
    async fn tokens(&self) -> Result<Vec<crate::auth::ApiToken>, StoreError>;
    /// Revokes a token (kept, for the record), with a ledger entry; revoking again changes nothing.
    async fn revoke_token(&self, id: &TokenId, by: &Actor, at: DateTime<Utc>) -> Result<(), StoreError>;

    // Filings
    async fn filings(&self, incident: &IncidentId) -> Result<Vec<Filing>, StoreError>;
    async fn filing(&self, id: &FilingId) -> Result<Option<Filing>, StoreError>;
    /// Claims the right to submit an approved filing until `until`; `false` if it was submitted
    /// or another process holds an unexpired claim. Two submitters can then not both send it.
    async fn claim_filing(&self, id: &FilingId, now: DateTime<Utc>, until: DateTime<Utc>) -> Result<bool, StoreError>;
    async fn insert_filing(&self, filing: &Filing, actor: &Actor) -> Result<(), StoreError>;
    /// Replaces a draft's content, deadline, authors and written fields (a redraft, or a field a
    /// responder wrote), if it still holds `expected_hash` and is neither approved nor submitted.
    async fn revise_filing(
        &self,
        revised: &Filing,
        expected_hash: &str,
        actor: &Actor,
        why: &str,
    ) -> Result<(), StoreError>;
    /// Records a second person's approval of the content with `content_hash`.
    async fn approve_filing(
        &self,
        id: &FilingId,
        content_hash: &str,
        approver: &Actor,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Records a submission attempt and its outcome, and releases the claim.
    async fn record_filing_attempt(
        &self,
        attempt: &FilingSubmission,
        outcome: &FilingOutcome,
    ) -> Result<(), StoreError>;
    /// Records the regulator's reference number for a filing a person submitted (on a portal):
    /// it counts as submitted at `filed_at` and acknowledged by the reference.
    async fn record_filing_reference(
        &self,
        id: &FilingId,
        reference: &str,
        filed_at: DateTime<Utc>,
        actor: &Actor,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Records the regulator's acknowledgement of a submitted filing.
    async fn acknowledge_filing(
        &self,
        id: &FilingId,
        reference: Option<&str>,
        text: &str,
        actor: &Actor,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    async fn filing_submissions(&self, id: &FilingId) -> Result<Vec<FilingSubmission>, StoreError>;

    /// Housekeeping the database needs from time to time (SQLite: copying the write-ahead log
    /// back into the database file, which large commits leave to this instead of doing inline).
    async fn checkpoint(&self) -> Result<(), StoreError>;

    // Ledger
    async fn append_ledger(&self, entry: &NewLedgerEntry) -> Result<(), StoreError>;
    /// Entries in order, for one incident or the whole ledger.
    async fn ledger_entries(&self, incident: Option<&IncidentId>) -> Result<Vec<LedgerEntry>, StoreError>;
}

/// Opens the embedded store in `data_dir` (creating it), migrated and ready.
pub async fn open_embedded(data_dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
    Ok(Arc::new(SqliteStore::open(data_dir).await?))
}
