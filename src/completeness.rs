//! Completeness of a rendered notice against the legal profiles that apply to its recipient,
//! as data: `config/notice_profiles.toml` (embedded; an operator may correct it). A profile
//! (the platform's own promise, PIPL Art. 57, GDPR Art. 34, California 1798.82, ...) applies
//! by the recipient's ISO 3166 region and lists required elements, each with a check that
//! reads one rendered notice variant ([`RenderedNotice`]). [`NoticeProfiles::check`] returns
//! every element that is missing, naming the profile, the element, the locale and why.
//!
//! Matching is on whitespace-collapsed text; the HTML email is compared as a reader sees it:
//! tags stripped (with the contents of `<head>`, `<style>` and `<script>`), entities decoded.

use std::cell::OnceCell;
use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::domain::{Locale, LocalizedText};
use crate::model::{IncidentFacts, NoticeSections};

pub const NOTICE_PROFILES_TOML: &str = include_str!("../config/notice_profiles.toml");

/// Why a profile file was refused: where (profile, element) and the reason in words.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file is not valid TOML, or has an unknown or missing key.
    #[error("notice profiles: {0}")]
    Syntax(#[from] toml::de::Error),
    #[error("notice profile '{profile}': {reason}")]
    Profile { profile: String, reason: String },
    #[error("notice profile '{profile}', element '{element}': {reason}")]
    Element {
        profile: String,
        element: String,
        reason: String,
    },
}

/// What a check reads: one rendered notice variant.
pub struct RenderedNotice<'a> {
    pub locale: Locale,
    /// ISO 3166 (-2) of the recipient, e.g. "CN-ZJ", "DE", "US-CA".
    pub region: &'a str,
    pub facts: &'a IncidentFacts,
    pub sections: &'a NoticeSections,
    /// Labels of the exposed categories in `locale`.
    pub exposed_labels: &'a [String],
    pub contact_email: &'a str,
    pub contact_phone: &'a str,
    pub email_subject: &'a str,
    pub email_text: &'a str,
    pub email_html: &'a str,
    /// The printable letter (HTML); an empty string if letters are not rendered.
    pub letter_html: &'a str,
}

/// One required element a notice lacks: `element` is the element's label from the profile file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MissingElement {
    pub profile: String,
    pub element: String,
    pub locale: Locale,
    pub reason: String,
}

impl fmt::Display for MissingElement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} ({}): {}",
            self.profile, self.element, self.locale, self.reason
        )
    }
}

/// The notice profiles of one file, in file order.
#[derive(Debug, Clone)]
pub struct NoticeProfiles {
    profiles: Vec<Profile>,
}

#[derive(Debug, Clone)]
struct Profile {
    id: String,
    name: String,
    regions: Vec<RegionPattern>,
    except_regions: Vec<RegionPattern>,
    elements: Vec<Element>,
}

impl Profile {
    fn applies_to(&self, region: &str) -> bool {
        self.regions.iter().any(|p| p.matches(region)) && !self.except_regions.iter().any(|p| p.matches(region))
    }
}

#[derive(Debug, Clone)]
struct Element {
    label: String,
    check: Check,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RegionPattern {
    /// `*`: every region.
    Any,
    /// `CN`: the country and all its subdivisions.
    Country(String),
    /// `US-CA`: exactly that subdivision.
    Subdivision(String),
}

impl RegionPattern {
    fn parse(raw: &str) -> Option<Self> {
        if raw == "*" {
            Some(Self::Any)
        } else if !crate::directory::is_region(raw) {
            None
        } else if raw.len() == 2 {
            Some(Self::Country(raw.to_owned()))
        } else {
            Some(Self::Subdivision(raw.to_owned()))
        }
    }

    /// `region` is already trimmed and upper-cased.
    fn matches(&self, region: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Country(c) => region == c || region.strip_prefix(c.as_str()).is_some_and(|r| r.starts_with('-')),
            Self::Subdivision(s) => region == s,
        }
    }
}

fn normalize_region(region: &str) -> String {
    region.trim().to_ascii_uppercase()
}

/// Where a check looks for text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rendering {
    Subject,
    Text,
    Html,
    Letter,
}

impl Rendering {
    fn parse(raw: &str) -> Option<Self> {
        match raw {
            "email_subject" => Some(Self::Subject),
            "email_text" => Some(Self::Text),
            "email_html" => Some(Self::Html),
            "letter_html" => Some(Self::Letter),
            _ => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Subject => "the subject line",
            Self::Text => "the plain-text email",
            Self::Html => "the HTML email",
            Self::Letter => "the letter",
        }
    }
}

/// "the subject line, the plain-text email and the HTML email"
fn describe_all(renderings: &[Rendering]) -> String {
    let names: Vec<&str> = renderings.iter().map(|r| r.describe()).collect();
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

/// The incident facts a `fact` check can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fact {
    WhatHappened,
    Impact,
    Cause,
    MeasuresTaken,
    MeasuresPlanned,
    Remedies,
    OccurredAt,
}

impl Fact {
    const ALL: [Fact; 7] = [
        Fact::WhatHappened,
        Fact::Impact,
        Fact::Cause,
        Fact::MeasuresTaken,
        Fact::MeasuresPlanned,
        Fact::Remedies,
        Fact::OccurredAt,
    ];

