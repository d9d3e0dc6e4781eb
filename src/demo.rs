//! `tocsin demo`: the whole flow on the demo data (`config/demo/`, embedded), on the embedded
//! default. Each step is skipped when it already happened, so a second run duplicates nothing.
//! The demo's times (events and facts) are all moved by the same amount so that the incident
//! was contained five minutes before the demo runs: the regulator clock is then as meaningful
//! as in a real incident. The story's texts give durations, never dates, so they stay true.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::directory;
use crate::domain::{Actor, IncidentState};
use crate::engine::{EngineError, IncidentView, Tocsin};
use crate::model::FilingState;
use crate::model::ScopeRule;
use crate::store::IngestOutcome;
use chrono::Utc;

use crate::time::{fmt_ts, human, parse_ts};

pub const MERCHANTS: &str = include_str!("../config/demo/merchants.jsonl");
pub const EVENTS: &str = include_str!("../config/demo/events.jsonl");
pub const FACTS: &str = include_str!("../config/demo/incident.json");
pub const SCOPE: &str = include_str!("../config/demo/scope.json");

#[derive(Debug, Serialize)]
pub struct DemoSummary {
    pub merchants_imported: u64,
    pub merchants_updated: u64,
    pub events_new: usize,
    pub events_duplicate: usize,
    pub incident: IncidentView,
    pub notices_drafted_now: usize,
    pub outputs: crate::engine::OutputPaths,
    pub bulletin_pages: Vec<String>,
    pub filing_files: Vec<String>,
    /// The evidence package of this run (a new one each run: evidence is never written over).
    pub evidence_package: String,
}

fn demo_err(reason: impl Into<String>) -> EngineError {
    EngineError::Invalid(crate::domain::FieldError::new("demo", reason))
}

/// How far to move the demo's times: containment lands five minutes before now.
fn demo_shift() -> Result<chrono::Duration, EngineError> {
    let facts: Value = serde_json::from_str(FACTS).map_err(|e| demo_err(e.to_string()))?;
    let contained = facts["contained_at"]
        .as_str()
        .and_then(|s| parse_ts(s).ok())
        .ok_or_else(|| demo_err("contained_at"))?;
    Ok(Utc::now() - chrono::Duration::minutes(5) - contained)
}

/// Moves the named time fields of a JSON object by `shift`.
fn shift_times(value: &mut Value, keys: &[&str], shift: chrono::Duration) {
    for key in keys {
        if let Some(t) = value[*key].as_str().and_then(|s| parse_ts(s).ok()) {
            value[*key] = Value::String(fmt_ts(t + shift));
        }
    }
}

