//! Drafting: the notices of an incident as one version. Merchants whose notices render alike
//! (the same class of exposed categories, language and legal profiles) form a variant; each
//! variant is rendered once with a sample merchant and checked: every required element present
//! for every profile that applies, each channel within its limits. A version that fails is not
//! stored, and the error lists what is missing for which profile. A version stores its inputs
//! frozen (facts, settings, classes, the template set), so any merchant's notice is reproduced
//! exactly when it is sent or previewed, and the store does not hold a copy per merchant.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::completeness::{NoticeProfiles, RenderedNotice};
use crate::domain::*;
use crate::ledger::content_hash;
use crate::model::*;
use crate::store::{Store, StoreError, VariantGroup};
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
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("draft {0} has no frozen inputs")]
    NotFrozen(String),
    #[error("the frozen template set {0} is not in the store")]
    MissingTemplates(String),
}

/// What drafting needs besides the incident: who the operator is and how to reach it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoticeSettings {
    pub operator_name: String,
    pub platform: String,
    /// The SMS signature per language (China requires a registered 【signature】).
    pub short_name_en: String,
    pub short_name_zh: String,
    pub officer_en: String,
    pub officer_zh: String,
    pub contact_email: String,
    pub contact_phone: String,
    pub public_base_url: String,
    /// Where `tocsin serve` (or a proxy) answers `/n/<token>` with a merchant's own notice.
    pub notice_base_url: String,
}

impl NoticeSettings {
    pub fn bulletin_url(&self, reference: &str) -> String {
        format!("{}/{reference}/", self.public_base_url.trim_end_matches('/'))
    }

    pub fn notice_url(&self, token: &str) -> String {
        format!("{}/n/{token}", self.notice_base_url.trim_end_matches('/'))
    }

    fn officer(&self, locale: Locale) -> &str {
        match locale {
            Locale::En => &self.officer_en,
            Locale::ZhCn => &self.officer_zh,
        }
    }

    fn short_name(&self, locale: Locale) -> &str {
        match locale {
            Locale::En => &self.short_name_en,
            Locale::ZhCn => &self.short_name_zh,
        }
    }
}

/// What each channel can carry (configuration, checked at drafting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChannelLimits {
    pub sms_max_segments: u32,
    pub push_title_max_chars: usize,
    pub push_body_max_chars: usize,
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

/// How an SMS is encoded and how many segments it takes: GSM-7 (160 characters, 153 per part
/// when concatenated; the extension characters count twice) unless a character needs UCS-2
/// (70, 67 per part; counted in UTF-16 units).
pub fn sms_segments(text: &str) -> (&'static str, usize, u32) {
    const BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
    const EXTENSION: &str = "^{}\\[~]|€\u{c}";
    let gsm: Option<usize> = text.chars().try_fold(0usize, |n, c| {
        if BASIC.contains(c) {
            Some(n + 1)
        } else if EXTENSION.contains(c) {
            Some(n + 2)
        } else {
            None
        }
    });
    let (encoding, units, single, part) = match gsm {
        Some(n) => ("GSM-7", n, 160, 153),
        None => ("UCS-2", text.encode_utf16().count(), 70, 67),
    };
    let segments = if units <= single { 1 } else { units.div_ceil(part) };
    (encoding, units, segments as u32)
}

