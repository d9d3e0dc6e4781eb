//! OCSF 1.x findings as security events: a Detection Finding (`class_uid` 2004) or an
//! Incident Finding (`class_uid` 2005) posted by a security tool is mapped into a
//! [`SecurityEvent`], so it is deduplicated, correlated and opens or joins an incident exactly
//! like an event in Tocsin's own format. [`crate::ingest::parse_event`] sends every object that
//! has a `class_uid` here; Tocsin's own format has no such field.
//!
//! The mapping (paths are OCSF attribute paths; "else" means the next one is read only when
//! the earlier one is absent):
//!
//! | Tocsin event | from the OCSF finding |
//! |---|---|
//! | (accepted at all) | `class_uid` 2004 or 2005, other classes refused; `metadata.version` 1.x; `activity_id` 1 (Create) or 2 (Update), 3 (Close) refused; a Detection Finding with `status_id` 3 (Suppressed) or 6 (Deleted), or an Incident Finding with `verdict_id` 1 (False Positive), 3 (Disregard) or 5 (Benign), refused: they report nothing to notify |
//! | `source` | `unmapped.tocsin.source`, else `metadata.product.name` made into an id: lower case, each run of other characters than `a-z 0-9 . _` one `-`, at most 64 (`Lanyard DLP` → `lanyard-dlp`) |
//! | `external_id` (with `source`, the idempotency key) | `unmapped.tocsin.external_id`, else Detection: `finding_info.uid`; Incident: `metadata.uid` (the class has no uid of its own) |
//! | `severity` | `severity_id`: 1 Informational → `info`, 2 → `low`, 3 → `medium`, 4 → `high`, 5 Critical and 6 Fatal → `critical`; 99 Other → the `severity` label if it names one of those; 0 Unknown refused |
//! | `kind` | `unmapped.tocsin.kind`, else from MITRE ATT&CK in `attacks`, `finding_info.attacks` and `finding_info_list[].attacks` (a sub-technique counts as its technique) and from `malware`, the first that applies of: T1486 → `ransomware`; tactic TA0010 Exfiltration → `leak`; T1565, T1491 → `tampering`; T1485, T1561 → `loss`; a non-empty `malware` → `malware`; T1498, T1499 → `denial_of_service`; tactics TA0001, TA0004, TA0006, TA0008 → `unauthorized_access`; else `other` |
//! | `title` | Detection: `finding_info.title`, else `message`. Incident: `desc`, else `message`, else the first `finding_info_list[].title`. First line, at most 300 characters |
//! | `description` | Detection: `finding_info.desc`, else `message` when not the title. Incident: `message` when not the title, then the list of its findings (`title (uid)`). At most 10,000 characters |
//! | `detected_at` | `time` (epoch milliseconds: the finding's creation time) |
//! | `occurred_at` | `start_time`, else Detection: `finding_info.first_seen_time`; Incident: the earliest `finding_info_list[].first_seen_time` |
//! | `correlation_key` | `unmapped.tocsin.correlation_key`, else `metadata.correlation_uid` |
//! | `categories` | `unmapped.tocsin.categories`: Tocsin's data-category ids (`config/categories.toml`) |
//! | `merchant_ids` | `unmapped.tocsin.merchant_ids`, then the `uid` of each `resources[]` whose `type` is `tocsin.merchant` |
//! | `attributes` | `{"ocsf": <the finding as posted>}`: observables, resources, evidences, priority, impact, verdict, status, product... stay readable |
//!
//! `unmapped.tocsin` is Tocsin's own namespace in the finding: its keys are `source`,
//! `external_id`, `kind`, `correlation_key`, `categories`, `merchant_ids`, and any other key is
//! refused (a typo would otherwise lose the categories). Everything else in the finding that
//! the table does not read is kept, not checked. Times must be integers of milliseconds since
//! the epoch; a value before 1973 is refused as most likely seconds. Every refusal is a
//! [`FieldError`] naming the OCSF path (`finding_info.uid`, `resources[3].uid`).
//!
//! A finding is recorded once per (source, external id): reposting it, or posting an Update
//! of a Detection Finding with the same `finding_info.uid`, is answered `duplicate` and
//! changes nothing; a responder brings new facts into the incident. An Update of an Incident
//! Finding usually carries a new `metadata.uid`: it is then a new event, which joins the open
//! incident when it has the same `metadata.correlation_uid` (without one it opens another).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use crate::domain::{CategoryId, FieldError, IncidentKind, MerchantId, Severity};
use crate::model::SecurityEvent;
use crate::taxonomy::Taxonomy;

/// `class_uid` of the OCSF Detection Finding.
pub const DETECTION_FINDING: i64 = 2004;
/// `class_uid` of the OCSF Incident Finding.
pub const INCIDENT_FINDING: i64 = 2005;

/// The `type` of a `resources[]` entry that names an affected merchant by its `uid`.
pub const MERCHANT_RESOURCE: &str = "tocsin.merchant";