pub async fn run(engine: &Tocsin) -> Result<DemoSummary, EngineError> {
    let alice: Actor = "alice@security".parse()?;
    let bob: Actor = "bob@security".parse()?;
    let olga: Actor = "olga@audit".parse()?;
    let ingest: Actor = "siem-connector".parse()?;

    let (merchants, rejected) = directory::parse_jsonl(MERCHANTS, &engine.taxonomy);
    let import = directory::import(engine.store.as_ref(), &merchants, rejected).await?;

    let shift = demo_shift()?;
    let mut events = String::new();
    for line in EVENTS.lines().filter(|l| !l.trim().is_empty()) {
        let mut event: Value = serde_json::from_str(line).map_err(|e| demo_err(e.to_string()))?;
        shift_times(&mut event, &["detected_at", "occurred_at"], shift);
        events.push_str(&event.to_string());
        events.push('\n');
    }
    let outcomes = engine.ingest_text(&events, &ingest).await?;
    let incident_id = outcomes
        .iter()
        .map(|o| match o {
            IngestOutcome::Opened { incident_id, .. }
            | IngestOutcome::Joined { incident_id, .. }
            | IngestOutcome::Duplicate { incident_id, .. } => incident_id.clone(),
        })
        .next()
        .ok_or_else(|| demo_err("the demo events opened no incident"))?;
    let id = incident_id.as_str();

    let state = |v: &IncidentView| v.incident.state;
    let mut view = engine.view(id).await?;
    if state(&view) == IncidentState::Triage {
        let mut facts: Value = serde_json::from_str(FACTS).map_err(|e| demo_err(e.to_string()))?;
        shift_times(&mut facts, &["occurred_at", "aware_at", "contained_at"], shift);
        engine.confirm(id, &facts, &alice).await?;
    }
    view = engine.view(id).await?;
    if state(&view) == IncidentState::Confirmed {
        let rule: ScopeRule = serde_json::from_str(SCOPE).map_err(|e| demo_err(e.to_string()))?;
        engine.scope(id, &rule, &alice, false).await?;
    }
    // A rerun finds the notices drafted and sent: drafting again would be an update.
    view = engine.view(id).await?;
    let drafted = if matches!(state(&view), IncidentState::Scoped | IncidentState::Drafted) {
        engine.draft(id, &alice, None).await?.notices
    } else {
        0
    };
    engine.approve(id, &bob).await?;
    engine.dispatch(id, &alice).await?;
    engine.deliver(id, Duration::from_secs(120), &alice).await?;
    // The regulator reports: drafted by alice, approved by bob, submitted by each profile's
    // method (on the embedded default, documents for the regulators' portals).
    for drafted in engine.draft_filings(id, None, None, &alice).await? {
        let f = &drafted.filing;
        if f.state == FilingState::Ready {
            engine.approve_filing(f.id.as_str(), &bob).await?;
        }
        if matches!(f.state, FilingState::Ready | FilingState::Approved) {
            engine.submit_filing(f.id.as_str(), &alice).await?;
        }
    }

    let (_, package) = engine.export_evidence_archive(id, &olga).await?;
    let incident = engine.view(id).await?;
    let reference = incident.incident.reference.clone();
    let list = |dir: std::path::PathBuf| -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .map(|e| e.path().display().to_string())
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    };
    Ok(DemoSummary {
        merchants_imported: import.counts.inserted,
        merchants_updated: import.counts.updated,
        events_new: outcomes
            .iter()
            .filter(|o| !matches!(o, IngestOutcome::Duplicate { .. }))
            .count(),
        events_duplicate: outcomes
            .iter()
            .filter(|o| matches!(o, IngestOutcome::Duplicate { .. }))
            .count(),
        notices_drafted_now: drafted,
        bulletin_pages: list(engine.paths.bulletins.join(&reference)),
        filing_files: list(engine.paths.filings.join(&reference)),
        evidence_package: engine.paths.evidence.join(package).display().to_string(),
        outputs: engine.paths.clone(),
        incident,
    })
}

