//! The entities of the flow as the stages see them. Storage maps rows to these and back;
//! nothing here knows about SQL.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::*;

/// A merchant of the platform's directory, with the contacts notices go to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Merchant {
    pub id: MerchantId,
    pub name: String,
    pub kind: MerchantKind,
    pub locale: Locale,
    pub region: String,
    pub email: Option<EmailAddress>,
    pub phone: Option<PhoneNumber>,
    pub push_token: Option<PushToken>,
    pub postal_address: Option<String>,
    /// Data categories the platform holds about this merchant.
    pub holdings: BTreeSet<CategoryId>,
    pub created_at: Option<DateTime<Utc>>,
    /// When the merchant last used the platform (for scoping by activity window).
    pub last_active_at: Option<DateTime<Utc>>,
    pub marketing_opt_out: bool,
    /// The natural persons whose data the platform holds for this merchant, by opaque key.
    pub people: People,
}

/// Natural persons behind a merchant record, identified by opaque keys (for example a hash of
/// their ID number) so that the same person behind several shops is counted once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct People {
    /// The person a natural-person or individual-business merchant is (defaults to the merchant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub representative: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contacts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sub_accounts: Vec<String>,
}

impl Merchant {
    /// The address of this merchant on `channel`, if it has one.
    pub fn address(&self, channel: Channel) -> Option<String> {
        match channel {
            Channel::Email => self.email.as_ref().map(|e| e.as_str().to_owned()),
            Channel::Sms => self.phone.as_ref().map(|p| p.as_str().to_owned()),
            Channel::Push => self.push_token.as_ref().map(|t| t.as_str().to_owned()),
        }
    }
}

/// A security event as parsed at the edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecurityEvent {
    pub source: String,
    pub external_id: String,
    pub kind: IncidentKind,
    pub severity: Severity,
    pub title: String,
    pub description: Option<String>,
    pub detected_at: DateTime<Utc>,
    pub occurred_at: Option<DateTime<Utc>>,
    pub correlation_key: Option<String>,
    pub categories: Vec<CategoryId>,
    pub merchant_ids: Vec<MerchantId>,
    pub attributes: serde_json::Value,
}

/// What a responder knows and confirms about an incident: the facts every notice and filing
/// is drafted from. Text fields are written in each notice language.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentFacts {
    pub grade: Grade,
    #[serde(default)]
    pub grade_reason: LocalizedText,
    pub kind: IncidentKind,
    pub categories: Vec<CategoryId>,
    pub occurred_at: Option<DateTime<Utc>>,
    pub aware_at: DateTime<Utc>,
    pub contained_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub affected_system: LocalizedText,
    #[serde(default)]
    pub location: LocalizedText,
    #[serde(default)]
    pub what_happened: LocalizedText,
    #[serde(default)]
    pub impact: LocalizedText,
    #[serde(default)]
    pub cause: LocalizedText,
    #[serde(default)]
    pub measures_taken: LocalizedText,
    #[serde(default)]
    pub measures_planned: LocalizedText,
    #[serde(default)]
    pub remedies: LocalizedText,
    #[serde(default)]
    pub harm_so_far: LocalizedText,
    #[serde(default)]
    pub trend: LocalizedText,
    #[serde(default)]
    pub attacker_leads: LocalizedText,
    #[serde(default)]
    pub evidence_preservation: LocalizedText,
    #[serde(default)]
    pub support_requested: LocalizedText,
    #[serde(default)]
    pub ransom: LocalizedText,
    #[serde(default)]
    pub other: LocalizedText,
    /// Measures that reduce or avoid harm, as the classification rules know them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mitigations: Vec<crate::classify::AppliedMitigation>,
    /// Who merchants should contact about this incident, if not the configured officer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact: Option<IncidentContact>,
}

/// A contact given for one incident; each part left out falls back to the configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentContact {
    #[serde(default)]
    pub officer: LocalizedText,
    #[serde(default)]
    pub email: Option<EmailAddress>,
    #[serde(default)]
    pub phone: Option<String>,
}

