//! Scope and classify: the incident's scope rule applied to the directory, crossed with each
//! merchant's holdings. Merchants with the same exposed categories share a class: its risk
//! level with the reasons, whether notice is required and why. The database applies the rule
//! and assigns classes in bulk; this module decides the classes, checks rules and counts.

use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::classify::Rules;
use crate::domain::{CategoryId, FieldError, Grade, MerchantId, Reachability};
use crate::model::{GradeSuggestion, IncidentFacts, ScopeClass, ScopeRule};
use crate::store::{PersonClasses, ScopeCount};
use crate::taxonomy::{Sensitivity, Taxonomy};

/// Categories about other people than the merchant (its contact persons, its staff).
const THIRD_PARTY: &[&str] = &["contact_persons", "sub_account_phones"];

/// Categories that identify an enterprise's legal representative, a natural person.
const REPRESENTATIVE: &[&str] = &[
    "real_name",
    "id_number",
    "id_photo",
    "face_image",
    "trademark_registrant",
];

/// The classes of a scope and which stored holdings fall in each.
#[derive(Debug, Clone, Default)]
pub struct ClassPlan {
    pub holdings_class: Vec<(String, i64)>,
    pub classes: Vec<ScopeClass>,
    pub persons: PersonClasses,
}

/// Classifies each distinct set of holdings the rule selected (as stored: a JSON array). A
/// merchant's exposed categories are its holdings among the incident's categories; merchants
/// with none are not affected.
pub fn plan_classes(
    holdings: &[(String, i64)],
    facts: &IncidentFacts,
    rules: &Rules,
    taxonomy: &Taxonomy,
) -> Result<ClassPlan, FieldError> {
    let incident: BTreeSet<&CategoryId> = facts.categories.iter().collect();
    let mut by_exposed: BTreeMap<Vec<CategoryId>, usize> = BTreeMap::new();
    let mut plan = ClassPlan::default();
    for (raw, count) in holdings {
        let held: BTreeSet<CategoryId> = serde_json::from_str(raw)
            .map_err(|e| FieldError::new("holdings", format!("a stored merchant record is unreadable: {e}")))?;
        let exposed: Vec<CategoryId> = held.into_iter().filter(|c| incident.contains(c)).collect();
        if exposed.is_empty() {
            continue;
        }
        let index = match by_exposed.get(&exposed) {
            Some(i) => *i,
            None => {
                let c = rules.classify(&exposed, facts.kind, &facts.mitigations, taxonomy);
                let class_no = plan.classes.len() as i64 + 1;
                // Data about the merchant's own person: personal categories other than those
                // describing third parties (its contacts and staff, counted below).
                let about_self = exposed.iter().any(|e| {
                    !THIRD_PARTY.contains(&e.as_str())
                        && taxonomy
                            .get(e)
                            .is_some_and(|i| i.sensitivity != Sensitivity::NotPersonal)
                });
                if about_self {
                    plan.persons.merchant.push(class_no);
                }
                if exposed.iter().any(|e| REPRESENTATIVE.contains(&e.as_str())) {
                    plan.persons.representative.push(class_no);
                }
                if exposed.iter().any(|e| e.as_str() == "contact_persons") {
                    plan.persons.contacts.push(class_no);
                }
                if exposed.iter().any(|e| e.as_str() == "sub_account_phones") {
                    plan.persons.sub_accounts.push(class_no);
                }
                plan.classes.push(ScopeClass {
                    class_no,
                    exposed: exposed.clone(),
                    risk: c.risk,
                    risk_reasons: c.reasons,
                    notice_required: c.notice_required,
                    notice_reason: c.notice_reason,
                    merchants: 0,
                });
                by_exposed.insert(exposed, plan.classes.len() - 1);
                plan.classes.len() - 1
            }
        };
        plan.classes[index].merchants += count;
        plan.holdings_class.push((raw.clone(), plan.classes[index].class_no));
    }
    Ok(plan)
}

/// A grade threshold of the CAC measures: this many natural persons or more.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GradeThreshold {
    pub grade: Grade,
    pub natural_persons: u64,
}

/// The grade the count suggests: the highest threshold reached ("above" includes the number).
pub fn suggest_grade(natural_persons: u64, thresholds: &[GradeThreshold]) -> GradeSuggestion {
    let reached = thresholds
        .iter()
        .filter(|t| natural_persons >= t.natural_persons)
        .max_by_key(|t| t.grade);
    let (grade, basis) = match reached {
        Some(t) => (
            t.grade,
            format!(
                "{natural_persons} distinct natural persons affected, at or above the {} threshold of {}",
                t.grade, t.natural_persons
            ),
        ),
        None => (
            Grade::General,
            format!("{natural_persons} distinct natural persons affected, below every grade threshold"),
        ),
    };
    GradeSuggestion {
        natural_persons,
        grade,
        basis,
        at: Utc::now(),
    }
}

