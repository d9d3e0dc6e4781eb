//! Regulator filings. A regulator profile (`config/regulators/*.toml`) says when it applies,
//! when its clock runs out and which items each stage holds. A filing is drafted from the
//! incident's facts and figures, checked for completeness (every required field present in
//! the report's language), stored with its deadline, then written to the filings directory
//! (JSON and HTML) or emailed to the regulator's address.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use crate::clocks::{Calendar, Span, Zone};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::domain::*;
use crate::draft::kind_label;
use crate::ledger::content_hash;
use crate::model::*;
use crate::templates::{TemplateError, Templates};
use crate::time::{fmt_ts, human_for};

pub const CAC_PROFILE: &str = include_str!("../config/regulators/cn-cac.toml");

/// The regulator profiles and working-day calendars shipped in `config/`.
static BUILTIN_REGULATORS: include_dir::Dir<'static> =
    include_dir::include_dir!("$CARGO_MANIFEST_DIR/config/regulators");
static BUILTIN_CALENDARS: include_dir::Dir<'static> = include_dir::include_dir!("$CARGO_MANIFEST_DIR/config/calendars");

/// Every regulator profile in force, with the calendars their clocks count in.
#[derive(Debug, Clone)]
pub struct Regulators {
    pub profiles: Vec<RegulatorProfile>,
    pub calendars: std::collections::HashMap<String, Calendar>,
}

impl Regulators {
    /// The shipped profiles and calendars; a file of the same name in `rules_dir/regulators/`
    /// or `rules_dir/calendars/` replaces a shipped one, other `.toml` files there are added.
    pub fn load(rules_dir: Option<&Path>) -> Result<Self, FilingError> {
        let texts = |builtin: &include_dir::Dir<'static>, sub: &str| -> Result<Vec<(String, String)>, FilingError> {
            let mut by_name: std::collections::BTreeMap<String, String> = builtin
                .files()
                .filter(|f| f.path().extension().is_some_and(|e| e == "toml"))
                .filter_map(|f| {
                    Some((
                        f.path().file_name()?.to_string_lossy().into_owned(),
                        f.contents_utf8()?.to_owned(),
                    ))
                })
                .collect();
            if let Some(dir) = rules_dir.map(|d| d.join(sub)) {
                match std::fs::read_dir(&dir) {
                    Ok(entries) => {
                        for entry in entries.flatten() {
                            let path = entry.path();
                            if path.extension().is_some_and(|e| e == "toml") {
                                let text = std::fs::read_to_string(&path)
                                    .map_err(|e| FilingError::Profile(format!("{}: {e}", path.display())))?;
                                by_name.insert(entry.file_name().to_string_lossy().into_owned(), text);
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(FilingError::Profile(format!("{}: {e}", dir.display()))),
                }
            }
            Ok(by_name.into_iter().collect())
        };
        let mut calendars = std::collections::HashMap::new();
        for (name, text) in texts(&BUILTIN_CALENDARS, "calendars")? {
            let c = Calendar::parse(&text).map_err(|e| FilingError::Profile(format!("calendars/{name}: {e}")))?;
            calendars.insert(c.id.clone(), c);
        }
        let mut profiles: Vec<RegulatorProfile> = Vec::new();
        for (name, text) in texts(&BUILTIN_REGULATORS, "regulators")? {
            let p =
                RegulatorProfile::parse(&text).map_err(|e| FilingError::Profile(format!("regulators/{name}: {e}")))?;
            if let Some(c) = p.calendar.as_deref().filter(|c| !calendars.contains_key(*c)) {
                return Err(FilingError::Profile(format!(
                    "regulators/{name}: calendar '{c}' is not in calendars/"
                )));
            }
            if profiles.iter().any(|q| q.id == p.id) {
                return Err(FilingError::Profile(format!(
                    "regulators/{name}: a second profile with id '{}'",
                    p.id
                )));
            }
            profiles.push(p);
        }
        Ok(Self { profiles, calendars })
    }

    pub fn get(&self, id: &str) -> Option<&RegulatorProfile> {
        self.profiles.iter().find(|p| p.id == id)
    }

    pub fn calendar_of(&self, p: &RegulatorProfile) -> Option<&Calendar> {
        p.calendar.as_deref().and_then(|c| self.calendars.get(c))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FilingError {
    #[error("regulator profile: {0}")]
    Profile(String),
    #[error("the {regulator} {stage} report is incomplete: {}", .missing.join("; "))]
    Incomplete {
        regulator: String,
        stage: String,
        missing: Vec<String>,
    },
    #[error("the incident has no confirmed facts yet")]
    NoFacts,
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("writing the filing to {path}: {reason}")]
    Write { path: String, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileItem {
    pub number: u32,
    pub title_en: String,
    pub title_zh: String,
    pub fields: Vec<String>,
    pub required_fields: Vec<String>,
}

/// The moment a clock starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockStart {
    /// When the operator became aware of the incident (the facts' `aware_at`).
    Aware,
    /// When the first event of the incident was detected.
    Detected,
    /// When a responder confirmed the incident (the assessment that it is one).
    Assessed,
    /// When handling ended: the incident was closed.
    HandlingEnded,
    /// When this profile's initial report was filed.
    InitialFiled,
    /// When this profile's update was filed (NIS2's final report runs from its notification).
    UpdateFiled,
}

impl ClockStart {
    pub fn as_str(&self) -> &'static str {
        match self {
            ClockStart::Aware => "aware",
            ClockStart::Detected => "detected",
            ClockStart::Assessed => "assessed",
            ClockStart::HandlingEnded => "handling_ended",
            ClockStart::InitialFiled => "initial_filed",
            ClockStart::UpdateFiled => "update_filed",
        }
    }
}

/// A report stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Initial,
    Update,
    Final,
}

impl Stage {
    pub fn as_str(&self) -> &'static str {
        match self {
            Stage::Initial => "initial",
            Stage::Update => "update",
            Stage::Final => "final",
        }
    }
}

/// One deadline of a profile: which stage, from when, how long.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockRule {
    pub stage: Stage,
    pub from: ClockStart,
    pub within: Span,
    /// A shorter period for critical-infrastructure operators (CAC: 1 hour instead of 4).
    #[serde(default)]
    pub critical_infrastructure: Option<Span>,
    /// What the regime calls this report ("early warning"), when it is not just the stage.
    #[serde(default)]
    pub label_en: Option<String>,
    #[serde(default)]
    pub label_zh: Option<String>,
}