/// Which merchants an incident affects. Every given criterion must hold (AND); `any_of` holds
/// when at least one of its rules does (OR) and `except` removes the merchants any of its rules
/// select (NOT). A merchant is affected only if it also holds at least one of the incident's
/// exposed categories.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merchant_ids: Vec<MerchantId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub any_categories: Vec<CategoryId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_after: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_before: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_after: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_before: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub any_of: Vec<ScopeRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<ScopeRule>,
}

/// The grade the natural-person count suggests, kept beside the responder's grade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GradeSuggestion {
    pub natural_persons: u64,
    pub grade: Grade,
    pub basis: String,
    pub at: DateTime<Utc>,
}

/// The facts a classification depends on: when they change, the classes must be recomputed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeBasis {
    pub categories: Vec<CategoryId>,
    pub kind: IncidentKind,
    pub mitigations: Vec<crate::classify::AppliedMitigation>,
}

impl ScopeBasis {
    pub fn of(facts: &IncidentFacts) -> Self {
        let mut categories = facts.categories.clone();
        categories.sort();
        categories.dedup();
        Self {
            categories,
            kind: facts.kind,
            mitigations: facts.mitigations.clone(),
        }
    }
}

/// One classification shared by every affected merchant with the same exposed categories.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeClass {
    pub class_no: i64,
    pub exposed: Vec<CategoryId>,
    pub risk: RiskLevel,
    pub risk_reasons: Vec<String>,
    pub notice_required: bool,
    pub notice_reason: String,
    pub merchants: i64,
}

/// A responder's decision on whether one merchant must be notified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NoticeOverride {
    pub merchant_id: MerchantId,
    pub required: bool,
    pub reason: String,
    pub actor: Actor,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Incident {
    pub id: IncidentId,
    pub reference: String,
    pub state: IncidentState,
    pub title: String,
    pub kind: IncidentKind,
    pub severity: Severity,
    pub correlation_key: Option<String>,
    pub facts: Option<IncidentFacts>,
    pub scope_rule: Option<ScopeRule>,
    /// The grade suggested by the count of natural persons at the last scoping.
    pub grade_suggestion: Option<GradeSuggestion>,
    /// What the scope's classes were computed from (see [`ScopeBasis`]).
    pub scope_basis: Option<ScopeBasis>,
    /// The earliest detection time among the incident's events.
    pub detected_at: DateTime<Utc>,
    pub opened_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One step of an incident's life, with who took it and when.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transition {
    pub from_state: Option<IncidentState>,
    pub to_state: IncidentState,
    pub actor: Actor,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// The classification of one affected merchant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AffectedMerchant {
    pub incident_id: IncidentId,
    pub merchant_id: MerchantId,
    pub class_no: i64,
    pub region: String,
    pub exposed: Vec<CategoryId>,
    pub risk: RiskLevel,
    pub risk_reasons: Vec<String>,
    pub notice_required: bool,
    pub notice_reason: String,
    pub channel_plan: Vec<Channel>,
    pub locale: Locale,
    pub reachability: Reachability,
    pub reached_channel: Option<Channel>,
}

/// Where a notice version stands in the four-eyes process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DraftState {
    Drafted,
    Approved,
}

/// One version of an incident's notice, covering every affected merchant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Draft {
    pub id: DraftId,
    pub incident_id: IncidentId,
    pub version: i64,
    pub state: DraftState,
    /// SHA-256 over every notice's content hash in merchant order: what the approver approved.
    pub content_hash: String,
    pub drafted_by: Actor,
    pub drafted_at: DateTime<Utc>,
    pub approved_by: Option<Actor>,
    pub approved_at: Option<DateTime<Utc>>,
    pub notice_count: i64,
}

/// What an earlier version said, for an update or correction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateOf {
    pub previous_version: i64,
    /// When the earlier version was first sent (its approval time if nothing was sent yet).
    pub previous_sent_at: DateTime<Utc>,
    /// Whether any of the earlier version was sent; if not, this version replaces it unseen.
    #[serde(default = "yes")]
    pub previous_sent: bool,
    pub changes: LocalizedText,
}

fn yes() -> bool {
    true
}

