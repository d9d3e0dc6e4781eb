//! The public bulletin: when affected merchants stay unreachable (a configurable threshold) or
//! a responder decides, a public notice carrying the five elements, without anyone's personal
//! data, is published as static files (it must survive an outage of Tocsin itself):
//! `<publish>/<reference>/index.html` (zh-CN), `index.en.html`, `feed.atom` with one entry per
//! update, `bulletin.json`; and `<publish>/index.html` listing every bulletin.
//! Each published version records which merchants it covers.

use std::path::{Path, PathBuf};

use chrono::Utc;
use serde_json::{Value, json};

use crate::domain::*;
use crate::draft::{NoticeSettings, categories_context, frozen_labels, incident_context};
use crate::ledger::content_hash;
use crate::model::*;
use crate::taxonomy::Taxonomy;
use crate::templates::{TemplateError, Templates};
use crate::time::{fmt_ts, human_for};

#[derive(Debug, thiserror::Error)]
pub enum BulletinError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("writing the bulletin to {path}: {reason}")]
    Write { path: String, reason: String },
    #[error("the incident has no confirmed facts yet")]
    NoFacts,
}

/// The language of `index.html`; the other is `index.<locale>.html`.
pub const PRIMARY: Locale = Locale::ZhCn;

pub fn page_file(locale: Locale) -> String {
    if locale == PRIMARY {
        "index.html".into()
    } else {
        format!("index.{locale}.html")
    }
}

/// What the public "am I affected?" lookup answers. Without the right second factor the answer
/// is `Unverified` whether or not the merchant exists or is affected, so nobody can enumerate
/// merchants or learn anything about one.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum LookupAnswer {
    /// The labels of the categories exposed, in the asker's language.
    Affected {
        categories: Vec<String>,
    },
    NotAffected,
    Unverified,
    /// Too many lookups from this client: try again in this many seconds.
    Limited {
        retry_after_seconds: u64,
    },
}

impl LookupAnswer {
    pub fn outcome(&self) -> &'static str {
        match self {
            LookupAnswer::Affected { .. } => "affected",
            LookupAnswer::NotAffected => "not_affected",
            LookupAnswer::Unverified => "unverified",
            LookupAnswer::Limited { .. } => "limited",
        }
    }
}

/// The client as the lookup log keeps it: a salted hash of its address (32 hex digits).
pub fn client_key(salt: &str, address: &str) -> String {
    content_hash(format!("{salt}:{address}").as_bytes())[..32].to_owned()
}

/// The second factor as given: exactly four digits.
pub fn parse_factor(text: &str) -> Result<String, FieldError> {
    let t = text.trim();
    if t.len() == 4 && t.bytes().all(|b| b.is_ascii_digit()) {
        Ok(t.to_owned())
    } else {
        Err(FieldError::new(
            "factor",
            "must be the last four digits of the registered phone number",
        ))
    }
}

/// Compares in time independent of where the texts differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The answer page in `locale`.
pub fn render_lookup(
    answer: &LookupAnswer,
    reference: &str,
    back: &str,
    locale: Locale,
    templates: &Templates,
) -> Result<String, BulletinError> {
    let context = json!({
        "reference": reference,
        "back": back,
        "affected": matches!(answer, LookupAnswer::Affected { .. }),
        "categories": match answer { LookupAnswer::Affected { categories } => categories.clone(), _ => vec![] },
        "not_affected": *answer == LookupAnswer::NotAffected,
        "unverified": *answer == LookupAnswer::Unverified,
        "limited": matches!(answer, LookupAnswer::Limited { .. }),
    });
    Ok(templates.render(&format!("bulletin/{locale}/lookup.html"), &context)?)
}

/// The affected cohort as the bulletin's triggers weigh it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cohort {
    /// Affected merchants who must be notified.
    pub merchants: u64,
    /// Of them, those with no contact data on any channel.
    pub without_contact: u64,
    /// Of them, those left unreachable after their channel plan.
    pub unreachable: u64,
}

/// When individual notice is disproportionate (0 turns a threshold off).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Thresholds {
    pub unreachable: u64,
    pub cohort_merchants: u64,
    /// Estimated cost of notifying everyone: merchants times `cost_per_notice`.
    pub cost_per_notice: f64,
    pub cost_limit: f64,
    /// Share (0 to 1) of merchants without contact data.
    pub no_contact_share: f64,
}

