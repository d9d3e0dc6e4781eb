//! The incident state machine and the facts a responder confirms.
//!
//! `triage -> confirmed -> scoped -> drafted -> approved -> notifying -> monitoring -> closed`,
//! and `dismissed` from triage or confirmed. Re-scoping before approval and re-drafting a
//! drafted incident are allowed; everything else moves forward only. Every transition is
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
            | (S::Confirmed | S::Scoped, S::Scoped)
            | (S::Scoped | S::Drafted, S::Drafted)
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
        IncidentError::Facts(FieldError::new(field, e.into_inner().to_string()))
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
        {
            return Err(IncidentError::Facts(FieldError::new(
                "contained_at",
                "is before occurred_at",
            )));
        }
    }
    if facts.occurred_at.is_some_and(|o| o > facts.aware_at) {
        return Err(IncidentError::Facts(FieldError::new(
            "aware_at",
            "is before occurred_at",
        )));
    }
    Ok(facts)
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
            assert!(!can_transition(pair[1], pair[0]), "{:?} backwards", pair);
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
        bad["grade"] = serde_json::json!("apocalyptic");
        assert!(parse_facts(&bad, &t).expect_err("grade").to_string().contains("grade"));
    }
}
