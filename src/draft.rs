//! Drafting: one notice per affected merchant, in the merchant's language, for every channel,
//! from the templates under `templates/`. The five required elements are rendered as
//! sections first; a notice lacking any of them fails with the list of what is missing, and
//! no draft is stored. A draft version's content hash covers every notice in it.

use chrono::Utc;
use serde::Serialize;
use serde_json::{Value, json};

use crate::domain::*;
use crate::ledger::content_hash;
use crate::model::*;
use crate::taxonomy::Taxonomy;
use crate::templates::{TemplateError, Templates};
use crate::time::human_for;

#[derive(Debug, thiserror::Error)]
pub enum DraftError {
    /// Lists every missing element as `element (locale): what is missing`.
    #[error("the notice is incomplete: {}", .missing.join("; "))]
    Incomplete { missing: Vec<String> },
    #[error(transparent)]
    Template(#[from] TemplateError),
}

/// What drafting needs besides the incident: who the operator is and how to reach it.
#[derive(Debug, Clone, Serialize)]
pub struct NoticeSettings {
    pub operator_name: String,
    pub platform: String,
    pub officer_en: String,
    pub officer_zh: String,
    pub contact_email: String,
    pub contact_phone: String,
    pub public_base_url: String,
}

impl NoticeSettings {
    pub fn notice_url(&self, reference: &str) -> String {
        format!("{}/{reference}/", self.public_base_url.trim_end_matches('/'))
    }

    fn officer(&self, locale: Locale) -> &str {
        match locale {
            Locale::En => &self.officer_en,
            Locale::ZhCn => &self.officer_zh,
        }
    }
}

pub fn kind_label(kind: IncidentKind, locale: Locale) -> &'static str {
    use IncidentKind::*;
    match (locale, kind) {
        (Locale::En, Leak) => "data leak",
        (Locale::En, Tampering) => "data tampering",
        (Locale::En, Loss) => "data loss",
        (Locale::En, UnauthorizedAccess) => "unauthorised access",
        (Locale::En, Ransomware) => "ransomware attack",
        (Locale::En, Malware) => "malware infection",
        (Locale::En, DenialOfService) => "denial of service",
        (Locale::En, Other) => "security incident",
        (Locale::ZhCn, Leak) => "数据泄露",
        (Locale::ZhCn, Tampering) => "数据篡改",
        (Locale::ZhCn, Loss) => "数据丢失",
        (Locale::ZhCn, UnauthorizedAccess) => "未经授权的访问",
        (Locale::ZhCn, Ransomware) => "勒索软件攻击",
        (Locale::ZhCn, Malware) => "恶意软件感染",
        (Locale::ZhCn, DenialOfService) => "拒绝服务攻击",
        (Locale::ZhCn, Other) => "安全事件",
    }
}

pub fn risk_label(risk: RiskLevel, locale: Locale) -> &'static str {
    match (locale, risk) {
        (Locale::En, RiskLevel::High) => "high",
        (Locale::En, RiskLevel::Medium) => "medium",
        (Locale::En, RiskLevel::Low) => "low",
        (Locale::ZhCn, RiskLevel::High) => "高",
        (Locale::ZhCn, RiskLevel::Medium) => "中",
        (Locale::ZhCn, RiskLevel::Low) => "低",
    }
}

/// The incident's facts in one language, for templates. Missing texts become empty strings
/// here; [`missing_elements`] reports them before anything is rendered.
pub fn incident_context(incident: &Incident, facts: &IncidentFacts, locale: Locale) -> Value {
    let text = |t: &LocalizedText| t.get(locale).unwrap_or("").to_owned();
    let human = |t| human_for(t, locale);
    let detected = incident.detected_at;
    json!({
        "reference": incident.reference,
        "kind": facts.kind.as_str(),
        "kind_label": kind_label(facts.kind, locale),
        "occurred_at": human(facts.occurred_at.unwrap_or(detected)),
        "detected_at": human(detected),
        "aware_at": human(facts.aware_at),
        "contained_at": facts.contained_at.map(&human),
        "what_happened": text(&facts.what_happened),
        "impact": text(&facts.impact),
        "cause": text(&facts.cause),
        "measures_taken": text(&facts.measures_taken),
        "measures_planned": text(&facts.measures_planned),
        "remedies": text(&facts.remedies),
    })
}