/// Whether a bulletin is due now, and why; whom it covers follows from the reason: everyone
/// affected when notifying each one is disproportionate, the unreachable ones otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    pub reason: String,
    pub covers_everyone: bool,
}

/// Why a bulletin is (re)published now, or `None` if it need not be.
pub fn trigger(cohort: &Cohort, t: &Thresholds, responder_asked: bool) -> Option<Trigger> {
    let everyone = |reason: String| {
        Some(Trigger {
            reason,
            covers_everyone: true,
        })
    };
    let cost = cohort.merchants as f64 * t.cost_per_notice;
    let share = if cohort.merchants == 0 {
        0.0
    } else {
        cohort.without_contact as f64 / cohort.merchants as f64
    };
    if t.cohort_merchants > 0 && cohort.merchants >= t.cohort_merchants {
        everyone(format!(
            "{} affected merchants: individual notice is disproportionate (threshold {})",
            cohort.merchants, t.cohort_merchants
        ))
    } else if t.cost_limit > 0.0 && cost >= t.cost_limit {
        everyone(format!(
            "notifying {} merchants would cost about {cost:.0} (threshold {:.0})",
            cohort.merchants, t.cost_limit
        ))
    } else if t.no_contact_share > 0.0 && cohort.merchants > 0 && share >= t.no_contact_share {
        everyone(format!(
            "{} of {} affected merchants ({:.0}%) have no contact data (threshold {:.0}%)",
            cohort.without_contact,
            cohort.merchants,
            share * 100.0,
            t.no_contact_share * 100.0
        ))
    } else if responder_asked {
        Some(Trigger {
            reason: "a responder decided to publish".into(),
            covers_everyone: false,
        })
    } else if t.unreachable > 0 && cohort.unreachable >= t.unreachable {
        Some(Trigger {
            reason: format!(
                "{} affected merchant(s) could not be reached individually",
                cohort.unreachable
            ),
            covers_everyone: false,
        })
    } else {
        None
    }
}

/// What the bulletin says, in a form whose hash decides whether a new version is due.
pub fn content_key(incident: &Incident, covered: &[MerchantId]) -> String {
    let facts = serde_json::to_string(&incident.facts).unwrap_or_default();
    let ids: Vec<&str> = covered.iter().map(|m| m.as_str()).collect();
    content_hash(format!("{facts}\n{}", ids.join(",")).as_bytes())
}

/// The update text of a new version.
pub fn update_text(version: i64, covered: usize, locale: Locale) -> String {
    match (locale, version) {
        (Locale::En, 1) => "First publication of this notice.".into(),
        (Locale::En, _) => {
            format!("Notice updated; it now covers {covered} merchants we could not reach individually.")
        }
        (Locale::ZhCn, 1) => "首次发布本公告。".into(),
        (Locale::ZhCn, _) => format!("公告已更新，目前覆盖 {covered} 个无法单独联系到的商家。"),
    }
}

fn title(incident: &Incident, locale: Locale) -> String {
    match locale {
        Locale::En => format!("Security incident notice {}", incident.reference),
        Locale::ZhCn => format!("安全事件公告 {}", incident.reference),
    }
}

