//! Regulator filings. A regulator profile (`config/regulators/*.toml`) says when it applies,
//! when its clock runs out and which items each stage holds. A filing is drafted from the
//! incident's facts and figures, checked for completeness (every required field present in
//! the report's language), stored with its deadline, then written to the filings directory
//! (JSON and HTML) or emailed to the regulator's address.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::domain::*;
use crate::draft::kind_label;
use crate::ledger::content_hash;
use crate::model::*;
use crate::templates::{TemplateError, Templates};
use crate::time::{fmt_ts, human_for};

pub const CAC_PROFILE: &str = include_str!("../config/regulators/cn-cac.toml");

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clock {
    pub from: String,
    pub ordinary_hours: i64,
    pub critical_infrastructure_hours: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegulatorProfile {
    pub id: String,
    pub name_en: String,
    pub name_zh: String,
    pub locale: Locale,
    pub min_grade: Grade,
    pub clock: Clock,
    pub initial: Vec<ProfileItem>,
    #[serde(default)]
    pub grade_threshold: Vec<crate::scope::GradeThreshold>,
}

impl RegulatorProfile {
    pub fn parse(text: &str) -> Result<Self, FilingError> {
        let p: Self = toml::from_str(text).map_err(|e| FilingError::Profile(e.to_string()))?;
        if p.clock.from != "aware_at" {
            return Err(FilingError::Profile(format!(
                "clock.from '{}' is not supported yet; use aware_at",
                p.clock.from
            )));
        }
        Ok(p)
    }

    pub fn cac() -> Result<Self, FilingError> {
        Self::parse(CAC_PROFILE)
    }

    pub fn applies(&self, facts: &IncidentFacts) -> bool {
        facts.grade >= self.min_grade
    }

    /// When the initial report is due.
    pub fn initial_deadline(&self, facts: &IncidentFacts, class: OperatorClass) -> DateTime<Utc> {
        let hours = match class {
            OperatorClass::Ordinary => self.clock.ordinary_hours,
            OperatorClass::CriticalInfrastructure => self.clock.critical_infrastructure_hours,
        };
        facts.aware_at + Duration::hours(hours)
    }

    pub fn name(&self) -> &str {
        match self.locale {
            Locale::En => &self.name_en,
            Locale::ZhCn => &self.name_zh,
        }
    }
}

/// Figures the report states besides the facts.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub reporting_unit: String,
    pub affected_merchants: Option<usize>,
    pub natural_persons: Option<usize>,
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
        _ => return None,
    };
    let value = value?;
    Some(if lead.is_empty() {
        value
    } else if zh {
        format!("{lead}：{value}")
    } else {
        format!("{lead}: {value}")
    })
}

/// Builds the initial report's items; fails with every missing required field.
pub fn initial_items(
    profile: &RegulatorProfile,
    facts: &IncidentFacts,
    figures: &Figures,
) -> Result<Vec<Value>, FilingError> {
    let locale = profile.locale;
    let mut missing = Vec::new();
    let mut items = Vec::new();
    for item in &profile.initial {
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
        let none = if locale == Locale::ZhCn { "无" } else { "none" };
        items.push(json!({
            "number": item.number,
            "title": title,
            "value": if value.is_empty() { none.to_owned() } else { value.join("\n") },
        }));
    }
    if missing.is_empty() {
        Ok(items)
    } else {
        Err(FilingError::Incomplete {
            regulator: profile.id.clone(),
            stage: "initial".into(),
            missing,
        })
    }
}

/// Drafts the initial filing (not yet stored or submitted).
pub fn draft_initial(
    profile: &RegulatorProfile,
    incident: &Incident,
    figures: &Figures,
    class: OperatorClass,
    transport: &str,
) -> Result<Filing, FilingError> {
    let facts = incident.facts.as_ref().ok_or(FilingError::NoFacts)?;
    let items = initial_items(profile, facts, figures)?;
    let deadline = profile.initial_deadline(facts, class);
    let content = json!({
        "regulator": { "id": profile.id, "name": profile.name() },
        "stage": "initial",
        "reference": incident.reference,
        "operator_class": class.as_str(),
        "aware_at": fmt_ts(facts.aware_at),
        "deadline_at": fmt_ts(deadline),
        "items": items,
    });
    Ok(Filing {
        id: FilingId::generate(),
        incident_id: incident.id.clone(),
        regulator: profile.id.clone(),
        stage: "initial".into(),
        content_hash: content_hash(content.to_string().as_bytes()),
        content,
        deadline_at: deadline,
        created_at: Utc::now(),
        submitted_at: None,
        transport: transport.to_owned(),
        location: None,
    })
}

/// Renders the filing as a printable HTML document.
pub fn render_html(
    filing: &Filing,
    profile: &RegulatorProfile,
    operator: (&str, &str),
    templates: &Templates,
) -> Result<String, FilingError> {
    let zh = profile.locale == Locale::ZhCn;
    let context = json!({
        "locale": profile.locale.as_str(),
        "regulator": { "id": profile.id, "name": profile.name() },
        "stage_label": if zh { "初报" } else { "Initial report" },
        "reference": filing.content["reference"],
        "operator": { "name": operator.0, "platform": operator.1 },
        "generated_at": human_for(filing.created_at, profile.locale),
        "deadline": human_for(filing.deadline_at, profile.locale),
        "items": filing.content["items"],
    });
    Ok(templates.render("filing/report.html", &context)?)
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
    let mut doc = filing.content.clone();
    doc["content_hash"] = filing.content_hash.clone().into();
    std::fs::write(&json_path, serde_json::to_vec_pretty(&doc).unwrap_or_default()).map_err(err)?;
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
            Duration::hours(4)
        );
        assert_eq!(
            p.initial_deadline(&f, OperatorClass::CriticalInfrastructure) - f.aware_at,
            Duration::hours(1)
        );
        assert!(p.applies(&f));
        assert!(!p.applies(&IncidentFacts {
            grade: Grade::General,
            ..f
        }));
    }

    #[test]
    fn items_hold_the_facts_and_missing_ones_are_listed() {
        let p = RegulatorProfile::cac().expect("profile");
        let figures = Figures {
            reporting_unit: "Example Marketplace".into(),
            affected_merchants: Some(45),
            natural_persons: Some(30),
        };
        let items = initial_items(&p, &facts(), &figures).expect("complete");
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
        let Err(FilingError::Incomplete { missing, .. }) = initial_items(&p, &f, &figures) else {
            panic!("must fail")
        };
        assert_eq!(
            missing,
            vec![
                "item 4: 'cause' (zh-CN)".to_owned(),
                "item 5: 'attacker_leads' (zh-CN)".to_owned()
            ]
        );
    }
}