impl ClockRule {
    pub fn span(&self, class: OperatorClass) -> Span {
        match (class, self.critical_infrastructure) {
            (OperatorClass::CriticalInfrastructure, Some(s)) => s,
            _ => self.within,
        }
    }
}

/// When a profile applies: every condition given must hold (a condition left out holds).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    #[serde(default)]
    pub min_grade: Option<Grade>,
    /// Distinct natural persons whose information is involved ("500 or more": 500).
    #[serde(default)]
    pub min_natural_persons: Option<u64>,
    #[serde(default)]
    pub min_merchants: Option<u64>,
    /// Any of these data categories exposed.
    #[serde(default)]
    pub categories_any: Vec<String>,
    /// Any affected merchant in one of these regions (`CN` covers `CN-ZJ`).
    #[serde(default)]
    pub regions_any: Vec<String>,
}

/// What an incident touches, as profiles' triggers test it.
#[derive(Debug, Clone, Default)]
pub struct Exposure {
    pub grade: Option<Grade>,
    pub natural_persons: Option<u64>,
    pub merchants: u64,
    pub categories: Vec<String>,
    /// The affected merchants' regions (`CN-ZJ`, `SG`, `DE`...).
    pub regions: Vec<String>,
}

impl Trigger {
    pub fn holds(&self, e: &Exposure) -> bool {
        let grade = self.min_grade.is_none_or(|min| e.grade.is_some_and(|g| g >= min));
        let persons = self
            .min_natural_persons
            .is_none_or(|min| e.natural_persons.is_some_and(|n| n >= min));
        let merchants = self.min_merchants.is_none_or(|min| e.merchants >= min);
        let categories = self.categories_any.is_empty() || self.categories_any.iter().any(|c| e.categories.contains(c));
        let regions = self.regions_any.is_empty()
            || self.regions_any.iter().any(|want| {
                e.regions
                    .iter()
                    .any(|r| r == want || r.strip_prefix(want.as_str()).is_some_and(|rest| rest.starts_with('-')))
            });
        grade && persons && merchants && categories && regions
    }
}