/// Everything one draft version's notices are rendered from, frozen when it is drafted, so
/// the exact text each merchant received can be reproduced without storing a copy per merchant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DraftInputs {
    pub version: i64,
    pub facts: IncidentFacts,
    pub settings: crate::draft::NoticeSettings,
    pub template_set: String,
    pub classes: Vec<ScopeClass>,
    pub update: Option<UpdateOf>,
    pub reference: String,
    pub detected_at: DateTime<Utc>,
    pub drafted_at: DateTime<Utc>,
    /// Labels of the exposed categories, as they read when drafted.
    pub labels: std::collections::BTreeMap<CategoryId, crate::draft::LabelPair>,
}

/// One notice variant the completeness check rendered: a class of exposed categories in one
/// language under one set of legal profiles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DraftVariant {
    pub variant_no: i64,
    pub class_no: i64,
    pub locale: Locale,
    pub profiles: String,
    pub merchants: i64,
    pub sample_hash: String,
}

/// A merchant's notice in one draft version, as stored: enough to reproduce its text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NoticeRecord {
    pub id: NoticeId,
    pub draft_id: DraftId,
    pub merchant_id: MerchantId,
    pub class_no: i64,
    pub locale: Locale,
    pub region: String,
    pub merchant_name: String,
    pub merchant_kind: MerchantKind,
    /// Opens the merchant's own notice page; as secret as the notice itself.
    #[serde(skip)]
    pub link_token: String,
    /// Renderings stored whole by the first schema, before drafts were frozen.
    #[serde(skip)]
    pub legacy: Option<serde_json::Value>,
}

/// The five required elements of a notice, as rendered text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoticeSections {
    pub impact: String,
    pub measures: String,
    pub advice: String,
    pub remedies: String,
    pub contact: String,
}

impl NoticeSections {
    /// The sections with their names, in the order a notice presents them.
    pub fn named(&self) -> [(&'static str, &str); 5] {
        [
            ("impact", &self.impact),
            ("measures", &self.measures),
            ("advice", &self.advice),
            ("remedies", &self.remedies),
            ("contact", &self.contact),
        ]
    }
}

/// The rendered notice for one merchant in one draft version, for every channel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notice {
    pub id: NoticeId,
    pub draft_id: DraftId,
    pub merchant_id: MerchantId,
    pub locale: Locale,
    /// The merchant's own page with the full notice (SMS and push link here).
    pub url: String,
    pub sections: NoticeSections,
    pub email_subject: String,
    pub email_text: String,
    pub email_html: String,
    pub sms_text: String,
    pub push_title: String,
    pub push_body: String,
    pub letter_html: String,
    pub content_hash: String,
}

/// How a failed attempt should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    Transient,
    Permanent,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// Why a send or a delivery failed. The kind decides whether to retry (transient) or move on
/// (permanent), and whether it counts against the provider's health (circuit breaker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Could not connect, connection reset, TLS failure.
    Network,
    /// No answer in time.
    Timeout,
    /// The provider asked us to slow down (HTTP 429, SMTP 421/450-452 rate answers).
    Throttled,
    /// The provider failed (HTTP 5xx, SMTP 4xx).
    ProviderError,
    /// Our credentials or configuration were refused (HTTP 401/403, SMTP 530/535): retried,
    /// so fixing the configuration delivers; counts against the provider so the next is used.
    Auth,
    /// The recipient or the message was refused (invalid address or number, SMTP 550-554,
    /// other HTTP 4xx).
    Rejected,
    /// The push token is no longer registered (FCM UNREGISTERED, APNs 410).
    Unregistered,
    /// The message bounced after acceptance (a delivery status notification said failed).
    Bounced,
    /// The provider reported the message undelivered (Twilio `undelivered`/`failed`, Aliyun
    /// report with success=false).
    Undelivered,
    /// No delivery receipt arrived within the channel's receipt window.
    NoReceipt,
}

impl FailureKind {
    pub fn class(self) -> ErrorClass {
        match self {
            Self::Network | Self::Timeout | Self::Throttled | Self::ProviderError | Self::Auth => ErrorClass::Transient,
            Self::Rejected | Self::Unregistered | Self::Bounced | Self::Undelivered | Self::NoReceipt => {
                ErrorClass::Permanent
            }
        }
    }

