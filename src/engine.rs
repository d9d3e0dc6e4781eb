//! The engine: every operation of the flow, for the CLI, the HTTP API and host applications.
//! Each operation checks the incident's state, stores the change (with its ledger entry), and
//! only then acts on the outside world. Operations are idempotent: repeating one that already
//! happened changes nothing and reports what exists.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use serde_json::{Value, json};

use crate::bulletin::{self, BulletinError};
use crate::channels::{ChannelSet, ChannelSetupError, EmailTransport, Mail};
use crate::config::{ConfigError, Settings};
use crate::directory::{self, DirectoryError, ImportReport};
use crate::dispatch::{self, DispatchError, Dispatcher, StepReport};
use crate::domain::*;
use crate::draft::{self, DraftError, NoticeSettings};
use crate::filing::{self, FilingError, RegulatorProfile};
use crate::incident::{self, IncidentError};
use crate::ingest::{self, IngestError};
use crate::model::*;
use crate::scope::{self, ScopeSummary};
use crate::store::{self, IngestOutcome, Store, StoreError};
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
    #[error("{0}")]
    Invalid(#[from] FieldError),
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("four eyes: {approver} drafted notice version {version} and cannot also approve it")]
    SameActor { approver: String, version: i64 },
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

#[derive(Debug, Clone, Serialize)]
pub struct FilingView {
    pub id: FilingId,
    pub regulator: String,
    pub stage: String,
    pub deadline_at: chrono::DateTime<Utc>,
    pub submitted_at: Option<chrono::DateTime<Utc>>,
    pub location: Option<String>,
    pub transport: String,
    /// Time left on the clock when the view was taken (negative when overdue), in minutes.
    pub minutes_left: i64,
}

/// A notice as JSON: its sections and every rendering.
#[derive(Debug, Clone, Serialize)]
pub struct NoticeView {
    pub notice: Notice,
    pub incident_reference: String,
    pub draft_version: i64,
}