/// How a profile's reports are filed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    /// `email`, `https` or `portal` (a document a person files on the regulator's web form).
    pub method: String,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub portal: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegulatorProfile {
    pub id: String,
    pub name_en: String,
    pub name_zh: String,
    pub locale: Locale,
    /// Where the regulator's days begin and end (IANA name).
    pub time_zone: Zone,
    /// The working-day calendar (`config/calendars/<id>.toml`) for periods in working days.
    #[serde(default)]
    pub calendar: Option<String>,
    /// The profile applies when any of these holds.
    pub triggers: Vec<Trigger>,
    pub clocks: Vec<ClockRule>,
    pub submission: Submission,
    pub initial: Vec<ProfileItem>,
    #[serde(default)]
    pub update: Vec<ProfileItem>,
    #[serde(default, rename = "final")]
    pub final_report: Vec<ProfileItem>,
    #[serde(default)]
    pub grade_threshold: Vec<crate::scope::GradeThreshold>,
}

impl RegulatorProfile {
    pub fn parse(text: &str) -> Result<Self, FilingError> {
        let p: Self = toml::from_str(text).map_err(|e| FilingError::Profile(e.to_string()))?;
        let fail = |why: String| Err(FilingError::Profile(format!("{}: {why}", p.id)));
        if p.triggers.is_empty() {
            return fail("triggers: give at least one (an empty [[triggers]] applies to every incident)".into());
        }
        if !matches!(p.submission.method.as_str(), "email" | "https" | "portal") {
            return fail(format!(
                "submission.method: '{}' is not email, https or portal",
                p.submission.method
            ));
        }
        if p.initial.is_empty() {
            return fail("initial: list the items of the initial report".into());
        }
        for c in &p.clocks {
            let started_by = match c.from {
                ClockStart::InitialFiled => Some(Stage::Initial),
                ClockStart::UpdateFiled => Some(Stage::Update),
                _ => None,
            };
            if started_by == Some(c.stage) {
                return fail(format!(
                    "clocks: the {} clock cannot start when its own report is filed",
                    c.stage.as_str()
                ));
            }
            if matches!(c.within, Span::WorkingDays(_)) && p.calendar.is_none() {
                return fail("clocks: a period in working days needs a calendar".into());
            }
        }
        if !p.clocks.iter().any(|c| c.stage == Stage::Initial) {
            return fail("clocks: the initial report needs a clock".into());
        }
        for (stage, items) in [
            ("initial", &p.initial),
            ("update", &p.update),
            ("final", &p.final_report),
        ] {
            for item in items {
                if let Some(f) = item
                    .fields
                    .iter()
                    .chain(&item.required_fields)
                    .find(|f| !REPORT_FIELDS.contains(&f.as_str()))
                {
                    return fail(format!("{stage} item {}: unknown field '{f}'", item.number));
                }
            }
        }
        Ok(p)
    }

    pub fn cac() -> Result<Self, FilingError> {
        Self::parse(CAC_PROFILE)
    }

    pub fn applies(&self, e: &Exposure) -> bool {
        self.triggers.iter().any(|t| t.holds(e))
    }

    pub fn clock(&self, stage: Stage) -> Option<&ClockRule> {
        self.clocks.iter().find(|c| c.stage == stage)
    }

    /// When the initial report is due (its clock runs from awareness, detection or assessment;
    /// for the CAC, from awareness).
    pub fn initial_deadline(&self, facts: &IncidentFacts, class: OperatorClass) -> DateTime<Utc> {
        let rule = self.clock(Stage::Initial);
        let span = rule.map(|r| r.span(class)).unwrap_or(Span::Hours(0));
        crate::clocks::due(facts.aware_at, span, self.time_zone, None).at
    }