    fn name(self) -> &'static str {
        match self {
            Fact::WhatHappened => "what_happened",
            Fact::Impact => "impact",
            Fact::Cause => "cause",
            Fact::MeasuresTaken => "measures_taken",
            Fact::MeasuresPlanned => "measures_planned",
            Fact::Remedies => "remedies",
            Fact::OccurredAt => "occurred_at",
        }
    }

    /// The text of a text fact; `None` for `occurred_at`.
    fn text(self, facts: &IncidentFacts) -> Option<&LocalizedText> {
        match self {
            Fact::WhatHappened => Some(&facts.what_happened),
            Fact::Impact => Some(&facts.impact),
            Fact::Cause => Some(&facts.cause),
            Fact::MeasuresTaken => Some(&facts.measures_taken),
            Fact::MeasuresPlanned => Some(&facts.measures_planned),
            Fact::Remedies => Some(&facts.remedies),
            Fact::OccurredAt => None,
        }
    }
}

#[derive(Debug, Clone)]
enum Check {
    Section {
        name: &'static str,
        renderings: Vec<Rendering>,
    },
    Fact {
        fact: Fact,
        renderings: Vec<Rendering>,
    },
    CategoriesListed {
        renderings: Vec<Rendering>,
    },
    Contains {
        strings: BTreeMap<Locale, Vec<String>>,
        renderings: Vec<Rendering>,
    },
    Contact {
        renderings: Vec<Rendering>,
    },
}

// ---- the file as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    profile: Vec<RawProfile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    id: String,
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    basis: Option<String>,
    regions: Vec<String>,
    #[serde(default)]
    except_regions: Vec<String>,
    #[serde(default)]
    element: Vec<RawElement>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawElement {
    id: String,
    label: String,
    #[serde(default)]
    #[allow(dead_code)]
    basis: Option<String>,
    check: String,
    section: Option<String>,
    fact: Option<String>,
    strings: Option<BTreeMap<String, Vec<String>>>,
    renderings: Option<Vec<String>>,
}

fn is_profile_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

const CHECK_KINDS: &str = "section, fact, categories_listed, contains, contact";
const RENDERING_NAMES: &str = "email_subject, email_text, email_html, letter_html";

impl RawElement {
    fn into_element(self, profile: &str) -> Result<(String, Element), ProfileError> {
        let err = |reason: String| ProfileError::Element {
            profile: profile.to_owned(),
            element: self.id.clone(),
            reason,
        };
        if !is_profile_id(&self.id) {
            return Err(err(
                "the id must be lower-case letters, digits and '-', starting with a letter".into(),
            ));
        }
        if self.label.trim().is_empty() {
            return Err(err("the label is empty".into()));
        }
        let renderings = match &self.renderings {
            None => None,
            Some(list) => {
                if list.is_empty() {
                    return Err(err("'renderings' is empty; leave it out or name at least one".into()));
                }
                let mut parsed = Vec::with_capacity(list.len());
                for raw in list {
                    let r = Rendering::parse(raw).ok_or_else(|| {
                        err(format!(
                            "unknown rendering '{raw}' (expected one of: {RENDERING_NAMES})"
                        ))
                    })?;
                    if !parsed.contains(&r) {
                        parsed.push(r);
                    }
                }
                Some(parsed)
            }
        };
        // Each kind takes its own key and refuses the others', so a typo cannot pass silently.
        let unexpected = |key: &str, given: bool| -> Result<(), ProfileError> {
            if given {
                Err(err(format!("'{key}' does not apply to a '{}' check", self.check)))
            } else {
                Ok(())
            }
        };
        let check = match self.check.as_str() {
            "section" => {
                unexpected("fact", self.fact.is_some())?;
                unexpected("strings", self.strings.is_some())?;
                let raw = self
                    .section
                    .as_deref()
                    .ok_or_else(|| err("a 'section' check needs 'section'".into()))?;
                let names = NoticeSections::default().named().map(|(n, _)| n);
                let name = names.iter().find(|n| *n == &raw).copied().ok_or_else(|| {
                    err(format!(
                        "unknown section '{raw}' (expected one of: {})",
                        names.join(", ")
                    ))
                })?;
                Check::Section {
                    name,
                    renderings: renderings.unwrap_or_default(),
                }
            }
            "fact" => {
                unexpected("section", self.section.is_some())?;
                unexpected("strings", self.strings.is_some())?;
                let raw = self
                    .fact
                    .as_deref()
                    .ok_or_else(|| err("a 'fact' check needs 'fact'".into()))?;
                let fact = Fact::ALL.iter().find(|f| f.name() == raw).copied().ok_or_else(|| {
                    let names: Vec<&str> = Fact::ALL.iter().map(|f| f.name()).collect();
                    err(format!("unknown fact '{raw}' (expected one of: {})", names.join(", ")))
                })?;
                if fact == Fact::OccurredAt && renderings.is_some() {
                    return Err(err(
                        "'occurred_at' is a date, checked as recorded; its rendered form is the templates' \
                         business, so it takes no 'renderings'"
                            .into(),
                    ));
                }
                Check::Fact {
                    fact,
                    renderings: renderings.unwrap_or_default(),
                }
            }
            "categories_listed" => {
                unexpected("section", self.section.is_some())?;
                unexpected("fact", self.fact.is_some())?;
                unexpected("strings", self.strings.is_some())?;
                Check::CategoriesListed {
                    renderings: renderings.unwrap_or_else(|| vec![Rendering::Text]),
                }
            }
            "contains" => {
                unexpected("section", self.section.is_some())?;
                unexpected("fact", self.fact.is_some())?;
                let raw = self
                    .strings
                    .as_ref()
                    .ok_or_else(|| err("a 'contains' check needs 'strings' for every locale".into()))?;
                let mut strings = BTreeMap::new();
                for (locale, list) in raw {
                    let parsed: Locale = locale.parse().map_err(|_| {
                        let all: Vec<&str> = Locale::ALL.iter().map(|l| l.as_str()).collect();
                        err(format!(
                            "unknown locale '{locale}' in 'strings' (expected: {})",
                            all.join(", ")
                        ))
                    })?;
                    let list: Vec<String> = list.iter().map(|s| collapse(s)).collect();
                    if list.is_empty() || list.iter().any(String::is_empty) {
                        return Err(err(format!("'strings' for {locale} must list non-blank strings")));
                    }
                    strings.insert(parsed, list);
                }
                if let Some(missing) = Locale::ALL.iter().find(|l| !strings.contains_key(*l)) {
                    return Err(err(format!("'strings' gives nothing for {missing}")));
                }
                Check::Contains {
                    strings,
                    renderings: renderings.ok_or_else(|| err("a 'contains' check needs 'renderings'".into()))?,
                }
            }
            "contact" => {
                unexpected("section", self.section.is_some())?;
                unexpected("fact", self.fact.is_some())?;
                unexpected("strings", self.strings.is_some())?;
                Check::Contact {
                    renderings: renderings.unwrap_or_else(|| vec![Rendering::Text]),
                }
            }
            other => return Err(err(format!("unknown check '{other}' (expected one of: {CHECK_KINDS})"))),
        };
        Ok((
            self.id,
            Element {
                label: self.label.trim().to_owned(),
                check,
            },
        ))
    }
}