    /// Failures that say the provider is unwell (not the recipient): they trip its breaker.
    pub fn counts_against_provider(self) -> bool {
        matches!(
            self,
            Self::Network | Self::Timeout | Self::Throttled | Self::ProviderError | Self::Auth
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Network => "network",
            Self::Timeout => "timeout",
            Self::Throttled => "throttled",
            Self::ProviderError => "provider_error",
            Self::Auth => "auth",
            Self::Rejected => "rejected",
            Self::Unregistered => "unregistered",
            Self::Bounced => "bounced",
            Self::Undelivered => "undelivered",
            Self::NoReceipt => "no_receipt",
        }
    }

    pub const ALL: [FailureKind; 10] = [
        Self::Network,
        Self::Timeout,
        Self::Throttled,
        Self::ProviderError,
        Self::Auth,
        Self::Rejected,
        Self::Unregistered,
        Self::Bounced,
        Self::Undelivered,
        Self::NoReceipt,
    ];
}

impl std::str::FromStr for FailureKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
            format!("unknown failure kind {s:?}; expected one of {}", names.join(", "))
        })
    }
}

/// One outbox row: a notice version to one merchant on one channel at one address.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivery {
    pub id: DeliveryId,
    pub idempotency_key: String,
    pub incident_id: IncidentId,
    pub draft_id: DraftId,
    pub notice_id: NoticeId,
    pub merchant_id: MerchantId,
    pub channel: Channel,
    pub address: String,
    pub plan_position: i64,
    pub status: DeliveryStatus,
    pub attempts: i64,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub error_class: Option<ErrorClass>,
    pub provider_message_id: Option<String>,
    /// Hash of the exact text sent, set when it was sent.
    pub content_hash: Option<String>,
    pub created_at: DateTime<Utc>,
    /// When a provider accepted it.
    pub sent_at: Option<DateTime<Utc>>,
    /// The provider of the latest attempt (a configured provider name).
    pub provider: Option<String>,
    pub error_kind: Option<FailureKind>,
    /// When a receipt confirmed delivery.
    pub delivered_at: Option<DateTime<Utc>>,
    /// Accepted and waiting for a receipt until then; no receipt by then moves the merchant on.
    pub receipt_due_at: Option<DateTime<Utc>>,
}

impl Delivery {
    /// The key that makes a send idempotent: one per notice version, merchant and channel.
    pub fn key_for(draft: &DraftId, merchant: &MerchantId, channel: Channel) -> String {
        format!("{draft}:{merchant}:{channel}")
    }
}

/// Delivery counts of an incident for one channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChannelTally {
    pub channel: String,
    /// Accepted by a provider (including those since confirmed delivered).
    pub sent: i64,
    /// Confirmed delivered by a receipt.
    pub delivered: i64,
    /// Failed for good (refused, bounced, undelivered, no receipt).
    pub failed: i64,
    /// Dead-lettered after the configured attempts: `tocsin deliveries redrive` sends them again.
    pub dead: i64,
    pub pending: i64,
}

/// A published version of an incident's public bulletin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bulletin {
    pub id: BulletinId,
    pub incident_id: IncidentId,
    pub version: i64,
    pub reason: String,
    pub summary: String,
    pub content_hash: String,
    pub published_at: DateTime<Utc>,
    pub covered: i64,
    /// When the external status page took this version (`None`: not yet, or none configured).
    pub status_pushed_at: Option<DateTime<Utc>>,
}

/// One "am I affected?" lookup, as logged: no merchant id, no second factor, the client as a
/// salted hash of its address.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lookup {
    pub at: DateTime<Utc>,
    pub reference: String,
    pub client: String,
    /// `affected`, `not_affected`, `unverified` or `limited`.
    pub outcome: String,
}

/// One reminder (or escalation) of a regulator clock to one recipient; see [`crate::watchdog`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClockReminder {
    pub incident_id: String,
    pub regulator: String,
    pub stage: String,
    pub due_at: DateTime<Utc>,
    /// `before:2h`, `overdue`.
    pub point: String,
    /// A responder's email address or phone number; empty for a skipped point.
    pub recipient: String,
    /// `email`, `sms`, or empty for a skipped point.
    pub channel: String,
    pub text: String,
    /// `pending`, `sent` or `skipped`.
    pub status: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
}