const TITLE_MAX: usize = 300;
const DESCRIPTION_MAX: usize = 10_000;
const ID_MAX: usize = 200;
/// Epoch milliseconds below this (1973-03-03) are most likely seconds sent by mistake.
const MILLIS_FLOOR: i64 = 100_000_000_000;
const TOCSIN_KEYS: [&str; 6] = [
    "source",
    "external_id",
    "kind",
    "correlation_key",
    "categories",
    "merchant_ids",
];

/// Whether `value` is an OCSF event (it carries `class_uid`) rather than Tocsin's own format.
pub fn is_ocsf(value: &Value) -> bool {
    value.get("class_uid").is_some()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Detection,
    Incident,
}

/// Maps one OCSF 1.x Detection Finding or Incident Finding into a [`SecurityEvent`].
///
/// # Errors
/// A [`FieldError`] naming the OCSF path and the reason: another class, a Close activity, a
/// false positive, a missing id, time or severity, a category the taxonomy does not know...
pub fn parse_finding(value: &Value, taxonomy: &Taxonomy) -> Result<SecurityEvent, FieldError> {
    let root = Node::root(value)?;
    let class = class_of(&root)?;
    check_version(&root)?;
    check_activity(&root, class)?;
    let tocsin = TocsinFields::parse(&root, taxonomy)?;
    let metadata = root.get("metadata").required_object()?;

    let source = match tocsin.source {
        Some(source) => source,
        None => {
            let name = metadata.get("product").required_object()?.get("name");
            let text = name.required_str()?;
            let source = slug(text);
            if source.is_empty() {
                return Err(name.err(
                    "has no letter or digit to make a source id from; name the source in unmapped.tocsin.source",
                ));
            }
            source
        }
    };

    let finding_info = match class {
        Class::Detection => Some(root.get("finding_info").required_object()?),
        Class::Incident => None,
    };
    let findings = match class {
        Class::Incident => {
            let list = root.get("finding_info_list");
            let items = list.array()?;
            if items.is_empty() {
                return Err(list.err("is required: the findings the incident is made of"));
            }
            items
                .into_iter()
                .map(|item| item.required_object())
                .collect::<Result<Vec<_>, _>>()?
        }
        Class::Detection => Vec::new(),
    };

    let external_id = match tocsin.external_id {
        Some(id) => id,
        None => {
            let node = match &finding_info {
                Some(info) => info.get("uid"),
                None => metadata.get("uid"),
            };
            let Some(id) = node.str()? else {
                return Err(node.err(match class {
                    Class::Detection => "is required: with the source it is Tocsin's idempotency key",
                    Class::Incident => {
                        "is required for an Incident Finding: with the source it is Tocsin's idempotency key \
                         (or set unmapped.tocsin.external_id)"
                    }
                }));
            };
            node.at_most(id, ID_MAX)?
        }
    };

    let message = root.get("message").str()?;
    let (title, description): (&str, Option<String>) = match &finding_info {
        Some(info) => {
            let desc = info.get("desc").str()?;
            match (info.get("title").str()?, message) {
                (Some(title), message) => (title, desc.or(message).map(str::to_owned)),
                (None, Some(message)) => (message, desc.map(str::to_owned)),
                (None, None) => {
                    return Err(info
                        .get("title")
                        .err("is required (or message): Tocsin needs a title for the event"));
                }
            }
        }
        None => {
            let mut first_title = None;
            let mut listed = Vec::new();
            for f in &findings {
                let (t, u) = (f.get("title").str()?, f.get("uid").str()?);
                first_title = first_title.or(t);
                match (t, u) {
                    (Some(t), Some(u)) => listed.push(format!("- {t} ({u})")),
                    (Some(x), None) | (None, Some(x)) => listed.push(format!("- {x}")),
                    (None, None) => {}
                }
            }
            let (title, message) = match (root.get("desc").str()?, message, first_title) {
                (Some(desc), message, _) => (desc, message),
                (None, Some(message), _) => (message, None),
                (None, None, Some(title)) => (title, None),
                (None, None, None) => {
                    return Err(root
                        .get("desc")
                        .err("is required (or message): Tocsin needs a title for the incident"));
                }
            };
            let mut text = message.map(str::to_owned).unwrap_or_default();
            if !listed.is_empty() {
                if !text.is_empty() {
                    text.push_str("\n\n");
                }
                text.push_str("Findings:\n");
                text.push_str(&listed.join("\n"));
            }
            (title, (!text.is_empty()).then_some(text))
        }
    };
    let title = first_line_limited(title, TITLE_MAX);
    let description = description.map(|d| limited(&d, DESCRIPTION_MAX));

    let detected_at = root.get("time").time()?.ok_or_else(|| {
        root.get("time")
            .err("is required: when the finding was created, in epoch milliseconds")
    })?;
    let occurred_at = match root.get("start_time").time()? {
        Some(t) => Some(t),
        None => match &finding_info {
            Some(info) => info.get("first_seen_time").time()?,
            None => {
                let mut earliest: Option<DateTime<Utc>> = None;
                for f in &findings {
                    if let Some(t) = f.get("first_seen_time").time()? {
                        earliest = Some(earliest.map_or(t, |e| e.min(t)));
                    }
                }
                earliest
            }
        },
    };

    let correlation_key = match tocsin.correlation_key {
        Some(key) => Some(key),
        None => {
            let node = metadata.get("correlation_uid");
            node.str()?.map(|k| node.at_most(k, ID_MAX)).transpose()?
        }
    };

    let kind = match tocsin.kind {
        Some(kind) => kind,
        None => infer_kind(&root, finding_info.as_ref(), &findings)?,
    };

    let mut merchant_ids = tocsin.merchant_ids;
    for resource in root.get("resources").array()? {
        let resource = resource.required_object()?;
        if resource.get("type").str()? == Some(MERCHANT_RESOURCE) {
            let uid = resource.get("uid");
            let raw = uid
                .str()?
                .ok_or_else(|| uid.err(format!("is required for a resource of type {MERCHANT_RESOURCE}")))?;
            let id: MerchantId = raw.parse().map_err(|e: FieldError| uid.err(e.reason))?;
            if !merchant_ids.contains(&id) {
                merchant_ids.push(id);
            }
        }
    }

    Ok(SecurityEvent {
        source,
        external_id,
        kind,
        severity: severity(&root)?,
        title,
        description,
        detected_at,
        occurred_at,
        correlation_key,
        categories: tocsin.categories,
        merchant_ids,
        attributes: json!({ "ocsf": value }),
    })
}