impl RawProfile {
    fn into_profile(self) -> Result<Profile, ProfileError> {
        let err = |reason: String| ProfileError::Profile {
            profile: self.id.clone(),
            reason,
        };
        if !is_profile_id(&self.id) {
            return Err(err(
                "the id must be lower-case letters, digits and '-', starting with a letter".into(),
            ));
        }
        if self.name.trim().is_empty() {
            return Err(err("the name is empty".into()));
        }
        let patterns = |key: &str, list: &[String]| -> Result<Vec<RegionPattern>, ProfileError> {
            list.iter()
                .map(|raw| {
                    RegionPattern::parse(raw).ok_or_else(|| {
                        err(format!(
                            "'{key}' has '{raw}': expected \"*\", a country (\"DE\") or a subdivision (\"US-CA\"), \
                             upper case"
                        ))
                    })
                })
                .collect()
        };
        let regions = patterns("regions", &self.regions)?;
        if regions.is_empty() {
            return Err(err("'regions' is empty: the profile would apply to nobody".into()));
        }
        let except_regions = patterns("except_regions", &self.except_regions)?;
        if self.element.is_empty() {
            return Err(err("the profile has no element".into()));
        }
        let mut ids = HashSet::new();
        let mut labels = HashSet::new();
        let mut elements = Vec::with_capacity(self.element.len());
        for raw in self.element {
            let (id, element) = raw.into_element(&self.id)?;
            if !ids.insert(id.clone()) {
                return Err(err(format!("element '{id}' is listed twice")));
            }
            if !labels.insert(element.label.clone()) {
                return Err(ProfileError::Element {
                    profile: self.id.clone(),
                    element: id,
                    reason: format!("the label '{}' is used twice in this profile", element.label),
                });
            }
            elements.push(element);
        }
        Ok(Profile {
            id: self.id,
            name: self.name.trim().to_owned(),
            regions,
            except_regions,
            elements,
        })
    }
}

// ---- text as a reader sees it ----

