//! Scope and classify: the incident's scope rule applied to the directory, crossed with each
//! merchant's holdings. For each affected merchant: the exposed categories, a risk level with
//! its reasons, whether notice is required and why, the channel plan, the locale.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::domain::{CategoryId, Channel, FieldError, IncidentId, MerchantId, Reachability, RiskLevel};
use crate::model::{AffectedMerchant, IncidentFacts, Merchant, ScopeRule};
use crate::taxonomy::Taxonomy;

/// Whether `merchant` falls under `rule` (every given criterion must hold).
pub fn rule_matches(rule: &ScopeRule, merchant: &Merchant) -> bool {
    (rule.merchant_ids.is_empty() || rule.merchant_ids.contains(&merchant.id))
        && (rule.any_categories.is_empty() || rule.any_categories.iter().any(|c| merchant.holdings.contains(c)))
        && (rule.regions.is_empty()
            || rule
                .regions
                .iter()
                .any(|r| r == &merchant.region || merchant.region.starts_with(&format!("{r}-"))))
        && rule
            .created_after
            .is_none_or(|after| merchant.created_at.is_some_and(|c| c >= after))
        && rule
            .created_before
            .is_none_or(|before| merchant.created_at.is_some_and(|c| c < before))
}

/// Risk from what was exposed: sensitive data or a damaging combination is high; other
/// personal data is medium; data that is not personal is low.
pub fn classify_risk(exposed: &[CategoryId], taxonomy: &Taxonomy) -> (RiskLevel, Vec<String>) {
    let has = |id: &str| exposed.iter().any(|c| c.as_str() == id);
    let mut reasons = Vec::new();
    if has("account_credentials") {
        reasons.push("account credentials were exposed: the account can be taken over".to_owned());
    }
    if has("real_name") && has("id_number") {
        reasons.push("name together with ID number enables identity fraud".to_owned());
    }
    let sensitive: Vec<&str> = exposed
        .iter()
        .filter(|c| taxonomy.is_sensitive(c))
        .map(|c| c.as_str())
        .collect();
    if !sensitive.is_empty() {
        reasons.push(format!(
            "sensitive personal information exposed: {}",
            sensitive.join(", ")
        ));
    }
    if !reasons.is_empty() {
        return (RiskLevel::High, reasons);
    }
    let personal: Vec<&str> = exposed
        .iter()
        .filter(|c| {
            taxonomy
                .get(c)
                .is_some_and(|i| i.sensitivity != crate::taxonomy::Sensitivity::NotPersonal)
        })
        .map(|c| c.as_str())
        .collect();
    if !personal.is_empty() {
        return (
            RiskLevel::Medium,
            vec![format!("personal information exposed: {}", personal.join(", "))],
        );
    }
    (
        RiskLevel::Low,
        vec!["only information that is not personal was exposed".to_owned()],
    )
}

/// The merchant's channels in the configured order, leaving out those it has no address for.
pub fn channel_plan(merchant: &Merchant, order: &[Channel]) -> Vec<Channel> {
    order
        .iter()
        .copied()
        .filter(|c| merchant.address(*c).is_some())
        .collect()
}

/// Classifies one merchant, or `None` if none of the incident's categories are held about it.
pub fn classify(
    incident: &IncidentId,
    facts: &IncidentFacts,
    merchant: &Merchant,
    taxonomy: &Taxonomy,
    order: &[Channel],
) -> Option<AffectedMerchant> {
    let exposed: Vec<CategoryId> = facts
        .categories
        .iter()
        .filter(|c| merchant.holdings.contains(c))
        .cloned()
        .collect();
    if exposed.is_empty() {
        return None;
    }
    let (risk, risk_reasons) = classify_risk(&exposed, taxonomy);
    let plan = channel_plan(merchant, order);
    Some(AffectedMerchant {
        incident_id: incident.clone(),
        merchant_id: merchant.id.clone(),
        exposed,
        risk,
        risk_reasons,
        notice_required: true,
        // Mandatory: marketing opt-outs do not apply to a security notice.
        notice_reason: "required: personal information held about the merchant may have leaked (PIPL Art. 57)"
            .to_owned(),
        reachability: if plan.is_empty() {
            Reachability::Unreachable
        } else {
            Reachability::Pending
        },
        channel_plan: plan,
        locale: merchant.locale,
        reached_channel: None,
    })
}

/// Applies the rule to the directory and classifies every merchant it selects.
pub fn scope(
    incident: &IncidentId,
    facts: &IncidentFacts,
    rule: &ScopeRule,
    merchants: &[Merchant],
    taxonomy: &Taxonomy,
    order: &[Channel],
) -> Vec<AffectedMerchant> {
    merchants
        .iter()
        .filter(|m| rule_matches(rule, m))
        .filter_map(|m| classify(incident, facts, m, taxonomy, order))
        .collect()
}