    pub fn name(&self) -> &str {
        match self.locale {
            Locale::En => &self.name_en,
            Locale::ZhCn => &self.name_zh,
        }
    }
}

/// The fields a report item may name (see [`field_text`]).
pub const REPORT_FIELDS: &[&str] = &[
    "reporting_unit",
    "affected_system",
    "occurred_at",
    "aware_at",
    "location",
    "kind",
    "grade",
    "grade_reason",
    "affected_counts",
    "harm_so_far",
    "measures_taken",
    "ransom",
    "trend",
    "impact",
    "cause",
    "attacker_leads",
    "measures_planned",
    "support_requested",
    "evidence_preservation",
    "other",
    "what_happened",
    "remedies",
    "categories",
    "contact",
    "responsibility",
    "remediation",
    "lessons",
    "delivery_figures",
];

/// Figures the report states besides the facts.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub reporting_unit: String,
    /// Who the regulator (or a person) contacts: the privacy officer's line.
    pub contact: String,
    /// Merchants notified per channel (accepted by a provider), and covered by the bulletin.
    pub notified_by_channel: Vec<(String, u64)>,
    pub bulletin_covered: Option<u64>,
    pub affected_merchants: Option<usize>,
    pub natural_persons: Option<usize>,
    /// Fields a responder wrote into this report (they take the place of the computed text).
    pub written: std::collections::BTreeMap<String, String>,
}

fn grade_label(g: Grade, locale: Locale) -> &'static str {
    match (locale, g) {
        (Locale::ZhCn, Grade::Critical) => "特别重大",
        (Locale::ZhCn, Grade::Major) => "重大",
        (Locale::ZhCn, Grade::Significant) => "较大",
        (Locale::ZhCn, Grade::General) => "一般",
        (Locale::En, g) => g.as_str(),
    }
}

