//! The incident state machine and the facts a responder confirms.
//!
//! `triage -> confirmed -> scoped -> drafted -> approved -> notifying -> monitoring -> closed`,
//! and `dismissed` from triage or confirmed. Re-scoping before approval and re-drafting a
//! drafted incident are allowed, and so is drafting an update once notices went out;
//! everything else moves forward only. Every transition is
//! stored with its actor, time and reason, and chained into the audit ledger.

use serde_json::Value;

use crate::domain::{FieldError, IncidentState as S, LocalizedText};
use crate::model::IncidentFacts;
use crate::taxonomy::Taxonomy;

/// Whether the state machine allows `from -> to`.
pub fn can_transition(from: S, to: S) -> bool {
    matches!(
        (from, to),
        (S::Triage, S::Confirmed)
            | (S::Triage | S::Confirmed, S::Dismissed)
            | (S::Confirmed | S::Scoped | S::Drafted, S::Scoped)
            | (S::Scoped | S::Drafted, S::Drafted)
            // An update or correction: a new version while (or after) the first is delivered.
            | (S::Notifying | S::Monitoring, S::Drafted)
            | (S::Drafted, S::Approved)
            | (S::Approved, S::Notifying)
            | (S::Notifying, S::Monitoring)
            | (S::Monitoring, S::Closed)
    )
}

#[derive(Debug, thiserror::Error)]
pub enum IncidentError {
    #[error("incident {0} not found")]
    NotFound(String),
    #[error("incident {reference} is '{state}'; it must be {expected} to {action}")]
    WrongState {
        reference: String,
        state: S,
        expected: String,
        action: &'static str,
    },
    #[error("incident facts: {0}")]
    Facts(FieldError),
}

/// Parses and checks a responder's facts document (`config/demo/incident.json` shows one).
pub fn parse_facts(value: &Value, taxonomy: &Taxonomy) -> Result<IncidentFacts, IncidentError> {
    let facts: IncidentFacts = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "(facts)".to_owned() } else { path };
        IncidentError::Facts(FieldError::new(field, without_values(&e.into_inner().to_string())))
    })?;
    if facts.categories.is_empty() {
        return Err(IncidentError::Facts(FieldError::new(
            "categories",
            "must list at least one exposed data category",
        )));
    }
    for (i, c) in facts.categories.iter().enumerate() {
        taxonomy
            .parse_category(c.as_str(), &format!("categories[{i}]"))
            .map_err(IncidentError::Facts)?;
    }
    if let (Some(occurred), Some(contained)) = (facts.occurred_at, facts.contained_at)
        && contained < occurred
    {
        return Err(IncidentError::Facts(FieldError::new(
            "contained_at",
            "is before occurred_at",
        )));
    }
    if facts.occurred_at.is_some_and(|o| o > facts.aware_at) {
        return Err(IncidentError::Facts(FieldError::new(
            "aware_at",
            "is before occurred_at",
        )));
    }
    // A little slack for clock skew; an awareness time in the future would push the
    // regulator's deadline out.
    if facts.aware_at > chrono::Utc::now() + chrono::Duration::minutes(5) {
        return Err(IncidentError::Facts(FieldError::new("aware_at", "is in the future")));
    }
    Ok(facts)
}

/// serde's messages quote the offending value (`invalid type: string "..."`), which may be
/// free text with personal data; keep the kind of error and what was expected.
fn without_values(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("invalid type: ")
        && let Some((_, expected)) = rest.split_once(", expected ")
    {
        let kind = rest.split_whitespace().next().unwrap_or("value").trim_end_matches(',');
        return format!("invalid type: got a {kind}, expected {expected}");
    }
    if let Some((_, expected)) = message.split_once(", expected ")
        && message.starts_with("invalid value")
    {
        return format!("invalid value, expected {expected}");
    }
    message.to_owned()
}

/// The text fields every notice needs in its language, by element; used by drafting to list
/// what is missing.
pub fn notice_texts(facts: &IncidentFacts) -> [(&'static str, &'static str, &LocalizedText); 5] {
    [
        ("impact", "what_happened", &facts.what_happened),
        ("impact", "impact", &facts.impact),
        ("measures", "measures_taken", &facts.measures_taken),
        ("measures", "measures_planned", &facts.measures_planned),
        ("remedies", "remedies", &facts.remedies),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flow_moves_forward_only() {
        let path = [
            S::Triage,
            S::Confirmed,
            S::Scoped,
            S::Drafted,
            S::Approved,
            S::Notifying,
            S::Monitoring,
            S::Closed,
        ];
        for pair in path.windows(2) {
            assert!(can_transition(pair[0], pair[1]), "{:?}", pair);
            let rescope = pair == [S::Scoped, S::Drafted];
            assert_eq!(can_transition(pair[1], pair[0]), rescope, "{:?} backwards", pair);
        }
        assert!(!can_transition(S::Triage, S::Approved));
        assert!(!can_transition(S::Notifying, S::Dismissed));
        assert!(
            can_transition(S::Drafted, S::Drafted),
            "a correction is a new draft version"
        );
    }

    #[test]
    fn demo_facts_parse_and_bad_facts_are_named() {
        let t = Taxonomy::builtin().expect("taxonomy");
        let demo: Value = serde_json::from_str(include_str!("../config/demo/incident.json")).expect("json");
        let facts = parse_facts(&demo, &t).expect("demo facts valid");
        assert_eq!(facts.grade, crate::domain::Grade::Significant);

        let mut bad = demo.clone();
        bad["categories"] = serde_json::json!(["nope"]);
        let err = parse_facts(&bad, &t).expect_err("unknown category");
        assert!(err.to_string().contains("categories"), "{err}");

        let mut bad = demo.clone();
        bad["what_happened"] = serde_json::json!("Zhang San's phone 13800000000 leaked");
        let err = parse_facts(&bad, &t).expect_err("not localized");
        assert!(err.to_string().contains("what_happened"), "{err}");
        assert!(
            !err.to_string().contains("13800000000"),
            "the value must not be echoed: {err}"
        );

        let mut bad = demo.clone();
        bad["aware_at"] = serde_json::json!("2999-01-01T00:00:00Z");
        assert!(
            parse_facts(&bad, &t)
                .expect_err("future")
                .to_string()
                .contains("aware_at")
        );

        let mut bad = demo.clone();
        bad["grade"] = serde_json::json!("apocalyptic");
        assert!(parse_facts(&bad, &t).expect_err("grade").to_string().contains("grade"));
    }
}
