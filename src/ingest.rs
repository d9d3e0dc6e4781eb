//! Ingest: security events from files, the CLI and the HTTP API, parsed at the edge into a
//! [`SecurityEvent`]. Malformed input is rejected with the field and the reason and stored
//! nowhere; a repeated (source, external id) is accepted once; an event joins the open
//! incident with its correlation key or opens a new one in triage. OCSF 1.x findings (objects
//! with a `class_uid`) are mapped by [`crate::ocsf`].

use serde_json::Value;

use crate::domain::{Actor, FieldError};
use crate::input::Fields;
use crate::model::SecurityEvent;
use crate::store::{IngestOutcome, Store, StoreError};
use crate::taxonomy::Taxonomy;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The input is not an event; names the record (1-based) and the field.
    #[error("event {record}: {error}")]
    Invalid { record: usize, error: FieldError },
    #[error("events: not valid JSON: {0}")]
    Syntax(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(crate) fn is_source(s: &str) -> bool {
    s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

/// Parses one event object: Tocsin's format, or an OCSF finding when it has a `class_uid`.
pub fn parse_event(value: &Value, taxonomy: &Taxonomy) -> Result<SecurityEvent, FieldError> {
    if crate::ocsf::is_ocsf(value) {
        return crate::ocsf::parse_finding(value, taxonomy);
    }
    let mut f = Fields::of(value)?;
    let source = f.string("source", 1, 64)?;
    if !is_source(&source) {
        return Err(FieldError::new(
            "source",
            "must be 1-64 lower-case letters, digits, '.', '_' or '-'",
        ));
    }
    let event = SecurityEvent {
        source,
        external_id: f.string("external_id", 1, 200)?,
        kind: f.parsed("kind")?,
        severity: f.parsed("severity")?,
        title: f.string("title", 1, 300)?,
        description: f.opt_string("description", 0, 10_000)?,
        detected_at: f.time("detected_at")?,
        occurred_at: f.opt_time("occurred_at")?,
        correlation_key: f.opt_string("correlation_key", 1, 200)?,
        categories: f.list("categories", |s, field| taxonomy.parse_category(s, field))?,
        merchant_ids: f.list("merchant_ids", |s, field| {
            s.parse().map_err(|e: FieldError| FieldError::new(field, e.reason))
        })?,
        attributes: f.opt_object("attributes")?,
    };
    f.finish()?;
    Ok(event)
}

/// Parses a document holding one event object, an array of them, or JSON Lines.
/// All records are checked before any is returned: one bad record rejects the batch.
pub fn parse_events(text: &str, taxonomy: &Taxonomy) -> Result<Vec<SecurityEvent>, IngestError> {
    let trimmed = text.trim_start();
    let values: Vec<Value> = if trimmed.starts_with('[') {
        serde_json::from_str(text).map_err(|e| IngestError::Syntax(e.to_string()))?
    } else {
        let stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
        stream
            .collect::<Result<_, _>>()
            .map_err(|e| IngestError::Syntax(e.to_string()))?
    };
    if values.is_empty() {
        return Err(IngestError::Syntax("no event found".into()));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| parse_event(v, taxonomy).map_err(|error| IngestError::Invalid { record: i + 1, error }))
        .collect()
}

/// Stores parsed events in order; returns what happened to each.
pub async fn ingest(
    store: &dyn Store,
    events: &[SecurityEvent],
    reference_prefix: &str,
    actor: &Actor,
) -> Result<Vec<IngestOutcome>, IngestError> {
    let mut outcomes = Vec::with_capacity(events.len());
    for event in events {
        let outcome = store.ingest_event(event, reference_prefix, actor).await?;
        match &outcome {
            IngestOutcome::Opened {
                incident_id, reference, ..
            } => {
                tracing::info!(%incident_id, %reference, source = %event.source, "event opened an incident")
            }
            IngestOutcome::Joined { incident_id, .. } => {
                tracing::info!(%incident_id, source = %event.source, "event joined an open incident")
            }
            IngestOutcome::Duplicate { .. } => {
                tracing::info!(source = %event.source, "duplicate event ignored")
            }
        }
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn taxonomy() -> Taxonomy {
        Taxonomy::builtin().expect("taxonomy")
    }

    fn valid() -> Value {
        json!({
            "source": "waf", "external_id": "e-1", "kind": "leak", "severity": "high",
            "title": "Exfiltration", "detected_at": "2026-11-28T02:07:00Z",
            "categories": ["phone_number"], "correlation_key": "k"
        })
    }

    #[test]
    fn a_valid_event_parses() {
        let e = parse_event(&valid(), &taxonomy()).expect("valid");
        assert_eq!(e.source, "waf");
        assert_eq!(e.categories.len(), 1);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            ("source", json!("WAF!")),
            ("kind", json!("sneeze")),
            ("severity", json!(7)),
            ("detected_at", json!("yesterday")),
            ("title", json!("")),
        ];
        for (field, bad) in cases {
            let mut v = valid();
            v[field] = bad;
            let err = parse_event(&v, &taxonomy()).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
        let mut v = valid();
        v["categories"] = json!(["phone_number", "shoe_size"]);
        assert_eq!(
            parse_event(&v, &taxonomy()).expect_err("category").field,
            "categories[1]"
        );
        let mut v = valid();
        v["colour"] = json!("red");
        assert_eq!(parse_event(&v, &taxonomy()).expect_err("unknown").field, "colour");
        let mut v = valid();
        v.as_object_mut().map(|m| m.remove("external_id"));
        assert_eq!(parse_event(&v, &taxonomy()).expect_err("missing").reason, "is required");
    }

    #[test]
    fn documents_may_hold_one_an_array_or_lines() {
        let one = valid().to_string();
        let lines = format!("{one}\n{one}\n");
        let array = format!("[{one},{one}]");
        assert_eq!(parse_events(&one, &taxonomy()).expect("one").len(), 1);
        assert_eq!(parse_events(&lines, &taxonomy()).expect("lines").len(), 2);
        assert_eq!(parse_events(&array, &taxonomy()).expect("array").len(), 2);
        let bad = format!("{one}\n{{\"source\": 1}}\n");
        assert!(matches!(
            parse_events(&bad, &taxonomy()),
            Err(IngestError::Invalid { record: 2, .. })
        ));
    }
}