/// Which class the object is; any other class is refused.
fn class_of(root: &Node<'_>) -> Result<Class, FieldError> {
    let node = root.get("class_uid");
    match node.int()? {
        Some(DETECTION_FINDING) => Ok(Class::Detection),
        Some(INCIDENT_FINDING) => Ok(Class::Incident),
        Some(other) => Err(node.err(format!(
            "{other} is not a class Tocsin ingests: send an OCSF Detection Finding (2004) or Incident Finding (2005)"
        ))),
        None => Err(node.err("is required")),
    }
}

fn check_version(root: &Node<'_>) -> Result<(), FieldError> {
    let node = root.get("metadata").required_object()?.get("version");
    let version = node.required_str()?;
    if version.strip_prefix("1.").is_some_and(|rest| !rest.is_empty()) {
        Ok(())
    } else {
        Err(node.err(format!("Tocsin reads OCSF 1.x; this finding is {version}")))
    }
}

/// Only findings being created or updated are events; a closed or dismissed one opens nothing.
fn check_activity(root: &Node<'_>, class: Class) -> Result<(), FieldError> {
    let activity = root.get("activity_id");
    match activity.int()? {
        Some(1 | 2) => {}
        Some(3) => {
            return Err(activity.err(
                "3 (Close) is not ingested: a closed finding opens nothing; dismiss or close the incident in Tocsin",
            ));
        }
        Some(other) => return Err(activity.err(format!("{other}: must be 1 (Create) or 2 (Update)"))),
        None => return Err(activity.err("is required: 1 (Create) or 2 (Update)")),
    }
    match class {
        Class::Detection => {
            let status = root.get("status_id");
            match status.int()? {
                Some(3) => Err(status.err("3 (Suppressed): a suppressed finding is nothing to notify")),
                Some(6) => Err(status.err("6 (Deleted): a deleted finding is nothing to notify")),
                _ => Ok(()),
            }
        }
        Class::Incident => {
            let verdict = root.get("verdict_id");
            let refused = match verdict.int()? {
                Some(1) => "1 (False Positive)",
                Some(3) => "3 (Disregard)",
                Some(5) => "5 (Benign)",
                _ => return Ok(()),
            };
            Err(verdict.err(format!("{refused}: such an incident is nothing to notify")))
        }
    }
}

/// `severity_id` as Tocsin's severity (see the table in the module documentation).
fn severity(root: &Node<'_>) -> Result<Severity, FieldError> {
    let node = root.get("severity_id");
    match node.int()? {
        Some(1) => Ok(Severity::Info),
        Some(2) => Ok(Severity::Low),
        Some(3) => Ok(Severity::Medium),
        Some(4) => Ok(Severity::High),
        Some(5 | 6) => Ok(Severity::Critical),
        Some(99) => {
            let label = root.get("severity");
            let named = label.str()?.map(str::to_ascii_lowercase);
            match named.as_deref() {
                Some("informational" | "info") => Ok(Severity::Info),
                Some("low") => Ok(Severity::Low),
                Some("medium") => Ok(Severity::Medium),
                Some("high") => Ok(Severity::High),
                Some("critical" | "fatal") => Ok(Severity::Critical),
                _ => Err(label
                    .err("with severity_id 99 (Other) must name informational, low, medium, high, critical or fatal")),
            }
        }
        Some(0) => {
            Err(node.err("0 (Unknown) gives Tocsin no severity: send 1-6, or 99 (Other) with severity naming one"))
        }
        Some(other) => Err(node.err(format!("{other} is not an OCSF severity: 0-6 or 99"))),
        None => Err(node.err("is required")),
    }
}