/// One field's text in `locale`, with a short lead-in; `None` if there is nothing to say.
fn field_text(name: &str, facts: &IncidentFacts, figures: &Figures, locale: Locale) -> Option<String> {
    let zh = locale == Locale::ZhCn;
    let label = |en: &str, zh_label: &str| {
        if zh { zh_label.to_owned() } else { en.to_owned() }
    };
    let text = |t: &LocalizedText| t.get(locale).map(str::to_owned);
    let written = figures.written.get(name).filter(|t| !t.trim().is_empty()).cloned();
    let (lead, value) = match name {
        "reporting_unit" => (
            label("Reporting unit", "报告单位"),
            Some(figures.reporting_unit.clone()).filter(|s| !s.is_empty()),
        ),
        "affected_system" => (label("Affected system", "受影响系统"), text(&facts.affected_system)),
        "occurred_at" => (
            label("Occurred", "发生时间"),
            facts.occurred_at.map(|t| human_for(t, locale)),
        ),
        "aware_at" => (
            label("Discovered (aware)", "发现时间"),
            Some(human_for(facts.aware_at, locale)),
        ),
        "location" => (label("Where", "地点"), text(&facts.location)),
        "kind" => (
            label("Type", "事件类型"),
            Some(kind_label(facts.kind, locale).to_owned()),
        ),
        "grade" => (
            label("Grade", "事件级别"),
            Some(grade_label(facts.grade, locale).to_owned()),
        ),
        "grade_reason" => (label("Grading basis", "定级依据"), text(&facts.grade_reason)),
        "affected_counts" => (
            label("Affected", "影响范围"),
            figures.affected_merchants.map(|m| {
                let persons = figures.natural_persons.unwrap_or(0);
                if zh {
                    format!("受影响商家 {m} 个，其中自然人及个体工商户 {persons} 个")
                } else {
                    format!("{m} merchants affected, of whom {persons} natural persons or individual businesses")
                }
            }),
        ),
        "harm_so_far" => (label("Harm so far", "已造成的危害"), text(&facts.harm_so_far)),
        "measures_taken" => (
            label("Measures taken and their effect", "已采取的措施及效果"),
            text(&facts.measures_taken),
        ),
        "ransom" => (label("Ransom", "勒索情况"), text(&facts.ransom)),
        "trend" => (String::new(), text(&facts.trend)),
        "impact" => (label("Possible impact", "可能的影响"), text(&facts.impact)),
        "cause" => (String::new(), text(&facts.cause)),
        "attacker_leads" => (String::new(), text(&facts.attacker_leads)),
        "measures_planned" => (label("Planned measures", "拟采取的措施"), text(&facts.measures_planned)),
        "support_requested" => (label("Support requested", "需要的支持"), text(&facts.support_requested)),
        "evidence_preservation" => (String::new(), text(&facts.evidence_preservation)),
        "other" => (String::new(), text(&facts.other)),
        "what_happened" => (String::new(), text(&facts.what_happened)),
        "remedies" => (
            label("What individuals can do", "个人可以采取的措施"),
            text(&facts.remedies),
        ),
        "categories" => (
            label("Information involved", "涉及的信息种类"),
            (!facts.categories.is_empty()).then(|| {
                let names: Vec<&str> = facts.categories.iter().map(|c| c.as_str()).collect();
                names.join(if zh { "、" } else { ", " })
            }),
        ),
        "contact" => (
            label("Contact", "联系方式"),
            (!figures.contact.is_empty()).then(|| figures.contact.clone()),
        ),
        "delivery_figures" => (
            label("Notification", "告知情况"),
            (!figures.notified_by_channel.is_empty() || figures.bulletin_covered.is_some()).then(|| {
                let mut parts: Vec<String> = figures
                    .notified_by_channel
                    .iter()
                    .map(|(c, n)| {
                        if zh {
                            format!("{c} 告知 {n} 个商家")
                        } else {
                            format!("{n} merchants notified by {c}")
                        }
                    })
                    .collect();
                if let Some(b) = figures.bulletin_covered {
                    parts.push(if zh {
                        format!("公告覆盖 {b} 个商家")
                    } else {
                        format!("{b} covered by the public bulletin")
                    });
                }
                parts.join(if zh { "；" } else { "; " })
            }),
        ),
        // Written by the responder for the summary report (no incident fact holds them).
        "responsibility" => (label("Responsibility", "责任认定"), None),
        "remediation" => (label("Remediation", "整改措施"), None),
        "lessons" => (label("Lessons learned", "经验教训"), None),
        _ => return None,
    };
    let value = written.or(value)?;
    Some(if lead.is_empty() {
        value
    } else if zh {
        format!("{lead}：{value}")
    } else {
        format!("{lead}: {value}")
    })
}

/// A stage's items filled from the facts and figures, and the required fields still missing
/// (`item 3: 'lessons' (zh-CN)`).
pub fn stage_items(
    profile: &RegulatorProfile,
    stage: Stage,
    facts: &IncidentFacts,
    figures: &Figures,
) -> (Vec<Value>, Vec<String>) {
    let locale = profile.locale;
    let mut missing = Vec::new();
    let mut items = Vec::new();
    for item in profile.items(stage) {
        for f in &item.required_fields {
            if field_text(f, facts, figures, locale).is_none() {
                missing.push(format!("item {}: '{f}' ({locale})", item.number));
            }
        }
        let value: Vec<String> = item
            .fields
            .iter()
            .filter_map(|f| field_text(f, facts, figures, locale))
            .collect();
        let title = if locale == Locale::ZhCn {
            &item.title_zh
        } else {
            &item.title_en
        };
        // "None so far": an item the initial report leaves for the update is not yet known.
        let none = if locale == Locale::ZhCn {
            "暂无"
        } else {
            "none so far"
        };
        items.push(json!({
            "number": item.number,
            "title": title,
            "value": if value.is_empty() { none.to_owned() } else { value.join("\n") },
        }));
    }
    (items, missing)
}