/// Counts for a dry run or a summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScopeSummary {
    pub affected: i64,
    pub notice_required: i64,
    pub notice_not_required: i64,
    pub by_risk: BTreeMap<String, i64>,
    pub by_first_channel: BTreeMap<String, i64>,
    pub by_locale: BTreeMap<String, i64>,
    pub unreachable: i64,
    pub natural_persons: Option<u64>,
    pub suggested_grade: Option<Grade>,
    pub grade: Option<Grade>,
    pub grade_basis: Option<String>,
}

/// Sums stored counts (only merchants to be notified count towards risk, channel and locale).
pub fn summarize(counts: &[ScopeCount], suggestion: Option<&GradeSuggestion>, grade: Option<Grade>) -> ScopeSummary {
    let mut s = ScopeSummary {
        natural_persons: suggestion.map(|g| g.natural_persons),
        suggested_grade: suggestion.map(|g| g.grade),
        grade_basis: suggestion.map(|g| g.basis.clone()),
        grade,
        ..Default::default()
    };
    for c in counts {
        s.affected += c.merchants;
        *s.by_risk.entry(c.risk.to_string()).or_default() += c.merchants;
        if !c.notice_required {
            s.notice_not_required += c.merchants;
            continue;
        }
        s.notice_required += c.merchants;
        *s.by_locale.entry(c.locale.to_string()).or_default() += c.merchants;
        let first = c.first_channel.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
        *s.by_first_channel.entry(first).or_default() += c.merchants;
        if c.reachability == Reachability::Unreachable {
            s.unreachable += c.merchants;
        }
    }
    s
}

/// Checks a rule before it is applied: it must select something (an empty rule would notify
/// the whole directory), regions must be ISO 3166 codes, and a window must be a window.
pub fn check_rule(rule: &ScopeRule) -> Result<(), FieldError> {
    check_rule_at(rule, "")
}

fn check_rule_at(rule: &ScopeRule, path: &str) -> Result<(), FieldError> {
    let field = |name: &str| format!("{path}{name}");
    if rule.merchant_ids.is_empty()
        && rule.any_categories.is_empty()
        && rule.regions.is_empty()
        && rule.created_after.is_none()
        && rule.created_before.is_none()
        && rule.active_after.is_none()
        && rule.active_before.is_none()
        && rule.any_of.is_empty()
    {
        return Err(FieldError::new(
            if path.is_empty() {
                "scope".to_owned()
            } else {
                path.trim_end_matches('.').to_owned()
            },
            "give at least one of merchant_ids, any_categories, regions, created_after, created_before, \
             active_after, active_before, any_of",
        ));
    }
    for (i, region) in rule.regions.iter().enumerate() {
        if !crate::directory::is_region(region) {
            return Err(FieldError::new(
                field(&format!("regions[{i}]")),
                "must be an ISO 3166 code such as CN, CN-ZJ or SG",
            ));
        }
    }
    for (after, before, name) in [
        (rule.created_after, rule.created_before, "created_before"),
        (rule.active_after, rule.active_before, "active_before"),
    ] {
        if let (Some(after), Some(before)) = (after, before)
            && after >= before
        {
            let start = name.replace("_before", "_after");
            return Err(FieldError::new(field(name), format!("must be later than {start}")));
        }
    }
    for (i, sub) in rule.any_of.iter().enumerate() {
        check_rule_at(sub, &field(&format!("any_of[{i}].")))?;
    }
    for (i, sub) in rule.except.iter().enumerate() {
        check_rule_at(sub, &field(&format!("except[{i}].")))?;
    }
    Ok(())
}

/// Checks that every category the rule names is in the taxonomy, naming the field.
pub fn check_categories(rule: &ScopeRule, taxonomy: &Taxonomy) -> Result<(), FieldError> {
    check_categories_at(rule, taxonomy, "")
}

fn check_categories_at(rule: &ScopeRule, taxonomy: &Taxonomy, path: &str) -> Result<(), FieldError> {
    for (i, c) in rule.any_categories.iter().enumerate() {
        taxonomy.parse_category(c.as_str(), &format!("{path}any_categories[{i}]"))?;
    }
    for (i, sub) in rule.any_of.iter().enumerate() {
        check_categories_at(sub, taxonomy, &format!("{path}any_of[{i}]."))?;
    }
    for (i, sub) in rule.except.iter().enumerate() {
        check_categories_at(sub, taxonomy, &format!("{path}except[{i}]."))?;
    }
    Ok(())
}