/// The incident kind from the finding's MITRE ATT&CK objects and malware (see the table).
fn infer_kind(
    root: &Node<'_>,
    finding_info: Option<&Node<'_>>,
    findings: &[Node<'_>],
) -> Result<IncidentKind, FieldError> {
    let mut lists = vec![root.get("attacks")];
    lists.extend(finding_info.map(|i| i.get("attacks")));
    lists.extend(findings.iter().map(|f| f.get("attacks")));
    let (mut techniques, mut tactics) = (Vec::new(), Vec::new());
    for list in lists {
        for attack in list.array()? {
            let attack = attack.required_object()?;
            for name in ["technique", "sub_technique"] {
                if let Some(t) = attack.get(name).object()? {
                    techniques.extend(t.get("uid").str()?.map(|u| u.split('.').next().unwrap_or(u).to_owned()));
                }
            }
            if let Some(t) = attack.get("tactic").object()? {
                tactics.extend(t.get("uid").str()?.map(str::to_owned));
            }
            // OCSF 1.0 wrote the tactics as a list.
            for t in attack.get("tactics").array()? {
                tactics.extend(t.required_object()?.get("uid").str()?.map(str::to_owned));
            }
        }
    }
    let technique = |ids: &[&str]| {
        techniques
            .iter()
            .any(|t| ids.contains(&t.to_ascii_uppercase().as_str()))
    };
    let tactic = |ids: &[&str]| tactics.iter().any(|t| ids.contains(&t.to_ascii_uppercase().as_str()));
    let malware = !root.get("malware").array()?.is_empty();
    Ok(if technique(&["T1486"]) {
        IncidentKind::Ransomware
    } else if tactic(&["TA0010"]) {
        IncidentKind::Leak
    } else if technique(&["T1565", "T1491"]) {
        IncidentKind::Tampering
    } else if technique(&["T1485", "T1561"]) {
        IncidentKind::Loss
    } else if malware {
        IncidentKind::Malware
    } else if technique(&["T1498", "T1499"]) {
        IncidentKind::DenialOfService
    } else if tactic(&["TA0001", "TA0004", "TA0006", "TA0008"]) {
        IncidentKind::UnauthorizedAccess
    } else {
        IncidentKind::Other
    })
}

/// `unmapped.tocsin`: what OCSF has no place for, in Tocsin's own terms.
#[derive(Default)]
struct TocsinFields {
    source: Option<String>,
    external_id: Option<String>,
    kind: Option<IncidentKind>,
    correlation_key: Option<String>,
    categories: Vec<CategoryId>,
    merchant_ids: Vec<MerchantId>,
}

impl TocsinFields {
    fn parse(root: &Node<'_>, taxonomy: &Taxonomy) -> Result<Self, FieldError> {
        let Some(unmapped) = root.get("unmapped").object()? else {
            return Ok(Self::default());
        };
        let Some(node) = unmapped.get("tocsin").object()? else {
            return Ok(Self::default());
        };
        if let Some(map) = node.map()
            && let Some(unknown) = map.keys().find(|k| !TOCSIN_KEYS.contains(&k.as_str()))
        {
            return Err(node
                .get(unknown)
                .err(format!("is not a known field (known: {})", TOCSIN_KEYS.join(", "))));
        }
        let source = node.get("source");
        let source = match source.str()? {
            Some(s) if crate::ingest::is_source(s) => Some(s.to_owned()),
            Some(_) => return Err(source.err("must be 1-64 lower-case letters, digits, '.', '_' or '-'")),
            None => None,
        };
        let external_id = node.get("external_id");
        let external_id = external_id.str()?.map(|s| external_id.at_most(s, ID_MAX)).transpose()?;
        let correlation_key = node.get("correlation_key");
        let correlation_key = correlation_key
            .str()?
            .map(|s| correlation_key.at_most(s, ID_MAX))
            .transpose()?;
        let kind = node.get("kind");
        let kind = kind
            .str()?
            .map(|s| s.parse::<IncidentKind>().map_err(|e| kind.err(e.reason)))
            .transpose()?;
        let mut categories = Vec::new();
        for item in node.get("categories").array()? {
            let category = taxonomy.parse_category(item.required_str()?, &item.path)?;
            if !categories.contains(&category) {
                categories.push(category);
            }
        }
        let mut merchant_ids = Vec::new();
        for item in node.get("merchant_ids").array()? {
            let id: MerchantId = item
                .required_str()?
                .parse()
                .map_err(|e: FieldError| item.err(e.reason))?;
            if !merchant_ids.contains(&id) {
                merchant_ids.push(id);
            }
        }
        Ok(Self {
            source,
            external_id,
            kind,
            correlation_key,
            categories,
            merchant_ids,
        })
    }
}

/// A source id from a product name: `Lanyard DLP` → `lanyard-dlp` (empty if nothing is left).
fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() || (matches!(c, '.' | '_') && !out.is_empty()) {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
        if out.len() >= 64 {
            break;
        }
    }
    out.truncate(64);
    out.trim_end_matches('-').to_owned()
}