/// One stage's report drafted from the incident's facts, the figures and what a responder
/// wrote: every item filled where the facts allow, the required fields still missing listed
/// (a draft may be stored incomplete; it is approved and submitted only once complete).
pub fn draft_stage(
    profile: &RegulatorProfile,
    incident: &Incident,
    stage: Stage,
    figures: &Figures,
    deadline: Option<DateTime<Utc>>,
    class: OperatorClass,
) -> Result<Filing, FilingError> {
    let facts = incident.facts.as_ref().ok_or(FilingError::NoFacts)?;
    let (items, missing) = stage_items(profile, stage, facts, figures);
    let content = json!({
        "regulator": { "id": profile.id, "name": profile.name() },
        "stage": stage.as_str(),
        "reference": incident.reference,
        "operator_class": class.as_str(),
        "aware_at": fmt_ts(facts.aware_at),
        "deadline_at": deadline.map(fmt_ts),
        "items": items,
        "missing": missing,
    });
    Ok(Filing {
        id: FilingId::generate(),
        incident_id: incident.id.clone(),
        regulator: profile.id.clone(),
        stage: stage.as_str().into(),
        content_hash: content_hash(content.to_string().as_bytes()),
        content,
        deadline_at: deadline,
        created_at: Utc::now(),
        submitted_at: None,
        transport: profile.submission.method.clone(),
        location: None,
        authors: Vec::new(),
        written: figures.written.clone(),
        approved_by: None,
        approved_at: None,
        document_at: None,
        reference_number: None,
        acknowledged_at: None,
        acknowledgement: None,
        last_error: None,
    })
}

impl Stage {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "initial" => Some(Stage::Initial),
            "update" => Some(Stage::Update),
            "final" => Some(Stage::Final),
            _ => None,
        }
    }
}

impl RegulatorProfile {
    /// The items a stage of this profile's report holds (empty: the regime has no such stage).
    pub fn items(&self, stage: Stage) -> &[ProfileItem] {
        match stage {
            Stage::Initial => &self.initial,
            Stage::Update => &self.update,
            Stage::Final => &self.final_report,
        }
    }

    /// What the report of `stage` is called in the profile's language.
    pub fn stage_label(&self, stage: Stage) -> String {
        let zh = self.locale == Locale::ZhCn;
        let from_clock = self
            .clock(stage)
            .and_then(|c| if zh { c.label_zh.clone() } else { c.label_en.clone() });
        from_clock.unwrap_or_else(|| {
            match (zh, stage) {
                (true, Stage::Initial) => "初报",
                (true, Stage::Update) => "续报",
                (true, Stage::Final) => "总结报告",
                (false, Stage::Initial) => "initial report",
                (false, Stage::Update) => "update",
                (false, Stage::Final) => "final report",
            }
            .to_owned()
        })
    }
}

/// Renders the filing as a printable HTML document.
pub fn render_html(
    filing: &Filing,
    profile: &RegulatorProfile,
    operator: (&str, &str),
    templates: &Templates,
) -> Result<String, FilingError> {
    let stage = Stage::parse(&filing.stage).unwrap_or(Stage::Initial);
    let context = json!({
        "locale": profile.locale.as_str(),
        "regulator": { "id": profile.id, "name": profile.name() },
        "stage_label": profile.stage_label(stage),
        "reference": filing.content["reference"],
        "operator": { "name": operator.0, "platform": operator.1 },
        "generated_at": human_for(filing.created_at, profile.locale),
        "deadline": filing.deadline_at.map(|d| human_for(d, profile.locale)),
        "drafted_by": filing.authors.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", "),
        "approved_by": filing.approved_by.as_ref().map(|a| a.as_str()),
        "approved_at": filing.approved_at.map(|t| human_for(t, profile.locale)),
        "content_hash": filing.content_hash,
        "items": filing.content["items"],
    });
    Ok(templates.render("filing/report.html", &context)?)
}

/// The report as the JSON a regulator receives: its content, hash, filing id and approval.
pub fn report_json(filing: &Filing) -> Value {
    let mut doc = filing.content.clone();
    doc["filing_id"] = filing.id.as_str().into();
    doc["content_hash"] = filing.content_hash.clone().into();
    doc["approved_by"] = filing.approved_by.as_ref().map(|a| a.as_str()).into();
    doc["approved_at"] = filing.approved_at.map(fmt_ts).into();
    doc
}