/// Categories with their label, advice and remedy in `locale`.
pub fn categories_context(
    categories: &[CategoryId],
    locale: Locale,
    base: &Value,
    taxonomy: &Taxonomy,
    templates: &Templates,
) -> Result<Vec<Value>, TemplateError> {
    categories
        .iter()
        .map(|c| {
            let advice_name = format!("advice/{locale}/{c}");
            let remedy_name = format!("remedy/{locale}/{c}");
            let advice = if templates.has(&advice_name) {
                templates.render(&advice_name, base)?
            } else {
                String::new()
            };
            let remedy = if templates.has(&remedy_name) {
                templates.render(&remedy_name, base)?
            } else {
                String::new()
            };
            Ok(json!({
                "id": c.as_str(),
                "label": taxonomy.label(c, locale),
                "sensitive": taxonomy.is_sensitive(c),
                "advice": advice,
                "remedy": remedy,
            }))
        })
        .collect()
}

/// Facts and settings a notice in `locale` needs, by element.
pub fn missing_elements(facts: &IncidentFacts, settings: &NoticeSettings, locale: Locale) -> Vec<String> {
    let mut missing: Vec<String> = crate::incident::notice_texts(facts)
        .iter()
        .filter(|(_, _, text)| text.get(locale).is_none())
        .map(|(element, field, _)| format!("{element} ({locale}): '{field}' is not written"))
        .collect();
    if settings.officer(locale).trim().is_empty()
        || settings.contact_email.trim().is_empty()
        || settings.contact_phone.trim().is_empty()
    {
        missing.push(format!(
            "contact ({locale}): the protection officer, email and phone must all be configured"
        ));
    }
    missing
}

/// What rendering needs besides the incident: the operator's settings, the taxonomy and
/// the templates.
#[derive(Clone, Copy)]
pub struct Renderer<'a> {
    pub settings: &'a NoticeSettings,
    pub taxonomy: &'a Taxonomy,
    pub templates: &'a Templates,
}

/// Renders one merchant's notice. Fails with every missing element if any is absent.
pub fn render_notice(
    r: Renderer<'_>,
    draft_id: &DraftId,
    incident: &Incident,
    facts: &IncidentFacts,
    merchant: &Merchant,
    affected: &AffectedMerchant,
) -> Result<Notice, DraftError> {
    let Renderer {
        settings,
        taxonomy,
        templates,
    } = r;
    let locale = affected.locale;
    let mut missing = missing_elements(facts, settings, locale);
    let mut context = json!({
        "locale": locale.as_str(),
        "merchant": { "id": merchant.id.as_str(), "name": merchant.name, "kind": merchant.kind.as_str() },
        "operator": { "name": settings.operator_name, "platform": settings.platform },
        "incident": incident_context(incident, facts, locale),
        "risk": { "level": affected.risk.as_str(), "label": risk_label(affected.risk, locale) },
        "contact": { "officer": settings.officer(locale), "email": settings.contact_email, "phone": settings.contact_phone },
        "notice_url": settings.notice_url(&incident.reference),
    });
    let categories = categories_context(&affected.exposed, locale, &context, taxonomy, templates)?;
    if !categories
        .iter()
        .any(|c| c["advice"].as_str().is_some_and(|a| !a.is_empty()))
    {
        missing.push(format!(
            "advice ({locale}): no advice is written for the exposed categories"
        ));
    }
    context["categories"] = Value::Array(categories);
    let section = |name: &str| templates.render(&format!("notice/{locale}/{name}"), &context);
    let sections = NoticeSections {
        impact: section("impact")?,
        measures: section("measures")?,
        advice: section("advice")?,
        remedies: section("remedies")?,
        contact: section("contact")?,
    };
    for (name, text) in sections.named() {
        if text.trim().is_empty() {
            missing.push(format!("{name} ({locale}): the section rendered empty"));
        }
    }
    if !missing.is_empty() {
        return Err(DraftError::Incomplete { missing });
    }
    let render = |name: &str| templates.render(&format!("notice/{locale}/{name}"), &context);
    let email_text = render("email.txt")?;
    // The full notice must carry every element as rendered; a template that drops one fails.
    let dropped: Vec<String> = sections
        .named()
        .iter()
        .filter(|(_, text)| !email_text.contains(*text))
        .map(|(name, _)| format!("{name} ({locale}): the email template leaves this section out"))
        .collect();
    if !dropped.is_empty() {
        return Err(DraftError::Incomplete { missing: dropped });
    }
    let mut notice = Notice {
        id: NoticeId::generate(),
        draft_id: draft_id.clone(),
        merchant_id: merchant.id.clone(),
        locale,
        email_subject: render("email_subject")?,
        email_text,
        email_html: render("email.html")?,
        sms_text: render("sms")?,
        push_title: render("push_title")?,
        push_body: render("push_body")?,
        sections,
        content_hash: String::new(),
    };
    notice.content_hash = notice_hash(&notice);
    Ok(notice)
}