impl ClockReminder {
    /// The reminder's identity, carried as its idempotency key (Message-ID, Idempotency-Key).
    pub fn key(&self) -> String {
        format!(
            "reminder:{}:{}:{}:{}:{}:{}",
            self.incident_id,
            self.regulator,
            self.stage,
            crate::time::fmt_ts(self.due_at),
            self.point,
            self.recipient
        )
    }
}

/// A regulator filing of one stage for one incident.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Filing {
    pub id: FilingId,
    pub incident_id: IncidentId,
    pub regulator: String,
    pub stage: String,
    /// The report as drafted: `items`, and `missing` (required fields without a value).
    pub content: serde_json::Value,
    pub content_hash: String,
    /// `None` for a stage without a fixed clock (the CAC's updates, GDPR's phased information).
    pub deadline_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// When the regulator had it: its clock stops here.
    pub submitted_at: Option<DateTime<Utc>>,
    /// `email`, `https` or `portal`.
    pub transport: String,
    pub location: Option<String>,
    /// Everyone who drafted it or wrote into it: none of them may approve it.
    pub authors: Vec<Actor>,
    /// Fields a responder wrote (the summary report's lessons...), by field name.
    pub written: std::collections::BTreeMap<String, String>,
    pub approved_by: Option<Actor>,
    pub approved_at: Option<DateTime<Utc>>,
    /// For a portal filing: when its document was produced for a person to file.
    pub document_at: Option<DateTime<Utc>>,
    pub reference_number: Option<String>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub acknowledgement: Option<String>,
    pub last_error: Option<String>,
}

/// Where a filing is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FilingState {
    /// Required fields are still missing.
    Incomplete,
    /// Complete, waiting for a second person's approval.
    Ready,
    /// Approved, not yet with the regulator.
    Approved,
    /// A portal document was produced; the reference number is not recorded yet.
    AwaitingReference,
    Submitted,
    Acknowledged,
}

impl Filing {
    /// The required fields the draft still lacks (`item 3: 'lessons' (zh-CN)`).
    pub fn missing(&self) -> Vec<String> {
        self.content["missing"]
            .as_array()
            .map(|m| m.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    pub fn state(&self) -> FilingState {
        if self.acknowledged_at.is_some() {
            FilingState::Acknowledged
        } else if self.submitted_at.is_some() {
            FilingState::Submitted
        } else if self.document_at.is_some() {
            FilingState::AwaitingReference
        } else if self.approved_at.is_some() {
            FilingState::Approved
        } else if self.missing().is_empty() {
            FilingState::Ready
        } else {
            FilingState::Incomplete
        }
    }
}

/// How a submission attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum FilingOutcome {
    /// The regulator (its mail server or endpoint) took it; it may have answered with a
    /// reference (an acknowledgement) at once.
    Sent {
        location: String,
        reference: Option<String>,
        acknowledgement: Option<String>,
    },
    /// A document was produced for a person to file on the regulator's portal.
    Document {
        location: String,
    },
    Failed {
        error: String,
    },
}

/// One attempt to submit a filing, or a reference or acknowledgement recorded for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FilingSubmission {
    pub filing_id: FilingId,
    pub at: DateTime<Utc>,
    pub actor: Actor,
    /// `email`, `https`, `portal`, `reference` or `acknowledgement`.
    pub method: String,
    /// The address, endpoint or document path.
    pub target: String,
    /// `sent`, `document`, `failed` or `recorded`.
    pub outcome: String,
    pub detail: String,
}

/// An audit ledger entry before it is chained.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewLedgerEntry {
    pub at: DateTime<Utc>,
    pub actor: Actor,
    pub action: String,
    pub incident_id: Option<IncidentId>,
    /// Facts about the action: ids, counts, hashes. Never personal data.
    pub detail: serde_json::Value,
}

impl NewLedgerEntry {
    pub fn new(actor: &Actor, action: &str, incident: Option<&IncidentId>, detail: serde_json::Value) -> Self {
        Self {
            at: Utc::now(),
            actor: actor.clone(),
            action: action.to_owned(),
            incident_id: incident.cloned(),
            detail,
        }
    }
}

/// A chained audit ledger entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerEntry {
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub incident_id: Option<String>,
    pub detail: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}