/// Writes `<dir>/<reference>/<regulator>-<stage>.json` and `.html`; returns the JSON path.
pub fn write_files(dir: &Path, reference: &str, filing: &Filing, html: &str) -> Result<PathBuf, FilingError> {
    let folder = dir.join(reference);
    let err = |e: std::io::Error| FilingError::Write {
        path: folder.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(&folder).map_err(err)?;
    let stem = format!("{}-{}", filing.regulator, filing.stage);
    let json_path = folder.join(format!("{stem}.json"));
    std::fs::write(
        &json_path,
        serde_json::to_vec_pretty(&report_json(filing)).unwrap_or_default(),
    )
    .map_err(err)?;
    std::fs::write(folder.join(format!("{stem}.html")), html).map_err(err)?;
    Ok(json_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> IncidentFacts {
        serde_json::from_str(include_str!("../config/demo/incident.json")).expect("facts")
    }

    #[test]
    fn cac_deadline_is_four_hours_or_one_for_critical_infrastructure() {
        let p = RegulatorProfile::cac().expect("profile");
        let f = facts();
        assert_eq!(
            p.initial_deadline(&f, OperatorClass::Ordinary) - f.aware_at,
            chrono::Duration::hours(4)
        );
        assert_eq!(
            p.initial_deadline(&f, OperatorClass::CriticalInfrastructure) - f.aware_at,
            chrono::Duration::hours(1)
        );
        let exposure = |grade| Exposure {
            grade: Some(grade),
            ..Default::default()
        };
        assert!(p.applies(&exposure(Grade::Significant)));
        assert!(p.applies(&exposure(Grade::Critical)));
        assert!(!p.applies(&exposure(Grade::General)));
    }

    fn shipped() -> Regulators {
        Regulators::load(None).expect("the shipped profiles load")
    }

    #[test]
    fn the_shipped_profiles_cover_china_the_eu_and_singapore() {
        let r = shipped();
        let mut ids: Vec<&str> = r.profiles.iter().map(|p| p.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["cn-cac", "cn-pipl-57", "eu-gdpr-33", "eu-nis2", "sg-pdpc"]);
        let nis2 = r.get("eu-nis2").expect("nis2");
        let periods: Vec<(Stage, String)> = nis2.clocks.iter().map(|c| (c.stage, c.within.to_string())).collect();
        assert_eq!(
            periods,
            [
                (Stage::Initial, "24h".to_owned()),
                (Stage::Update, "72h".to_owned()),
                (Stage::Final, "1mo".to_owned())
            ]
        );
        assert_eq!(
            r.get("cn-cac").and_then(|p| r.calendar_of(p)).map(|c| c.id.as_str()),
            Some("cn")
        );
        // The template documents every key and is not loaded itself.
        let template = include_str!("../config/regulators/TEMPLATE.toml.example");
        assert!(
            RegulatorProfile::parse(template).is_ok(),
            "the template is a valid profile"
        );
    }

    #[test]
    fn triggers_hold_at_their_thresholds() {
        let r = shipped();
        let pdpc = r.get("sg-pdpc").expect("pdpc");
        let sg = |persons: u64, categories: &[&str]| Exposure {
            grade: Some(Grade::General),
            natural_persons: Some(persons),
            merchants: persons,
            categories: categories.iter().map(|c| c.to_string()).collect(),
            regions: vec!["SG".into(), "CN-ZJ".into()],
        };
        assert!(
            !pdpc.applies(&sg(499, &["phone_number"])),
            "499 people, no prescribed data"
        );
        assert!(pdpc.applies(&sg(500, &["phone_number"])), "500 people");
        assert!(pdpc.applies(&sg(3, &["id_number"])), "prescribed data, any number");
        let elsewhere = Exposure {
            regions: vec!["CN-ZJ".into()],
            ..sg(5000, &["id_number"])
        };
        assert!(!pdpc.applies(&elsewhere), "nobody in Singapore");

        let gdpr = r.get("eu-gdpr-33").expect("gdpr");
        let nis2 = r.get("eu-nis2").expect("nis2");
        let eu = |grade, regions: &[&str]| Exposure {
            grade: Some(grade),
            regions: regions.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        };
        assert!(gdpr.applies(&eu(Grade::General, &["DE"])));
        assert!(!gdpr.applies(&eu(Grade::Critical, &["US-CA", "SG"])));
        assert!(
            !nis2.applies(&eu(Grade::General, &["DE"])),
            "not a significant incident"
        );
        assert!(nis2.applies(&eu(Grade::Significant, &["FR"])));
        // A region prefix matches its subdivisions, not other codes that start alike.
        let pipl = r.get("cn-pipl-57").expect("pipl");
        assert!(pipl.applies(&eu(Grade::General, &["CN-ZJ"])));
        assert!(!pipl.applies(&eu(Grade::General, &["CNX"])));
    }

    #[test]
    fn the_summary_report_carries_the_final_figures_and_lists_what_the_responder_must_write() {
        let p = RegulatorProfile::cac().expect("profile");
        let figures = Figures {
            affected_merchants: Some(45),
            natural_persons: Some(30),
            notified_by_channel: vec![("email".into(), 40), ("sms".into(), 3)],
            bulletin_covered: Some(2),
            ..Default::default()
        };
        let (items, missing) = stage_items(&p, Stage::Final, &facts(), &figures);
        assert_eq!(items.len(), 3);
        let measures = items[1]["value"].as_str().unwrap_or_default();
        assert!(
            measures.contains("email 告知 40 个商家") && measures.contains("公告覆盖 2 个商家"),
            "{measures}"
        );
        assert_eq!(
            missing,
            [
                "item 3: 'responsibility' (zh-CN)",
                "item 3: 'remediation' (zh-CN)",
                "item 3: 'lessons' (zh-CN)"
            ]
        );
    }

    #[test]
    fn a_profile_with_a_mistake_is_refused_naming_it() {
        let cac = CAC_PROFILE;
        for (from, to, says) in [
            ("within = \"4h\"", "within = \"4 hours\"", "not a period"),
            (
                "time_zone = \"Asia/Shanghai\"",
                "time_zone = \"Asia/Beijing\"",
                "not an IANA time zone",
            ),
            ("method = \"portal\"", "method = \"fax\"", "submission.method"),
            (
                "fields = [\"cause\"]",
                "fields = [\"motive\"]",
                "unknown field 'motive'",
            ),
        ] {
            assert!(cac.contains(from), "{from}");
            let e = RegulatorProfile::parse(&cac.replacen(from, to, 1))
                .expect_err(to)
                .to_string();
            assert!(e.contains(says), "{to}: {e}");
        }
    }

    #[test]
    fn items_hold_the_facts_and_missing_ones_are_listed() {
        let p = RegulatorProfile::cac().expect("profile");
        let figures = Figures {
            reporting_unit: "Example Marketplace".into(),
            contact: "privacy@example.com".into(),
            affected_merchants: Some(45),
            natural_persons: Some(30),
            ..Default::default()
        };
        let (items, missing) = stage_items(&p, Stage::Initial, &facts(), &figures);
        assert_eq!(missing, Vec::<String>::new());
        assert_eq!(items.len(), 8);
        assert!(
            items[0]["value"]
                .as_str()
                .is_some_and(|v| v.contains("Example Marketplace"))
        );
        assert!(items[1]["value"].as_str().is_some_and(|v| v.contains("较大")));

        let mut f = facts();
        f.cause = LocalizedText::default();
        f.attacker_leads.zh_cn = None;
        // Items 1-2 may go first: the initial report goes without the cause, the update not.
        let (items, missing) = stage_items(&p, Stage::Initial, &f, &figures);
        assert!(missing.is_empty(), "{missing:?}");
        assert_eq!(items[3]["value"], "暂无", "an unknown item says so");
        let (_, missing) = stage_items(&p, Stage::Update, &f, &figures);
        assert_eq!(
            missing,
            vec![
                "item 4: 'cause' (zh-CN)".to_owned(),
                "item 5: 'attacker_leads' (zh-CN)".to_owned()
            ]
        );
        f.affected_system = LocalizedText::default();
        let (_, missing) = stage_items(&p, Stage::Initial, &f, &figures);
        assert_eq!(missing, vec!["item 1: 'affected_system' (zh-CN)".to_owned()]);
    }
}