/// The incident's facts in one language, for templates. Missing texts become empty strings
/// here; [`missing_elements`] reports them before anything is approved.
pub fn incident_context(
    reference: &str,
    detected_at: chrono::DateTime<Utc>,
    facts: &IncidentFacts,
    locale: Locale,
) -> Value {
    let text = |t: &LocalizedText| t.get(locale).unwrap_or("").to_owned();
    let human = |t| human_for(t, locale);
    json!({
        "reference": reference,
        "kind": facts.kind.as_str(),
        "kind_label": kind_label(facts.kind, locale),
        "occurred_at": human(facts.occurred_at.unwrap_or(detected_at)),
        "detected_at": human(detected_at),
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
    labels: &BTreeMap<CategoryId, LabelPair>,
    templates: &Templates,
) -> Result<Vec<Value>, TemplateError> {
    categories
        .iter()
        .map(|c| {
            let optional = |name: String| -> Result<String, TemplateError> {
                if templates.has(&name) {
                    templates.render(&name, base)
                } else {
                    Ok(String::new())
                }
            };
            let label = labels.get(c);
            Ok(json!({
                "id": c.as_str(),
                "label": label.map(|l| l.label(locale)).unwrap_or(c.as_str()),
                "sensitive": label.is_some_and(|l| l.sensitive),
                "advice": optional(format!("advice/{locale}/{c}"))?,
                "remedy": optional(format!("remedy/{locale}/{c}"))?,
            }))
        })
        .collect()
}

/// A category's labels as frozen into a draft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelPair {
    pub en: String,
    pub zh: String,
    pub sensitive: bool,
}

impl LabelPair {
    fn label(&self, locale: Locale) -> &str {
        match locale {
            Locale::En => &self.en,
            Locale::ZhCn => &self.zh,
        }
    }
}

/// The labels of the incident's categories, frozen with the draft.
pub fn frozen_labels(categories: &[CategoryId], taxonomy: &Taxonomy) -> BTreeMap<CategoryId, LabelPair> {
    categories
        .iter()
        .map(|c| {
            (
                c.clone(),
                LabelPair {
                    en: taxonomy.label(c, Locale::En),
                    zh: taxonomy.label(c, Locale::ZhCn),
                    sensitive: taxonomy.is_sensitive(c),
                },
            )
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

/// Who a notice is addressed to, as far as rendering is concerned.
#[derive(Debug, Clone)]
pub struct Addressee<'a> {
    pub merchant_id: &'a str,
    pub name: &'a str,
    pub kind: MerchantKind,
    pub locale: Locale,
    pub class_no: i64,
    pub link_token: &'a str,
    pub postal_address: Option<&'a str>,
}

/// A draft's frozen inputs with their templates: renders any notice of that version.
pub struct Frozen {
    pub inputs: DraftInputs,
    templates: Arc<Templates>,
    classes: HashMap<i64, ScopeClass>,
    /// Per (class, locale, kind, channel): the channel's texts rendered once with placeholders
    /// for the merchant's id, name and link, or `None` where filling them in would not give
    /// exactly what rendering does (a template that tests or transforms them).
    skeletons: Mutex<HashMap<SkeletonKey, Option<Arc<Skeleton>>>>,
}

/// Class, locale, kind of merchant and channel: notices alike but for the merchant's fields.
type SkeletonKey = (i64, Locale, MerchantKind, Channel);

/// Placeholders no merchant value contains (Unicode private use).
const PLACEHOLDER_ID: &str = "\u{E000}id\u{E001}";
const PLACEHOLDER_NAME: &str = "\u{E000}name\u{E001}";
const PLACEHOLDER_LINK: &str = "\u{E000}link\u{E001}";

/// A channel's texts with placeholders, split once at the placeholders so that filling one in
/// is a single copy, with each literal piece also kept JSON-escaped so that the content hash
/// (of the texts' JSON array) needs no escaping per send but for the merchant's own fields.
struct Skeleton {
    parts: Vec<SkeletonPart>,
}

struct SkeletonPart {
    pieces: Vec<Piece>,
    /// Whether the merchant's fields are HTML-escaped in this text.
    html: bool,
}

enum Piece {
    /// Literal text and the same JSON-escaped (without quotes).
    Literal(String, String),
    Slot(Slot),
}

#[derive(Clone, Copy)]
enum Slot {
    Id,
    Name,
    Link,
}

impl SkeletonPart {
    fn parse(text: &str, html: bool) -> Self {
        let mut pieces = Vec::new();
        let mut rest = text;
        let literal = |t: &str| Piece::Literal(t.to_owned(), json_escaped(t));
        loop {
            let next = [
                (PLACEHOLDER_ID, Slot::Id),
                (PLACEHOLDER_NAME, Slot::Name),
                (PLACEHOLDER_LINK, Slot::Link),
            ]
            .into_iter()
            .filter_map(|(p, slot)| rest.find(p).map(|at| (at, p.len(), slot)))
            .min_by_key(|(at, _, _)| *at);
            match next {
                Some((at, len, slot)) => {
                    if at > 0 {
                        pieces.push(literal(&rest[..at]));
                    }
                    pieces.push(Piece::Slot(slot));
                    rest = &rest[at + len..];
                }
                None => {
                    if !rest.is_empty() {
                        pieces.push(literal(rest));
                    }
                    break;
                }
            }
        }
        Self { pieces, html }
    }
}

/// A string JSON-escaped as serde_json writes it, without the quotes.
fn json_escaped(s: &str) -> String {
    let quoted = serde_json::to_string(s).unwrap_or_default();
    quoted
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .unwrap_or_default()
        .to_owned()
}

/// The merchant's fields as one text takes them (HTML-escaped or not).
struct SlotValues {
    id: String,
    name: String,
    link: String,
}

impl SlotValues {
    fn new(to: &Addressee<'_>, html: bool) -> Self {
        let value = |v: &str| {
            if html { handlebars::html_escape(v) } else { v.to_owned() }
        };
        Self {
            id: value(to.merchant_id),
            name: value(to.name),
            link: value(to.link_token),
        }
    }
    fn get(&self, slot: Slot) -> &str {
        match slot {
            Slot::Id => &self.id,
            Slot::Name => &self.name,
            Slot::Link => &self.link,
        }
    }
}

/// The templates each channel sends, in [`Frozen::channel_texts`] order.
fn channel_templates(channel: Channel) -> &'static [&'static str] {
    match channel {
        Channel::Email => &["email_subject", "email.txt", "email.html"],
        Channel::Sms => &["sms"],
        Channel::Push => &["push_title", "push_body"],
    }
}

impl Skeleton {
    fn new(texts: Vec<String>, channel: Channel) -> Self {
        Self {
            parts: channel_templates(channel)
                .iter()
                .zip(texts)
                .map(|(name, text)| SkeletonPart::parse(&text, name.ends_with(".html")))
                .collect(),
        }
    }

    fn fill(&self, to: &Addressee<'_>) -> Vec<String> {
        let plain = SlotValues::new(to, false);
        let html = SlotValues::new(to, true);
        self.parts
            .iter()
            .map(|part| {
                let values = if part.html { &html } else { &plain };
                let len = part
                    .pieces
                    .iter()
                    .map(|p| match p {
                        Piece::Literal(t, _) => t.len(),
                        Piece::Slot(s) => values.get(*s).len(),
                    })
                    .sum();
                let mut out = String::with_capacity(len);
                for p in &part.pieces {
                    match p {
                        Piece::Literal(t, _) => out.push_str(t),
                        Piece::Slot(s) => out.push_str(values.get(*s)),
                    }
                }
                out
            })
            .collect()
    }

    /// [`channel_hash`] of the filled texts followed by `extra` (the push channel hashes its
    /// link too), from the pre-escaped literals.
    fn hash(&self, to: &Addressee<'_>, extra: &[&str]) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"[");
        let mut first = true;
        let mut open = |hasher: &mut Sha256| {
            hasher.update(if std::mem::take(&mut first) {
                &b"\""[..]
            } else {
                &b",\""[..]
            });
        };
        let escaped = |values: &SlotValues| SlotValues {
            id: json_escaped(&values.id),
            name: json_escaped(&values.name),
            link: json_escaped(&values.link),
        };
        let plain = escaped(&SlotValues::new(to, false));
        let html = escaped(&SlotValues::new(to, true));
        for part in &self.parts {
            let values = if part.html { &html } else { &plain };
            open(&mut hasher);
            for p in &part.pieces {
                match p {
                    Piece::Literal(_, escaped) => hasher.update(escaped.as_bytes()),
                    Piece::Slot(s) => hasher.update(values.get(*s).as_bytes()),
                }
            }
            hasher.update(b"\"");
        }
        for e in extra {
            open(&mut hasher);
            hasher.update(json_escaped(e).as_bytes());
            hasher.update(b"\"");
        }
        hasher.update(b"]");
        hex::encode(hasher.finalize())
    }
}

impl Frozen {
    pub fn new(inputs: DraftInputs, templates: Arc<Templates>) -> Self {
        let classes = inputs.classes.iter().map(|c| (c.class_no, c.clone())).collect();
        Self {
            inputs,
            templates,
            classes,
            skeletons: Mutex::new(HashMap::new()),
        }
    }

    /// Renders the texts `channel` sends, the slow way (a context per merchant).
    fn channel_texts(&self, to: &Addressee<'_>, channel: Channel) -> Result<Vec<String>, DraftError> {
        let context = self.context(to)?;
        let locale = to.locale;
        channel_templates(channel)
            .iter()
            .map(|name| Ok(self.templates.render(&format!("notice/{locale}/{name}"), &context)?))
            .collect()
    }

    /// The texts `channel` sends to `to`: from the skeleton of its class, locale and kind when
    /// there is a sound one (a send renders thousands of notices a second), else rendered.
    /// Also returns the skeleton, if one served, which hashes the texts cheaply.
    fn channel_texts_fast(
        &self,
        to: &Addressee<'_>,
        channel: Channel,
    ) -> Result<(Vec<String>, Option<Arc<Skeleton>>), DraftError> {
        let key = (to.class_no, to.locale, to.kind, channel);
        let cached = self.skeletons.lock().ok().and_then(|m| m.get(&key).cloned());
        let skeleton = match cached {
            Some(s) => s,
            None => {
                let built = self.skeleton(to, channel)?;
                if let Ok(mut m) = self.skeletons.lock() {
                    m.insert(key, built.clone());
                }
                built
            }
        };
        match skeleton {
            Some(s) => Ok((s.fill(to), Some(s))),
            None => Ok((self.channel_texts(to, channel)?, None)),
        }
    }

    /// Renders with placeholders, then proves the skeleton on `to`: filled in, it must equal
    /// the real rendering byte for byte, or it is not used.
    fn skeleton(&self, to: &Addressee<'_>, channel: Channel) -> Result<Option<Arc<Skeleton>>, DraftError> {
        let sample = Addressee {
            merchant_id: PLACEHOLDER_ID,
            name: PLACEHOLDER_NAME,
            link_token: PLACEHOLDER_LINK,
            ..*to
        };
        let skeleton = Skeleton::new(self.channel_texts(&sample, channel)?, channel);
        let sound = skeleton.fill(to) == self.channel_texts(to, channel)?;
        if !sound {
            tracing::debug!(channel = %channel, "notice templates transform the merchant's fields; rendering each notice");
        }
        Ok(sound.then(|| Arc::new(skeleton)))
    }

    fn context(&self, to: &Addressee<'_>) -> Result<Value, DraftError> {
        let DraftInputs {
            version,
            facts,
            settings,
            update,
            reference,
            detected_at,
            drafted_at,
            labels,
            ..
        } = &self.inputs;
        let locale = to.locale;
        let human = |t| human_for(t, locale);
        let text = |t: &LocalizedText| t.get(locale).unwrap_or("").to_owned();
        let class = self.classes.get(&to.class_no).ok_or_else(|| DraftError::Incomplete {
            missing: vec![format!("class {} is not part of this version", to.class_no)],
        })?;
        let lines: Vec<&str> = to
            .postal_address
            .map(|a| a.split(['\n', ';']).map(str::trim).filter(|l| !l.is_empty()).collect())
            .unwrap_or_default();
        let mut context = json!({
            "locale": locale.as_str(),
            "merchant": { "id": to.merchant_id, "name": to.name, "kind": to.kind.as_str(), "postal_address_lines": lines },
            "operator": { "name": settings.operator_name, "platform": settings.platform, "short_name": settings.short_name(locale) },
            "incident": incident_context(reference, *detected_at, facts, locale),
            "risk": { "level": class.risk.as_str(), "label": risk_label(class.risk, locale) },
            "contact": { "officer": settings.officer(locale), "email": settings.contact_email, "phone": settings.contact_phone },
            "notice_url": settings.notice_url(to.link_token),
            "bulletin_url": settings.bulletin_url(reference),
            "notice": { "version": version, "date": crate::time::human_date_for(*drafted_at, locale) },
            // Measures in place that templates may state as done (only what the facts say).
            "measures_in_place": {
                "credentials_reset": facts.mitigations.iter().any(|m| m.id == "credentials_reset"),
            },
            "update": update.as_ref().map(|u| json!({
                "previous_version": u.previous_version,
                "previous_sent_at": human(u.previous_sent_at),
                "previous_sent": u.previous_sent,
                "changes": text(&u.changes),
            })),
        });
        let categories = categories_context(&class.exposed, locale, &context, labels, &self.templates)?;
        context["category_remedies"] = Value::Bool(
            categories
                .iter()
                .any(|c| c["remedy"].as_str().is_some_and(|r| !r.is_empty())),
        );
        context["categories"] = Value::Array(categories);
        Ok(context)
    }

    /// Renders one notice on every channel.
    pub fn render(&self, id: &NoticeId, draft: &DraftId, to: &Addressee<'_>) -> Result<Notice, DraftError> {
        let context = self.context(to)?;
        let locale = to.locale;
        let render = |name: &str| self.templates.render(&format!("notice/{locale}/{name}"), &context);
        let sections = NoticeSections {
            impact: render("impact")?,
            measures: render("measures")?,
            advice: render("advice")?,
            remedies: render("remedies")?,
            contact: render("contact")?,
        };
        let mut notice = Notice {
            id: id.clone(),
            draft_id: draft.clone(),
            merchant_id: to.merchant_id.parse().map_err(|e: FieldError| DraftError::Incomplete {
                missing: vec![e.to_string()],
            })?,
            locale,
            url: self.inputs.settings.notice_url(to.link_token),
            email_subject: render("email_subject")?,
            email_text: render("email.txt")?,
            email_html: render("email.html")?,
            sms_text: render("sms")?,
            push_title: render("push_title")?,
            push_body: render("push_body")?,
            letter_html: render("letter.html")?,
            sections,
            content_hash: String::new(),
        };
        notice.content_hash = notice_hash(&notice);
        Ok(notice)
    }

    /// Renders only what `channel` sends (and the link): the send path needs nothing else.
    /// Returns the notice and its [`channel_hash`], which equals that of the full rendering.
    pub fn render_channel(
        &self,
        id: &NoticeId,
        draft: &DraftId,
        to: &Addressee<'_>,
        channel: Channel,
    ) -> Result<(Notice, String), DraftError> {
        let (texts, skeleton) = self.channel_texts_fast(to, channel)?;
        let mut texts = texts.into_iter();
        let mut next = || texts.next().unwrap_or_default();
        let mut notice = Notice {
            id: id.clone(),
            draft_id: draft.clone(),
            merchant_id: to.merchant_id.parse().map_err(|e: FieldError| DraftError::Incomplete {
                missing: vec![e.to_string()],
            })?,
            locale: to.locale,
            url: self.inputs.settings.notice_url(to.link_token),
            sections: NoticeSections::default(),
            email_subject: String::new(),
            email_text: String::new(),
            email_html: String::new(),
            sms_text: String::new(),
            push_title: String::new(),
            push_body: String::new(),
            letter_html: String::new(),
            content_hash: String::new(),
        };
        match channel {
            Channel::Email => {
                notice.email_subject = next();
                notice.email_text = next();
                notice.email_html = next();
            }
            Channel::Sms => notice.sms_text = next(),
            Channel::Push => {
                notice.push_title = next();
                notice.push_body = next();
            }
        }
        let hash = match skeleton {
            Some(s) if channel == Channel::Push => s.hash(to, &[&notice.url]),
            Some(s) => s.hash(to, &[]),
            None => channel_hash(&notice, channel),
        };
        debug_assert_eq!(hash, channel_hash(&notice, channel));
        Ok((notice, hash))
    }

    /// Checks a sample rendering of one variant: every required element for `profiles`, and
    /// each channel within its limits. Returns what is missing.
    pub fn check_variant(
        &self,
        group: &VariantGroup,
        profiles: &NoticeProfiles,
        limits: &ChannelLimits,
    ) -> Result<(Vec<String>, String), DraftError> {
        let locale = group.locale;
        let settings = &self.inputs.settings;
        let mut missing = missing_elements(&self.inputs.facts, settings, locale);
        let sample = Addressee {
            merchant_id: "sample-merchant",
            name: match locale {
                Locale::En => "Sample Shop",
                Locale::ZhCn => "示例店铺",
            },
            kind: MerchantKind::IndividualBusiness,
            locale,
            class_no: group.class_no,
            // Exactly as long as a real link token (8 + 10 characters), so the SMS length holds.
            link_token: "00000000sample0000",
            postal_address: Some("1 Sample Road; Hangzhou"),
        };
        let n = self.render(&NoticeId::generate(), &DraftId::generate(), &sample)?;
        let class = &self.classes[&group.class_no];
        if !class
            .exposed
            .iter()
            .any(|c| self.templates.has(&format!("advice/{locale}/{c}")))
        {
            missing.push(format!(
                "advice ({locale}): no advice is written for the exposed categories"
            ));
        }
        for (name, text) in n.sections.named() {
            if text.trim().is_empty() {
                missing.push(format!("{name} ({locale}): the section rendered empty"));
            } else if !n.email_text.contains(text) {
                missing.push(format!("{name} ({locale}): the email template leaves this section out"));
            }
        }
        let labels: Vec<String> = class
            .exposed
            .iter()
            .map(|c| {
                self.inputs
                    .labels
                    .get(c)
                    .map(|l| l.label(locale).to_owned())
                    .unwrap_or_else(|| c.to_string())
            })
            .collect();
        let rendered = RenderedNotice {
            locale,
            region: &group.region,
            facts: &self.inputs.facts,
            sections: &n.sections,
            exposed_labels: &labels,
            contact_email: &settings.contact_email,
            contact_phone: &settings.contact_phone,
            email_subject: &n.email_subject,
            email_text: &n.email_text,
            email_html: &n.email_html,
            letter_html: &n.letter_html,
        };
        missing.extend(profiles.check(&rendered).iter().map(|m| m.to_string()));
        let (encoding, units, segments) = sms_segments(&n.sms_text);
        if segments > limits.sms_max_segments {
            missing.push(format!(
                "sms ({locale}): {units} {encoding} characters take {segments} segments; at most {} allowed (sms.max_segments)",
                limits.sms_max_segments
            ));
        }
        if !n.sms_text.contains(&n.url) {
            missing.push(format!("sms ({locale}): does not link to the merchant's notice page"));
        }
        for (what, text, max) in [
            ("push title", &n.push_title, limits.push_title_max_chars),
            ("push body", &n.push_body, limits.push_body_max_chars),
        ] {
            let len = text.chars().count();
            if len == 0 || len > max {
                missing.push(format!("{what} ({locale}): {len} characters; must be 1 to {max}"));
            }
        }
        Ok((missing, n.content_hash))
    }
}

/// Hash of what the merchant receives: every rendering, not the ids.
pub fn notice_hash(n: &Notice) -> String {
    let content = json!([
        n.merchant_id.as_str(),
        n.locale.as_str(),
        n.url,
        n.sections,
        n.email_subject,
        n.email_text,
        n.email_html,
        n.sms_text,
        n.push_title,
        n.push_body,
        n.letter_html
    ]);
    content_hash(content.to_string().as_bytes())
}

/// Hash of what one channel carried.
///
/// The SHA-256 of the compact JSON array of the channel's texts (`["subject","text","html"]`),
/// streamed into the hasher: no JSON value (a copy of every body) and no serialised string are
/// built per send. Serialising string slices writes exactly what `json!([..]).to_string()` writes.
pub fn channel_hash(n: &Notice, channel: Channel) -> String {
    let mut hasher = HashWriter(Sha256::new());
    let written = match channel {
        Channel::Email => serde_json::to_writer(&mut hasher, &[&n.email_subject, &n.email_text, &n.email_html]),
        Channel::Sms => serde_json::to_writer(&mut hasher, &[&n.sms_text]),
        Channel::Push => serde_json::to_writer(&mut hasher, &[&n.push_title, &n.push_body, &n.url]),
    };
    // Writing into a hasher cannot fail, nor can serialising strings.
    debug_assert!(written.is_ok());
    hex::encode(hasher.0.finalize())
}

/// Feeds whatever is written into a SHA-256.
struct HashWriter(Sha256);

impl std::io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A notice of the first schema, stored rendered.
fn legacy_notice(record: &NoticeRecord, legacy: &Value) -> Result<Notice, DraftError> {
    let text = |k: &str| legacy[k].as_str().unwrap_or_default().to_owned();
    Ok(Notice {
        id: record.id.clone(),
        draft_id: record.draft_id.clone(),
        merchant_id: record.merchant_id.clone(),
        locale: record.locale,
        url: String::new(),
        sections: serde_json::from_value(legacy["sections"].clone()).unwrap_or_default(),
        email_subject: text("email_subject"),
        email_text: text("email_text"),
        email_html: text("email_html"),
        sms_text: text("sms_text"),
        push_title: text("push_title"),
        push_body: text("push_body"),
        letter_html: String::new(),
        content_hash: text("content_hash"),
    })
}

/// Renders stored notices, loading each version's frozen inputs once.
pub struct NoticeRenderer {
    store: Arc<dyn Store>,
    current: Arc<Templates>,
    frozen: Mutex<HashMap<DraftId, Arc<Frozen>>>,
}

impl NoticeRenderer {
    pub fn new(store: Arc<dyn Store>, current: Arc<Templates>) -> Self {
        Self {
            store,
            current,
            frozen: Mutex::new(HashMap::new()),
        }
    }

    pub async fn frozen(&self, draft: &DraftId) -> Result<Arc<Frozen>, DraftError> {
        if let Some(f) = self.frozen.lock().ok().and_then(|m| m.get(draft).cloned()) {
            return Ok(f);
        }
        let inputs = self
            .store
            .draft_inputs(draft)
            .await?
            .ok_or_else(|| DraftError::NotFrozen(draft.to_string()))?;
        let templates = if inputs.template_set == self.current.set_hash() {
            self.current.clone()
        } else {
            let sources = self
                .store
                .template_set(&inputs.template_set)
                .await?
                .ok_or_else(|| DraftError::MissingTemplates(inputs.template_set.clone()))?;
            Arc::new(Templates::from_json(&sources)?)
        };
        let f = Arc::new(Frozen::new(inputs, templates));
        if let Ok(mut m) = self.frozen.lock() {
            m.insert(draft.clone(), f.clone());
        }
        Ok(f)
    }

    /// Renders a stored notice; `locale` renders it in another language (preview).
    pub async fn render_id(&self, id: &NoticeId) -> Result<Option<Notice>, DraftError> {
        match self.store.notice_record(id).await? {
            Some(record) => self.render(&record, None, None).await.map(Some),
            None => Ok(None),
        }
    }

    /// Renders what `channel` sends of a stored notice (the send path), with its
    /// [`channel_hash`].
    pub async fn render_for_channel(
        &self,
        record: &NoticeRecord,
        channel: Channel,
    ) -> Result<(Notice, String), DraftError> {
        if let Some(legacy) = &record.legacy {
            let notice = legacy_notice(record, legacy)?;
            let hash = channel_hash(&notice, channel);
            return Ok((notice, hash));
        }
        let frozen = self.frozen(&record.draft_id).await?;
        let to = Addressee {
            merchant_id: record.merchant_id.as_str(),
            name: &record.merchant_name,
            kind: record.merchant_kind,
            locale: record.locale,
            class_no: record.class_no,
            link_token: &record.link_token,
            postal_address: None,
        };
        frozen.render_channel(&record.id, &record.draft_id, &to, channel)
    }

    /// Renders a stored notice; `locale` renders it in another language (preview).
    pub async fn render(
        &self,
        record: &NoticeRecord,
        postal_address: Option<&str>,
        locale: Option<Locale>,
    ) -> Result<Notice, DraftError> {
        if let Some(legacy) = &record.legacy {
            return legacy_notice(record, legacy);
        }
        let frozen = self.frozen(&record.draft_id).await?;
        let to = Addressee {
            merchant_id: record.merchant_id.as_str(),
            name: &record.merchant_name,
            kind: record.merchant_kind,
            locale: locale.unwrap_or(record.locale),
            class_no: record.class_no,
            link_token: &record.link_token,
            postal_address,
        };
        frozen.render(&record.id, &record.draft_id, &to)
    }
}

/// The variants of a version: groups that render alike under the same legal profiles.
pub fn variants(groups: &[VariantGroup], profiles: &NoticeProfiles) -> Vec<(VariantGroup, String)> {
    let mut by_key: BTreeMap<(i64, Locale, String), VariantGroup> = BTreeMap::new();
    for g in groups {
        let key = (g.class_no, g.locale, profiles.profile_key(&g.region));
        by_key
            .entry(key)
            .and_modify(|v| v.merchants += g.merchants)
            .or_insert_with(|| g.clone());
    }
    by_key.into_iter().map(|((_, _, key), g)| (g, key)).collect()
}

/// Checks every variant and returns them with the version's content hash, or every missing
/// element of every variant.
pub fn check_all(
    frozen: &Frozen,
    groups: &[VariantGroup],
    profiles: &NoticeProfiles,
    limits: &ChannelLimits,
) -> Result<(Vec<DraftVariant>, String), DraftError> {
    let mut missing: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for (i, (group, key)) in variants(groups, profiles).into_iter().enumerate() {
        let (m, hash) = frozen.check_variant(&group, profiles, limits)?;
        for item in m {
            if !missing.contains(&item) {
                missing.push(item);
            }
        }
        out.push(DraftVariant {
            variant_no: i as i64 + 1,
            class_no: group.class_no,
            locale: group.locale,
            profiles: key,
            merchants: group.merchants,
            sample_hash: hash,
        });
    }
    if !missing.is_empty() {
        return Err(DraftError::Incomplete { missing });
    }
    // What the version says, not when it was drafted: redrafting an unchanged text gives the
    // same hash. The samples follow from the inputs, so the variants' keys and sizes suffice.
    let mut inputs = serde_json::to_value(&frozen.inputs).unwrap_or_default();
    if let Some(map) = inputs.as_object_mut() {
        map.remove("drafted_at");
        map.remove("version");
    }
    let variants: Vec<String> = out
        .iter()
        .map(|v| format!("{} {} {} {}", v.class_no, v.locale, v.profiles, v.merchants))
        .collect();
    let hash = content_hash(format!("{inputs}\n{}", variants.join("\n")).as_bytes());
    Ok((out, hash))
}

/// The new draft row for a checked version.
pub fn new_draft(incident: &IncidentId, version: i64, hash: String, notices: i64, actor: &Actor) -> Draft {
    Draft {
        id: DraftId::generate(),
        incident_id: incident.clone(),
        version,
        state: DraftState::Drafted,
        content_hash: hash,
        drafted_by: actor.clone(),
        drafted_at: Utc::now(),
        approved_by: None,
        approved_at: None,
        notice_count: notices,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash as it was first computed, through a JSON value: the streamed one must match it.
    fn channel_hash_via_value(n: &Notice, channel: Channel) -> String {
        let content = match channel {
            Channel::Email => json!([n.email_subject, n.email_text, n.email_html]),
            Channel::Sms => json!([n.sms_text]),
            Channel::Push => json!([n.push_title, n.push_body, n.url]),
        };
        content_hash(content.to_string().as_bytes())
    }

    #[test]
    fn channel_hash_is_unchanged_from_the_json_value_hash() {
        let texts = [
            "",
            "plain ascii",
            "quotes \"here\" and 'there'",
            "back\\slash \\n not a newline, and a / slash",
            "unicode: 示例商城 — café ü 🚨 \u{2028}\u{2029}",
            "control: \n\r\t\u{0} \u{1} \u{8} \u{b} \u{c} \u{1f} \u{7f}",
            "<p class=\"x\">html &amp; </p>\r\n.line starting with a dot",
        ];
        let mut notice = Notice {
            id: NoticeId::generate(),
            draft_id: DraftId::generate(),
            merchant_id: "m-1".parse().expect("a merchant id"),
            locale: Locale::En,
            url: String::new(),
            sections: NoticeSections::default(),
            email_subject: String::new(),
            email_text: String::new(),
            email_html: String::new(),
            sms_text: String::new(),
            push_title: String::new(),
            push_body: String::new(),
            letter_html: String::new(),
            content_hash: String::new(),
        };
        for (i, a) in texts.iter().enumerate() {
            let b = texts[(i + 1) % texts.len()];
            let c = texts[(i + 3) % texts.len()];
            notice.email_subject = (*a).to_owned();
            notice.email_text = b.to_owned();
            notice.email_html = c.to_owned();
            notice.sms_text = format!("{a}{b}");
            notice.push_title = c.to_owned();
            notice.push_body = (*a).to_owned();
            notice.url = format!("https://example.com/n/{i}?q=\"{b}\"");
            for channel in [Channel::Email, Channel::Sms, Channel::Push] {
                assert_eq!(
                    channel_hash(&notice, channel),
                    channel_hash_via_value(&notice, channel),
                    "{channel:?} {i}"
                );
            }
        }
    }

    fn settings() -> NoticeSettings {
        NoticeSettings {
            operator_name: "Example Marketplace".into(),
            platform: "seller platform".into(),
            short_name_en: "Example Marketplace".into(),
            short_name_zh: "示例商城".into(),
            officer_en: "PI Officer".into(),
            officer_zh: "个人信息保护负责人".into(),
            contact_email: "privacy@example.com".into(),
            contact_phone: "+86 400 000 0000".into(),
            public_base_url: "https://status.example.com/bulletins".into(),
            notice_base_url: "http://127.0.0.1:8080".into(),
        }
    }

    const LIMITS: ChannelLimits = ChannelLimits {
        sms_max_segments: 1,
        push_title_max_chars: 50,
        push_body_max_chars: 110,
    };

    fn frozen(facts: IncidentFacts, exposed: &[&str]) -> Frozen {
        let taxonomy = Taxonomy::builtin().expect("taxonomy");
        let exposed: Vec<CategoryId> = exposed.iter().map(|c| c.parse().expect("c")).collect();
        let inputs = DraftInputs {
            version: 1,
            labels: frozen_labels(&facts.categories, &taxonomy),
            facts,
            settings: settings(),
            template_set: String::new(),
            classes: vec![ScopeClass {
                class_no: 1,
                exposed,
                risk: RiskLevel::High,
                risk_reasons: vec![],
                notice_required: true,
                notice_reason: String::new(),
                merchants: 1,
            }],
            update: None,
            reference: "INC-2026-0001".into(),
            detected_at: Utc::now(),
            drafted_at: Utc::now(),
        };
        Frozen::new(inputs, Arc::new(Templates::embedded().expect("templates")))
    }

    fn demo_facts() -> IncidentFacts {
        serde_json::from_str(include_str!("../config/demo/incident.json")).expect("facts")
    }

    fn group(locale: Locale, region: &str) -> VariantGroup {
        VariantGroup {
            class_no: 1,
            locale,
            region: region.into(),
            merchants: 1,
        }
    }

    fn addressee(locale: Locale) -> Addressee<'static> {
        Addressee {
            merchant_id: "m-1",
            name: "Lin <Tea> & Co",
            kind: MerchantKind::IndividualBusiness,
            locale,
            class_no: 1,
            link_token: "00000001abcdef0123",
            postal_address: Some("8 West Lake Road; Hangzhou 310000"),
        }
    }

    #[test]
    fn the_send_path_renders_and_hashes_exactly_what_the_full_rendering_does() {
        let f = frozen(demo_facts(), &["account_credentials", "settlement_account"]);
        let names = ["Lin <Tea> & Co", "Quote \"q\" back\\slash", "茶 \u{7f}\t tab", ""];
        for locale in [Locale::En, Locale::ZhCn] {
            for name in names {
                let to = Addressee {
                    name,
                    ..addressee(locale)
                };
                let (id, draft) = (NoticeId::generate(), DraftId::generate());
                let full = f.render(&id, &draft, &to).expect("render");
                for channel in [Channel::Email, Channel::Sms, Channel::Push] {
                    let (sent, hash) = f.render_channel(&id, &draft, &to, channel).expect("render");
                    assert_eq!(hash, channel_hash(&full, channel), "{locale} {channel:?} {name:?}");
                    assert_eq!(hash, channel_hash(&sent, channel), "{locale} {channel:?} {name:?}");
                }
                let (sent, _) = f.render_channel(&id, &draft, &to, Channel::Email).expect("render");
                assert_eq!(
                    (sent.email_subject, sent.email_text, sent.email_html),
                    (full.email_subject, full.email_text, full.email_html)
                );
            }
            assert!(
                f.skeletons.lock().expect("lock").values().all(Option::is_some),
                "{locale}: every channel served from a skeleton"
            );
        }
    }

    #[test]
    fn sms_segments_follow_gsm7_and_ucs2() {
        assert_eq!(sms_segments(&"a".repeat(160)), ("GSM-7", 160, 1));
        assert_eq!(sms_segments(&"a".repeat(161)), ("GSM-7", 161, 2));
        assert_eq!(
            sms_segments(&"{".repeat(80)),
            ("GSM-7", 160, 1),
            "extension characters count twice"
        );
        assert_eq!(sms_segments(&"字".repeat(70)), ("UCS-2", 70, 1));
        assert_eq!(sms_segments(&"字".repeat(71)), ("UCS-2", 71, 2));
        assert_eq!(sms_segments(&"a".repeat(154 + 153)).2, 3);
    }

    #[test]
    fn a_notice_has_every_element_for_its_profiles_and_exactly_the_merchants_advice() {
        let profiles = NoticeProfiles::builtin().expect("profiles");
        let f = frozen(demo_facts(), &["account_credentials", "settlement_account"]);
        for (locale, region) in [(Locale::En, "US-CA"), (Locale::ZhCn, "CN-ZJ"), (Locale::En, "DE")] {
            let (missing, _) = f
                .check_variant(&group(locale, region), &profiles, &LIMITS)
                .expect("check");
            assert!(missing.is_empty(), "{locale} {region}: {missing:?}");
            let n = f
                .render(&NoticeId::generate(), &DraftId::generate(), &addressee(locale))
                .expect("render");
            let taxonomy = Taxonomy::builtin().expect("taxonomy");
            let label = |c: &str| taxonomy.label(&c.parse().expect("c"), locale);
            assert!(n.sections.advice.contains(&label("account_credentials")));
            assert!(
                !n.sections.advice.contains(&label("media")),
                "{locale}: advice for data not exposed"
            );
            assert!(
                n.email_html.contains("Lin &lt;Tea&gt; &amp; Co"),
                "HTML must escape the merchant's name"
            );
            assert!(n.email_html.contains(&format!("lang=\"{locale}\"")));
            assert!(!n.email_html.contains("<table"), "no layout tables");
            assert!(n.email_text.contains("Lin <Tea> & Co"), "plain text must not escape");
            assert!(n.sms_text.contains("http://127.0.0.1:8080/n/00000001abcdef0123"));
            assert!(sms_segments(&n.sms_text).2 == 1, "{locale}: {}", n.sms_text);
            assert!(n.letter_html.contains("West Lake Road") && n.letter_html.contains("A4"));
        }
        let en = f
            .render(&NoticeId::generate(), &DraftId::generate(), &addressee(Locale::En))
            .expect("render");
        let mut at = 0;
        for heading in [
            "Notice of Data Breach",
            "What Happened",
            "What Information Was Involved",
            "What We Are Doing",
            "What You Can Do",
            "For More Information",
        ] {
            let found = en.email_text[at..]
                .find(heading)
                .unwrap_or_else(|| panic!("{heading} missing or out of order"));
            at += found;
        }
        assert!(en.email_subject.starts_with("Notice of Data Breach"));
    }

    #[test]
    fn a_missing_element_is_named_with_its_profile_and_channel_limits_are_enforced() {
        let profiles = NoticeProfiles::builtin().expect("profiles");
        let mut facts = demo_facts();
        facts.cause.zh_cn = None;
        facts.remedies = LocalizedText::default();
        let f = frozen(facts, &["account_credentials"]);
        let (missing, _) = f
            .check_variant(&group(Locale::ZhCn, "CN-ZJ"), &profiles, &LIMITS)
            .expect("check");
        assert!(
            missing
                .iter()
                .any(|m| m.starts_with("cn-pipl-57") && m.contains("cause")),
            "{missing:?}"
        );
        assert!(missing.iter().any(|m| m.starts_with("remedies (zh-CN)")), "{missing:?}");
        let f = frozen(demo_facts(), &["account_credentials"]);
        let tight = ChannelLimits {
            sms_max_segments: 1,
            push_title_max_chars: 5,
            push_body_max_chars: 110,
        };
        let mut long = settings();
        long.notice_base_url = format!("https://{}.example.com", "x".repeat(60));
        let mut inputs = f.inputs.clone();
        inputs.settings = long;
        let f = Frozen::new(inputs, f.templates.clone());
        let (missing, _) = f
            .check_variant(&group(Locale::ZhCn, "CN-ZJ"), &profiles, &tight)
            .expect("check");
        assert!(
            missing
                .iter()
                .any(|m| m.starts_with("sms (zh-CN)") && m.contains("segments")),
            "{missing:?}"
        );
        assert!(
            missing.iter().any(|m| m.starts_with("push title (zh-CN)")),
            "{missing:?}"
        );
        let err = check_all(&f, &[group(Locale::ZhCn, "CN-ZJ")], &profiles, &tight).expect_err("incomplete");
        assert!(matches!(err, DraftError::Incomplete { .. }));
    }

    #[test]
    fn an_update_says_what_changed_and_when_the_earlier_notice_was_sent() {
        let mut f = frozen(demo_facts(), &["account_credentials"]);
        let sent = crate::time::parse_ts("2026-11-28T08:00:00Z").expect("time");
        f.inputs.version = 2;
        f.inputs.update = Some(UpdateOf {
            previous_version: 1,
            previous_sent_at: sent,
            previous_sent: true,
            changes: LocalizedText::both("The attacker also read order records.", "攻击者还读取了订单记录。"),
        });
        let f = Frozen::new(f.inputs.clone(), f.templates.clone());
        for locale in [Locale::En, Locale::ZhCn] {
            let n = f
                .render(&NoticeId::generate(), &DraftId::generate(), &addressee(locale))
                .expect("render");
            assert!(n.email_text.contains(&crate::time::human_for(sent, locale)), "{locale}");
            assert!(
                n.email_text.contains(
                    f.inputs
                        .update
                        .as_ref()
                        .and_then(|u| u.changes.get(locale))
                        .unwrap_or("?")
                )
            );
            assert!(
                n.sms_text
                    .contains(if locale == Locale::En { "Update" } else { "更新" })
            );
        }
        // An earlier version that never went out is replaced, not "updated".
        let mut unsent = f.inputs.clone();
        if let Some(u) = unsent.update.as_mut() {
            u.previous_sent = false;
        }
        let f = Frozen::new(unsent, f.templates.clone());
        let n = f
            .render(&NoticeId::generate(), &DraftId::generate(), &addressee(Locale::En))
            .expect("render");
        assert!(
            n.email_text.contains("which had not yet been sent to you"),
            "{}",
            n.email_text
        );
        assert!(!n.email_text.contains("to our notice sent on"));
    }
}
