//! The engine: every operation of the flow, for the CLI, the HTTP API and host applications.
//! Each operation checks the incident's state, stores the change (with its ledger entry), and
//! only then acts on the outside world. Operations are idempotent: repeating one that already
//! happened changes nothing and reports what exists.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};

use crate::bulletin::{self, BulletinError};
use crate::channels::{ChannelSet, ChannelSetupError, EmailTransport, Mail, Receipt};
use crate::classify::{ClassifyError, Rules};
use crate::completeness::{NoticeProfiles, ProfileError};
use crate::config::{ConfigError, Settings};
use crate::directory::{self, DirectoryError, ImportReport};
use crate::dispatch::{DispatchError, Dispatcher, StepReport};
use crate::domain::*;
use crate::draft::{self, ChannelLimits, DraftError, NoticeRenderer, NoticeSettings};
use crate::filing::{self, FilingError, RegulatorProfile};
use crate::incident::{self, IncidentError};
use crate::ingest::{self, IngestError};
use crate::model::*;
use crate::scope::{self, ScopeSummary};
use crate::store::{self, DeliveryFilter, IngestOutcome, Store, StoreError};
use crate::taxonomy::{Taxonomy, TaxonomyError};
use crate::templates::{TemplateError, Templates};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Taxonomy(#[from] TaxonomyError),
    #[error(transparent)]
    Classify(#[from] ClassifyError),
    #[error(transparent)]
    Profiles(#[from] ProfileError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Channel(#[from] ChannelSetupError),
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Incident(#[from] IncidentError),
    #[error(transparent)]
    Draft(#[from] DraftError),
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    #[error(transparent)]
    Bulletin(#[from] BulletinError),
    #[error(transparent)]
    Filing(#[from] FilingError),
    /// Input that is well formed JSON but not acceptable; names the field.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("four eyes: {approver} drafted notice version {version} and cannot also approve it")]
    SameActor { approver: String, version: i64 },
    #[error("four eyes: {approver} drafted or wrote into the {regulator} {stage} report and cannot also approve it")]
    FilingAuthor {
        approver: String,
        regulator: String,
        stage: String,
    },
    #[error(transparent)]
    Evidence(#[from] crate::evidence::EvidenceError),
    #[error("submitting the report: {0}")]
    Submission(#[from] crate::submission::SubmissionError),
    /// A provider callback whose signature or token does not check out.
    #[error("{0}")]
    Unauthenticated(String),
}

/// `authors` with `actor` among them.
fn with_author(authors: &[Actor], actor: &Actor) -> Vec<Actor> {
    let mut all = authors.to_vec();
    if !all.contains(actor) {
        all.push(actor.clone());
    }
    all
}

/// Compares two secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    use sha2::Digest;
    let (x, y) = (sha2::Sha256::digest(a.as_bytes()), sha2::Sha256::digest(b.as_bytes()));
    !a.is_empty() && x.iter().zip(y.iter()).fold(0u8, |acc, (p, q)| acc | (p ^ q)) == 0
}

impl EngineError {
    fn wrong_state(incident: &Incident, expected: &str, action: &'static str) -> Self {
        EngineError::Incident(IncidentError::WrongState {
            reference: incident.reference.clone(),
            state: incident.state,
            expected: expected.to_owned(),
            action,
        })
    }
}

/// Where the outputs live inside the data directory.
#[derive(Debug, Clone, Serialize)]
pub struct OutputPaths {
    pub database: PathBuf,
    pub email_outbox: PathBuf,
    pub sms_outbox: PathBuf,
    pub push_outbox: PathBuf,
    pub bulletins: PathBuf,
    pub filings: PathBuf,
    /// Evidence packages exported over the API (kept: what was handed out, and when).
    pub evidence: PathBuf,
}

impl OutputPaths {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            database: data_dir.join("tocsin.db"),
            email_outbox: data_dir.join("outbox").join("email"),
            sms_outbox: data_dir.join("outbox").join("sms"),
            push_outbox: data_dir.join("outbox").join("push"),
            bulletins: data_dir.join("publish").join("bulletins"),
            filings: data_dir.join("filings"),
            evidence: data_dir.join("evidence"),
        }
    }
}

/// The outcome of drafting: the version, and whether it is new.
#[derive(Debug, Clone, Serialize)]
pub struct DraftOutcome {
    pub draft: Draft,
    pub notices: usize,
    pub created: bool,
}

/// The outcome of starting dispatch.
#[derive(Debug, Clone, Serialize)]
pub struct DispatchStart {
    pub draft_id: DraftId,
    pub queued: u64,
    pub unreachable_without_channel: usize,
}

/// Everything about an incident a responder or a summary needs.
#[derive(Debug, Clone, Serialize)]
pub struct IncidentView {
    pub incident: Incident,
    pub transitions: Vec<Transition>,
    pub scope: ScopeSummary,
    pub reached: usize,
    pub unreachable: Vec<MerchantId>,
    pub drafts: Vec<Draft>,
    pub deliveries: Vec<ChannelTally>,
    pub bulletins: Vec<Bulletin>,
    pub filings: Vec<FilingView>,
}

/// Whether one stage of one regulator's report could be filed now.
#[derive(Debug, Clone, Serialize)]
pub struct StageReadiness {
    pub regulator: String,
    pub stage: &'static str,
    /// `email`, `https` or `portal`.
    pub submission: String,
    /// Required fields not given yet (`item 4: 'cause' (zh-CN)`); empty when complete.
    pub missing: Vec<String>,
}

/// One watchdog round: reminders stored, and sent this round.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WatchdogReport {
    /// Reminder rows stored this round (new clock points, recipients and skipped points).
    pub stored: u64,
    pub reminders: u64,
    pub escalations: u64,
    /// Sends that failed this round (kept pending; the next round retries them).
    pub failed: u64,
}

/// A regulator filing as responders see it.
#[derive(Debug, Clone, Serialize)]
pub struct FilingView {
    pub id: FilingId,
    pub regulator: String,
    pub regulator_name: String,
    pub stage: String,
    /// What the regime calls this report, in its language ("初报", "early warning").
    pub stage_label: String,
    pub state: FilingState,
    /// `email`, `https` or `portal`, as the profile (and the settings) say.
    pub transport: String,
    /// `None`: the stage has no fixed clock (or its clock has not started).
    pub deadline_at: Option<DateTime<Utc>>,
    /// Time left on the clock when the view was taken (negative when overdue), in minutes;
    /// `None` once submitted or without a deadline.
    pub minutes_left: Option<i64>,
    /// Required fields the draft still lacks (the summary report's lessons...).
    pub missing: Vec<String>,
    pub content_hash: String,
    pub authors: Vec<Actor>,
    pub written: std::collections::BTreeMap<String, String>,
    pub approved_by: Option<Actor>,
    pub approved_at: Option<DateTime<Utc>>,
    pub document_at: Option<DateTime<Utc>>,
    pub submitted_at: Option<DateTime<Utc>>,
    pub location: Option<String>,
    pub reference_number: Option<String>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub acknowledgement: Option<String>,
    pub last_error: Option<String>,
}

/// One filing with the report itself and every submission attempt.
#[derive(Debug, Clone, Serialize)]
pub struct FilingDetail {
    pub filing: FilingView,
    pub incident_reference: String,
    pub content: Value,
    pub submissions: Vec<FilingSubmission>,
}

/// What drafting did to one report: `drafted` (new), `revised` (the facts or figures changed),
/// `unchanged`, or `frozen` (approved or submitted: left as it is).
#[derive(Debug, Clone, Serialize)]
pub struct FilingDrafted {
    pub change: &'static str,
    pub filing: FilingView,
}

/// A notice as JSON: its sections and every rendering.
#[derive(Debug, Clone, Serialize)]
pub struct NoticeView {
    pub notice: Notice,
    pub incident_reference: String,
    pub draft_version: i64,
}

/// One merchant's notice of one version in every language.
#[derive(Debug, Clone, Serialize)]
pub struct Preview {
    pub incident_reference: String,
    pub merchant_id: MerchantId,
    pub version: i64,
    pub draft_state: DraftState,
    pub merchant_locale: Locale,
    pub notices: Vec<Notice>,
}

/// What changed for one merchant between two versions, rendering by rendering.
#[derive(Debug, Clone, Serialize)]
pub struct NoticeDiff {
    pub merchant_id: MerchantId,
    pub from_version: i64,
    pub to_version: i64,
    /// Unified diffs keyed by rendering (`email_subject`, `email.txt`, `sms`, `push_title`,
    /// `push_body`, `email.html`, `letter.html`), in the merchant's language;
    /// a rendering that did not change is absent.
    pub changes: std::collections::BTreeMap<String, String>,
}

/// A delivery with its attempts and receipts, oldest first.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryHistory {
    pub delivery: Delivery,
    pub events: Vec<store::DeliveryEvent>,
}

/// A configured provider and its circuit breaker.
#[derive(Debug, Clone, Serialize)]
pub struct ProviderStatus {
    pub channel: Channel,
    /// 1 = first choice.
    pub position: usize,
    pub name: String,
    /// closed | open | half_open
    pub breaker: &'static str,
    pub consecutive_failures: i64,
    pub open_until: Option<DateTime<Utc>>,
    pub last_error_kind: Option<String>,
}

/// What a batch of receipts did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReceiptTally {
    pub matched: u64,
    pub changed: u64,
    /// Receipts for no delivery of ours (already forgotten, or not ours).
    pub unmatched: u64,
}

pub struct Tocsin {
    pub settings: Settings,
    pub store: Arc<dyn Store>,
    pub taxonomy: Taxonomy,
    pub templates: Arc<Templates>,
    pub channels: ChannelSet,
    pub paths: OutputPaths,
    pub cac: RegulatorProfile,
    /// Every regulator profile in force (the CAC's among them) and their calendars.
    pub regulators: filing::Regulators,
    pub rules: Rules,
    pub profiles: NoticeProfiles,
    pub renderer: Arc<NoticeRenderer>,
}

/// A rule file from `paths.rules`, if that directory has it.
fn rule_file(dir: Option<&Path>, name: &str) -> Result<Option<String>, EngineError> {
    let Some(path) = dir.map(|d| d.join(name)) else {
        return Ok(None);
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FieldError::new("paths.rules", format!("reading {}: {e}", path.display())).into()),
    }
}

impl Tocsin {
    /// Opens the embedded store in `data_dir` and builds the channels the settings name.
    pub async fn open(settings: Settings, data_dir: &Path) -> Result<Self, EngineError> {
        let store = store::open_embedded(data_dir).await?;
        Self::with_store(settings, data_dir, store)
    }

    /// Builds the engine on a store the host already opened.
    pub fn with_store(settings: Settings, data_dir: &Path, store: Arc<dyn Store>) -> Result<Self, EngineError> {
        let templates = match &settings.paths.templates {
            Some(dir) => Templates::from_dir(dir)?,
            None => Templates::embedded()?,
        };
        let channels = ChannelSet::from_settings(&settings, data_dir)?;
        let rules_dir = settings.paths.rules.as_deref();
        let taxonomy = match rule_file(rules_dir, "categories.toml")? {
            Some(text) => Taxonomy::parse(&text)?,
            None => Taxonomy::builtin()?,
        };
        let rules = match rule_file(rules_dir, "classification.toml")? {
            Some(text) => Rules::parse(&text, &taxonomy)?,
            None => Rules::builtin(&taxonomy)?,
        };
        let profiles = match rule_file(rules_dir, "notice_profiles.toml")? {
            Some(text) => NoticeProfiles::parse(&text)?,
            None => NoticeProfiles::builtin()?,
        };
        let regulators = filing::Regulators::load(rules_dir)?;
        let cac = match regulators.get("cn-cac") {
            Some(p) => p.clone(),
            None => RegulatorProfile::cac()?,
        };
        let templates = Arc::new(templates);
        Ok(Self {
            rules,
            profiles,
            renderer: Arc::new(NoticeRenderer::new(store.clone(), templates.clone())),
            taxonomy,
            templates,
            channels,
            paths: OutputPaths::new(data_dir),
            cac,
            regulators,
            settings,
            store,
        })
    }

    pub fn notice_settings(&self) -> NoticeSettings {
        let s = &self.settings;
        NoticeSettings {
            operator_name: s.operator.name.clone(),
            platform: s.operator.platform.clone(),
            short_name_en: s.operator.short_name_en.clone(),
            short_name_zh: s.operator.short_name_zh.clone(),
            notice_base_url: s.operator.notice_base_url.clone(),
            officer_en: s.contact.officer_en.clone(),
            officer_zh: s.contact.officer_zh.clone(),
            contact_email: s.contact.email.clone(),
            contact_phone: s.contact.phone.clone(),
            public_base_url: s.operator.public_base_url.clone(),
        }
    }

    /// The notice settings for one incident: its own contact, where the facts give one.
    pub fn notice_settings_for(&self, facts: &IncidentFacts) -> NoticeSettings {
        let mut settings = self.notice_settings();
        if let Some(c) = &facts.contact {
            if let Some(officer) = c.officer.get(Locale::En) {
                settings.officer_en = officer.to_owned();
            }
            if let Some(officer) = c.officer.get(Locale::ZhCn) {
                settings.officer_zh = officer.to_owned();
            }
            if let Some(email) = &c.email {
                settings.contact_email = email.to_string();
            }
            if let Some(phone) = c.phone.as_deref().map(str::trim).filter(|p| !p.is_empty()) {
                settings.contact_phone = phone.to_owned();
            }
        }
        settings
    }

    pub fn channel_limits(&self) -> ChannelLimits {
        ChannelLimits {
            sms_max_segments: self.settings.sms.max_segments,
            push_title_max_chars: self.settings.push.title_max_chars,
            push_body_max_chars: self.settings.push.body_max_chars,
        }
    }

    pub fn dispatcher(&self) -> Dispatcher {
        Dispatcher::new(
            self.store.clone(),
            self.renderer.clone(),
            self.channels.clone(),
            self.settings.delivery.clone(),
        )
    }

    pub(crate) async fn incident(&self, id_or_reference: &str) -> Result<Incident, EngineError> {
        self.store
            .incident(id_or_reference)
            .await?
            .ok_or_else(|| EngineError::NotFound {
                what: "incident",
                id: id_or_reference.to_owned(),
            })
    }

    fn facts(incident: &Incident) -> Result<&IncidentFacts, EngineError> {
        incident
            .facts
            .as_ref()
            .ok_or_else(|| EngineError::wrong_state(incident, "confirmed", "use its facts"))
    }

    // ---- directory and events

    pub async fn import_merchants(&self, path: &Path) -> Result<ImportReport, EngineError> {
        Ok(directory::import_file(self.store.as_ref(), path, &self.taxonomy).await?)
    }

    /// Imports merchants from a document: JSON Lines, or CSV with a header row.
    pub async fn import_merchants_text(&self, text: &str, csv: bool) -> Result<ImportReport, EngineError> {
        Ok(directory::import_text(self.store.as_ref(), text, csv, &self.taxonomy).await?)
    }

    /// Parses and stores a document of events (one object, an array, or JSON Lines).
    pub async fn ingest_text(&self, text: &str, actor: &Actor) -> Result<Vec<IngestOutcome>, EngineError> {
        let events = ingest::parse_events(text, &self.taxonomy)?;
        Ok(ingest::ingest(
            self.store.as_ref(),
            &events,
            &self.settings.operator.reference_prefix,
            actor,
        )
        .await?)
    }

    // ---- lifecycle

    /// Confirms an incident in triage with the responder's facts.
    pub async fn confirm(&self, id: &str, facts: &Value, actor: &Actor) -> Result<Incident, EngineError> {
        let incident = self.incident(id).await?;
        let facts = self.parse_facts(facts)?;
        if incident.state != IncidentState::Triage {
            return Err(EngineError::wrong_state(&incident, "in triage", "confirm it"));
        }
        let detail =
            json!({ "grade": facts.grade.as_str(), "kind": facts.kind.as_str(), "categories": facts.categories });
        let reason = format!("confirmed as a {} incident of grade {}", facts.kind, facts.grade);
        self.store
            .transition(
                &incident.id,
                IncidentState::Triage,
                store::Step {
                    to: IncidentState::Confirmed,
                    actor,
                    reason: &reason,
                    detail,
                },
                store::IncidentChanges { facts: Some(facts) },
            )
            .await?;
        self.incident(incident.id.as_str()).await
    }

    fn parse_facts(&self, facts: &Value) -> Result<IncidentFacts, EngineError> {
        let facts = incident::parse_facts(facts, &self.taxonomy)?;
        self.rules.check_mitigations(&facts.mitigations, &self.taxonomy)?;
        Ok(facts)
    }

    /// Replaces the facts of a confirmed incident (new findings, corrections before an update).
    /// Notices already drafted keep the facts they were drafted from.
    pub async fn amend(&self, id: &str, facts: &Value, actor: &Actor, reason: &str) -> Result<Incident, EngineError> {
        let incident = self.incident(id).await?;
        let facts = self.parse_facts(facts)?;
        if matches!(
            incident.state,
            IncidentState::Triage | IncidentState::Closed | IncidentState::Dismissed
        ) {
            return Err(EngineError::wrong_state(
                &incident,
                "confirmed and open",
                "amend its facts",
            ));
        }
        if reason.trim().is_empty() {
            return Err(FieldError::new("reason", "say why the facts change").into());
        }
        let detail =
            json!({ "grade": facts.grade.as_str(), "kind": facts.kind.as_str(), "categories": facts.categories });
        self.replace_facts(&incident, facts, actor, &format!("facts amended: {reason}"), detail)
            .await
    }

    /// Stores new facts without a change of state, recorded in the timeline and the ledger.
    async fn replace_facts(
        &self,
        incident: &Incident,
        facts: IncidentFacts,
        actor: &Actor,
        reason: &str,
        detail: Value,
    ) -> Result<Incident, EngineError> {
        let step = store::Step {
            to: incident.state,
            actor,
            reason,
            detail,
        };
        self.store
            .transition(
                &incident.id,
                incident.state,
                step,
                store::IncidentChanges { facts: Some(facts) },
            )
            .await?;
        self.incident(incident.id.as_str()).await
    }

    /// Sets the incident's grade by hand. A grade other than the one the count suggests needs
    /// a reason; both the suggestion and the decision stay on record.
    pub async fn set_grade(
        &self,
        id: &str,
        grade: Grade,
        reason: &str,
        actor: &Actor,
    ) -> Result<Incident, EngineError> {
        let incident = self.incident(id).await?;
        let mut facts = Self::facts(&incident)?.clone();
        if matches!(incident.state, IncidentState::Closed | IncidentState::Dismissed) {
            return Err(EngineError::wrong_state(&incident, "open", "grade it"));
        }
        let suggested = incident.grade_suggestion.as_ref().map(|g| g.grade);
        if suggested != Some(grade) && reason.trim().is_empty() {
            return Err(FieldError::new(
                "reason",
                match &incident.grade_suggestion {
                    Some(g) => format!(
                        "the suggested grade is {} ({}); say why it is {grade}",
                        g.grade, g.basis
                    ),
                    None => format!("no grade has been suggested yet (scope first); say why it is {grade}"),
                },
            )
            .into());
        }
        facts.grade = grade;
        // The reason is the responder's words, in whatever language they wrote it.
        facts.grade_reason = LocalizedText {
            en: Some(reason.trim().to_owned()).filter(|r| !r.is_empty()),
            zh_cn: None,
        };
        let detail = json!({ "grade": grade.as_str(), "suggested": suggested.map(|g| g.as_str()), "reason": reason });
        self.replace_facts(&incident, facts, actor, &format!("grade set to {grade}"), detail)
            .await
    }

    /// Overrides whether one affected merchant must be notified (before approval). A drafted
    /// version no longer matches and must be drafted again.
    pub async fn override_notice(
        &self,
        id: &str,
        merchant: &MerchantId,
        required: bool,
        reason: &str,
        actor: &Actor,
    ) -> Result<AffectedMerchant, EngineError> {
        let incident = self.incident(id).await?;
        if !matches!(incident.state, IncidentState::Scoped | IncidentState::Drafted) {
            return Err(EngineError::wrong_state(
                &incident,
                "scoped or drafted (before approval)",
                "override a notice decision",
            ));
        }
        if reason.trim().is_empty() {
            return Err(FieldError::new("reason", "say why this merchant is or is not notified").into());
        }
        if self.store.affected_merchant(&incident.id, merchant).await?.is_none() {
            return Err(FieldError::new("merchant_id", format!("{merchant} is not affected by this incident")).into());
        }
        let o = NoticeOverride {
            merchant_id: merchant.clone(),
            required,
            reason: reason.trim().to_owned(),
            actor: actor.clone(),
            at: Utc::now(),
        };
        self.store.set_notice_override(&incident.id, &o).await?;
        if incident.state == IncidentState::Drafted {
            self.store
                .transition(
                    &incident.id,
                    IncidentState::Drafted,
                    store::Step {
                        to: IncidentState::Scoped,
                        actor,
                        reason: "a notice decision changed: draft again",
                        detail: json!({ "merchant_id": merchant.as_str(), "required": required }),
                    },
                    Default::default(),
                )
                .await?;
        }
        self.store
            .affected_merchant(&incident.id, merchant)
            .await?
            .ok_or_else(|| EngineError::NotFound {
                what: "affected merchant",
                id: merchant.to_string(),
            })
    }

    /// Dismisses an incident that turned out not to be one.
    pub async fn dismiss(&self, id: &str, reason: &str, actor: &Actor) -> Result<(), EngineError> {
        let incident = self.incident(id).await?;
        if !incident::can_transition(incident.state, IncidentState::Dismissed) {
            return Err(EngineError::wrong_state(
                &incident,
                "in triage or confirmed",
                "dismiss it",
            ));
        }
        self.store
            .transition(
                &incident.id,
                incident.state,
                store::Step {
                    to: IncidentState::Dismissed,
                    actor,
                    reason,
                    detail: json!({}),
                },
                Default::default(),
            )
            .await?;
        Ok(())
    }

    /// Closes an incident whose notices are settled; its correlation key is then free again.
    pub async fn close(&self, id: &str, reason: &str, actor: &Actor) -> Result<(), EngineError> {
        let incident = self.incident(id).await?;
        if incident.state == IncidentState::Closed {
            // Closing again finishes what a crash may have cut short: the summary drafts.
            self.draft_summary_reports(incident.id.as_str(), actor).await?;
            return Ok(());
        }
        if incident.state != IncidentState::Monitoring {
            return Err(EngineError::wrong_state(
                &incident,
                "monitoring (every delivery final)",
                "close it",
            ));
        }
        let step = store::Step {
            to: IncidentState::Closed,
            actor,
            reason,
            detail: json!({}),
        };
        self.store
            .transition(&incident.id, IncidentState::Monitoring, step, Default::default())
            .await?;
        // Stored after the transition: closing again would find nothing to close, and the
        // drafts are made once (a second run finds them).
        self.draft_summary_reports(incident.id.as_str(), actor).await?;
        Ok(())
    }

    /// Applies a scope rule. With `dry_run`, returns the counts and stores nothing. Scoping also
    /// counts the distinct natural persons affected and records the grade they suggest; a grade
    /// the responder set without a reason yields to the suggestion, one with a reason stands.
    pub async fn scope(
        &self,
        id: &str,
        rule: &ScopeRule,
        actor: &Actor,
        dry_run: bool,
    ) -> Result<ScopeSummary, EngineError> {
        scope::check_rule(rule)?;
        scope::check_categories(rule, &self.taxonomy)?;
        let incident = self.incident(id).await?;
        let facts = Self::facts(&incident)?;
        if !incident::can_transition(incident.state, IncidentState::Scoped) {
            return Err(EngineError::wrong_state(
                &incident,
                "confirmed, scoped or drafted",
                "scope it",
            ));
        }
        // Once a version went out, its merchants, notice ids and links are the record: the
        // cohort is fixed (updates go to the same merchants).
        if self
            .store
            .drafts(&incident.id)
            .await?
            .iter()
            .any(|d| d.state == DraftState::Approved)
        {
            return Err(EngineError::wrong_state(
                &incident,
                "not yet approved (the merchants of an approved notice stay its cohort; open a new incident \
                 for merchants found affected later)",
                "scope it again",
            ));
        }
        let unknown = self.store.unknown_merchants(&scope::named_ids(rule)).await?;
        if !unknown.is_empty() {
            let ids: Vec<&str> = unknown.iter().map(|i| i.as_str()).collect();
            return Err(FieldError::new("merchant_ids", format!("not in the directory: {}", ids.join(", "))).into());
        }
        let order = self.settings.delivery.channel_order()?;
        // Everything is read and written in one transaction; a dry run rolls it back, so its
        // counts are exactly what applying the rule would store.
        let mut writer = self.store.begin_scope(&incident.id).await?;
        let holdings = writer.holdings(&facts.categories).await?;
        let plan = scope::plan_classes(&holdings, facts, &self.rules, &self.taxonomy)?;
        let totals = writer
            .insert(&store::ScopeInsert {
                rule,
                holdings_class: &plan.holdings_class,
                classes: &plan.classes,
                channel_order: &order,
                person_classes: plan.persons.clone(),
            })
            .await?;
        let counts = totals.counts;
        let suggestion = scope::suggest_grade(totals.natural_persons, &self.cac.grade_threshold);
        let explained = facts.grade_reason.en.is_some() || facts.grade_reason.zh_cn.is_some();
        let adopted = (facts.grade != suggestion.grade && !explained).then(|| {
            let mut f = facts.clone();
            f.grade = suggestion.grade;
            f
        });
        let grade = adopted.as_ref().map(|f| f.grade).unwrap_or(facts.grade);
        let summary = scope::summarize(&counts, Some(&suggestion), Some(grade));
        if dry_run {
            return Ok(summary);
        }
        if summary.affected == 0 {
            return Err(FieldError::new(
                "scope",
                "selects no merchant holding the incident's exposed categories; nothing was stored",
            )
            .into());
        }
        let detail = serde_json::to_value(&summary).unwrap_or(Value::Null);
        let mut reason = format!(
            "{} merchants affected; {}; suggested grade {}",
            summary.affected, suggestion.basis, suggestion.grade
        );
        if let Some(f) = &adopted {
            reason.push_str(&format!(
                "; the unexplained grade {} was replaced by {}",
                facts.grade, f.grade
            ));
        } else if facts.grade != suggestion.grade {
            reason.push_str(&format!(
                "; the responder's grade {} stands with its reason",
                facts.grade
            ));
        }
        writer
            .finish(
                incident.state,
                store::Step {
                    to: IncidentState::Scoped,
                    actor,
                    reason: &reason,
                    detail,
                },
                store::ScopeResult {
                    rule,
                    basis: ScopeBasis::of(facts),
                    suggestion: &suggestion,
                    facts: adopted.as_ref(),
                },
            )
            .await?;
        Ok(summary)
    }

    /// Drafts the notices as a new version. If the latest version already says exactly this, it
    /// is returned instead. Once a version was approved, a new one is an update: `changes` says
    /// what changed since then, in every language the cohort reads.
    pub async fn draft(
        &self,
        id: &str,
        actor: &Actor,
        changes: Option<&LocalizedText>,
    ) -> Result<DraftOutcome, EngineError> {
        let incident = self.incident(id).await?;
        let facts = Self::facts(&incident)?;
        let drafts = self.store.drafts(&incident.id).await?;
        let latest = drafts.last().cloned();
        let previous = drafts.iter().rev().find(|d| d.state == DraftState::Approved).cloned();
        if !incident::can_transition(incident.state, IncidentState::Drafted) {
            if let Some(d) = latest.filter(|_| incident.state == IncidentState::Approved) {
                return Ok(DraftOutcome {
                    notices: d.notice_count as usize,
                    draft: d,
                    created: false,
                });
            }
            return Err(EngineError::wrong_state(
                &incident,
                "scoped or drafted, or notifying for an update",
                "draft its notices",
            ));
        }
        // A notice must describe the classification of today's facts.
        if incident.scope_basis.as_ref() != Some(&ScopeBasis::of(facts)) {
            if previous.is_none() {
                return Err(FieldError::new(
                    "scope",
                    "the exposed categories, kind or mitigations changed since scoping: scope again before drafting",
                )
                .into());
            }
            self.reclassify_cohort(&incident, facts, actor).await?;
        }
        let groups = self.store.variant_groups(&incident.id).await?;
        if groups.is_empty() {
            return Err(FieldError::new("scope", "no affected merchant is to be notified").into());
        }
        let update = match &previous {
            None => None,
            Some(prev) => {
                let changes = changes.cloned().unwrap_or_default();
                let mut locales: Vec<Locale> = groups.iter().map(|g| g.locale).collect();
                locales.dedup();
                if let Some(l) = locales.iter().find(|l| changes.get(**l).is_none()) {
                    return Err(FieldError::new(
                        format!("changes.{l}"),
                        format!(
                            "version {} was approved: say what this update changes, in {l}",
                            prev.version
                        ),
                    )
                    .into());
                }
                let sent = self.store.first_sent(&prev.id).await?;
                Some(UpdateOf {
                    previous_version: prev.version,
                    previous_sent_at: sent.or(prev.approved_at).unwrap_or(prev.drafted_at),
                    previous_sent: sent.is_some(),
                    changes,
                })
            }
        };
        let version = drafts.last().map(|d| d.version + 1).unwrap_or(1);
        let inputs = DraftInputs {
            version,
            facts: facts.clone(),
            settings: self.notice_settings_for(facts),
            template_set: self.templates.set_hash().to_owned(),
            classes: self.store.scope_classes(&incident.id).await?,
            update,
            reference: incident.reference.clone(),
            detected_at: incident.detected_at,
            drafted_at: Utc::now(),
            labels: draft::frozen_labels(&facts.categories, &self.taxonomy),
        };
        let frozen = draft::Frozen::new(inputs, self.templates.clone());
        let (variants, hash) = draft::check_all(&frozen, &groups, &self.profiles, &self.channel_limits())?;
        if let Some(d) = latest.filter(|d| d.content_hash == hash && incident.state == IncidentState::Drafted) {
            return Ok(DraftOutcome {
                notices: d.notice_count as usize,
                draft: d,
                created: false,
            });
        }
        let notices: i64 = groups.iter().map(|g| g.merchants).sum();
        let mut new_draft = draft::new_draft(&incident.id, version, hash, notices, actor);
        new_draft.drafted_at = frozen.inputs.drafted_at;
        self.store
            .create_draft(store::NewDraft {
                draft: &new_draft,
                inputs: &frozen.inputs,
                template_sources: &self.templates.sources_json(),
                variants: &variants,
                from: incident.state,
            })
            .await?;
        Ok(DraftOutcome {
            notices: notices as usize,
            draft: new_draft,
            created: true,
        })
    }

    /// Classifies an approved version's cohort again under changed facts, keeping every merchant
    /// (and its notice ids and link). Categories only grow for people already told: a merchant
    /// keeps the categories it was told about, and a correction says so in the update's text.
    async fn reclassify_cohort(
        &self,
        incident: &Incident,
        facts: &IncidentFacts,
        actor: &Actor,
    ) -> Result<(), EngineError> {
        let mut told = facts.clone();
        for class in self.store.scope_classes(&incident.id).await? {
            for c in class.exposed {
                if !told.categories.contains(&c) {
                    told.categories.push(c);
                }
            }
        }
        let holdings = self.store.cohort_holdings(&incident.id).await?;
        let plan = scope::plan_classes(&holdings, &told, &self.rules, &self.taxonomy)?;
        self.store
            .reclassify(
                &incident.id,
                &plan.holdings_class,
                &plan.classes,
                &ScopeBasis::of(facts),
                actor,
            )
            .await?;
        Ok(())
    }

    /// Approves the latest draft; the approver must not be its drafter.
    pub async fn approve(&self, id: &str, approver: &Actor) -> Result<Draft, EngineError> {
        let incident = self.incident(id).await?;
        let latest = self.store.drafts(&incident.id).await?.pop();
        let Some(draft) = latest else {
            return Err(EngineError::wrong_state(&incident, "drafted", "approve its notices"));
        };
        if draft.state == DraftState::Approved {
            return Ok(draft);
        }
        if incident.state != IncidentState::Drafted {
            return Err(EngineError::wrong_state(&incident, "drafted", "approve its notices"));
        }
        if &draft.drafted_by == approver {
            return Err(EngineError::SameActor {
                approver: approver.to_string(),
                version: draft.version,
            });
        }
        self.store.approve_draft(&draft.id, approver, Utc::now()).await?;
        self.store.draft(&draft.id).await?.ok_or_else(|| EngineError::NotFound {
            what: "draft",
            id: draft.id.to_string(),
        })
    }

    /// Puts the approved notices in the outbox and moves the incident to `notifying`.
    pub async fn dispatch(&self, id: &str, actor: &Actor) -> Result<DispatchStart, EngineError> {
        let incident = self.incident(id).await?;
        if !matches!(
            incident.state,
            IncidentState::Approved | IncidentState::Notifying | IncidentState::Monitoring
        ) {
            return Err(EngineError::wrong_state(&incident, "approved", "dispatch its notices"));
        }
        let draft = self
            .store
            .drafts(&incident.id)
            .await?
            .into_iter()
            .rev()
            .find(|d| d.state == DraftState::Approved)
            .ok_or_else(|| EngineError::wrong_state(&incident, "approved", "dispatch its notices"))?;
        // Releasing is done once, on approval; asking again reports what was released.
        let queued = if incident.state == IncidentState::Approved {
            self.store
                .release_draft(&incident.id, &draft.id, IncidentState::Approved, actor)
                .await?
        } else {
            0
        };
        let without_channel = self
            .store
            .affected_ids(&incident.id, Reachability::Unreachable)
            .await?
            .len();
        // A cohort too large (or too costly, or too often without contact data) to notify
        // one by one gets its public bulletin as the notices go out.
        if queued > 0 {
            self.publish_bulletin_if(id, actor, false, true).await?;
        }
        Ok(DispatchStart {
            draft_id: draft.id,
            queued,
            unreachable_without_channel: without_channel,
        })
    }

    /// Runs delivery until the incident's outbox is empty (or `limit` passes), then settles
    /// it: `notifying -> monitoring` and a bulletin if merchants stayed unreachable.
    pub async fn deliver(&self, id: &str, limit: Duration, actor: &Actor) -> Result<StepReport, EngineError> {
        let incident = self.incident(id).await?;
        let report = self.dispatcher().drain(Some(&incident.id), limit).await?;
        self.settle(&incident.id, actor).await?;
        Ok(report)
    }

    /// Once an incident's outbox holds nothing open: move to monitoring, publish if needed.
    pub async fn settle(&self, id: &IncidentId, actor: &Actor) -> Result<Option<Bulletin>, EngineError> {
        if self.store.open_deliveries(Some(id)).await? > 0 || self.store.awaiting_receipts(id).await? > 0 {
            return Ok(None);
        }
        // The bulletin comes first: should publishing fail, the incident stays `notifying` and
        // the next settle (the worker's next tick) tries again.
        let bulletin = self.publish_bulletin(id.as_str(), actor, false).await?;
        let incident = self.incident(id.as_str()).await?;
        if incident.state == IncidentState::Notifying {
            let tally = self.store.delivery_tally(id).await?;
            self.store
                .transition(
                    id,
                    IncidentState::Notifying,
                    store::Step {
                        to: IncidentState::Monitoring,
                        actor,
                        reason: "every delivery reached a final state",
                        detail: json!({ "tally": tally }),
                    },
                    Default::default(),
                )
                .await?;
        }
        Ok(bulletin)
    }

    /// Publishes (or refreshes) the public bulletin if a trigger holds or `force` is set.
    /// A version is only added when what it says or whom it covers changed.
    pub async fn publish_bulletin(
        &self,
        id: &str,
        actor: &Actor,
        force: bool,
    ) -> Result<Option<Bulletin>, EngineError> {
        self.publish_bulletin_if(id, actor, force, false).await
    }

    /// As [`Self::publish_bulletin`]; with `cohort_only`, only when notifying the cohort one
    /// by one is disproportionate (the check at dispatch, before any send could fail).
    async fn publish_bulletin_if(
        &self,
        id: &str,
        actor: &Actor,
        force: bool,
        cohort_only: bool,
    ) -> Result<Option<Bulletin>, EngineError> {
        let incident = self.incident(id).await?;
        let settings = self.notice_settings_for(Self::facts(&incident)?);
        // A public notice says what the approved notices say: not before approval, never for a
        // dismissed incident.
        if !matches!(
            incident.state,
            IncidentState::Approved | IncidentState::Notifying | IncidentState::Monitoring | IncidentState::Closed
        ) {
            return Err(EngineError::wrong_state(&incident, "approved", "publish a bulletin"));
        }
        let unreachable = self.store.affected_ids(&incident.id, Reachability::Unreachable).await?;
        let mut versions = self.store.bulletins(&incident.id).await?;
        let counts = self.store.scope_counts(&incident.id).await?;
        let required = counts.iter().filter(|c| c.notice_required);
        let cohort = bulletin::Cohort {
            merchants: required.clone().map(|c| c.merchants as u64).sum(),
            without_contact: required
                .filter(|c| c.first_channel.is_none())
                .map(|c| c.merchants as u64)
                .sum(),
            unreachable: unreachable.len() as u64,
        };
        let b = &self.settings.bulletin;
        let thresholds = bulletin::Thresholds {
            unreachable: b.unreachable_threshold,
            cohort_merchants: b.cohort_merchants,
            cost_per_notice: b.cost_per_notice,
            cost_limit: b.cost_limit,
            no_contact_share: b.no_contact_share,
        };
        let Some(trigger) = bulletin::trigger(&cohort, &thresholds, force || !versions.is_empty()) else {
            return Ok(None);
        };
        if cohort_only && !trigger.covers_everyone {
            return Ok(None);
        }
        let reason = trigger.reason;
        // Disproportionate individual notice: the bulletin stands in for every notice.
        let covered = if trigger.covers_everyone {
            self.store.affected_ids_requiring_notice(&incident.id).await?
        } else {
            unreachable
        };
        let key = bulletin::content_key(&incident, &covered);
        let fresh = versions.last().is_none_or(|b| b.content_hash != key);
        if fresh {
            let reason = if versions.is_empty() || force {
                reason
            } else {
                "the notice or the merchants it covers changed".into()
            };
            let b = Bulletin {
                id: BulletinId::generate(),
                incident_id: incident.id.clone(),
                version: versions.last().map(|b| b.version + 1).unwrap_or(1),
                summary: bulletin::update_text(versions.len() as i64 + 1, covered.len(), Locale::En),
                reason,
                content_hash: key,
                published_at: Utc::now(),
                covered: covered.len() as i64,
                status_pushed_at: None,
            };
            // Stored first: if writing the files fails, the next run rewrites them.
            self.store.insert_bulletin(&b, &covered, actor).await?;
            versions.push(b);
        }
        let files = bulletin::render_files(&incident, &versions, &settings, &self.taxonomy, &self.templates)?;
        bulletin::write(&self.paths.bulletins, &incident.reference, &files)?;
        self.write_bulletin_index().await?;
        self.push_to_status_page(&incident, &versions).await?;
        Ok(versions.pop())
    }

    /// Sends every bulletin version the status page has not taken yet (each stored before it
    /// is sent; one that fails is sent again at the next publication, which
    /// `tocsin incidents bulletin` also triggers).
    async fn push_to_status_page(&self, incident: &Incident, versions: &[Bulletin]) -> Result<(), EngineError> {
        let b = &self.settings.bulletin;
        if b.status_page_url.is_empty() {
            return Ok(());
        }
        let client = crate::channels::http_client_builder(30)
            .build()
            .map_err(|e| FieldError::new("bulletin.status_page_url", e.to_string()))?;
        let page = format!(
            "{}/{}/",
            self.settings.operator.public_base_url.trim_end_matches('/'),
            incident.reference
        );
        for v in versions.iter().filter(|v| v.status_pushed_at.is_none()) {
            let body = json!({
                "reference": incident.reference, "version": v.version, "published_at": crate::time::fmt_ts(v.published_at),
                "summary": v.summary, "reason": v.reason, "covered": v.covered, "url": page,
                "feed": format!("{page}feed.atom"),
            })
            .to_string();
            let timestamp = Utc::now().timestamp();
            let sent = client
                .post(&b.status_page_url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("X-Tocsin-Timestamp", timestamp.to_string())
                .header(
                    "X-Tocsin-Signature",
                    crate::channels::sign(b.status_page_secret.expose().as_bytes(), timestamp, body.as_bytes()),
                )
                .header(
                    "Idempotency-Key",
                    format!("bulletin:{}:{}", incident.reference, v.version),
                )
                .body(body)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => self.store.mark_bulletin_pushed(&v.id, Utc::now()).await?,
                Ok(r) => {
                    tracing::warn!(reference = %incident.reference, version = v.version, status = r.status().as_u16(),
                    "the status page refused a bulletin version; sent again next time")
                }
                Err(_) => tracing::warn!(reference = %incident.reference, version = v.version,
                    "the status page could not be reached; sent again next time"),
            }
        }
        Ok(())
    }

    async fn write_bulletin_index(&self) -> Result<(), EngineError> {
        let mut entries = Vec::new();
        for incident in self.store.incidents().await? {
            if let Some(last) = self.store.bulletins(&incident.id).await?.pop() {
                entries.push((
                    incident.reference.clone(),
                    format!("安全事件公告 {}", incident.reference),
                    crate::time::human(last.published_at),
                ));
            }
        }
        bulletin::write_index(&self.paths.bulletins, &entries)?;
        Ok(())
    }

    /// Every regulator clock of the incidents that have facts (all but dismissed ones, or the
    /// one named), soonest first. Without `all`, only clocks running or overdue.
    pub async fn deadlines(
        &self,
        incident: Option<&str>,
        all: bool,
        now: DateTime<Utc>,
    ) -> Result<Vec<crate::clocks::ClockView>, EngineError> {
        let incidents = match incident {
            Some(id) => vec![self.incident(id).await?],
            None => self
                .store
                .incidents()
                .await?
                .into_iter()
                .filter(|i| i.state != IncidentState::Dismissed)
                .collect(),
        };
        let mut views = Vec::new();
        for incident in &incidents {
            if incident.facts.is_none() {
                continue;
            }
            let exposure = self.exposure(incident).await?;
            let filings = self.store.filings(&incident.id).await?;
            views.extend(self.clocks_of(incident, &exposure, &filings, now).await?);
        }
        if !all {
            views.retain(|v| matches!(v.status, "open" | "overdue"));
        }
        views.sort_by_key(|v| (v.due_at.is_none(), v.due_at));
        Ok(views)
    }

    /// The public "am I affected?" lookup on a published bulletin: `merchant_id` and `factor`
    /// (the last four digits of the registered phone) as typed, `client` the asker's address
    /// (kept only as a salted hash). Every lookup is logged without personal data.
    pub async fn lookup(
        &self,
        reference: &str,
        merchant_id: &str,
        factor: &str,
        client: &str,
        locale: Locale,
        now: DateTime<Utc>,
    ) -> Result<bulletin::LookupAnswer, EngineError> {
        use bulletin::LookupAnswer;
        let factor = bulletin::parse_factor(factor)?;
        let incident = self.incident(reference).await?;
        // Only a published incident can be looked up: the lookup reveals nothing else.
        if self.store.bulletins(&incident.id).await?.is_empty() {
            return Err(EngineError::NotFound {
                what: "bulletin",
                id: reference.to_owned(),
            });
        }
        let client = bulletin::client_key(&self.store.lookup_salt().await?, client);
        let limit = u64::from(self.settings.bulletin.lookups_per_hour);
        let answer = if self
            .store
            .lookups_since(&client, now - chrono::Duration::hours(1))
            .await?
            >= limit
        {
            LookupAnswer::Limited {
                retry_after_seconds: 3600,
            }
        } else {
            // The same reads whether the id is known or not, so the time taken tells nothing.
            let id: Option<MerchantId> = merchant_id.trim().parse().ok();
            let (merchant, affected) = match &id {
                Some(id) => (
                    self.store.merchant(id).await?,
                    self.store.affected_merchant(&incident.id, id).await?,
                ),
                None => (None, None),
            };
            let expected = merchant
                .as_ref()
                .and_then(|m| m.phone.as_ref())
                .map(|p| p.last_four().to_owned())
                .unwrap_or_else(|| "----".into());
            if !bulletin::same_secret(&expected, &factor) {
                LookupAnswer::Unverified
            } else {
                match affected {
                    Some(a) => LookupAnswer::Affected {
                        categories: a.exposed.iter().map(|c| self.taxonomy.label(c, locale)).collect(),
                    },
                    None => LookupAnswer::NotAffected,
                }
            }
        };
        self.store
            .record_lookup(&Lookup {
                at: now,
                reference: incident.reference.clone(),
                client,
                outcome: answer.outcome().to_owned(),
            })
            .await?;
        tracing::info!(reference = %incident.reference, outcome = answer.outcome(), "bulletin lookup");
        Ok(answer)
    }

    /// The lookups made on an incident's bulletin (no personal data), newest first.
    pub async fn lookups(&self, id: &str) -> Result<Vec<Lookup>, EngineError> {
        let incident = self.incident(id).await?;
        Ok(self.store.lookups(&incident.reference).await?)
    }

    /// Every reminder the watchdog stored for an incident.
    pub async fn reminders(&self, id: &str) -> Result<Vec<ClockReminder>, EngineError> {
        let incident = self.incident(id).await?;
        Ok(self.store.reminders(&incident.id).await?)
    }

    /// One round of the watchdog at `now`: stores the reminders and escalations the running
    /// clocks call for (each clock, point and recipient once), then sends every one not sent
    /// yet, this round's and any an earlier round could not send.
    pub async fn watchdog_tick(&self, now: DateTime<Utc>) -> Result<WatchdogReport, EngineError> {
        let plan = crate::watchdog::Plan::from_settings(&self.settings.watchdog)
            .map_err(|e| FieldError::new(e.field, e.reason))?;
        let mut report = WatchdogReport::default();
        if plan.responders.is_empty() && plan.escalation.is_empty() {
            return Ok(report);
        }
        let clocks = self.deadlines(None, false, now).await?;
        let mut rows = Vec::new();
        for clock in &clocks {
            let (Some(call), Some(due_at)) = (crate::watchdog::call(clock, &plan, now), clock.due_at) else {
                continue;
            };
            let row = |point: &str, recipient: &str, channel: &str, text: &str, status: &str| ClockReminder {
                incident_id: clock.incident_id.clone(),
                regulator: clock.regulator.clone(),
                stage: clock.stage.to_owned(),
                due_at,
                point: point.to_owned(),
                recipient: recipient.to_owned(),
                channel: channel.to_owned(),
                text: text.to_owned(),
                status: status.to_owned(),
                attempts: 0,
                last_error: None,
                sent_at: None,
            };
            let text = crate::watchdog::text(clock, &call.point, now);
            let mut told: Vec<&str> = Vec::new();
            let escalation = if call.escalate { plan.escalation.as_slice() } else { &[] };
            for contact in plan.responders.iter().chain(escalation) {
                if !told.contains(&contact.address()) {
                    told.push(contact.address());
                    rows.push(row(&call.point, contact.address(), contact.channel(), &text, "pending"));
                }
            }
            for skipped in &call.skipped {
                rows.push(row(skipped, "", "", "", "skipped"));
            }
        }
        report.stored = self.store.add_reminders(&rows, now).await?;
        let pending = self.store.pending_reminders().await?;
        if pending.is_empty() {
            return Ok(report);
        }
        let mailer = EmailTransport::from_settings(&self.settings.email, &self.paths.email_outbox)?;
        for r in pending {
            let key = r.key();
            let sent = match r.channel.as_str() {
                "email" => {
                    let subject = r.text.lines().next().unwrap_or_default();
                    let mail = Mail {
                        to: &r.recipient,
                        subject,
                        text: &r.text,
                        html: &format!("<p>{}</p>", handlebars::html_escape(&r.text)),
                        language: "zh-CN",
                        key: &key,
                        delivery: None,
                    };
                    mailer.send_mail(&mail).await.map(|_| ())
                }
                _ => self.text_responder(&r.recipient, &r.text, &key).await,
            };
            match sent {
                Ok(()) => {
                    self.store.finish_reminder(&r, Ok(Utc::now())).await?;
                    if r.point == "overdue" {
                        report.escalations += 1;
                    } else {
                        report.reminders += 1;
                    }
                    tracing::info!(incident = %r.incident_id, regulator = %r.regulator, stage = %r.stage,
                        point = %r.point, channel = %r.channel, "reminder sent");
                }
                Err(e) => {
                    // The error stays in the store: a provider's words may quote the address.
                    tracing::warn!(incident = %r.incident_id, regulator = %r.regulator, point = %r.point,
                        channel = %r.channel, "reminder not sent; retried next round");
                    self.store.finish_reminder(&r, Err(e.message)).await?;
                    report.failed += 1;
                }
            }
        }
        Ok(report)
    }

    /// Texts a responder through the SMS channel's providers in failover order (the channel's
    /// own transport, or its named providers): the first that takes it wins. Providers that
    /// send only approved templates (Aliyun) refuse free text and are passed over.
    async fn text_responder(&self, to: &str, text: &str, key: &str) -> Result<(), crate::channels::SendError> {
        let mut last = crate::channels::SendError::permanent("no SMS provider is configured");
        for handle in self.channels.providers(Channel::Sms) {
            match handle.provider.send_text(to, text, key).await {
                Ok(_) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The figures a report states besides the facts: who reports, the contact, how many
    /// merchants and persons are affected, how many were notified on which channel and how
    /// many the bulletin covers.
    async fn figures(&self, incident: &Incident, exposure: &filing::Exposure) -> Result<filing::Figures, EngineError> {
        let affected = usize::try_from(exposure.merchants).unwrap_or(usize::MAX);
        let c = &self.settings.contact;
        let notified_by_channel = self
            .store
            .delivery_tally(&incident.id)
            .await?
            .into_iter()
            .filter(|t| t.sent > 0)
            .map(|t| (t.channel, u64::try_from(t.sent).unwrap_or(0)))
            .collect();
        let bulletin_covered = self
            .store
            .bulletins(&incident.id)
            .await?
            .last()
            .map(|b| u64::try_from(b.covered).unwrap_or(0));
        Ok(filing::Figures {
            reporting_unit: format!("{} ({})", self.settings.operator.name, self.settings.operator.platform),
            contact: format!("{} / {} / {}", c.officer_zh, c.email, c.phone),
            affected_merchants: (affected > 0).then_some(affected),
            natural_persons: incident.grade_suggestion.as_ref().map(|g| g.natural_persons as usize),
            notified_by_channel,
            bulletin_covered,
            written: Default::default(),
        })
    }

    /// For every regulator that applies and every stage it asks for: the required fields the
    /// incident's facts and figures do not give yet (empty: the report can be filed).
    pub async fn filing_readiness(&self, id: &str) -> Result<Vec<StageReadiness>, EngineError> {
        let incident = self.incident(id).await?;
        let facts = Self::facts(&incident)?;
        let exposure = self.exposure(&incident).await?;
        let figures = self.figures(&incident, &exposure).await?;
        let mut out = Vec::new();
        for p in self.regulators.profiles.iter().filter(|p| p.applies(&exposure)) {
            for (stage, items) in [
                (filing::Stage::Initial, &p.initial),
                (filing::Stage::Update, &p.update),
                (filing::Stage::Final, &p.final_report),
            ] {
                if items.is_empty() {
                    continue;
                }
                let (_, missing) = filing::stage_items(p, stage, facts, &figures);
                out.push(StageReadiness {
                    regulator: p.id.clone(),
                    stage: stage.as_str(),
                    submission: p.submission.method.clone(),
                    missing,
                });
            }
        }
        Ok(out)
    }

    /// When handling ends: the summary report of every regulator that applies and asks for
    /// one, drafted with the final figures (the responder completes and another approves it).
    async fn draft_summary_reports(&self, id: &str, actor: &Actor) -> Result<Vec<FilingDrafted>, EngineError> {
        self.draft_filings(id, None, Some("final"), actor).await
    }

    /// The clocks of every regulator that applies to one incident with facts.
    async fn clocks_of(
        &self,
        incident: &Incident,
        exposure: &filing::Exposure,
        filings: &[Filing],
        now: DateTime<Utc>,
    ) -> Result<Vec<crate::clocks::ClockView>, EngineError> {
        let Some(facts) = incident.facts.as_ref() else {
            return Ok(Vec::new());
        };
        let applying: Vec<&RegulatorProfile> = self
            .regulators
            .profiles
            .iter()
            .filter(|p| p.applies(exposure))
            .collect();
        if applying.is_empty() {
            return Ok(Vec::new());
        }
        let transitions = self.store.transitions(&incident.id).await?;
        let first = |state: IncidentState| transitions.iter().find(|t| t.to_state == state).map(|t| t.at);
        let submitted: Vec<(String, String, DateTime<Utc>)> = filings
            .iter()
            .filter_map(|f| Some((f.regulator.clone(), f.stage.clone(), f.submitted_at?)))
            .collect();
        let inputs = crate::clocks::ClockInputs {
            incident,
            aware_at: facts.aware_at,
            assessed_at: first(IncidentState::Confirmed),
            handling_ended_at: first(IncidentState::Closed),
            submitted: &submitted,
            class: self.settings.operator.operator_class()?,
        };
        Ok(crate::clocks::clock_views(&inputs, &self.regulators, &applying, now))
    }

    /// What an incident touches, as regulators' triggers test it: the grade and categories of
    /// its facts, the natural persons counted at scoping, the affected merchants and regions.
    pub async fn exposure(&self, incident: &Incident) -> Result<filing::Exposure, EngineError> {
        let merchants: i64 = self
            .store
            .scope_counts(&incident.id)
            .await?
            .iter()
            .map(|c| c.merchants)
            .sum();
        Ok(filing::Exposure {
            grade: incident.facts.as_ref().map(|f| f.grade),
            natural_persons: incident.grade_suggestion.as_ref().map(|g| g.natural_persons),
            merchants: u64::try_from(merchants).unwrap_or(0),
            categories: incident
                .facts
                .as_ref()
                .map(|f| f.categories.iter().map(|c| c.as_str().to_owned()).collect())
                .unwrap_or_default(),
            regions: self.store.affected_regions(&incident.id).await?,
        })
    }

    /// Drafts the reports the incident owes its regulators: for every profile that applies
    /// (or the one named), every stage whose clock is running (or the stage named, even one
    /// without a fixed clock: the CAC's update). A report already drafted is brought up to date
    /// with the facts and figures unless it is approved or submitted. Incomplete reports are
    /// stored too, with their missing fields listed.
    pub async fn draft_filings(
        &self,
        id: &str,
        regulator: Option<&str>,
        stage: Option<&str>,
        actor: &Actor,
    ) -> Result<Vec<FilingDrafted>, EngineError> {
        let incident = self.incident(id).await?;
        if incident.state == IncidentState::Dismissed {
            return Err(EngineError::wrong_state(
                &incident,
                "confirmed (not dismissed)",
                "draft a regulator report",
            ));
        }
        Self::facts(&incident)?;
        let stage = stage
            .map(|s| {
                filing::Stage::parse(s)
                    .ok_or_else(|| FieldError::new("stage", format!("'{s}' is not initial, update or final")))
            })
            .transpose()?;
        let exposure = self.exposure(&incident).await?;
        let applying: Vec<&RegulatorProfile> = match regulator {
            Some(r) => {
                let p = self.regulators.get(r).ok_or_else(|| {
                    let known: Vec<&str> = self.regulators.profiles.iter().map(|p| p.id.as_str()).collect();
                    FieldError::new("regulator", format!("no profile '{r}' (known: {})", known.join(", ")))
                })?;
                if !p.applies(&exposure) {
                    return Err(FieldError::new(
                        "regulator",
                        format!("the {r} profile does not apply to this incident: none of its triggers holds"),
                    )
                    .into());
                }
                if let Some(s) = stage.filter(|s| p.items(*s).is_empty()) {
                    return Err(
                        FieldError::new("stage", format!("the {r} profile has no {} report", s.as_str())).into(),
                    );
                }
                vec![p]
            }
            None => self
                .regulators
                .profiles
                .iter()
                .filter(|p| p.applies(&exposure))
                .collect(),
        };
        let mut figures = self.figures(&incident, &exposure).await?;
        let existing = self.store.filings(&incident.id).await?;
        let now = Utc::now();
        let clocks = self.clocks_of(&incident, &exposure, &existing, now).await?;
        let class = self.settings.operator.operator_class()?;
        let mut out = Vec::new();
        for p in applying {
            for s in [filing::Stage::Initial, filing::Stage::Update, filing::Stage::Final] {
                if p.items(s).is_empty() || stage.is_some_and(|want| want != s) {
                    continue;
                }
                let clock = clocks.iter().find(|c| c.regulator == p.id && c.stage == s.as_str());
                let before = existing.iter().find(|f| f.regulator == p.id && f.stage == s.as_str());
                let running = clock.is_some_and(|c| matches!(c.status, "open" | "overdue"));
                if stage.is_none() && before.is_none() && !running {
                    continue;
                }
                let deadline = clock.and_then(|c| c.due_at);
                match before {
                    Some(f) if f.approved_at.is_some() || f.submitted_at.is_some() => out.push(FilingDrafted {
                        change: "frozen",
                        filing: self.filing_view(f.clone(), now),
                    }),
                    Some(f) => {
                        figures.written = f.written.clone();
                        let fresh = filing::draft_stage(p, &incident, s, &figures, deadline, class)?;
                        if fresh.content_hash == f.content_hash {
                            out.push(FilingDrafted {
                                change: "unchanged",
                                filing: self.filing_view(f.clone(), now),
                            });
                            continue;
                        }
                        let revised = Filing {
                            content: fresh.content,
                            content_hash: fresh.content_hash,
                            deadline_at: deadline,
                            authors: with_author(&f.authors, actor),
                            ..f.clone()
                        };
                        self.store
                            .revise_filing(&revised, &f.content_hash, actor, "redrafted from the current facts")
                            .await?;
                        out.push(FilingDrafted {
                            change: "revised",
                            filing: self.filing_view(revised, now),
                        });
                    }
                    None => {
                        figures.written.clear();
                        let mut f = filing::draft_stage(p, &incident, s, &figures, deadline, class)?;
                        f.transport = self.route(p).map(|r| r.method().to_owned()).unwrap_or(f.transport);
                        f.authors = vec![actor.clone()];
                        self.store.insert_filing(&f, actor).await?;
                        out.push(FilingDrafted {
                            change: "drafted",
                            filing: self.filing_view(f, now),
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Where a profile's reports go in this deployment.
    fn route(&self, p: &RegulatorProfile) -> Result<crate::submission::Route, FieldError> {
        crate::submission::Route::of(p, &self.settings.filing)
    }

    async fn stored_filing(&self, id: &str) -> Result<(Filing, &RegulatorProfile), EngineError> {
        let not_found = || EngineError::NotFound {
            what: "filing",
            id: id.to_owned(),
        };
        let fid: FilingId = id.parse().map_err(|_| not_found())?;
        let f = self.store.filing(&fid).await?.ok_or_else(not_found)?;
        let p = self.regulators.get(&f.regulator).ok_or_else(|| {
            FieldError::new(
                "regulator",
                format!("the profile '{}' of this filing is no longer configured", f.regulator),
            )
        })?;
        Ok((f, p))
    }

    fn filing_conflict(f: &Filing, reason: &str) -> EngineError {
        StoreError::Conflict {
            what: "filing",
            id: f.id.to_string(),
            reason: reason.to_owned(),
        }
        .into()
    }

    /// Writes a field of a draft report in the report's language (the summary report's
    /// responsibility, remediation and lessons; or wording that replaces a computed field).
    /// Empty text removes what was written. The writer becomes an author: someone else approves.
    pub async fn write_filing_field(
        &self,
        filing_id: &str,
        field: &str,
        text: &str,
        actor: &Actor,
    ) -> Result<FilingView, EngineError> {
        let (f, p) = self.stored_filing(filing_id).await?;
        if f.approved_at.is_some() || f.submitted_at.is_some() {
            return Err(Self::filing_conflict(
                &f,
                "it is approved or submitted; its content can no longer change",
            ));
        }
        let stage = filing::Stage::parse(&f.stage).unwrap_or(filing::Stage::Initial);
        let fields: Vec<&str> = p
            .items(stage)
            .iter()
            .flat_map(|i| i.fields.iter().map(String::as_str))
            .collect();
        if !fields.contains(&field) {
            return Err(FieldError::new(
                "field",
                format!(
                    "the {} {} report has no field '{field}' (its fields: {})",
                    p.id,
                    f.stage,
                    fields.join(", ")
                ),
            )
            .into());
        }
        let text = text.trim();
        if text.chars().count() > 20_000 {
            return Err(FieldError::new("text", "is longer than 20,000 characters").into());
        }
        let incident = self.incident(f.incident_id.as_str()).await?;
        let exposure = self.exposure(&incident).await?;
        let mut figures = self.figures(&incident, &exposure).await?;
        figures.written = f.written.clone();
        if text.is_empty() {
            figures.written.remove(field);
        } else {
            figures.written.insert(field.to_owned(), text.to_owned());
        }
        let fresh = filing::draft_stage(
            p,
            &incident,
            stage,
            &figures,
            f.deadline_at,
            self.settings.operator.operator_class()?,
        )?;
        let revised = Filing {
            content: fresh.content,
            content_hash: fresh.content_hash,
            written: figures.written,
            authors: with_author(&f.authors, actor),
            ..f.clone()
        };
        self.store
            .revise_filing(&revised, &f.content_hash, actor, &format!("field '{field}' written"))
            .await?;
        Ok(self.filing_view(revised, Utc::now()))
    }

    /// A second person approves a complete report: nobody who drafted it or wrote into it.
    /// Approving again changes nothing.
    pub async fn approve_filing(&self, filing_id: &str, approver: &Actor) -> Result<FilingView, EngineError> {
        let (f, p) = self.stored_filing(filing_id).await?;
        if f.approved_at.is_some() || f.submitted_at.is_some() {
            return Ok(self.filing_view(f, Utc::now()));
        }
        if f.authors.contains(approver) {
            return Err(EngineError::FilingAuthor {
                approver: approver.to_string(),
                regulator: p.id.clone(),
                stage: f.stage.clone(),
            });
        }
        let missing = f.missing();
        if !missing.is_empty() {
            return Err(FilingError::Incomplete {
                regulator: p.id.clone(),
                stage: f.stage.clone(),
                missing,
            }
            .into());
        }
        self.store
            .approve_filing(&f.id, &f.content_hash, approver, Utc::now())
            .await?;
        self.filing(filing_id).await.map(|d| d.filing)
    }

    /// Submits an approved report by its route: by email (JSON and document attached), by an
    /// HTTPS POST, or, for a portal, as a document a person files (then
    /// [`Self::record_filing_reference`]). A copy of the report is kept under the filings
    /// directory either way. The submission is claimed (stored) before anything is sent, so
    /// two submitters never both send it; after a crash the claim expires and the next run
    /// sends the same report again, under the same Message-ID or Idempotency-Key. A failure is
    /// recorded, and the report can be submitted again.
    pub async fn submit_filing(&self, filing_id: &str, actor: &Actor) -> Result<FilingView, EngineError> {
        let (f, p) = self.stored_filing(filing_id).await?;
        match f.state() {
            FilingState::Incomplete | FilingState::Ready => {
                return Err(Self::filing_conflict(
                    &f,
                    "it is not approved: a second person approves it first",
                ));
            }
            FilingState::AwaitingReference | FilingState::Submitted | FilingState::Acknowledged => {
                return Ok(self.filing_view(f, Utc::now()));
            }
            FilingState::Approved => {}
        }
        let route = self.route(p)?;
        let now = Utc::now();
        if !self
            .store
            .claim_filing(&f.id, now, now + chrono::Duration::minutes(5))
            .await?
        {
            return self.filing(filing_id).await.map(|d| d.filing);
        }
        let incident = self.incident(f.incident_id.as_str()).await?;
        let html = filing::render_html(
            &f,
            p,
            (&self.settings.operator.name, &self.settings.operator.platform),
            &self.templates,
        )?;
        let json = filing::report_json(&f);
        let copy = filing::write_files(&self.paths.filings, &incident.reference, &f, &html)?;
        let stage = filing::Stage::parse(&f.stage).unwrap_or(filing::Stage::Initial);
        let report = crate::submission::Report {
            filing: &f,
            profile: p,
            json: &json,
            html: &html,
            stem: format!("{}-{}", f.regulator, f.stage),
            subject: format!(
                "{} {} / {}",
                p.stage_label(stage),
                incident.reference,
                self.settings.operator.name
            ),
        };
        let attempt = |outcome: &str, detail: String| FilingSubmission {
            filing_id: f.id.clone(),
            at: Utc::now(),
            actor: actor.clone(),
            method: route.method().to_owned(),
            target: route.target(),
            outcome: outcome.to_owned(),
            detail,
        };
        let sent: Result<(FilingSubmission, FilingOutcome), crate::submission::SubmissionError> = match &route {
            crate::submission::Route::Email { address } => {
                let mailer = EmailTransport::from_settings(&self.settings.email, &self.paths.email_outbox)?;
                crate::submission::by_email(&mailer, address, &report)
                    .await
                    .map(|message_id| {
                        (
                            attempt("sent", format!("Message-ID <{message_id}>")),
                            FilingOutcome::Sent {
                                location: format!("email to {address}"),
                                reference: None,
                                acknowledgement: None,
                            },
                        )
                    })
            }
            crate::submission::Route::Https {
                url,
                token,
                reference_pointer,
            } => {
                let client = crate::channels::http_client_builder(30)
                    .build()
                    .map_err(|e| crate::channels::setup_err("filing", e))?;
                crate::submission::by_https(&client, url, token, reference_pointer, &report)
                    .await
                    .map(|r| {
                        let acknowledgement = r.reference.as_ref().map(|_| r.body.clone());
                        (
                            attempt("sent", format!("HTTP {}: {}", r.status, r.body)),
                            FilingOutcome::Sent {
                                location: url.to_string(),
                                reference: r.reference,
                                acknowledgement,
                            },
                        )
                    })
            }
            crate::submission::Route::Portal { portal } => {
                let document = copy.with_extension("html").display().to_string();
                Ok((
                    attempt(
                        "document",
                        match portal {
                            Some(url) => format!("{document}, to be filed on {url}"),
                            None => document.clone(),
                        },
                    ),
                    FilingOutcome::Document { location: document },
                ))
            }
        };
        match sent {
            Ok((row, outcome)) => {
                self.store.record_filing_attempt(&row, &outcome).await?;
                self.filing(filing_id).await.map(|d| d.filing)
            }
            Err(e) => {
                let row = attempt("failed", e.to_string());
                self.store
                    .record_filing_attempt(&row, &FilingOutcome::Failed { error: e.to_string() })
                    .await?;
                Err(e.into())
            }
        }
    }

    /// Records the reference number a regulator gave a report a person filed (on its portal,
    /// or by another way in an emergency): the report counts as submitted at `filed_at`
    /// (default now). Recording the same reference again changes nothing.
    pub async fn record_filing_reference(
        &self,
        filing_id: &str,
        reference: &str,
        filed_at: Option<DateTime<Utc>>,
        actor: &Actor,
    ) -> Result<FilingView, EngineError> {
        let (f, _) = self.stored_filing(filing_id).await?;
        let reference = reference.trim();
        if reference.is_empty() || reference.chars().count() > 200 || reference.chars().any(char::is_control) {
            return Err(FieldError::new("reference", "must be 1-200 printable characters").into());
        }
        if f.submitted_at.is_some() {
            if f.reference_number.as_deref() == Some(reference) {
                return Ok(self.filing_view(f, Utc::now()));
            }
            return Err(Self::filing_conflict(
                &f,
                "it is already submitted (record an acknowledgement instead)",
            ));
        }
        let Some(approved_at) = f.approved_at else {
            return Err(Self::filing_conflict(
                &f,
                "it is not approved: a second person approves it first",
            ));
        };
        let now = Utc::now();
        let filed_at = filed_at.unwrap_or(now);
        if filed_at > now + chrono::Duration::minutes(1) || filed_at < approved_at {
            return Err(FieldError::new("filed_at", "must lie between the approval and now").into());
        }
        self.store
            .record_filing_reference(&f.id, reference, filed_at, actor, now)
            .await?;
        self.filing(filing_id).await.map(|d| d.filing)
    }

    /// Records the regulator's acknowledgement of a submitted report (a reply by mail, a
    /// receipt), with its reference number if it gave one.
    pub async fn acknowledge_filing(
        &self,
        filing_id: &str,
        reference: Option<&str>,
        note: &str,
        actor: &Actor,
    ) -> Result<FilingView, EngineError> {
        let (f, _) = self.stored_filing(filing_id).await?;
        if f.submitted_at.is_none() {
            return Err(Self::filing_conflict(&f, "it has not been submitted"));
        }
        let note = note.trim();
        if note.chars().count() > 2_000 {
            return Err(FieldError::new("note", "is longer than 2,000 characters").into());
        }
        let reference = reference.map(str::trim).filter(|r| !r.is_empty());
        if reference.is_some_and(|r| r.chars().count() > 200 || r.chars().any(char::is_control)) {
            return Err(FieldError::new("reference", "must be 1-200 printable characters").into());
        }
        self.store
            .acknowledge_filing(&f.id, reference, note, actor, Utc::now())
            .await?;
        self.filing(filing_id).await.map(|d| d.filing)
    }

    /// The incident's filings.
    pub async fn filings(&self, id: &str) -> Result<Vec<FilingView>, EngineError> {
        let incident = self.incident(id).await?;
        let now = Utc::now();
        Ok(self
            .store
            .filings(&incident.id)
            .await?
            .into_iter()
            .map(|f| self.filing_view(f, now))
            .collect())
    }

    /// One filing with its report and every submission attempt.
    pub async fn filing(&self, filing_id: &str) -> Result<FilingDetail, EngineError> {
        let (f, _) = self.stored_filing(filing_id).await?;
        let incident = self.incident(f.incident_id.as_str()).await?;
        let submissions = self.store.filing_submissions(&f.id).await?;
        Ok(FilingDetail {
            incident_reference: incident.reference,
            content: f.content.clone(),
            submissions,
            filing: self.filing_view(f, Utc::now()),
        })
    }

    fn filing_view(&self, f: Filing, now: DateTime<Utc>) -> FilingView {
        let profile = self.regulators.get(&f.regulator);
        let stage = filing::Stage::parse(&f.stage).unwrap_or(filing::Stage::Initial);
        FilingView {
            state: f.state(),
            missing: f.missing(),
            regulator_name: profile.map(|p| p.name().to_owned()).unwrap_or_default(),
            stage_label: profile.map(|p| p.stage_label(stage)).unwrap_or_default(),
            minutes_left: f
                .deadline_at
                .filter(|_| f.submitted_at.is_none())
                .map(|d| (d - now).num_minutes()),
            id: f.id,
            regulator: f.regulator,
            stage: f.stage,
            transport: f.transport,
            deadline_at: f.deadline_at,
            content_hash: f.content_hash,
            authors: f.authors,
            written: f.written,
            approved_by: f.approved_by,
            approved_at: f.approved_at,
            document_at: f.document_at,
            submitted_at: f.submitted_at,
            location: f.location,
            reference_number: f.reference_number,
            acknowledged_at: f.acknowledged_at,
            acknowledgement: f.acknowledgement,
            last_error: f.last_error,
        }
    }

    // ---- API tokens

    /// Creates a token acting as `actor` with `role`; returns it once (only its hash is kept).
    pub async fn create_token(
        &self,
        actor: &Actor,
        role: crate::auth::Role,
        expires_at: Option<DateTime<Utc>>,
        by: &Actor,
    ) -> Result<(crate::auth::ApiToken, String), EngineError> {
        let now = Utc::now();
        if expires_at.is_some_and(|e| e <= now) {
            return Err(FieldError::new("expires_at", "must be in the future").into());
        }
        let (secret, hash) = crate::auth::new_token();
        let token = crate::auth::ApiToken {
            id: TokenId::generate(),
            actor: actor.clone(),
            role,
            created_at: now,
            created_by: by.clone(),
            expires_at,
            revoked_at: None,
            revoked_by: None,
        };
        self.store.insert_token(&token, &hash).await?;
        Ok((token, secret))
    }

    pub async fn revoke_token(&self, id: &str, by: &Actor) -> Result<(), EngineError> {
        let id: TokenId = id.parse().map_err(|e: FieldError| FieldError::new("token", e.reason))?;
        self.store.revoke_token(&id, by, Utc::now()).await?;
        Ok(())
    }

    pub async fn tokens(&self) -> Result<Vec<crate::auth::ApiToken>, EngineError> {
        Ok(self.store.tokens().await?)
    }

    /// The valid token a bearer presents (not revoked, not expired), if any.
    pub async fn authenticate(&self, bearer: &str) -> Result<Option<crate::auth::ApiToken>, EngineError> {
        if !bearer.starts_with(crate::auth::TOKEN_PREFIX) {
            return Ok(None);
        }
        let token = self.store.token_by_hash(&crate::auth::token_hash(bearer)).await?;
        Ok(token.filter(|t| t.is_valid_at(Utc::now())))
    }

    // ---- reading

    pub async fn view(&self, id: &str) -> Result<IncidentView, EngineError> {
        let incident = self.incident(id).await?;
        let counts = self.store.scope_counts(&incident.id).await?;
        let now = Utc::now();
        Ok(IncidentView {
            transitions: self.store.transitions(&incident.id).await?,
            scope: scope::summarize(
                &counts,
                incident.grade_suggestion.as_ref(),
                incident.facts.as_ref().map(|f| f.grade),
            ),
            reached: counts
                .iter()
                .filter(|c| c.reachability == Reachability::Reached)
                .map(|c| c.merchants as usize)
                .sum(),
            unreachable: self.store.affected_ids(&incident.id, Reachability::Unreachable).await?,
            drafts: self.store.drafts(&incident.id).await?,
            deliveries: self.store.delivery_tally(&incident.id).await?,
            bulletins: self.store.bulletins(&incident.id).await?,
            filings: self
                .store
                .filings(&incident.id)
                .await?
                .into_iter()
                .map(|f| self.filing_view(f, now))
                .collect(),
            incident,
        })
    }

    pub async fn incidents(&self) -> Result<Vec<Incident>, EngineError> {
        Ok(self.store.incidents().await?)
    }

    /// The figures `/metrics` reports, read from the database as of `now`.
    pub async fn metrics_snapshot(&self, now: DateTime<Utc>) -> Result<crate::metrics::Snapshot, EngineError> {
        let mut incidents = std::collections::BTreeMap::new();
        for incident in self.store.incidents().await? {
            *incidents.entry(incident.state.as_str().to_owned()).or_default() += 1;
        }
        Ok(crate::metrics::Snapshot {
            deliveries: self.store.delivery_counts().await?,
            clocks: self.deadlines(None, false, now).await?,
            providers: self.store.provider_health().await?,
            incidents,
            now,
        })
    }

    /// Whether this instance can do its work: the database answers and the publish
    /// directory takes files. Each check by name, with the reason when it fails.
    pub async fn readiness(&self) -> Vec<(&'static str, Result<(), String>)> {
        let database = self.store.ping().await.map_err(|e| e.to_string());
        let probe = self.paths.bulletins.join(format!(".readyz-{}", std::process::id()));
        let publish = std::fs::create_dir_all(&self.paths.bulletins)
            .and_then(|()| std::fs::write(&probe, b"ok"))
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| format!("{}: {e}", self.paths.bulletins.display()));
        vec![("database", database), ("publish_dir", publish)]
    }

    pub async fn notice(&self, id: &str) -> Result<NoticeView, EngineError> {
        let not_found = || EngineError::NotFound {
            what: "notice",
            id: id.to_owned(),
        };
        let notice_id: NoticeId = id.parse().map_err(|_| not_found())?;
        let record = self.store.notice_record(&notice_id).await?.ok_or_else(not_found)?;
        let draft = self.store.draft(&record.draft_id).await?.ok_or_else(not_found)?;
        let incident = self.incident(draft.incident_id.as_str()).await?;
        let address = self.postal_address(&record.merchant_id).await?;
        let notice = self.renderer.render(&record, address.as_deref(), None).await?;
        Ok(NoticeView {
            notice,
            incident_reference: incident.reference,
            draft_version: draft.version,
        })
    }

    async fn postal_address(&self, merchant: &MerchantId) -> Result<Option<String>, EngineError> {
        Ok(self.store.merchant(merchant).await?.and_then(|m| m.postal_address))
    }

    /// The notices of the incident's latest draft, in merchant order after `after`.
    pub async fn notices(
        &self,
        id: &str,
        after: Option<&MerchantId>,
        limit: u32,
    ) -> Result<Vec<NoticeRecord>, EngineError> {
        let incident = self.incident(id).await?;
        match self.store.drafts(&incident.id).await?.pop() {
            Some(d) => Ok(self.store.notice_records(&d.id, after, limit).await?),
            None => Ok(Vec::new()),
        }
    }

    async fn draft_version(&self, incident: &Incident, version: Option<i64>) -> Result<Draft, EngineError> {
        let drafts = self.store.drafts(&incident.id).await?;
        let found = match version {
            Some(v) => drafts.into_iter().find(|d| d.version == v),
            None => drafts.into_iter().last(),
        };
        found.ok_or_else(|| match version {
            Some(v) => FieldError::new("version", format!("{} has no notice version {v}", incident.reference)).into(),
            None => EngineError::wrong_state(incident, "drafted", "preview its notices"),
        })
    }

    /// One merchant's notice of a version (the latest by default), rendered on every channel in
    /// the merchant's language and in every other.
    pub async fn preview(&self, id: &str, merchant: &MerchantId, version: Option<i64>) -> Result<Preview, EngineError> {
        let incident = self.incident(id).await?;
        let draft = self.draft_version(&incident, version).await?;
        let record = self.store.notice_for(&draft.id, merchant).await?.ok_or_else(|| {
            FieldError::new(
                "merchant_id",
                format!("{merchant} has no notice in version {}", draft.version),
            )
        })?;
        let address = self.postal_address(merchant).await?;
        let mut notices = vec![self.renderer.render(&record, address.as_deref(), None).await?];
        if record.legacy.is_none() {
            for locale in Locale::ALL.iter().filter(|l| **l != record.locale) {
                notices.push(self.renderer.render(&record, address.as_deref(), Some(*locale)).await?);
            }
        }
        Ok(Preview {
            incident_reference: incident.reference,
            merchant_id: merchant.clone(),
            version: draft.version,
            draft_state: draft.state,
            merchant_locale: record.locale,
            notices,
        })
    }

    /// What changed in one merchant's notice between two versions, as unified diffs.
    pub async fn diff(&self, id: &str, merchant: &MerchantId, from: i64, to: i64) -> Result<NoticeDiff, EngineError> {
        let a = self.preview(id, merchant, Some(from)).await?;
        let b = self.preview(id, merchant, Some(to)).await?;
        let (Some(old), Some(new)) = (a.notices.first(), b.notices.first()) else {
            return Err(FieldError::new("merchant_id", "has no notice in both versions").into());
        };
        let mut changes = std::collections::BTreeMap::new();
        for (name, x, y) in [
            ("email_subject", &old.email_subject, &new.email_subject),
            ("email.txt", &old.email_text, &new.email_text),
            ("sms", &old.sms_text, &new.sms_text),
            ("push_title", &old.push_title, &new.push_title),
            ("push_body", &old.push_body, &new.push_body),
            ("email.html", &old.email_html, &new.email_html),
            ("letter.html", &old.letter_html, &new.letter_html),
        ] {
            if x != y {
                let diff = similar::TextDiff::from_lines(x.as_str(), y.as_str())
                    .unified_diff()
                    .header(&format!("version {from}"), &format!("version {to}"))
                    .to_string();
                changes.insert(name.to_owned(), diff);
            }
        }
        Ok(NoticeDiff {
            merchant_id: merchant.clone(),
            from_version: from,
            to_version: to,
            changes,
        })
    }

    /// A merchant's own notice page (`/n/<token>`): the latest approved version, as HTML.
    pub async fn notice_page(&self, token: &str) -> Result<Option<String>, EngineError> {
        let Some(record) = self.store.notice_by_token(token).await? else {
            return Ok(None);
        };
        Ok(Some(self.renderer.render(&record, None, None).await?.email_html))
    }

    /// The affected merchants with their exposure, risk and its reasons, and whether and why they
    /// are notified (including those skipped under PIPL Art. 57 para 2), a page at a time.
    pub async fn affected(
        &self,
        id: &str,
        after: Option<&MerchantId>,
        limit: u32,
        notice_required: Option<bool>,
    ) -> Result<Vec<AffectedMerchant>, EngineError> {
        let incident = self.incident(id).await?;
        Ok(self
            .store
            .affected_page(&incident.id, after, limit, notice_required)
            .await?)
    }

    pub async fn deliveries(&self, id: &str) -> Result<Vec<Delivery>, EngineError> {
        let incident = self.incident(id).await?;
        Ok(self.store.deliveries(&incident.id).await?)
    }

    /// Dead letters matching `filter` (the incident may be given by reference).
    pub async fn dead_letters(
        &self,
        filter: &DeliveryFilter,
        after: Option<&DeliveryId>,
        limit: u32,
    ) -> Result<Vec<Delivery>, EngineError> {
        Ok(self.store.dead_letters(filter, after, limit).await?)
    }

    /// A page of the incident's deliveries in id order after `after`.
    pub async fn deliveries_page(
        &self,
        id: &str,
        after: Option<&DeliveryId>,
        limit: u32,
    ) -> Result<Vec<Delivery>, EngineError> {
        let incident = self.incident(id).await?;
        Ok(self.store.deliveries_page(&incident.id, after, limit).await?)
    }

    /// The security events that opened or joined the incident.
    pub async fn incident_events(&self, id: &str) -> Result<Vec<SecurityEvent>, EngineError> {
        let incident = self.incident(id).await?;
        Ok(self.store.incident_events(&incident.id).await?)
    }

    /// Puts matching dead letters back in the outbox; recorded in the ledger with the actor.
    pub async fn redrive(&self, filter: &DeliveryFilter, actor: &Actor) -> Result<u64, EngineError> {
        Ok(self.store.redrive(filter, actor, Utc::now()).await?)
    }

    /// A filter naming its incident by id or reference, checked against the configuration.
    pub async fn delivery_filter(
        &self,
        incident: Option<&str>,
        channel: Option<&str>,
        provider: Option<&str>,
        error_class: Option<&str>,
    ) -> Result<DeliveryFilter, EngineError> {
        let incident = match incident {
            Some(i) => Some(self.incident(i).await?.id),
            None => None,
        };
        let channel = channel.map(str::parse::<Channel>).transpose()?;
        if let Some(p) = provider
            && self.channels.provider(p).is_none()
        {
            let known: Vec<&str> = self.channels.all().map(|h| h.name.as_str()).collect();
            return Err(FieldError::new(
                "provider",
                format!("no provider is named {p:?}; configured: {}", known.join(", ")),
            )
            .into());
        }
        if let Some(c) = error_class
            && !matches!(c, "transient" | "permanent")
            && c.parse::<FailureKind>().is_err()
        {
            return Err(FieldError::new(
                "error_class",
                format!(
                    "{c:?} is neither transient, permanent nor a failure kind ({})",
                    FailureKind::ALL.map(FailureKind::as_str).join(", ")
                ),
            )
            .into());
        }
        Ok(DeliveryFilter {
            incident,
            channel,
            provider: provider.map(str::to_owned),
            error_class: error_class.map(str::to_owned),
        })
    }

    /// A delivery with its attempts and receipts.
    pub async fn delivery_history(&self, id: &str) -> Result<DeliveryHistory, EngineError> {
        let id: DeliveryId = id.parse()?;
        let delivery = self.store.delivery(&id).await?.ok_or_else(|| EngineError::NotFound {
            what: "delivery",
            id: id.to_string(),
        })?;
        let events = self.store.delivery_events(&id).await?;
        Ok(DeliveryHistory { delivery, events })
    }

    /// Every configured provider with its breaker state, in failover order per channel.
    pub async fn providers(&self) -> Result<Vec<ProviderStatus>, EngineError> {
        let health: std::collections::HashMap<String, store::ProviderHealth> = self
            .store
            .provider_health()
            .await?
            .into_iter()
            .map(|h| (h.provider.clone(), h))
            .collect();
        let now = Utc::now();
        let mut out = Vec::new();
        for channel in Channel::ALL.iter().copied() {
            for (position, h) in self.channels.providers(channel).iter().enumerate() {
                let stored = health.get(&h.name);
                let failures = stored.map(|s| s.consecutive_failures).unwrap_or(0);
                let open_until = stored.and_then(|s| s.open_until);
                let breaker = if failures < h.breaker.failure_threshold as i64 {
                    "closed"
                } else if open_until.is_some_and(|u| u > now) {
                    "open"
                } else {
                    "half_open"
                };
                out.push(ProviderStatus {
                    channel,
                    position: position + 1,
                    name: h.name.clone(),
                    breaker,
                    consecutive_failures: failures,
                    open_until,
                    last_error_kind: stored.and_then(|s| s.last_error_kind.clone()),
                });
            }
        }
        Ok(out)
    }

    fn provider_settings(&self, name: &str, kind: &str) -> Result<&crate::config::ProviderSettings, EngineError> {
        self.settings
            .providers
            .get(name)
            .filter(|p| p.kind == kind)
            .ok_or_else(|| EngineError::NotFound {
                what: "provider",
                id: format!("{name} ({kind})"),
            })
    }

    /// A Twilio status callback for provider `name`: the signature is checked against the
    /// configured callback URL and auth token; a bad one changes nothing.
    pub async fn twilio_status(
        &self,
        name: &str,
        params: &[(String, String)],
        signature: Option<&str>,
    ) -> Result<ReceiptTally, EngineError> {
        let p = self.provider_settings(name, "twilio")?;
        let twilio = p.twilio.as_ref().ok_or_else(|| EngineError::NotFound {
            what: "provider",
            id: name.to_owned(),
        })?;
        let url = twilio.status_callback_url.as_deref().unwrap_or_default();
        // An empty key would let anyone sign: without an auth token no callback is believed.
        let valid = !twilio.auth_token.is_empty()
            && signature.is_some_and(|sig| {
                crate::channels::twilio::verify_signature(twilio.auth_token.expose(), url, params, sig)
            });
        if !valid {
            tracing::warn!(
                provider = name,
                "a Twilio status callback with a missing or wrong signature was refused"
            );
            return Err(EngineError::Unauthenticated(
                "X-Twilio-Signature: missing or does not match this request".into(),
            ));
        }
        let receipts: Vec<Receipt> = crate::channels::twilio::receipt_from_status(params)
            .into_iter()
            .collect();
        self.apply_receipts(&receipts, &[name]).await
    }

    /// An Aliyun SMS delivery report push for provider `name`, authenticated by its token.
    pub async fn aliyun_report(
        &self,
        name: &str,
        token: Option<&str>,
        body: &[u8],
    ) -> Result<ReceiptTally, EngineError> {
        let p = self.provider_settings(name, "aliyun_sms")?;
        let expected = p
            .aliyun_sms
            .as_ref()
            .map(|a| a.report_token.expose())
            .unwrap_or_default();
        if !token.is_some_and(|t| same_secret(t, expected)) {
            tracing::warn!(
                provider = name,
                "an Aliyun delivery report without the right token was refused"
            );
            return Err(EngineError::Unauthenticated("token: missing or wrong".into()));
        }
        let receipts =
            crate::channels::aliyun::receipts_from_report(body).map_err(|reason| FieldError::new("body", reason))?;
        self.apply_receipts(&receipts, &[name]).await
    }

    /// A bounce or delivery report (a raw RFC 3464 message) posted by the mail system with the
    /// configured bearer token; matched to its delivery by the original Message-ID.
    pub async fn email_dsn(&self, token: Option<&str>, raw: &[u8]) -> Result<ReceiptTally, EngineError> {
        if !token.is_some_and(|t| same_secret(t, self.settings.email.dsn_token.expose())) {
            tracing::warn!("a delivery status notification without the right token was refused");
            return Err(EngineError::Unauthenticated(
                "Authorization: a bearer token matching email.dsn_token is required".into(),
            ));
        }
        let receipts =
            crate::channels::dsn::receipts_from_dsn(raw).map_err(|e| FieldError::new("body", e.to_string()))?;
        let providers: Vec<&str> = self
            .channels
            .providers(Channel::Email)
            .iter()
            .map(|h| h.name.as_str())
            .collect();
        self.apply_receipts(&receipts, &providers).await
    }

    /// Applies provider receipts (status callbacks, delivery reports, bounces).
    pub async fn apply_receipts(&self, receipts: &[Receipt], providers: &[&str]) -> Result<ReceiptTally, EngineError> {
        let dispatcher = self.dispatcher();
        let mut tally = ReceiptTally::default();
        for r in receipts {
            match dispatcher.apply_receipt(r, providers).await? {
                None => tally.unmatched += 1,
                Some(changed) => {
                    tally.matched += 1;
                    if changed {
                        tally.changed += 1;
                    }
                }
            }
        }
        Ok(tally)
    }
}