/// A readable account of an incident's state.
pub fn describe(v: &IncidentView) -> String {
    let i = &v.incident;
    let mut out = format!(
        "incident {} ({}) - {}\n  state: {}\n",
        i.reference, i.id, i.title, i.state
    );
    if let Some(f) = &i.facts {
        out.push_str(&format!(
            "  grade: {}, kind: {}, aware at {}\n",
            f.grade,
            f.kind,
            human(f.aware_at)
        ));
    }
    out.push_str(&format!(
        "  merchants affected: {} (risk {:?}; locale {:?})\n  reached: {}, unreachable: {}\n",
        v.scope.affected,
        v.scope.by_risk,
        v.scope.by_locale,
        v.reached,
        v.unreachable.len()
    ));
    for d in &v.drafts {
        out.push_str(&format!(
            "  notice version {}: drafted by {}, approved by {}\n",
            d.version,
            d.drafted_by,
            d.approved_by
                .as_ref()
                .map(|a| a.to_string())
                .unwrap_or_else(|| "(awaiting approval)".into())
        ));
    }
    for t in &v.deliveries {
        out.push_str(&format!(
            "  {:<5}: {} accepted ({} confirmed delivered), {} failed, {} dead-lettered, {} pending\n",
            t.channel, t.sent, t.delivered, t.failed, t.dead, t.pending
        ));
    }
    for b in &v.bulletins {
        out.push_str(&format!(
            "  bulletin v{}: covers {} unreachable merchants ({})\n",
            b.version, b.covered, b.reason
        ));
    }
    for f in &v.filings {
        let span = |minutes: i64| format!("{}h{:02}m", minutes.abs() / 60, minutes.abs() % 60);
        let clock = match (f.deadline_at, f.submitted_at, f.minutes_left) {
            (Some(due), Some(at), _) if at <= due => {
                format!("filed {} before the deadline", span((due - at).num_minutes()))
            }
            (Some(due), Some(at), _) => format!("filed {} late", span((at - due).num_minutes())),
            (_, _, Some(left)) if left >= 0 => format!("{} left", span(left)),
            (_, _, Some(left)) => format!("overdue by {}", span(left)),
            _ => "no fixed deadline".to_owned(),
        };
        let state = match f.state {
            FilingState::Incomplete => format!("incomplete: {}", f.missing.join("; ")),
            FilingState::Ready => "waiting for a second person's approval".to_owned(),
            FilingState::Approved => "approved, not yet submitted".to_owned(),
            FilingState::AwaitingReference => format!(
                "document for the regulator's portal: {}; once filed: tocsin filings reference {} REFERENCE",
                f.location.as_deref().unwrap_or("-"),
                f.id
            ),
            FilingState::Submitted | FilingState::Acknowledged => format!(
                "submitted -> {}{}",
                f.location.as_deref().unwrap_or("-"),
                f.reference_number
                    .as_deref()
                    .map(|r| format!(", reference {r}"))
                    .unwrap_or_default()
            ),
        };
        out.push_str(&format!(
            "  filing {} {} ({}): deadline {}; {clock}; {state}\n",
            f.regulator,
            f.stage,
            f.stage_label,
            f.deadline_at.map(human).unwrap_or_else(|| "none".into()),
        ));
    }
    out.push_str("  timeline:\n");
    for t in &v.transitions {
        out.push_str(&format!(
            "    {}  {} -> {}  by {}: {}\n",
            human(t.at),
            t.from_state.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            t.to_state,
            t.actor,
            t.reason
        ));
    }
    out
}

impl DemoSummary {
    pub fn to_text(&self) -> String {
        let mut out = String::from("Tocsin demo\n\n");
        out.push_str(&format!(
            "directory: {} merchants new, {} updated\nevents: {} new, {} already seen\n\n",
            self.merchants_imported, self.merchants_updated, self.events_new, self.events_duplicate
        ));
        out.push_str(&describe(&self.incident));
        if !self.incident.unreachable.is_empty() {
            let ids: Vec<String> = self.incident.unreachable.iter().map(|m| m.to_string()).collect();
            out.push_str(&format!(
                "  unreachable merchants covered by the bulletin: {}\n",
                ids.join(", ")
            ));
        }
        out.push_str(&format!(
            "  notices drafted in this run: {}\n\noutputs:\n",
            self.notices_drafted_now
        ));
        let o = &self.outputs;
        for (what, path) in [
            ("database", &o.database),
            ("email (.eml files)", &o.email_outbox),
            ("sms (JSON files)", &o.sms_outbox),
            ("push (JSON files)", &o.push_outbox),
            ("public bulletins", &o.bulletins),
            ("regulator filings", &o.filings),
            ("evidence packages", &o.evidence),
        ] {
            if path.is_dir() {
                let count = std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0);
                out.push_str(&format!("  {what:<20} {} ({count} entries)\n", path.display()));
            } else {
                out.push_str(&format!("  {what:<20} {}\n", path.display()));
            }
        }
        for p in self.bulletin_pages.iter().chain(&self.filing_files) {
            out.push_str(&format!("    {p}\n"));
        }
        out.push_str(&format!(
            "    {} (check: cd there && sha256sum -c SHA256SUMS)\n",
            self.evidence_package
        ));
        out
    }
}