/// The first non-empty line of `text`, at most `max` characters (an ellipsis marks a cut).
fn first_line_limited(text: &str, max: usize) -> String {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or(text.trim());
    limited(line, max)
}

/// `text`, at most `max` characters (an ellipsis marks a cut). The finding as posted keeps
/// the whole text under `attributes.ocsf`.
fn limited(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut cut: String = text.chars().take(max - 1).collect();
        cut.push('…');
        cut
    }
}

/// A place in the finding: its OCSF path and its value (`None`: absent or null).
struct Node<'a> {
    path: String,
    value: Option<&'a Value>,
}

impl<'a> Node<'a> {
    fn root(value: &'a Value) -> Result<Self, FieldError> {
        match value {
            Value::Object(_) => Ok(Self {
                path: String::new(),
                value: Some(value),
            }),
            _ => Err(FieldError::new("(record)", "must be a JSON object")),
        }
    }

    fn err(&self, reason: impl Into<String>) -> FieldError {
        FieldError::new(self.path.clone(), reason)
    }

    /// The member `name` of this object (absent when this is not an object: the caller
    /// checked that with `object` first).
    fn get(&self, name: &str) -> Node<'a> {
        Node {
            path: if self.path.is_empty() {
                name.to_owned()
            } else {
                format!("{}.{name}", self.path)
            },
            value: self.value.and_then(|v| v.get(name)).filter(|v| !v.is_null()),
        }
    }

    fn map(&self) -> Option<&'a Map<String, Value>> {
        self.value.and_then(Value::as_object)
    }

    fn object(&self) -> Result<Option<Node<'a>>, FieldError> {
        match self.value {
            None => Ok(None),
            Some(Value::Object(_)) => Ok(Some(Node {
                path: self.path.clone(),
                value: self.value,
            })),
            Some(_) => Err(self.err("must be an object")),
        }
    }

    fn required_object(&self) -> Result<Node<'a>, FieldError> {
        self.object()?.ok_or_else(|| self.err("is required"))
    }

    /// The elements of an array (none when absent).
    fn array(&self) -> Result<Vec<Node<'a>>, FieldError> {
        match self.value {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, v)| Node {
                    path: format!("{}[{i}]", self.path),
                    value: Some(v).filter(|v| !v.is_null()),
                })
                .collect()),
            Some(_) => Err(self.err("must be an array")),
        }
    }

    /// A string, trimmed; an empty one counts as absent.
    fn str(&self) -> Result<Option<&'a str>, FieldError> {
        match self.value {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim()).filter(|s| !s.is_empty())),
            Some(_) => Err(self.err("must be a string")),
        }
    }

    fn required_str(&self) -> Result<&'a str, FieldError> {
        self.str()?.ok_or_else(|| self.err("is required"))
    }

    fn at_most(&self, text: &str, max: usize) -> Result<String, FieldError> {
        if text.chars().count() > max {
            Err(self.err(format!("must be at most {max} characters")))
        } else {
            Ok(text.to_owned())
        }
    }

    fn int(&self) -> Result<Option<i64>, FieldError> {
        match self.value {
            None => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| self.err("must be an integer")),
        }
    }

    /// An OCSF `timestamp_t`: integer milliseconds since the epoch.
    fn time(&self) -> Result<Option<DateTime<Utc>>, FieldError> {
        let Some(ms) = self.int()? else {
            return Ok(None);
        };
        if ms < MILLIS_FLOOR {
            return Err(self.err(format!(
                "{ms} is before 1973 as milliseconds since the epoch; OCSF times are milliseconds, not seconds"
            )));
        }
        DateTime::from_timestamp_millis(ms)
            .map(Some)
            .ok_or_else(|| self.err(format!("{ms} is out of range")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{IngestError, parse_events};

    const DETECTION: &str = include_str!("../tests/fixtures/ocsf/detection_finding.json");
    const INCIDENT: &str = include_str!("../tests/fixtures/ocsf/incident_finding.json");
    const FILE_ACTIVITY: &str = include_str!("../tests/fixtures/ocsf/file_activity.json");

    fn taxonomy() -> Taxonomy {
        Taxonomy::builtin().expect("taxonomy")
    }

    fn sample(text: &str) -> Value {
        serde_json::from_str(text).expect("sample JSON")
    }

    fn parse(v: &Value) -> Result<SecurityEvent, FieldError> {
        crate::ingest::parse_event(v, &taxonomy())
    }

    /// The field a refusal names, after `change` is applied to `base`.
    fn refused(base: &str, change: impl FnOnce(&mut Value)) -> FieldError {
        let mut v = sample(base);
        change(&mut v);
        parse(&v).expect_err("refused")
    }

    fn at(s: &str) -> DateTime<Utc> {
        crate::time::parse_ts(s).expect("time")
    }

    fn ids<T: std::fmt::Display>(items: &[T]) -> Vec<String> {
        items.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_detection_finding_maps_to_an_event() {
        let e = parse(&sample(DETECTION)).expect("detection finding");
        assert_eq!(e.source, "lanyard-dlp");
        assert_eq!(e.external_id, "dlp-evt-88213");
        assert_eq!(e.kind, IncidentKind::Leak, "TA0010 Exfiltration");
        assert_eq!(e.severity, Severity::Critical);
        assert_eq!(
            e.title,
            "Bulk export of merchant identity and settlement tables sent to an external host"
        );
        assert!(
            e.description
                .as_deref()
                .is_some_and(|d| d.starts_with("The back-office report export"))
        );
        assert_eq!(e.detected_at, at("2026-11-28T02:41:00Z"));
        assert_eq!(e.occurred_at, Some(at("2026-11-28T00:12:00Z")));
        assert_eq!(e.correlation_key.as_deref(), Some("merchant-backoffice-exfil-2026-11"));
        assert_eq!(
            ids(&e.categories),
            ["real_name", "id_number", "phone_number", "settlement_account"]
        );
        assert_eq!(ids(&e.merchant_ids), ["m-0004", "m-0016"]);
        assert_eq!(e.attributes["ocsf"], sample(DETECTION), "the finding is kept as posted");
    }

    #[test]
    fn an_incident_finding_maps_to_an_event() {
        let e = parse(&sample(INCIDENT)).expect("incident finding");
        assert_eq!(e.source, "watchtower-siem");
        assert_eq!(e.external_id, "INC-2026-1128-0009");
        assert_eq!(e.kind, IncidentKind::Leak, "one of its findings is an exfiltration");
        assert_eq!(e.severity, Severity::High);
        assert_eq!(
            e.title,
            "Compromised staff session exported merchant contact-person data after credential stuffing"
        );
        let description = e.description.expect("description");
        assert!(
            description.starts_with("Correlation of the WAF and DLP alerts"),
            "{description}"
        );
        assert!(
            description.ends_with(
                "Findings:\n- Credential stuffing against the seller-centre login, with successful logins \
                 (waf-20261128-cs-000417)\n- Bulk export of merchant identity and settlement tables sent to an \
                 external host (dlp-evt-88213)"
            ),
            "{description}"
        );
        assert_eq!(e.detected_at, at("2026-11-28T03:22:00Z"));
        assert_eq!(e.occurred_at, Some(at("2026-11-27T22:40:00Z")));
        assert_eq!(e.correlation_key.as_deref(), Some("merchant-backoffice-exfil-2026-11"));
        assert_eq!(
            ids(&e.categories),
            ["account_credentials", "contact_persons", "phone_number", "real_name"]
        );
        assert_eq!(ids(&e.merchant_ids), ["m-0004", "m-0016", "m-0023"]);
    }

    #[test]
    fn other_classes_are_refused_naming_class_uid() {
        let err = parse(&sample(FILE_ACTIVITY)).expect_err("file activity");
        assert_eq!(err.field, "class_uid");
        assert!(err.reason.contains("1001 is not a class Tocsin ingests"), "{err}");
        for bad in [json!(2001), json!("2004"), json!(2004.5)] {
            let err = refused(DETECTION, |v| v["class_uid"] = bad.clone());
            assert_eq!(err.field, "class_uid", "{bad}: {err}");
        }
    }

    #[test]
    fn each_refusal_names_the_ocsf_path() {
        type Change = Box<dyn FnOnce(&mut Value)>;
        let remove = |path: &'static [&'static str]| -> Change {
            Box::new(move |v: &mut Value| {
                let (last, parents) = path.split_last().expect("path");
                let mut at = v;
                for p in parents {
                    at = &mut at[*p];
                }
                at.as_object_mut().map(|m| m.remove(*last));
            })
        };
        let set = |path: &'static [&'static str], value: Value| -> Change {
            Box::new(move |v: &mut Value| {
                let mut at = v;
                for p in path {
                    at = &mut at[*p];
                }
                *at = value;
            })
        };
        let cases: Vec<(&str, &str, Change)> = vec![
            (DETECTION, "finding_info.uid", remove(&["finding_info", "uid"])),
            (DETECTION, "finding_info", remove(&["finding_info"])),
            (DETECTION, "time", remove(&["time"])),
            (DETECTION, "time", set(&["time"], json!(1795833660))),
            (DETECTION, "time", set(&["time"], json!("2026-11-28T02:41:00Z"))),
            (DETECTION, "start_time", set(&["start_time"], json!(-5))),
            (DETECTION, "severity_id", set(&["severity_id"], json!(0))),
            (DETECTION, "severity_id", set(&["severity_id"], json!(7))),
            (DETECTION, "severity_id", remove(&["severity_id"])),
            (DETECTION, "activity_id", set(&["activity_id"], json!(3))),
            (DETECTION, "activity_id", set(&["activity_id"], json!(99))),
            (DETECTION, "status_id", set(&["status_id"], json!(3))),
            (
                DETECTION,
                "metadata.version",
                set(&["metadata", "version"], json!("2.0.0")),
            ),
            (DETECTION, "metadata.version", remove(&["metadata", "version"])),
            (
                DETECTION,
                "metadata.product.name",
                set(&["metadata", "product", "name"], json!("天眼")),
            ),
            (DETECTION, "metadata", set(&["metadata"], json!("lanyard"))),
            (
                DETECTION,
                "finding_info.title",
                Box::new(|v: &mut Value| {
                    v["finding_info"].as_object_mut().map(|m| m.remove("title"));
                    v.as_object_mut().map(|m| m.remove("message"));
                }),
            ),
            (
                DETECTION,
                "finding_info.uid",
                set(&["finding_info", "uid"], json!("x".repeat(201))),
            ),
            (
                DETECTION,
                "unmapped.tocsin.categories[1]",
                set(&["unmapped", "tocsin", "categories"], json!(["real_name", "shoe_size"])),
            ),
            (
                DETECTION,
                "unmapped.tocsin.categorys",
                set(&["unmapped", "tocsin", "categorys"], json!(["real_name"])),
            ),
            (
                DETECTION,
                "unmapped.tocsin.kind",
                set(&["unmapped", "tocsin", "kind"], json!("sneeze")),
            ),
            (
                DETECTION,
                "unmapped.tocsin.source",
                set(&["unmapped", "tocsin", "source"], json!("DLP!")),
            ),
            (
                DETECTION,
                "resources[2].uid",
                set(&["resources"], json!([{}, {}, {"type": "tocsin.merchant"}])),
            ),
            (
                DETECTION,
                "resources[0].uid",
                set(&["resources"], json!([{"type": "tocsin.merchant", "uid": "-bad id"}])),
            ),
            (
                DETECTION,
                "finding_info.attacks",
                set(&["finding_info", "attacks"], json!({"tactic": "TA0010"})),
            ),
            (INCIDENT, "metadata.uid", remove(&["metadata", "uid"])),
            (INCIDENT, "finding_info_list", remove(&["finding_info_list"])),
            (INCIDENT, "finding_info_list", set(&["finding_info_list"], json!([]))),
            (INCIDENT, "verdict_id", set(&["verdict_id"], json!(1))),
            (
                INCIDENT,
                "unmapped.tocsin.merchant_ids[0]",
                set(&["unmapped", "tocsin", "merchant_ids"], json!([7])),
            ),
            (
                INCIDENT,
                "finding_info_list[1].title",
                Box::new(|v: &mut Value| v["finding_info_list"][1]["title"] = json!(3)),
            ),
        ];
        for (base, field, change) in cases {
            let mut v = sample(base);
            change(&mut v);
            match parse(&v) {
                Err(err) => assert_eq!(err.field, field, "{err}"),
                Ok(_) => panic!("accepted; expected a refusal naming {field}"),
            }
        }
        let err = refused(DETECTION, |v| v["time"] = json!(1795833660));
        assert!(err.reason.contains("not seconds"), "{err}");
        let err = refused(DETECTION, |v| v["activity_id"] = json!(3));
        assert!(err.reason.contains("Close"), "{err}");
    }

    #[test]
    fn severity_ids_map_to_tocsin_severities() {
        for (id, label, expected) in [
            (1, "Informational", Severity::Info),
            (2, "Low", Severity::Low),
            (3, "Medium", Severity::Medium),
            (4, "High", Severity::High),
            (5, "Critical", Severity::Critical),
            (6, "Fatal", Severity::Critical),
            (99, "HIGH", Severity::High),
            (99, "fatal", Severity::Critical),
        ] {
            let mut v = sample(DETECTION);
            v["severity_id"] = json!(id);
            v["severity"] = json!(label);
            assert_eq!(parse(&v).expect("severity").severity, expected, "{id} {label}");
        }
        let err = refused(DETECTION, |v| {
            v["severity_id"] = json!(99);
            v["severity"] = json!("Spicy");
        });
        assert_eq!(err.field, "severity");
    }

    #[test]
    fn the_kind_follows_att_and_ck_unless_named() {
        let attack =
            |tactic: &str, technique: &str| json!([{"tactic": {"uid": tactic}, "technique": {"uid": technique}}]);
        for (attacks, expected) in [
            (attack("TA0040", "T1486"), IncidentKind::Ransomware),
            (attack("TA0010", "T1048"), IncidentKind::Leak),
            (attack("TA0040", "T1565.001"), IncidentKind::Tampering),
            (attack("TA0040", "T1485"), IncidentKind::Loss),
            (attack("TA0040", "T1499"), IncidentKind::DenialOfService),
            (attack("TA0006", "T1110"), IncidentKind::UnauthorizedAccess),
            (attack("TA0007", "T1087"), IncidentKind::Other),
            (
                json!([{"tactics": [{"uid": "TA0010"}], "technique": {"uid": "T1041"}}]),
                IncidentKind::Leak,
            ),
            (json!([]), IncidentKind::Other),
        ] {
            let mut v = sample(DETECTION);
            v["finding_info"]["attacks"] = attacks.clone();
            assert_eq!(parse(&v).expect("kind").kind, expected, "{attacks}");
        }
        let mut v = sample(DETECTION);
        v["finding_info"]["attacks"] = json!([]);
        v["malware"] = json!([{"name": "LockBit", "classification_ids": [3]}]);
        assert_eq!(parse(&v).expect("malware").kind, IncidentKind::Malware);
        v["unmapped"]["tocsin"]["kind"] = json!("loss");
        assert_eq!(parse(&v).expect("named").kind, IncidentKind::Loss);
    }

    #[test]
    fn unmapped_tocsin_overrides_what_ocsf_gives() {
        let mut v = sample(INCIDENT);
        v["unmapped"]["tocsin"]["source"] = json!("siem");
        v["unmapped"]["tocsin"]["external_id"] = json!("case-9");
        v["unmapped"]["tocsin"]["correlation_key"] = json!("k-1");
        let e = parse(&v).expect("overrides");
        assert_eq!((e.source.as_str(), e.external_id.as_str()), ("siem", "case-9"));
        assert_eq!(e.correlation_key.as_deref(), Some("k-1"));
        // Without unmapped at all: no categories, no merchants, still an event.
        let mut v = sample(DETECTION);
        v.as_object_mut().map(|m| m.remove("unmapped"));
        v["resources"] = json!([]);
        let e = parse(&v).expect("bare finding");
        assert!(e.categories.is_empty() && e.merchant_ids.is_empty());
    }

    #[test]
    fn titles_fall_back_and_are_cut_to_fit() {
        let mut v = sample(DETECTION);
        v["finding_info"].as_object_mut().map(|m| m.remove("title"));
        let e = parse(&v).expect("message as title");
        assert_eq!(
            e.title,
            "Bulk export of merchant identity and settlement tables sent to 198.51.100.23"
        );
        v["message"] = json!(format!("{}\nsecond line", "a".repeat(400)));
        let e = parse(&v).expect("long title");
        assert_eq!(e.title.chars().count(), 300);
        assert!(e.title.ends_with('…'));
        let mut v = sample(INCIDENT);
        v.as_object_mut().map(|m| {
            m.remove("desc");
            m.remove("message")
        });
        let e = parse(&v).expect("first finding's title");
        assert_eq!(
            e.title,
            "Credential stuffing against the seller-centre login, with successful logins"
        );
    }

    #[test]
    fn product_names_become_source_ids() {
        assert_eq!(slug("Lanyard DLP"), "lanyard-dlp");
        assert_eq!(slug("  AWS Security Hub (cn-north-1) "), "aws-security-hub-cn-north-1");
        assert_eq!(slug("_Example.Sensor_v2"), "example.sensor_v2");
        assert_eq!(slug("天眼"), "");
        assert_eq!(slug(&"x".repeat(80)).len(), 64);
        assert!(crate::ingest::is_source(&slug("奇安信 NGSOC 3.0")));
    }

    #[test]
    fn documents_may_mix_ocsf_findings_and_tocsin_events() {
        let tocsin = json!({
            "source": "waf", "external_id": "e-1", "kind": "leak", "severity": "high",
            "title": "Exfiltration", "detected_at": "2026-11-28T02:07:00Z"
        });
        let detection = sample(DETECTION).to_string();
        let incident = sample(INCIDENT).to_string();
        let lines = format!("{tocsin}\n{detection}\n{incident}\n");
        let events = parse_events(&lines, &taxonomy()).expect("mixed lines");
        assert_eq!(
            ids(&events.iter().map(|e| &e.source).collect::<Vec<_>>()),
            ["waf", "lanyard-dlp", "watchtower-siem"]
        );
        let array = format!("[{detection}, {}]", FILE_ACTIVITY);
        match parse_events(&array, &taxonomy()) {
            Err(IngestError::Invalid { record: 2, error }) => assert_eq!(error.field, "class_uid"),
            other => panic!("expected record 2 refused, got {other:?}"),
        }
    }
}