/// Counts for a dry run or a summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScopeSummary {
    pub affected: usize,
    pub by_risk: BTreeMap<String, usize>,
    pub by_first_channel: BTreeMap<String, usize>,
    pub by_locale: BTreeMap<String, usize>,
    pub unreachable: usize,
}

pub fn summarize(affected: &[AffectedMerchant]) -> ScopeSummary {
    let mut s = ScopeSummary {
        affected: affected.len(),
        ..Default::default()
    };
    for a in affected {
        *s.by_risk.entry(a.risk.to_string()).or_default() += 1;
        *s.by_locale.entry(a.locale.to_string()).or_default() += 1;
        let first = a
            .channel_plan
            .first()
            .map(|c| c.to_string())
            .unwrap_or_else(|| "none".into());
        *s.by_first_channel.entry(first).or_default() += 1;
        if a.channel_plan.is_empty() {
            s.unreachable += 1;
        }
    }
    s
}

/// Checks a rule before it is applied: it must select something (an empty rule would notify
/// the whole directory), regions must be ISO 3166 codes, and a window must be a window.
pub fn check_rule(rule: &ScopeRule) -> Result<(), FieldError> {
    if rule == &ScopeRule::default() {
        return Err(FieldError::new(
            "scope",
            "give at least one of merchant_ids, any_categories, regions, created_after, created_before",
        ));
    }
    for (i, region) in rule.regions.iter().enumerate() {
        if !crate::directory::is_region(region) {
            return Err(FieldError::new(
                format!("regions[{i}]"),
                "must be an ISO 3166 code such as CN, CN-ZJ or SG",
            ));
        }
    }
    if let (Some(after), Some(before)) = (rule.created_after, rule.created_before)
        && after >= before
    {
        return Err(FieldError::new("created_before", "must be later than created_after"));
    }
    Ok(())
}

/// Merchant ids the rule names that the directory does not hold.
pub fn unknown_ids<'a>(rule: &'a ScopeRule, merchants: &[Merchant]) -> Vec<&'a str> {
    let known: std::collections::HashSet<&MerchantId> = merchants.iter().map(|m| &m.id).collect();
    rule.merchant_ids
        .iter()
        .filter(|id| !known.contains(id))
        .map(|id| id.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::*;

    fn merchant(id: &str, holdings: &[&str], email: bool, phone: bool) -> Merchant {
        Merchant {
            id: id.parse().expect("id"),
            name: "Shop".into(),
            kind: MerchantKind::Enterprise,
            locale: Locale::En,
            region: "CN-ZJ".into(),
            email: email.then(|| "a@example.com".parse().expect("email")),
            phone: phone.then(|| "+8613800000000".parse().expect("phone")),
            push_token: None,
            postal_address: None,
            holdings: holdings.iter().map(|h| h.parse().expect("cat")).collect(),
            created_at: None,
            marketing_opt_out: true,
        }
    }

    fn cats(ids: &[&str]) -> Vec<CategoryId> {
        ids.iter().map(|c| c.parse().expect("cat")).collect()
    }

    #[test]
    fn risk_follows_sensitivity_and_combinations() {
        let t = Taxonomy::builtin().expect("taxonomy");
        assert_eq!(classify_risk(&cats(&["account_credentials"]), &t).0, RiskLevel::High);
        let (level, reasons) = classify_risk(&cats(&["real_name", "id_number"]), &t);
        assert_eq!(level, RiskLevel::High);
        assert!(reasons.iter().any(|r| r.contains("identity fraud")));
        assert_eq!(classify_risk(&cats(&["email_address"]), &t).0, RiskLevel::Medium);
        assert_eq!(classify_risk(&cats(&["business_license"]), &t).0, RiskLevel::Low);
    }

    #[test]
    fn only_merchants_holding_exposed_data_are_affected_and_opt_outs_still_notified() {
        let t = Taxonomy::builtin().expect("taxonomy");
        let facts: IncidentFacts = serde_json::from_str(include_str!("../config/demo/incident.json")).expect("facts");
        let merchants = vec![
            merchant("m-1", &["account_credentials"], true, true),
            merchant("m-2", &["media"], true, false),
            merchant("m-3", &["phone_number"], false, false),
        ];
        let rule = ScopeRule {
            regions: vec!["CN".into()],
            ..Default::default()
        };
        let order = [Channel::Email, Channel::Sms, Channel::Push];
        let affected = scope(&IncidentId::generate(), &facts, &rule, &merchants, &t, &order);
        let ids: Vec<_> = affected.iter().map(|a| a.merchant_id.as_str()).collect();
        assert_eq!(ids, ["m-1", "m-3"]);
        assert_eq!(affected[0].channel_plan, vec![Channel::Email, Channel::Sms]);
        assert!(
            affected[0].notice_required,
            "marketing opt-out must not suppress a mandatory notice"
        );
        assert_eq!(affected[1].reachability, Reachability::Unreachable);
        let s = summarize(&affected);
        assert_eq!((s.affected, s.unreachable), (2, 1));
    }

    #[test]
    fn empty_or_malformed_rules_are_refused() {
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
    }
}