/// Whitespace runs become one space; leading and trailing whitespace goes.
/// Whitespace collapsed, and list markers dropped: the plain text writes a list as "- item"
/// lines where the HTML uses `<ul>`, and both say the same.
fn collapse(s: &str) -> String {
    s.split_whitespace()
        .filter(|t| !matches!(*t, "-" | "•" | "*"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Elements whose content a reader never sees in the body of an email.
const HIDDEN_ELEMENTS: [&str; 4] = ["head", "title", "style", "script"];
/// Elements that do not break a word: `Wh<b>at</b>` reads as "What".
const INLINE_ELEMENTS: [&str; 16] = [
    "a", "abbr", "b", "bdi", "bdo", "cite", "code", "em", "font", "i", "mark", "s", "small", "span", "strong", "u",
];

/// The end of the tag starting at `start` (`<`): the index after its `>`, quotes respected.
fn tag_end(bytes: &[u8], start: usize) -> usize {
    let mut quote: Option<u8> = None;
    let mut i = start + 1;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'"' || b == b'\'' => quote = Some(b),
            None if b == b'>' => return i + 1,
            None => {}
        }
        i += 1;
    }
    bytes.len()
}

/// The HTML with its tags removed (block tags become a space) and the contents of hidden
/// elements and comments dropped. Entities are left for [`decode_entities`].
fn strip_tags(html: &str) -> String {
    let bytes = html.as_bytes();
    let lower = html.to_ascii_lowercase();
    let mut out = String::with_capacity(html.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'<' {
            i += 1;
            continue;
        }
        let next = bytes.get(i + 1).copied().unwrap_or(b' ');
        if !(next.is_ascii_alphabetic() || matches!(next, b'/' | b'!' | b'?')) {
            i += 1; // a bare '<' in text
            continue;
        }
        out.push_str(&html[copied..i]);
        if lower[i..].starts_with("<!--") {
            i = lower[i + 4..].find("-->").map_or(bytes.len(), |p| i + 4 + p + 3);
            out.push(' ');
            copied = i;
            continue;
        }
        let end = tag_end(bytes, i);
        let closing = next == b'/';
        let name: String = lower[i + 1..end]
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        i = end;
        if !closing && HIDDEN_ELEMENTS.contains(&name.as_str()) {
            let close = format!("</{name}");
            i = lower[i..].find(&close).map_or(bytes.len(), |p| tag_end(bytes, i + p));
        }
        if !INLINE_ELEMENTS.contains(&name.as_str()) {
            out.push(' ');
        }
        copied = i;
    }
    out.push_str(&html[copied.min(html.len())..]);
    out
}

/// Decodes named (`&amp; &lt; &gt; &quot; &apos; &nbsp;`) and numeric (`&#39; &#x27;`)
/// character references; anything else is left as written.
fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let decoded = after.find(';').filter(|&semi| semi > 0 && semi <= 10).and_then(|semi| {
            let name = &after[..semi];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some('\u{a0}'),
                _ => {
                    let code = if let Some(hex) = name.strip_prefix("#x").or_else(|| name.strip_prefix("#X")) {
                        u32::from_str_radix(hex, 16).ok()
                    } else if let Some(dec) = name.strip_prefix('#') {
                        dec.parse::<u32>().ok()
                    } else {
                        None
                    };
                    code.and_then(char::from_u32)
                }
            };
            c.map(|c| (c, semi))
        });
        match decoded {
            Some((c, semi)) => {
                out.push(c);
                rest = &after[semi + 1..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The text of an HTML email as a reader sees it, whitespace collapsed.
fn html_text(html: &str) -> String {
    collapse(&decode_entities(&strip_tags(html)))
}

/// The renderings of one notice, normalised once for every check; the lower-case and phone
/// forms only when a contact check asks for them.
struct Views {
    collapsed: [String; 4],
    lower: [OnceCell<String>; 4],
    phone: [OnceCell<String>; 4],
}

impl Views {
    fn of(notice: &RenderedNotice<'_>) -> Self {
        Self {
            collapsed: [
                collapse(notice.email_subject),
                collapse(notice.email_text),
                html_text(notice.email_html),
                html_text(notice.letter_html),
            ],
            lower: Default::default(),
            phone: Default::default(),
        }
    }

    fn index(r: Rendering) -> usize {
        match r {
            Rendering::Subject => 0,
            Rendering::Text => 1,
            Rendering::Html => 2,
            Rendering::Letter => 3,
        }
    }

    fn get(&self, r: Rendering) -> &str {
        &self.collapsed[Self::index(r)]
    }

    fn lower(&self, r: Rendering) -> &str {
        self.lower[Self::index(r)].get_or_init(|| self.get(r).to_lowercase())
    }

    fn phone(&self, r: Rendering) -> &str {
        self.phone[Self::index(r)].get_or_init(|| phone_digits(self.get(r)))
    }

    /// The renderings among `renderings` that lack `needle` (already collapsed).
    fn lacking(&self, renderings: &[Rendering], needle: &str) -> Vec<Rendering> {
        renderings
            .iter()
            .copied()
            .filter(|r| !self.get(*r).contains(needle))
            .collect()
    }
}

/// Text with the separators inside phone numbers dropped, so "+1 (800) 555-0100" matches
/// "+18005550100"; any other character becomes a boundary, so separate numbers do not run together.
fn phone_digits(s: &str) -> String {
    s.chars()
        .filter_map(|c| match c {
            '0'..='9' | '+' => Some(c),
            '-' | '.' | '(' | ')' | '/' => None,
            c if c.is_whitespace() => None,
            _ => Some('|'),
        })
        .collect()
}

/// The reason `check` fails on `notice`, or `None` when the element is present.
fn run(check: &Check, notice: &RenderedNotice<'_>, views: &Views) -> Option<String> {
    let locale = notice.locale;
    match check {
        Check::Section { name, renderings } => {
            let text = notice
                .sections
                .named()
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| collapse(t))
                .unwrap_or_default();
            if text.is_empty() {
                return Some(format!("the '{name}' section rendered empty"));
            }
            let lacking = views.lacking(renderings, &text);
            (!lacking.is_empty()).then(|| format!("the '{name}' section is not in {}", describe_all(&lacking)))
        }
        Check::Fact { fact, renderings } => {
            let Some(text) = fact.text(notice.facts) else {
                return notice
                    .facts
                    .occurred_at
                    .is_none()
                    .then(|| format!("'{}' (when the incident happened) is not recorded", fact.name()));
            };
            let Some(text) = text.get(locale) else {
                return Some(format!("'{}' is not written in {locale}", fact.name()));
            };
            let lacking = views.lacking(renderings, &collapse(text));
            (!lacking.is_empty()).then(|| format!("the '{}' text is not in {}", fact.name(), describe_all(&lacking)))
        }
        Check::CategoriesListed { renderings } => {
            let labels: Vec<String> = notice
                .exposed_labels
                .iter()
                .map(|l| collapse(l))
                .filter(|l| !l.is_empty())
                .collect();
            if labels.is_empty() {
                return Some("no exposed category was given to list".into());
            }
            let problems: Vec<String> = renderings
                .iter()
                .filter_map(|r| {
                    let absent: Vec<String> = labels
                        .iter()
                        .filter(|l| !views.get(*r).contains(l.as_str()))
                        .map(|l| format!("'{l}'"))
                        .collect();
                    (!absent.is_empty()).then(|| format!("{} not listed in {}", absent.join(", "), r.describe()))
                })
                .collect();
            (!problems.is_empty()).then(|| problems.join("; "))
        }
        Check::Contains { strings, renderings } => {
            let problems: Vec<String> = strings
                .get(&locale)
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .filter_map(|s| {
                    let lacking = views.lacking(renderings, s);
                    (!lacking.is_empty()).then(|| format!("'{s}' not found in {}", describe_all(&lacking)))
                })
                .collect();
            (!problems.is_empty()).then(|| problems.join("; "))
        }
        Check::Contact { renderings } => {
            let email = collapse(notice.contact_email);
            let phone = phone_digits(notice.contact_phone).trim_matches('|').to_owned();
            let mut problems = Vec::new();
            if email.is_empty() {
                problems.push("no contact email is configured".to_owned());
            } else {
                let email = email.to_lowercase();
                let lacking: Vec<Rendering> = renderings
                    .iter()
                    .copied()
                    .filter(|r| !views.lower(*r).contains(&email))
                    .collect();
                if !lacking.is_empty() {
                    problems.push(format!(
                        "contact email '{email}' not found in {}",
                        describe_all(&lacking)
                    ));
                }
            }
            if !phone.chars().any(|c| c.is_ascii_digit()) {
                problems.push("no contact phone is configured".to_owned());
            } else {
                let lacking: Vec<Rendering> = renderings
                    .iter()
                    .copied()
                    .filter(|r| !views.phone(*r).contains(&phone))
                    .collect();
                if !lacking.is_empty() {
                    problems.push(format!(
                        "contact phone '{}' not found in {}",
                        notice.contact_phone.trim(),
                        describe_all(&lacking)
                    ));
                }
            }
            (!problems.is_empty()).then(|| problems.join("; "))
        }
    }
}

impl NoticeProfiles {
    /// Parses and checks a profile file; every mistake names the profile and element.
    pub fn parse(toml_text: &str) -> Result<Self, ProfileError> {
        let file: RawFile = toml::from_str(toml_text)?;
        if file.profile.is_empty() {
            return Err(ProfileError::Profile {
                profile: "(none)".into(),
                reason: "the file defines no [[profile]]".into(),
            });
        }
        let mut profiles: Vec<Profile> = Vec::with_capacity(file.profile.len());
        for raw in file.profile {
            let profile = raw.into_profile()?;
            if profiles.iter().any(|p| p.id == profile.id) {
                return Err(ProfileError::Profile {
                    profile: profile.id,
                    reason: "the profile is defined twice".into(),
                });
            }
            profiles.push(profile);
        }
        Ok(Self { profiles })
    }

    /// The profiles shipped in `config/notice_profiles.toml`.
    pub fn builtin() -> Result<Self, ProfileError> {
        Self::parse(NOTICE_PROFILES_TOML)
    }

    /// Profile ids that apply to a recipient in `region`, in file order. Cheap: called per
    /// distinct region. `region` is compared without regard to case or surrounding spaces.
    pub fn applicable(&self, region: &str) -> Vec<&str> {
        let region = normalize_region(region);
        self.profiles
            .iter()
            .filter(|p| p.applies_to(&region))
            .map(|p| p.id.as_str())
            .collect()
    }

    /// A short key for the set of applicable profiles (e.g. "platform+cn-pipl-57"), used to
    /// group recipients; empty when no profile applies. Ids cannot contain '+', so the key is
    /// unambiguous.
    pub fn profile_key(&self, region: &str) -> String {
        self.applicable(region).join("+")
    }

    /// Every element of every applicable profile that `notice` lacks, in file order.
    pub fn check(&self, notice: &RenderedNotice<'_>) -> Vec<MissingElement> {
        let region = normalize_region(notice.region);
        let applicable: Vec<&Profile> = self.profiles.iter().filter(|p| p.applies_to(&region)).collect();
        if applicable.is_empty() {
            return Vec::new();
        }
        let views = Views::of(notice);
        let mut missing = Vec::new();
        for profile in applicable {
            for element in &profile.elements {
                if let Some(reason) = run(&element.check, notice, &views) {
                    missing.push(MissingElement {
                        profile: profile.id.clone(),
                        element: element.label.clone(),
                        locale: notice.locale,
                        reason,
                    });
                }
            }
        }
        missing
    }

    /// `(id, name)` of every profile, in file order, for docs and the CLI.
    pub fn profiles(&self) -> impl Iterator<Item = (&str, &str)> {
        self.profiles.iter().map(|p| (p.id.as_str(), p.name.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMAIL: &str = "privacy@example.com";
    const PHONE: &str = "+1 800 555 0100";

    /// Title and the five California headings, per locale, as the statute and the file's
    /// comment give them (written out here so the test also pins the file's strings).
    fn ca_headings(locale: Locale) -> [&'static str; 6] {
        match locale {
            Locale::En => [
                "Notice of Data Breach",
                "What Happened",
                "What Information Was Involved",
                "What We Are Doing",
                "What You Can Do",
                "For More Information",
            ],
            Locale::ZhCn => [
                "数据安全事件通知",
                "发生了什么",
                "涉及哪些信息",
                "我们正在做什么",
                "您可以做什么",
                "更多信息",
            ],
        }
    }

    fn facts() -> IncidentFacts {
        serde_json::from_value(serde_json::json!({
            "grade": "general",
            "kind": "leak",
            "categories": ["id_number", "settlement_account"],
            "occurred_at": "2026-11-27T22:40:00Z",
            "aware_at": "2026-11-28T03:45:00Z",
            "what_happened": {
                "en": "An attacker logged in to a staff account\nand exported merchant records.",
                "zh-CN": "攻击者登录了一个员工账号，\n导出了商家资料。"
            },
            "impact": {
                "en": "Someone could try to change your payout account & <redirect> payments.",
                "zh-CN": "他人可能尝试修改您的结算账户。"
            },
            "cause": {
                "en": "The staff account's password was reused; a=b rules were not enforced.",
                "zh-CN": "该员工账号的密码在其他网站重复使用。"
            },
            "measures_taken": { "en": "We disabled the account.", "zh-CN": "我们停用了该账号。" },
            "measures_planned": { "en": "We will require two-factor login.", "zh-CN": "我们将要求双重验证登录。" },
            "remedies": { "en": "We offer a free account review.", "zh-CN": "我们提供免费的账户安全检查。" }
        }))
        .expect("facts")
    }

    /// A notice built by hand, owning its strings.
    struct Built {
        locale: Locale,
        region: String,
        facts: IncidentFacts,
        sections: NoticeSections,
        labels: Vec<String>,
        email: String,
        phone: String,
        subject: String,
        text: String,
        html: String,
        /// The letter: the complete HTML as built, so that tests which cut the email's HTML
        /// check what the email lacks.
        letter: String,
    }

    impl Built {
        fn view(&self) -> RenderedNotice<'_> {
            RenderedNotice {
                locale: self.locale,
                region: &self.region,
                facts: &self.facts,
                sections: &self.sections,
                exposed_labels: &self.labels,
                contact_email: &self.email,
                contact_phone: &self.phone,
                email_subject: &self.subject,
                email_text: &self.text,
                email_html: &self.html,
                letter_html: &self.letter,
            }
        }

        fn check(&self) -> Vec<MissingElement> {
            NoticeProfiles::builtin().expect("builtin").check(&self.view())
        }
    }

    /// Escapes as the handlebars HTML registry does.
    fn esc(s: &str) -> String {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
            .replace('\'', "&#x27;")
            .replace('`', "&#x60;")
            .replace('=', "&#x3D;")
    }

    /// An HTML heading with markup in the way: an inline tag with a '>' in a quoted
    /// attribute around the first word, a no-break space and a line break after it.
    fn html_heading(h: &str) -> String {
        match h.split_once(' ') {
            _ if h.is_empty() => String::new(),
            Some((first, rest)) => {
                format!(
                    "<h2><span class=\"k\" data-x=\"a>b\">{}</span>&nbsp;\n  {}</h2>",
                    esc(first),
                    esc(rest)
                )
            }
            None => format!("<h2>{}</h2>", esc(h)),
        }
    }

    /// A complete notice for `locale` in `region`, with `text_h` and `html_h` as the title
    /// and headings of the two bodies (blank one to leave it out).
    fn build_with(locale: Locale, region: &str, text_h: [&str; 6], html_h: [&str; 6]) -> Built {
        let facts = facts();
        let t = |f: &LocalizedText| f.get(locale).expect("written").to_owned();
        let (labels, lines): (Vec<String>, [&str; 4]) = match locale {
            Locale::En => (
                vec!["ID number".into(), "settlement bank or payment account".into()],
                [
                    "Possible impact:",
                    "Cause:",
                    "Here is what we recommend:",
                    "Contact our officer, Pat Lee.",
                ],
            ),
            Locale::ZhCn => (
                vec!["身份证件号码".into(), "结算银行或支付账户".into()],
                ["可能的影响：", "原因：", "我们建议您：", "请联系个人信息保护负责人。"],
            ),
        };
        let sections = NoticeSections {
            impact: format!(
                "{}\n\n{} {}\n\n{} {}",
                t(&facts.what_happened),
                lines[0],
                t(&facts.impact),
                lines[1],
                t(&facts.cause)
            ),
            measures: format!("{}\n{}", t(&facts.measures_taken), t(&facts.measures_planned)),
            advice: format!("{}\n- {}: change your password", lines[2], labels[0]),
            remedies: t(&facts.remedies),
            contact: format!("{}\nEmail: {EMAIL}\nPhone: {PHONE}", lines[3]),
        };
        let list: String = labels.iter().map(|l| format!("- {l}\n")).collect();
        let text = format!(
            "{}\n\n{}\n{}\n\n{}\n{}\n{}\n{}\n\n{}\n{}\n\n{}\n\n{}\n{}\n",
            text_h[0],
            text_h[1],
            sections.impact,
            text_h[2],
            list,
            text_h[3],
            sections.measures,
            text_h[4],
            sections.advice,
            sections.remedies,
            text_h[5],
            sections.contact
        );
        let div = |s: &str| format!("<div style=\"white-space: pre-line\">{}</div>", esc(s));
        let items: String = labels.iter().map(|l| format!("<li>{}</li>", esc(l))).collect();
        let html = format!(
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{title}</title>\
             <style>h2 {{ color: #333 }} /* What Happened */</style></head><body>\
             <!-- For More Information -->\
             <h1>{}</h1>{}{}{}<ul>{items}</ul>{}{}{}{}{}<p>{}</p>{}{}</body></html>",
            esc(html_h[0]),
            html_heading(html_h[1]),
            div(&sections.impact),
            html_heading(html_h[2]),
            html_heading(html_h[3]),
            div(&sections.measures),
            html_heading(html_h[4]),
            div(&sections.advice),
            div(&sections.remedies),
            // The contact details as links, the way a template would set them.
            format_args!("<a href=\"mailto:{EMAIL}\">{EMAIL}</a> <a href=\"tel:+18005550100\">{PHONE}</a>"),
            html_heading(html_h[5]),
            div(&sections.contact),
            title = esc(ca_headings(locale)[0]),
        );
        Built {
            locale,
            region: region.into(),
            facts,
            sections,
            labels,
            email: EMAIL.into(),
            phone: PHONE.into(),
            subject: format!("{}: an incident involving your account", text_h[0]),
            text,
            letter: html.clone(),
            html,
        }
    }

    fn build(locale: Locale, region: &str) -> Built {
        build_with(locale, region, ca_headings(locale), ca_headings(locale))
    }

    #[test]
    fn the_builtin_profiles_parse_in_file_order() {
        let p = NoticeProfiles::builtin().expect("builtin parses");
        let ids: Vec<&str> = p.profiles().map(|(id, _)| id).collect();
        assert_eq!(ids, ["platform", "cn-pipl-57", "eu-gdpr-34", "us-ca-1798-82"]);
        assert!(p.profiles().all(|(_, name)| !name.is_empty()));
        let counts: Vec<usize> = p.profiles.iter().map(|p| p.elements.len()).collect();
        assert_eq!(counts, [6, 6, 5, 10]);
    }

    #[test]
    fn profiles_apply_by_the_recipients_region() {
        let p = NoticeProfiles::builtin().expect("builtin");
        assert_eq!(p.applicable("CN-ZJ"), ["platform", "cn-pipl-57"]);
        assert_eq!(p.applicable("CN"), ["platform", "cn-pipl-57"]);
        assert_eq!(p.applicable("DE"), ["platform", "eu-gdpr-34"]);
        assert_eq!(p.applicable("FR"), ["platform", "eu-gdpr-34"]);
        assert_eq!(p.applicable("FR-75"), ["platform", "eu-gdpr-34"]);
        assert_eq!(p.applicable("US-CA"), ["platform", "us-ca-1798-82"]);
        assert_eq!(p.applicable("US-NY"), ["platform"]);
        assert_eq!(p.applicable("US"), ["platform"]);
        assert_eq!(p.applicable("SG"), ["platform"]);
        assert_eq!(p.applicable("CN-HK"), ["platform"], "PIPL is not in force in Hong Kong");
        assert_eq!(p.applicable("CNX"), ["platform"], "a prefix is not a country");
        assert_eq!(p.applicable(" us-ca "), ["platform", "us-ca-1798-82"]);
        assert_eq!(p.profile_key("CN-ZJ"), "platform+cn-pipl-57");
        assert_eq!(p.profile_key("SG"), "platform");
    }

    #[test]
    fn a_complete_notice_passes_every_applicable_profile() {
        for (locale, region) in [
            (Locale::En, "US-CA"),
            (Locale::ZhCn, "US-CA"),
            (Locale::ZhCn, "CN-ZJ"),
            (Locale::En, "CN-ZJ"),
            (Locale::En, "DE"),
            (Locale::En, "SG"),
        ] {
            let missing = build(locale, region).check();
            assert!(missing.is_empty(), "{locale} {region}: {missing:#?}");
        }
    }

    #[test]
    fn each_california_heading_is_required_in_the_text_and_the_html() {
        for locale in [Locale::En, Locale::ZhCn] {
            let all = ca_headings(locale);
            for i in 0..all.len() {
                let mut without = all;
                without[i] = "";
                let label = ca_headings(Locale::En)[i];
                for (built, where_) in [
                    (build_with(locale, "US-CA", without, all), "the plain-text email"),
                    (build_with(locale, "US-CA", all, without), "the HTML email"),
                ] {
                    let missing = built.check();
                    assert_eq!(missing.len(), 1, "{locale} {label} {where_}: {missing:#?}");
                    let m = &missing[0];
                    assert_eq!(m.profile, "us-ca-1798-82");
                    assert!(m.element.contains(label), "{m}");
                    assert!(m.reason.contains(all[i]) && m.reason.contains(where_), "{m}");
                    if i == 0 && where_ == "the plain-text email" {
                        assert!(m.reason.contains("the subject line"), "the title is the subject: {m}");
                    }
                }
            }
        }
        // Outside California the headings are not asked for.
        let mut without = ca_headings(Locale::En);
        without[1] = "";
        assert!(build_with(Locale::En, "US-NY", without, without).check().is_empty());
    }

    #[test]
    fn a_chinese_notice_without_the_cause_fails_pipl_57() {
        let mut built = build(Locale::ZhCn, "CN-ZJ");
        built.facts.cause.zh_cn = Some("  ".into());
        let missing = built.check();
        assert_eq!(missing.len(), 1, "{missing:#?}");
        assert_eq!(missing[0].profile, "cn-pipl-57");
        assert_eq!(missing[0].locale, Locale::ZhCn);
        assert!(missing[0].element.contains("cause"), "{}", missing[0]);
        assert!(missing[0].reason.contains("'cause'"), "{}", missing[0]);
        // Written, but left out of what the reader gets.
        let mut built = build(Locale::ZhCn, "CN-ZJ");
        built.html = built.html.replace(&esc("该员工账号的密码在其他网站重复使用。"), "");
        let missing = built.check();
        // (The platform's impact section is checked whole in the text email only: the HTML splits it.)
        assert_eq!(missing.len(), 1, "{missing:#?}");
        assert!(
            missing
                .iter()
                .any(|m| m.profile == "cn-pipl-57" && m.reason == "the 'cause' text is not in the HTML email")
        );
    }

    #[test]
    fn a_notice_that_does_not_list_an_exposed_category_fails() {
        let mut built = build(Locale::ZhCn, "CN-ZJ");
        built.labels.push("交易记录".into());
        let missing = built.check();
        assert_eq!(missing.len(), 1, "{missing:#?}");
        assert_eq!(missing[0].profile, "cn-pipl-57");
        assert!(missing[0].reason.contains("'交易记录'"), "{}", missing[0]);
        assert!(missing[0].reason.contains("the plain-text email"), "{}", missing[0]);
        assert!(missing[0].reason.contains("the HTML email"), "{}", missing[0]);

        let mut built = build(Locale::En, "US-CA");
        built.labels.clear();
        let missing = built.check();
        assert_eq!(missing.len(), 1, "{missing:#?}");
        assert_eq!(missing[0].reason, "no exposed category was given to list");
    }

    #[test]
    fn contact_details_must_reach_the_reader() {
        let mut built = build(Locale::En, "DE");
        built.phone = "+1-800-555-0100".into();
        assert!(built.check().is_empty(), "phone punctuation does not matter");
        built.email = "officer@example.com".into();
        let missing = built.check();
        let profiles: Vec<&str> = missing.iter().map(|m| m.profile.as_str()).collect();
        assert_eq!(profiles, ["platform", "eu-gdpr-34"], "{missing:#?}");
        assert!(
            missing[1]
                .reason
                .contains("'officer@example.com' not found in the plain-text email, the HTML email and the letter")
        );
        built.email.clear();
        assert!(built.check()[0].reason.contains("no contact email is configured"));
    }

    #[test]
    fn occurred_at_and_empty_sections_are_caught() {
        let mut built = build(Locale::En, "US-CA");
        built.facts.occurred_at = None;
        built.sections.remedies = " \n".into();
        let missing: Vec<String> = built.check().iter().map(ToString::to_string).collect();
        assert_eq!(
            missing,
            [
                "platform: what we offer you (en): the 'remedies' section rendered empty",
                "us-ca-1798-82: date or estimated date of the breach (en): 'occurred_at' (when the incident happened) \
                 is not recorded",
            ]
        );
    }

    #[test]
    fn display_names_profile_element_and_locale() {
        let m = MissingElement {
            profile: "us-ca-1798-82".into(),
            element: "'What Happened' heading".into(),
            locale: Locale::En,
            reason: "'What Happened' not found in the HTML email".into(),
        };
        assert_eq!(
            m.to_string(),
            "us-ca-1798-82: 'What Happened' heading (en): 'What Happened' not found in the HTML email"
        );
        let mut without = ca_headings(Locale::ZhCn);
        without[1] = "";
        let missing = build_with(Locale::ZhCn, "US-CA", ca_headings(Locale::ZhCn), without).check();
        assert_eq!(
            missing[0].to_string(),
            "us-ca-1798-82: 'What Happened' heading (zh-CN): '发生了什么' not found in the HTML email and the letter"
        );
    }

    #[test]
    fn html_is_read_as_a_reader_sees_it() {
        let html = "<html><head><title>Hidden title</title><style>p>a{x:1}</style></head><body>\
                    <script>var s = '<p>Hidden script</p>';</script><!-- hidden <b>comment</b> -->\
                    <p title=\"x > y\">Fish &amp; chips&nbsp;&#39;n&#x27; <b>pe</b>as, 1 &lt; 2 &gt; 0 &quot;q&quot;</p>\
                    <p>a</p><p>b</p><br>c &unknown; &#xZZ; 3 < 4 &copy;</body></html>";
        assert_eq!(
            html_text(html),
            "Fish & chips 'n' peas, 1 < 2 > 0 \"q\" a b c &unknown; &#xZZ; 3 < 4 &copy;"
        );
        assert_eq!(html_text("<P>Upper</P><SCRIPT>x</SCRIPT>case"), "Upper case");
        assert_eq!(html_text("unterminated <div class=\"a"), "unterminated");
    }

    #[test]
    fn a_bad_profile_file_is_refused_naming_profile_and_element() {
        let one = |element: &str| {
            format!(
                "[[profile]]\nid = \"p\"\nname = \"P\"\nregions = [\"*\"]\n[[profile.element]]\nid = \"e\"\nlabel = \"E\"\n{element}"
            )
        };
        let err = |text: &str| NoticeProfiles::parse(text).expect_err(text).to_string();
        let e = err(&one("check = \"section\"\nsection = \"summary\""));
        assert!(
            e.contains("'p'") && e.contains("'e'") && e.contains("unknown section 'summary'"),
            "{e}"
        );
        let e = err(&one(
            "check = \"contains\"\nstrings = { en = [\"X\"] }\nrenderings = [\"email_text\"]",
        ));
        assert!(e.contains("'e'") && e.contains("nothing for zh-CN"), "{e}");
        let e = err(&one(
            "check = \"contains\"\nstrings = { en = [\"X\"], \"zh-CN\" = [\"Y\"] }",
        ));
        assert!(e.contains("needs 'renderings'"), "{e}");
        let e = err(&one("check = \"fact\"\nfact = \"motive\""));
        assert!(e.contains("unknown fact 'motive'"), "{e}");
        let e = err(&one("check = \"fact\"\nfact = \"cause\"\nsection = \"impact\""));
        assert!(e.contains("'section' does not apply to a 'fact' check"), "{e}");
        let e = err(&one("check = \"contact\"\nrenderings = [\"sms\"]"));
        assert!(e.contains("unknown rendering 'sms'"), "{e}");
        let e = err(&one("check = \"vibes\""));
        assert!(e.contains("unknown check 'vibes'"), "{e}");
        let e = err(&one("check = \"contact\"\ncolour = \"red\""));
        assert!(e.contains("colour"), "unknown keys are refused: {e}");
        let e = err(&one("check = \"contact\"").replace("[\"*\"]", "[\"Germany\"]"));
        assert!(e.contains("'p'") && e.contains("'Germany'"), "{e}");
        let twice = format!("{}\n{}", one("check = \"contact\""), one("check = \"contact\""));
        assert!(err(&twice).contains("defined twice"));
        let e = err(&format!(
            "{}\n[[profile.element]]\nid = \"e\"\nlabel = \"F\"\ncheck = \"contact\"",
            one("check = \"contact\"")
        ));
        assert!(e.contains("element 'e' is listed twice"), "{e}");
        assert!(err("").contains("no [[profile]]"));
    }
}