/// Renders every file of the bulletin from all its versions (newest last in `versions`).
pub fn render_files(
    incident: &Incident,
    versions: &[Bulletin],
    settings: &NoticeSettings,
    taxonomy: &Taxonomy,
    templates: &Templates,
) -> Result<Vec<(String, String)>, BulletinError> {
    let facts = incident.facts.as_ref().ok_or(BulletinError::NoFacts)?;
    let base_url = settings.notice_url(&incident.reference);
    let published_at = versions.first().map(|b| b.published_at).unwrap_or_else(Utc::now);
    let updated_at = versions.last().map(|b| b.published_at).unwrap_or(published_at);
    let mut files = Vec::new();
    for locale in [Locale::ZhCn, Locale::En] {
        let other = if locale == Locale::ZhCn {
            Locale::En
        } else {
            Locale::ZhCn
        };
        let updates: Vec<Value> = versions
            .iter()
            .rev()
            .map(
                |b| json!({ "at": fmt_ts(b.published_at), "text": update_text(b.version, b.covered as usize, locale) }),
            )
            .collect();
        let base = json!({
            "locale": locale.as_str(),
            "operator": { "name": settings.operator_name, "platform": settings.platform,
                          "short_name": if locale == Locale::En { &settings.short_name_en } else { &settings.short_name_zh } },
            "measures_in_place": {
                "credentials_reset": facts.mitigations.iter().any(|m| m.id == "credentials_reset"),
            },
        });
        let labels = frozen_labels(&facts.categories, taxonomy);
        let categories = categories_context(&facts.categories, locale, &base, &labels, templates)?;
        let context = json!({
            "locale": locale.as_str(),
            "operator": { "name": settings.operator_name, "platform": settings.platform },
            "reference": incident.reference,
            "title": title(incident, locale),
            "published_at": human_for(published_at, locale),
            "updated_at": human_for(updated_at, locale),
            "incident": incident_context(&incident.reference, incident.detected_at, facts, locale),
            "categories": categories,
            "contact": {
                "officer": if locale == Locale::En { &settings.officer_en } else { &settings.officer_zh },
                "email": settings.contact_email,
                "phone": settings.contact_phone,
            },
            "updates": updates,
            "other_locale": {
                "code": other.as_str(),
                "label": if other == Locale::En { "English" } else { "中文" },
                "href": page_file(other),
            },
            "feed_href": "feed.atom",
            "json_href": "bulletin.json",
            // The lookup needs Tocsin itself (a static copy still shows the form).
            "lookup": { "action": format!("{}/lookup", settings.notice_base_url.trim_end_matches('/')) },
        });
        files.push((
            page_file(locale),
            templates.render(&format!("bulletin/{locale}/page.html"), &context)?,
        ));
    }
    let entries: Vec<Value> = versions
        .iter()
        .rev()
        .map(|b| {
            json!({
                "id": format!("urn:tocsin:bulletin:{}:{}", incident.reference, b.version),
                "title": format!("{} ({})", title(incident, PRIMARY), b.version),
                "updated_at": fmt_ts(b.published_at),
                "summary": format!("{} / {}", update_text(b.version, b.covered as usize, Locale::ZhCn), update_text(b.version, b.covered as usize, Locale::En)),
                "href": base_url,
            })
        })
        .collect();
    let feed = json!({
        "feed_id": format!("urn:tocsin:bulletin:{}", incident.reference),
        "title": title(incident, PRIMARY),
        "updated_at": fmt_ts(updated_at),
        "self_href": format!("{base_url}feed.atom"),
        "alternate_href": base_url,
        "operator": { "name": settings.operator_name },
        "entries": entries,
    });
    files.push(("feed.atom".into(), templates.render("bulletin/feed.atom", &feed)?));
    let texts: serde_json::Map<String, Value> = [Locale::ZhCn, Locale::En]
        .iter()
        .map(|l| {
            let t = |x: &LocalizedText| x.get(*l).unwrap_or("").to_owned();
            let text = json!({
                "title": title(incident, *l),
                "what_happened": t(&facts.what_happened), "impact": t(&facts.impact),
                "measures_taken": t(&facts.measures_taken), "measures_planned": t(&facts.measures_planned),
                "remedies": t(&facts.remedies),
            });
            (l.as_str().to_owned(), text)
        })
        .collect();
    let updates: Vec<Value> = versions
        .iter()
        .map(|b| {
            json!({ "version": b.version, "at": fmt_ts(b.published_at),
                    "text": { "zh-CN": update_text(b.version, b.covered as usize, Locale::ZhCn),
                              "en": update_text(b.version, b.covered as usize, Locale::En) } })
        })
        .collect();
    let view = json!({
        "reference": incident.reference,
        "published_at": fmt_ts(published_at),
        "updated_at": fmt_ts(updated_at),
        "kind": facts.kind.as_str(),
        "categories": facts.categories,
        "contained_at": facts.contained_at.map(fmt_ts),
        "text": texts,
        "contact": { "email": settings.contact_email, "phone": settings.contact_phone },
        "updates": updates,
    });
    files.push((
        "bulletin.json".into(),
        serde_json::to_string_pretty(&view).unwrap_or_default(),
    ));
    Ok(files)
}