/// Every merchant id the rule names, at any depth.
pub fn named_ids(rule: &ScopeRule) -> Vec<MerchantId> {
    let mut ids: Vec<MerchantId> = rule.merchant_ids.clone();
    for sub in rule.any_of.iter().chain(&rule.except) {
        ids.extend(named_ids(sub));
    }
    ids.sort();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::*;

    fn facts(categories: &[&str]) -> IncidentFacts {
        let mut f: IncidentFacts = serde_json::from_str(include_str!("../config/demo/incident.json")).expect("facts");
        f.categories = categories.iter().map(|c| c.parse().expect("category")).collect();
        f
    }

    #[test]
    fn holdings_fall_into_classes_by_what_is_exposed() {
        let t = Taxonomy::builtin().expect("taxonomy");
        let rules = Rules::builtin(&t).expect("rules");
        let f = facts(&["account_credentials", "contact_persons", "business_license"]);
        let holdings = vec![
            (r#"["account_credentials","media"]"#.to_owned(), 3),
            (r#"["account_credentials"]"#.to_owned(), 2),
            (r#"["media"]"#.to_owned(), 5),
            (r#"["business_license","contact_persons"]"#.to_owned(), 1),
            (r#"["business_license"]"#.to_owned(), 4),
        ];
        let plan = plan_classes(&holdings, &f, &rules, &t).expect("plan");
        // Two holdings expose only credentials: one class of five merchants. Media is not exposed.
        assert_eq!(plan.classes.len(), 3);
        assert_eq!(plan.classes[0].merchants, 5);
        assert_eq!(plan.classes[0].risk, RiskLevel::High);
        assert!(plan.classes[0].notice_required);
        assert!(!plan.holdings_class.iter().any(|(h, _)| h == r#"["media"]"#));
        // Only classes exposing personal data count the merchant as a person; contacts count
        // only where contact_persons leaked.
        // The class exposing only contact data is about third parties: it counts the contacts,
        // not the merchant.
        assert_eq!(plan.persons.merchant, vec![1]);
        assert_eq!(plan.persons.contacts, vec![2]);
        assert!(plan.persons.representative.is_empty());
        let licence_only = &plan.classes[2];
        assert_eq!(licence_only.risk, RiskLevel::Low);
        assert!(
            licence_only.notice_required,
            "the platform's promise covers non-personal data too"
        );
        assert!(plan_classes(&[("not json".into(), 1)], &f, &rules, &t).is_err());
    }

    #[test]
    fn the_grade_follows_the_cac_thresholds_at_their_edges() {
        let profile = crate::filing::RegulatorProfile::cac().expect("profile");
        let g = |n| suggest_grade(n, &profile.grade_threshold).grade;
        assert_eq!(g(0), Grade::General);
        assert_eq!(g(999_999), Grade::General);
        assert_eq!(g(1_000_000), Grade::Significant);
        assert_eq!(g(9_999_999), Grade::Significant);
        assert_eq!(g(10_000_000), Grade::Major);
        assert_eq!(g(100_000_000), Grade::Critical);
        assert!(
            suggest_grade(1_000_000, &profile.grade_threshold)
                .basis
                .contains("1000000")
        );
    }

    #[test]
    fn empty_or_malformed_rules_are_refused_naming_the_field() {
        assert!(check_rule(&ScopeRule::default()).is_err());
        let bad_region = ScopeRule {
            regions: vec!["zhejiang".into()],
            ..Default::default()
        };
        assert_eq!(check_rule(&bad_region).expect_err("region").field, "regions[0]");
        let t = |s: &str| crate::time::parse_ts(s).expect("time");
        let window = ScopeRule {
            created_after: Some(t("2026-01-01T00:00:00Z")),
            created_before: Some(t("2025-01-01T00:00:00Z")),
            ..Default::default()
        };
        assert_eq!(check_rule(&window).expect_err("window").field, "created_before");
        let nested = ScopeRule {
            regions: vec!["CN".into()],
            except: vec![ScopeRule {
                active_after: Some(t("2026-01-01T00:00:00Z")),
                active_before: Some(t("2025-01-01T00:00:00Z")),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            check_rule(&nested).expect_err("nested").field,
            "except[0].active_before"
        );
        let ids = ScopeRule {
            merchant_ids: vec!["m-2".parse().expect("id")],
            any_of: vec![ScopeRule {
                merchant_ids: vec!["m-1".parse().expect("id"), "m-2".parse().expect("id")],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(named_ids(&ids).len(), 2);
        let taxonomy = Taxonomy::builtin().expect("taxonomy");
        let unknown = ScopeRule {
            regions: vec!["CN".into()],
            except: vec![ScopeRule {
                any_categories: vec!["favourite_colour".parse().expect("well-formed id")],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            check_categories(&unknown, &taxonomy).expect_err("unknown").field,
            "except[0].any_categories[0]"
        );
    }
}