/// Hash of what the merchant receives: every rendering, not the ids.
pub fn notice_hash(n: &Notice) -> String {
    let content = json!([
        n.merchant_id.as_str(),
        n.locale.as_str(),
        n.sections,
        n.email_subject,
        n.email_text,
        n.email_html,
        n.sms_text,
        n.push_title,
        n.push_body
    ]);
    content_hash(content.to_string().as_bytes())
}

/// Hash of a whole draft version: every notice's hash in merchant order.
pub fn draft_hash(notices: &[Notice]) -> String {
    let mut lines: Vec<String> = notices
        .iter()
        .map(|n| format!("{} {}", n.merchant_id, n.content_hash))
        .collect();
    lines.sort();
    content_hash(lines.join("\n").as_bytes())
}

/// Renders every required notice of an incident as a new draft version.
pub fn draft_all(
    r: Renderer<'_>,
    incident: &Incident,
    facts: &IncidentFacts,
    affected: &[AffectedMerchant],
    merchants: &[Merchant],
    version: i64,
    actor: &Actor,
) -> Result<(Draft, Vec<Notice>), DraftError> {
    let draft_id = DraftId::generate();
    let by_id: std::collections::HashMap<&MerchantId, &Merchant> = merchants.iter().map(|m| (&m.id, m)).collect();
    let mut notices = Vec::with_capacity(affected.len());
    let mut missing = Vec::new();
    for a in affected.iter().filter(|a| a.notice_required) {
        let Some(merchant) = by_id.get(&a.merchant_id) else {
            missing.push(format!("merchant {} is no longer in the directory", a.merchant_id));
            continue;
        };
        match render_notice(r, &draft_id, incident, facts, merchant, a) {
            Ok(n) => notices.push(n),
            Err(DraftError::Incomplete { missing: m }) => {
                for item in m {
                    if !missing.contains(&item) {
                        missing.push(item);
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    if !missing.is_empty() {
        return Err(DraftError::Incomplete { missing });
    }
    let draft = Draft {
        id: draft_id,
        incident_id: incident.id.clone(),
        version,
        state: DraftState::Drafted,
        content_hash: draft_hash(&notices),
        drafted_by: actor.clone(),
        drafted_at: Utc::now(),
        approved_by: None,
        approved_at: None,
    };
    Ok((draft, notices))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> NoticeSettings {
        NoticeSettings {
            operator_name: "Example Marketplace".into(),
            platform: "seller platform".into(),
            officer_en: "PI Officer".into(),
            officer_zh: "个人信息保护负责人".into(),
            contact_email: "privacy@example.com".into(),
            contact_phone: "+86 400 000 0000".into(),
            public_base_url: "https://status.example.com/bulletins".into(),
        }
    }

    fn fixture(locale: Locale) -> (Incident, IncidentFacts, Merchant, AffectedMerchant) {
        let facts: IncidentFacts = serde_json::from_str(include_str!("../config/demo/incident.json")).expect("facts");
        let incident = Incident {
            id: IncidentId::generate(),
            reference: "INC-2026-0001".into(),
            state: IncidentState::Scoped,
            title: "t".into(),
            kind: facts.kind,
            severity: Severity::High,
            correlation_key: None,
            facts: Some(facts.clone()),
            scope_rule: None,
            detected_at: Utc::now(),
            opened_at: Utc::now(),
            updated_at: Utc::now(),
        };
        let merchant = Merchant {
            id: "m-1".parse().expect("id"),
            name: "Lin <Tea> & Co".into(),
            kind: MerchantKind::IndividualBusiness,
            locale,
            region: "CN-ZJ".into(),
            email: Some("a@example.com".parse().expect("email")),
            phone: None,
            push_token: None,
            postal_address: None,
            holdings: ["account_credentials", "settlement_account", "media"]
                .iter()
                .map(|c| c.parse().expect("c"))
                .collect(),
            created_at: None,
            marketing_opt_out: false,
        };
        let taxonomy = Taxonomy::builtin().expect("taxonomy");
        let affected =
            crate::scope::classify(&incident.id, &facts, &merchant, &taxonomy, &[Channel::Email]).expect("affected");
        (incident, facts, merchant, affected)
    }

    #[test]
    fn a_notice_has_all_five_sections_and_exactly_the_merchants_advice() {
        let templates = Templates::embedded().expect("templates");
        let taxonomy = Taxonomy::builtin().expect("taxonomy");
        for locale in [Locale::En, Locale::ZhCn] {
            let (incident, facts, merchant, affected) = fixture(locale);
            let settings = settings();
            let r = Renderer {
                settings: &settings,
                taxonomy: &taxonomy,
                templates: &templates,
            };
            let n = render_notice(r, &DraftId::generate(), &incident, &facts, &merchant, &affected).expect("renders");
            let creds = taxonomy.label(&"account_credentials".parse().expect("c"), locale);
            let media = taxonomy.label(&"media".parse().expect("c"), locale);
            assert!(
                n.sections.advice.contains(&creds),
                "{locale}: advice for credentials missing"
            );
            assert!(
                !n.sections.advice.contains(&media),
                "{locale}: advice for data not exposed"
            );
            assert!(n.email_text.contains("privacy@example.com"));
            assert!(
                n.email_html.contains("Lin &lt;Tea&gt; &amp; Co"),
                "HTML must escape the merchant's name"
            );
            assert!(n.email_text.contains("Lin <Tea> & Co"), "plain text must not escape");
            assert!(
                n.sms_text
                    .contains("https://status.example.com/bulletins/INC-2026-0001/")
            );
            assert!(!n.sms_text.contains('\n'));
        }
    }

    #[test]
    fn missing_facts_are_listed_and_nothing_is_drafted() {
        let templates = Templates::embedded().expect("templates");
        let taxonomy = Taxonomy::builtin().expect("taxonomy");
        let (incident, mut facts, merchant, affected) = fixture(Locale::ZhCn);
        facts.remedies = LocalizedText::default();
        facts.measures_planned.zh_cn = None;
        let settings = settings();
        let r = Renderer {
            settings: &settings,
            taxonomy: &taxonomy,
            templates: &templates,
        };
        let err = draft_all(
            r,
            &incident,
            &facts,
            &[affected],
            &[merchant],
            1,
            &"alice".parse().expect("actor"),
        )
        .expect_err("incomplete");
        let DraftError::Incomplete { missing } = err else {
            panic!("wrong error")
        };
        assert!(missing.iter().any(|m| m.starts_with("remedies (zh-CN)")), "{missing:?}");
        assert!(
            missing
                .iter()
                .any(|m| m.starts_with("measures (zh-CN)") && m.contains("measures_planned")),
            "{missing:?}"
        );
    }
}