/// Writes the files under `<publish>/<reference>/`, each atomically (write then rename), so a
/// web server never serves half a page.
pub fn write(publish_dir: &Path, reference: &str, files: &[(String, String)]) -> Result<PathBuf, BulletinError> {
    let folder = publish_dir.join(reference);
    let err = |p: &Path, e: std::io::Error| BulletinError::Write {
        path: p.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(&folder).map_err(|e| err(&folder, e))?;
    for (name, body) in files {
        let path = folder.join(name);
        let tmp = folder.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, body).map_err(|e| err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(&path, e))?;
    }
    Ok(folder)
}

/// Writes `<publish>/index.html`, the list of every published bulletin.
pub fn write_index(publish_dir: &Path, entries: &[(String, String, String)]) -> Result<(), BulletinError> {
    let mut items = String::new();
    for (reference, title, updated) in entries {
        let esc = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
                .replace('"', "&quot;")
        };
        items.push_str(&format!(
            "<li><a href=\"{r}/\">{t}</a> <span lang=\"en\">(<a href=\"{r}/index.en.html\">English</a>)</span> · <time>{u}</time></li>\n",
            r = esc(reference), t = esc(title), u = esc(updated)
        ));
    }
    let page = format!(
        "<!DOCTYPE html>\n<html lang=\"zh-CN\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>安全事件公告 / Security notices</title>\n</head>\n<body>\n<main>\n<h1>安全事件公告 <span lang=\"en\">/ Security notices</span></h1>\n<ul>\n{items}</ul>\n</main>\n</body>\n</html>\n"
    );
    let path = publish_dir.join("index.html");
    std::fs::create_dir_all(publish_dir).map_err(|e| BulletinError::Write {
        path: publish_dir.display().to_string(),
        reason: e.to_string(),
    })?;
    std::fs::write(&path, page).map_err(|e| BulletinError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cohort(merchants: u64, without_contact: u64, unreachable: u64) -> Cohort {
        Cohort {
            merchants,
            without_contact,
            unreachable,
        }
    }

    #[test]
    fn each_threshold_holds_from_its_value_up_and_says_so() {
        let off = Thresholds::default();
        assert_eq!(
            trigger(&cohort(1_000_000, 0, 0), &off, false),
            None,
            "every threshold off"
        );
        let size = Thresholds {
            cohort_merchants: 1000,
            ..off
        };
        assert_eq!(trigger(&cohort(999, 0, 0), &size, false), None);
        let t = trigger(&cohort(1000, 0, 0), &size, false).expect("at the threshold");
        assert!(
            t.covers_everyone && t.reason.contains("1000 affected merchants"),
            "{t:?}"
        );
        let cost = Thresholds {
            cost_per_notice: 0.5,
            cost_limit: 250_000.0,
            ..off
        };
        assert_eq!(trigger(&cohort(499_999, 0, 0), &cost, false), None);
        assert!(trigger(&cohort(500_000, 0, 0), &cost, false).is_some_and(|t| t.reason.contains("cost about 250000")));
        let share = Thresholds {
            no_contact_share: 0.25,
            ..off
        };
        assert_eq!(trigger(&cohort(100, 24, 0), &share, false), None);
        assert!(
            trigger(&cohort(100, 25, 0), &share, false).is_some_and(|t| t.covers_everyone && t.reason.contains("25%"))
        );
        let unreachable = Thresholds { unreachable: 3, ..off };
        assert_eq!(trigger(&cohort(10, 0, 2), &unreachable, false), None);
        let t = trigger(&cohort(10, 0, 3), &unreachable, false).expect("unreachable");
        assert!(!t.covers_everyone, "covers the unreachable ones");
        let asked = trigger(&cohort(10, 0, 0), &off, true).expect("a responder's decision");
        assert_eq!(asked.reason, "a responder decided to publish");
        let zero = Thresholds { unreachable: 0, ..off };
        assert_eq!(
            trigger(&cohort(10, 0, 5), &zero, false),
            None,
            "threshold 0 disables the automatic trigger"
        );
    }
}