pub struct Tocsin {
    pub settings: Settings,
    pub store: Arc<dyn Store>,
    pub taxonomy: Taxonomy,
    pub templates: Arc<Templates>,
    pub channels: ChannelSet,
    pub paths: OutputPaths,
    pub cac: RegulatorProfile,
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
        Ok(Self {
            taxonomy: Taxonomy::builtin()?,
            templates: Arc::new(templates),
            channels,
            paths: OutputPaths::new(data_dir),
            cac: RegulatorProfile::cac()?,
            settings,
            store,
        })
    }

    pub fn notice_settings(&self) -> NoticeSettings {
        let s = &self.settings;
        NoticeSettings {
            operator_name: s.operator.name.clone(),
            platform: s.operator.platform.clone(),
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

    pub fn dispatcher(&self) -> Dispatcher {
        Dispatcher::new(
            self.store.clone(),
            self.channels.clone(),
            self.settings.delivery.clone(),
            &self.settings.operator.public_base_url,
        )
    }

    async fn incident(&self, id_or_reference: &str) -> Result<Incident, EngineError> {
        self.store
            .incident(id_or_reference)
            .await?
            .ok_or_else(|| EngineError::NotFound {
                what: "incident",
                id: id_or_reference.to_owned(),
            })
    }

    async fn merchants_by_id(&self) -> Result<HashMap<MerchantId, Merchant>, EngineError> {
        Ok(self
            .store
            .merchants()
            .await?
            .into_iter()
            .map(|m| (m.id.clone(), m))
            .collect())
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
        let facts = incident::parse_facts(facts, &self.taxonomy)?;
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
                store::IncidentChanges {
                    facts: Some(facts),
                    ..Default::default()
                },
            )
            .await?;
        self.incident(incident.id.as_str()).await
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
        Ok(())
    }

    /// Applies a scope rule. With `dry_run`, returns the counts and stores nothing.
    pub async fn scope(
        &self,
        id: &str,
        rule: &ScopeRule,
        actor: &Actor,
        dry_run: bool,
    ) -> Result<ScopeSummary, EngineError> {
        scope::check_rule(rule)?;
        let incident = self.incident(id).await?;
        let facts = Self::facts(&incident)?;
        if !incident::can_transition(incident.state, IncidentState::Scoped) {
            return Err(EngineError::wrong_state(
                &incident,
                "confirmed, scoped or drafted",
                "scope it",
            ));
        }
        let merchants = self.store.merchants().await?;
        let unknown = scope::unknown_ids(rule, &merchants);
        if !unknown.is_empty() {
            return Err(
                FieldError::new("merchant_ids", format!("not in the directory: {}", unknown.join(", "))).into(),
            );
        }
        let order = self.settings.delivery.channel_order()?;
        let affected = scope::scope(&incident.id, facts, rule, &merchants, &self.taxonomy, &order);
        let summary = scope::summarize(&affected);
        if dry_run {
            return Ok(summary);
        }
        if affected.is_empty() {
            return Err(FieldError::new(
                "scope",
                "selects no merchant holding the incident's exposed categories; nothing was stored",
            )
            .into());
        }
        let detail = serde_json::to_value(&summary).unwrap_or(Value::Null);
        self.store
            .transition(
                &incident.id,
                incident.state,
                store::Step {
                    to: IncidentState::Scoped,
                    actor,
                    reason: &format!("{} merchants affected", summary.affected),
                    detail,
                },
                store::IncidentChanges {
                    scope_rule: Some(rule.clone()),
                    affected: Some(affected),
                    ..Default::default()
                },
            )
            .await?;
        Ok(summary)
    }

    /// Drafts the notices. If the latest version already says exactly this, it is returned
    /// instead of a new version; a changed text is a new version.
    pub async fn draft(&self, id: &str, actor: &Actor) -> Result<DraftOutcome, EngineError> {
        let incident = self.incident(id).await?;
        let facts = Self::facts(&incident)?;
        let drafts = self.store.drafts(&incident.id).await?;
        let latest = drafts.last().cloned();
        if incident.state != IncidentState::Scoped && incident.state != IncidentState::Drafted {
            if let Some(d) = latest.filter(|_| incident.state > IncidentState::Drafted) {
                let notices = self.store.notices(&d.id).await?.len();
                return Ok(DraftOutcome {
                    draft: d,
                    notices,
                    created: false,
                });
            }
            return Err(EngineError::wrong_state(
                &incident,
                "scoped or drafted",
                "draft its notices",
            ));
        }
        let affected = self.store.affected(&incident.id).await?;
        let merchants = self.store.merchants().await?;
        let version = latest.as_ref().map(|d| d.version + 1).unwrap_or(1);
        let settings = self.notice_settings_for(facts);
        let renderer = draft::Renderer {
            settings: &settings,
            taxonomy: &self.taxonomy,
            templates: &self.templates,
        };
        let (new_draft, notices) = draft::draft_all(renderer, &incident, facts, &affected, &merchants, version, actor)?;
        if let Some(d) =
            latest.filter(|d| d.content_hash == new_draft.content_hash && incident.state == IncidentState::Drafted)
        {
            let count = self.store.notices(&d.id).await?.len();
            return Ok(DraftOutcome {
                draft: d,
                notices: count,
                created: false,
            });
        }
        self.store.insert_draft(&new_draft, &notices, incident.state).await?;
        Ok(DraftOutcome {
            notices: notices.len(),
            draft: new_draft,
            created: true,
        })
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
        let affected = self.store.affected(&incident.id).await?;
        let notices = self.store.notices(&draft.id).await?;
        let merchants = self.merchants_by_id().await?;
        let first = dispatch::first_deliveries(&incident.id, &draft.id, &affected, &notices, &merchants);
        let queued = self.store.enqueue(&first).await?;
        // Merchants still waiting for notice but without any usable address (none in their plan,
        // or the directory lost it since scoping) are unreachable: the bulletin covers them.
        for a in affected.iter().filter(|a| a.reachability == Reachability::Pending) {
            if !first.iter().any(|d| d.merchant_id == a.merchant_id) {
                self.store
                    .set_reachability(&incident.id, &a.merchant_id, Reachability::Unreachable, None)
                    .await?;
            }
        }
        let without_channel = affected.iter().filter(|a| a.channel_plan.is_empty()).count();
        if incident.state == IncidentState::Approved {
            self.store
                .transition(
                &incident.id,
                IncidentState::Approved,
                store::Step { to: IncidentState::Notifying, actor, reason: &format!("{queued} deliveries queued"), detail: json!({ "draft_id": draft.id.as_str(), "queued": queued, "without_channel": without_channel }) },
                Default::default(),
            )
                .await?;
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
        if self.store.open_deliveries(Some(id)).await? > 0 {
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
        let affected = self.store.affected(&incident.id).await?;
        let unreachable: Vec<MerchantId> = affected
            .iter()
            .filter(|a| a.reachability == Reachability::Unreachable)
            .map(|a| a.merchant_id.clone())
            .collect();
        let mut versions = self.store.bulletins(&incident.id).await?;
        let Some(reason) = bulletin::trigger(
            unreachable.len(),
            self.settings.bulletin.unreachable_threshold,
            force || !versions.is_empty(),
        ) else {
            return Ok(None);
        };
        let key = bulletin::content_key(&incident, &unreachable);
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
                summary: bulletin::update_text(versions.len() as i64 + 1, unreachable.len(), Locale::En),
                reason,
                content_hash: key,
                published_at: Utc::now(),
                covered: unreachable.len() as i64,
            };
            // Stored first: if writing the files fails, the next run rewrites them.
            self.store.insert_bulletin(&b, &unreachable, actor).await?;
            versions.push(b);
        }
        let files = bulletin::render_files(&incident, &versions, &settings, &self.taxonomy, &self.templates)?;
        bulletin::write(&self.paths.bulletins, &incident.reference, &files)?;
        self.write_bulletin_index().await?;
        Ok(versions.pop())
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

    /// Drafts, stores and submits the CAC initial report if the incident's grade requires it.
    /// Returns `None` when the profile does not apply. Submitting twice changes nothing.
    pub async fn file_initial(&self, id: &str, actor: &Actor) -> Result<Option<Filing>, EngineError> {
        let incident = self.incident(id).await?;
        if incident.state == IncidentState::Dismissed {
            return Err(EngineError::wrong_state(
                &incident,
                "confirmed (not dismissed)",
                "file a regulator report",
            ));
        }
        let facts = Self::facts(&incident)?;
        if !self.cac.applies(facts) {
            return Ok(None);
        }
        let existing = self
            .store
            .filings(&incident.id)
            .await?
            .into_iter()
            .find(|f| f.regulator == self.cac.id && f.stage == "initial");
        let filing = match existing {
            Some(f) => f,
            None => {
                let affected = self.store.affected(&incident.id).await?;
                let merchants = self.merchants_by_id().await?;
                let natural = affected
                    .iter()
                    .filter(|a| {
                        merchants
                            .get(&a.merchant_id)
                            .is_some_and(|m| m.kind != MerchantKind::Enterprise)
                    })
                    .count();
                let figures = filing::Figures {
                    reporting_unit: format!("{} ({})", self.settings.operator.name, self.settings.operator.platform),
                    affected_merchants: (!affected.is_empty()).then_some(affected.len()),
                    natural_persons: (!affected.is_empty()).then_some(natural),
                };
                let f = filing::draft_initial(
                    &self.cac,
                    &incident,
                    &figures,
                    self.settings.operator.operator_class()?,
                    &self.settings.filing.transport,
                )?;
                self.store.insert_filing(&f, actor).await?;
                f
            }
        };
        if filing.submitted_at.is_some() {
            return Ok(Some(filing));
        }
        // Claimed before sending, so a second `file` running at the same time does not send it
        // again; a claim left by a crash expires and the next run sends it.
        let now = Utc::now();
        if !self
            .store
            .claim_filing(&filing.id, now, now + chrono::Duration::minutes(5))
            .await?
        {
            return Ok(Some(filing));
        }
        let html = filing::render_html(
            &filing,
            &self.cac,
            (&self.settings.operator.name, &self.settings.operator.platform),
            &self.templates,
        )?;
        let location = match self.settings.filing.transport.as_str() {
            "email" => {
                let mailer = EmailTransport::from_settings(&self.settings.email, &self.paths.email_outbox)?;
                let subject = format!(
                    "网络安全事件报告（初报）{} / Incident report (initial)",
                    incident.reference
                );
                let text = serde_json::to_string_pretty(&filing.content).unwrap_or_default();
                let key = format!("{}:{}", filing.id, filing.stage);
                let mail = Mail {
                    to: &self.settings.filing.regulator_email,
                    subject: &subject,
                    text: &text,
                    html: &html,
                    language: self.cac.locale.as_str(),
                    key: &key,
                };
                mailer.send_mail(&mail).await.map_err(|e| FilingError::Write {
                    path: "regulator email".into(),
                    reason: e.message,
                })?;
                format!("email to the configured regulator address ({})", self.cac.id)
            }
            _ => filing::write_files(&self.paths.filings, &incident.reference, &filing, &html)?
                .display()
                .to_string(),
        };
        self.store
            .mark_filing_submitted(&filing.id, Utc::now(), &location, actor)
            .await?;
        Ok(self
            .store
            .filings(&incident.id)
            .await?
            .into_iter()
            .find(|f| f.id == filing.id))
    }

    // ---- reading

    pub async fn view(&self, id: &str) -> Result<IncidentView, EngineError> {
        let incident = self.incident(id).await?;
        let affected = self.store.affected(&incident.id).await?;
        let now = Utc::now();
        Ok(IncidentView {
            transitions: self.store.transitions(&incident.id).await?,
            scope: scope::summarize(&affected),
            reached: affected
                .iter()
                .filter(|a| a.reachability == Reachability::Reached)
                .count(),
            unreachable: affected
                .iter()
                .filter(|a| a.reachability == Reachability::Unreachable)
                .map(|a| a.merchant_id.clone())
                .collect(),
            drafts: self.store.drafts(&incident.id).await?,
            deliveries: self.store.delivery_tally(&incident.id).await?,
            bulletins: self.store.bulletins(&incident.id).await?,
            filings: self
                .store
                .filings(&incident.id)
                .await?
                .into_iter()
                .map(|f| FilingView {
                    minutes_left: (f.deadline_at - now).num_minutes(),
                    id: f.id,
                    regulator: f.regulator,
                    stage: f.stage,
                    deadline_at: f.deadline_at,
                    submitted_at: f.submitted_at,
                    location: f.location,
                    transport: f.transport,
                })
                .collect(),
            incident,
        })
    }

    pub async fn incidents(&self) -> Result<Vec<Incident>, EngineError> {
        Ok(self.store.incidents().await?)
    }

    pub async fn notice(&self, id: &str) -> Result<NoticeView, EngineError> {
        let not_found = || EngineError::NotFound {
            what: "notice",
            id: id.to_owned(),
        };
        let notice_id: NoticeId = id.parse().map_err(|_| not_found())?;
        let notice = self.store.notice(&notice_id).await?.ok_or_else(not_found)?;
        let draft = self.store.draft(&notice.draft_id).await?.ok_or_else(not_found)?;
        let incident = self.incident(draft.incident_id.as_str()).await?;
        Ok(NoticeView {
            notice,
            incident_reference: incident.reference,
            draft_version: draft.version,
        })
    }

    /// The notices of the incident's latest draft.
    pub async fn notices(&self, id: &str) -> Result<Vec<Notice>, EngineError> {
        let incident = self.incident(id).await?;
        match self.store.drafts(&incident.id).await?.pop() {
            Some(d) => Ok(self.store.notices(&d.id).await?),
            None => Ok(Vec::new()),
        }
    }

    pub async fn deliveries(&self, id: &str) -> Result<Vec<Delivery>, EngineError> {
        let incident = self.incident(id).await?;
        Ok(self.store.deliveries(&incident.id).await?)
    }
}
