//! Per-merchant classification, as data: `config/classification.toml` (embedded; an operator may
//! correct any rule there). From the categories exposed about one merchant, the incident kind and
//! the measures the responder says are in place, it derives a risk level with its reasons in words
//! and whether individual notice is required (PIPL Art. 57 and its para 2).
//!
//! Order of application (documented in the rules file too):
//! 1. measures that neutralise a category remove it from the set counted for risk (if nothing is
//!    left the risk is low and steps 2-5 are skipped);
//! 2. each counted category gets its override level or the level of its sensitivity, one level
//!    less when a measure that lowers covers it;
//! 3. combinations and aggregation over the counted set, one level less when they hold only
//!    thanks to lowered categories;
//! 4. the risk is the maximum of steps 2 and 3;
//! 5. the incident kind's adjustment;
//! 6. notice: required unless every exposed category is covered by measures that avoid harm.
//!
//! Measures come first because they apply per category, not to the incident as a whole.
//! The result depends only on the set of inputs (they are sorted and deduplicated here).

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::domain::{CategoryId, FieldError, IncidentKind, Locale, RiskLevel};
use crate::taxonomy::{Sensitivity, Taxonomy};

pub const CLASSIFICATION_TOML: &str = include_str!("../config/classification.toml");

/// A mitigation the responder says is in place, from the incident facts
/// (JSON: `{"id": "credentials_reset", "categories": ["account_credentials"]}`; empty or absent
/// categories = every exposed category the measure covers).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliedMitigation {
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<CategoryId>,
}

/// The outcome for one merchant: its risk with the reasons, and the notice decision with its reason.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Classification {
    pub risk: RiskLevel,
    pub reasons: Vec<String>,
    pub notice_required: bool,
    pub notice_reason: String,
}

/// A rules file Tocsin refuses: which rule, and why.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error("classification rules: {0}")]
    Syntax(String),
    #[error("classification rules: {rule}: {reason}")]
    Rule { rule: String, reason: String },
}

fn rule_error(rule: impl Into<String>, reason: impl Into<String>) -> ClassifyError {
    ClassifyError::Rule {
        rule: rule.into(),
        reason: reason.into(),
    }
}

// ----- the file as written -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    sensitivity: BTreeMap<String, RawLevelRule>,
    #[serde(default)]
    category: Vec<RawCategory>,
    #[serde(default)]
    combination: Vec<RawCombination>,
    aggregation: Option<RawAggregation>,
    kind: Vec<RawKind>,
    #[serde(default)]
    mitigation: Vec<RawMitigation>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLevelRule {
    level: String,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCategory {
    id: String,
    level: String,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCombination {
    id: String,
    all_of: Vec<String>,
    #[serde(default)]
    any_of: Vec<String>,
    level: String,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAggregation {
    sensitivity: String,
    min_count: usize,
    #[serde(default)]
    exclude: Vec<String>,
    level: String,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKind {
    kind: String,
    change: String,
    level: Option<String>,
    #[serde(default)]
    unless_sensitive: bool,
    reason: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawCovers {
    Word(String),
    List(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMitigation {
    id: String,
    name: String,
    covers: RawCovers,
    effect: String,
    avoids_harm: bool,
    reason: String,
}

// ----- the checked rules ---------------------------------------------------------------------

#[derive(Debug, Clone)]
struct LevelRule {
    level: RiskLevel,
    reason: String,
}

#[derive(Debug, Clone)]
struct Combination {
    id: String,
    all_of: BTreeSet<CategoryId>,
    any_of: BTreeSet<CategoryId>,
    level: RiskLevel,
    reason: String,
}

impl Combination {
    fn holds(&self, set: &BTreeSet<CategoryId>) -> bool {
        self.all_of.is_subset(set) && (self.any_of.is_empty() || !self.any_of.is_disjoint(set))
    }
}

#[derive(Debug, Clone)]
struct Aggregation {
    sensitivity: Sensitivity,
    min_count: usize,
    exclude: BTreeSet<CategoryId>,
    level: RiskLevel,
    reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Keep,
    Lower,
    Raise,
    AtLeast(RiskLevel),
    AtMost(RiskLevel),
}

#[derive(Debug, Clone)]
struct KindRule {
    change: Change,
    unless_sensitive: bool,
    reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Neutralises,
    Lowers,
}

#[derive(Debug, Clone)]
struct Mitigation {
    name: String,
    /// `None` = every category.
    covers: Option<BTreeSet<CategoryId>>,
    effect: Effect,
    avoids_harm: bool,
    reason: String,
}

impl Mitigation {
    fn covers(&self, c: &CategoryId) -> bool {
        self.covers.as_ref().is_none_or(|set| set.contains(c))
    }
}

/// The classification rules, checked against the taxonomy.
#[derive(Debug, Clone)]
pub struct Rules {
    sensitive: LevelRule,
    ordinary: LevelRule,
    not_personal: LevelRule,
    overrides: BTreeMap<CategoryId, LevelRule>,
    combinations: Vec<Combination>,
    aggregation: Option<Aggregation>,
    kinds: BTreeMap<IncidentKind, KindRule>,
    mitigations: BTreeMap<String, Mitigation>,
}

fn parse_level(raw: &str, rule: &str) -> Result<RiskLevel, ClassifyError> {
    raw.parse().map_err(|_| {
        rule_error(
            rule,
            format!("unknown level '{raw}' (must be one of: low, medium, high)"),
        )
    })
}

fn parse_sensitivity(raw: &str, rule: &str) -> Result<Sensitivity, ClassifyError> {
    match raw {
        "sensitive" => Ok(Sensitivity::Sensitive),
        "ordinary" => Ok(Sensitivity::Ordinary),
        "not_personal" => Ok(Sensitivity::NotPersonal),
        _ => Err(rule_error(
            rule,
            format!("unknown sensitivity '{raw}' (must be one of: sensitive, ordinary, not_personal)"),
        )),
    }
}

fn parse_category(raw: &str, rule: &str, taxonomy: &Taxonomy) -> Result<CategoryId, ClassifyError> {
    let unknown = || {
        rule_error(
            rule,
            format!("unknown data category '{raw}' (not in config/categories.toml)"),
        )
    };
    let id: CategoryId = raw.parse().map_err(|_| unknown())?;
    if taxonomy.get(&id).is_some() {
        Ok(id)
    } else {
        Err(unknown())
    }
}

fn parse_categories(raw: &[String], rule: &str, taxonomy: &Taxonomy) -> Result<BTreeSet<CategoryId>, ClassifyError> {
    raw.iter().map(|c| parse_category(c, rule, taxonomy)).collect()
}

fn check_reason(reason: &str, rule: &str) -> Result<String, ClassifyError> {
    if reason.trim().is_empty() {
        Err(rule_error(rule, "the reason is empty"))
    } else {
        Ok(reason.trim().to_owned())
    }
}

fn lower(level: RiskLevel) -> RiskLevel {
    match level {
        RiskLevel::High => RiskLevel::Medium,
        RiskLevel::Medium | RiskLevel::Low => RiskLevel::Low,
    }
}

fn raise(level: RiskLevel) -> RiskLevel {
    match level {
        RiskLevel::Low => RiskLevel::Medium,
        RiskLevel::Medium | RiskLevel::High => RiskLevel::High,
    }
}

/// A list of category labels. Labels contain commas and "and" themselves
/// ("shop, shipping and return addresses"), so items are separated by semicolons.
fn join_words(items: &[String]) -> String {
    items.join("; ")
}

fn labels<'a>(cats: impl IntoIterator<Item = &'a CategoryId>, taxonomy: &Taxonomy) -> Vec<String> {
    cats.into_iter().map(|c| taxonomy.label(c, Locale::En)).collect()
}

/// Fills `{categories}` and `{does}` in a reason template.
fn fill(template: &str, cats: &BTreeSet<CategoryId>, taxonomy: &Taxonomy) -> String {
    template
        .replace("{categories}", &join_words(&labels(cats, taxonomy)))
        .replace("{does}", if cats.len() == 1 { "does" } else { "do" })
}

impl Rules {
    /// Parses and checks a rules file: every category id against the taxonomy, every level, kind,
    /// sensitivity, change and effect name; every incident kind exactly once.
    pub fn parse(toml_text: &str, taxonomy: &Taxonomy) -> Result<Self, ClassifyError> {
        let raw: RawFile = toml::from_str(toml_text).map_err(|e| ClassifyError::Syntax(e.to_string()))?;

        let mut base: BTreeMap<&'static str, LevelRule> = BTreeMap::new();
        for (key, rule) in &raw.sensitivity {
            let name = format!("sensitivity.{key}");
            let key: &'static str = match parse_sensitivity(key, &name)? {
                Sensitivity::Sensitive => "sensitive",
                Sensitivity::Ordinary => "ordinary",
                Sensitivity::NotPersonal => "not_personal",
            };
            base.insert(
                key,
                LevelRule {
                    level: parse_level(&rule.level, &name)?,
                    reason: check_reason(&rule.reason, &name)?,
                },
            );
        }
        let mut take_base = |key: &str| {
            base.remove(key).ok_or_else(|| {
                rule_error(
                    format!("sensitivity.{key}"),
                    "missing: every sensitivity needs a base level",
                )
            })
        };
        let sensitive = take_base("sensitive")?;
        let ordinary = take_base("ordinary")?;
        let not_personal = take_base("not_personal")?;

        let mut overrides = BTreeMap::new();
        for c in &raw.category {
            let name = format!("category '{}'", c.id);
            let id = parse_category(&c.id, &name, taxonomy)?;
            let rule = LevelRule {
                level: parse_level(&c.level, &name)?,
                reason: check_reason(&c.reason, &name)?,
            };
            if overrides.insert(id, rule).is_some() {
                return Err(rule_error(name, "is listed twice"));
            }
        }

        let mut combinations: Vec<Combination> = Vec::new();
        for c in &raw.combination {
            let name = format!("combination '{}'", c.id);
            if c.id.trim().is_empty() {
                return Err(rule_error("combination ''", "needs an id"));
            }
            if combinations.iter().any(|k| k.id == c.id) {
                return Err(rule_error(name, "is listed twice"));
            }
            let all_of = parse_categories(&c.all_of, &name, taxonomy)?;
            if all_of.is_empty() {
                return Err(rule_error(name, "all_of must name at least one category"));
            }
            combinations.push(Combination {
                id: c.id.clone(),
                any_of: parse_categories(&c.any_of, &name, taxonomy)?,
                all_of,
                level: parse_level(&c.level, &name)?,
                reason: check_reason(&c.reason, &name)?,
            });
        }

        let aggregation = match &raw.aggregation {
            None => None,
            Some(a) => {
                let name = "aggregation";
                if a.min_count < 2 {
                    return Err(rule_error(name, "min_count must be at least 2"));
                }
                Some(Aggregation {
                    sensitivity: parse_sensitivity(&a.sensitivity, name)?,
                    min_count: a.min_count,
                    exclude: parse_categories(&a.exclude, name, taxonomy)?,
                    level: parse_level(&a.level, name)?,
                    reason: check_reason(&a.reason, name)?,
                })
            }
        };

        let mut kinds = BTreeMap::new();
        for k in &raw.kind {
            let name = format!("kind '{}'", k.kind);
            let kind: IncidentKind = k
                .kind
                .parse()
                .map_err(|e: FieldError| rule_error(&name, format!("unknown incident kind ({})", e.reason)))?;
            let level = k.level.as_deref().map(|l| parse_level(l, &name)).transpose()?;
            let change = match (k.change.as_str(), level) {
                ("keep", None) => Change::Keep,
                ("lower", None) => Change::Lower,
                ("raise", None) => Change::Raise,
                ("at_least", Some(l)) => Change::AtLeast(l),
                ("at_most", Some(l)) => Change::AtMost(l),
                ("keep" | "lower" | "raise", Some(_)) => {
                    return Err(rule_error(name, format!("change '{}' takes no level", k.change)));
                }
                ("at_least" | "at_most", None) => {
                    return Err(rule_error(name, format!("change '{}' needs a level", k.change)));
                }
                (other, _) => {
                    return Err(rule_error(
                        name,
                        format!("unknown change '{other}' (must be one of: keep, lower, raise, at_least, at_most)"),
                    ));
                }
            };
            let rule = KindRule {
                change,
                unless_sensitive: k.unless_sensitive,
                reason: check_reason(&k.reason, &name)?,
            };
            if kinds.insert(kind, rule).is_some() {
                return Err(rule_error(name, "is listed twice"));
            }
        }
        if let Some(missing) = IncidentKind::ALL.iter().find(|k| !kinds.contains_key(k)) {
            return Err(rule_error(
                format!("kind '{missing}'"),
                "missing: every incident kind needs an entry",
            ));
        }

        let mut mitigations = BTreeMap::new();
        for m in &raw.mitigation {
            let name = format!("mitigation '{}'", m.id);
            let id_ok = !m.id.is_empty()
                && m.id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !id_ok {
                return Err(rule_error(name, "the id must be lower-case letters, digits and '_'"));
            }
            let covers = match &m.covers {
                RawCovers::Word(w) if w == "all" => None,
                RawCovers::Word(w) => {
                    return Err(rule_error(
                        name,
                        format!("covers must be \"all\" or a list of categories, not '{w}'"),
                    ));
                }
                RawCovers::List(list) if list.is_empty() => {
                    return Err(rule_error(
                        name,
                        "covers is an empty list (write \"all\" for every category)",
                    ));
                }
                RawCovers::List(list) => Some(parse_categories(list, &name, taxonomy)?),
            };
            let effect = match m.effect.as_str() {
                "neutralises" => Effect::Neutralises,
                "lowers" => Effect::Lowers,
                other => {
                    return Err(rule_error(
                        name,
                        format!("unknown effect '{other}' (must be one of: neutralises, lowers)"),
                    ));
                }
            };
            if m.name.trim().is_empty() {
                return Err(rule_error(name, "the name is empty"));
            }
            let rule = Mitigation {
                name: m.name.trim().to_owned(),
                covers,
                effect,
                avoids_harm: m.avoids_harm,
                reason: check_reason(&m.reason, &name)?,
            };
            if mitigations.insert(m.id.clone(), rule).is_some() {
                return Err(rule_error(name, "is listed twice"));
            }
        }

        Ok(Self {
            sensitive,
            ordinary,
            not_personal,
            overrides,
            combinations,
            aggregation,
            kinds,
            mitigations,
        })
    }

    /// The rules shipped in `config/classification.toml`.
    pub fn builtin(taxonomy: &Taxonomy) -> Result<Self, ClassifyError> {
        Self::parse(CLASSIFICATION_TOML, taxonomy)
    }

    /// The ids of the measures a responder may name.
    pub fn mitigation_ids(&self) -> impl Iterator<Item = &str> {
        self.mitigations.keys().map(String::as_str)
    }

    /// Checks the responder's mitigations at the edge: an unknown id, an unknown category or a
    /// category the measure does not cover is a [`FieldError`] naming the field
    /// (`mitigations[1].id`, `mitigations[0].categories[2]`) and what is allowed.
    pub fn check_mitigations(&self, m: &[AppliedMitigation], taxonomy: &Taxonomy) -> Result<(), FieldError> {
        for (i, applied) in m.iter().enumerate() {
            let Some(rule) = self.mitigations.get(&applied.id) else {
                let known: Vec<&str> = self.mitigation_ids().collect();
                return Err(FieldError::new(
                    format!("mitigations[{i}].id"),
                    format!("unknown measure '{}' (known: {})", applied.id, known.join(", ")),
                ));
            };
            for (j, c) in applied.categories.iter().enumerate() {
                let field = format!("mitigations[{i}].categories[{j}]");
                if taxonomy.get(c).is_none() {
                    return Err(FieldError::new(
                        field,
                        format!("unknown data category '{c}' (see config/categories.toml)"),
                    ));
                }
                if !rule.covers(c) {
                    let covered: Vec<&str> = rule
                        .covers
                        .iter()
                        .flat_map(|set| set.iter().map(CategoryId::as_str))
                        .collect();
                    return Err(FieldError::new(
                        field,
                        format!(
                            "measure '{}' does not apply to '{c}' (it applies to: {})",
                            applied.id,
                            covered.join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn base(&self, s: Sensitivity) -> &LevelRule {
        match s {
            Sensitivity::Sensitive => &self.sensitive,
            Sensitivity::Ordinary => &self.ordinary,
            Sensitivity::NotPersonal => &self.not_personal,
        }
    }

    /// Classifies one merchant. Unknown category ids (not in the taxonomy) count as sensitive;
    /// unknown measures are ignored and said so (check them first with [`Rules::check_mitigations`]).
    pub fn classify(
        &self,
        exposed: &[CategoryId],
        kind: IncidentKind,
        mitigations: &[AppliedMitigation],
        taxonomy: &Taxonomy,
    ) -> Classification {
        let exposed: BTreeSet<CategoryId> = exposed.iter().cloned().collect();
        // Unknown categories are treated as sensitive: the safe side.
        let sensitivity = |c: &CategoryId| taxonomy.get(c).map_or(Sensitivity::Sensitive, |i| i.sensitivity);
        let mut reasons = Vec::new();

        // Merge the responder's measures by id: None = every exposed category.
        let mut merged: BTreeMap<&str, Option<BTreeSet<CategoryId>>> = BTreeMap::new();
        for m in mitigations {
            let entry = merged.entry(m.id.as_str()).or_insert_with(|| Some(BTreeSet::new()));
            if m.categories.is_empty() {
                *entry = None;
            } else if let Some(set) = entry {
                set.extend(m.categories.iter().cloned());
            }
        }
        let mut resolved: Vec<(&Mitigation, BTreeSet<CategoryId>)> = Vec::new();
        for (id, named) in &merged {
            let Some(rule) = self.mitigations.get(*id) else {
                reasons.push(format!("unknown measure '{id}' was ignored"));
                continue;
            };
            let applies: BTreeSet<CategoryId> = exposed
                .iter()
                .filter(|c| rule.covers(c) && named.as_ref().is_none_or(|set| set.contains(*c)))
                .cloned()
                .collect();
            if !applies.is_empty() {
                resolved.push((rule, applies));
            }
        }

        // Step 1: neutralising measures. Then lowering measures on what still counts.
        let mut neutralised = BTreeSet::new();
        for (rule, applies) in resolved.iter().filter(|(r, _)| r.effect == Effect::Neutralises) {
            reasons.push(fill(&rule.reason, applies, taxonomy));
            neutralised.extend(applies.iter().cloned());
        }
        let counted: BTreeSet<CategoryId> = exposed.difference(&neutralised).cloned().collect();
        let mut lowered = BTreeSet::new();
        for (rule, applies) in resolved.iter().filter(|(r, _)| r.effect == Effect::Lowers) {
            let still: BTreeSet<CategoryId> = applies.intersection(&counted).cloned().collect();
            if !still.is_empty() {
                reasons.push(fill(&rule.reason, &still, taxonomy));
                lowered.extend(still);
            }
        }

        let risk = if counted.is_empty() {
            if !exposed.is_empty() {
                reasons.push(
                    "after the measures taken no exposed category counts for risk, whatever the incident kind"
                        .to_owned(),
                );
            } else {
                reasons.push("no data category was exposed".to_owned());
            }
            RiskLevel::Low
        } else {
            let level = self.level_of(&counted, &lowered, &sensitivity, taxonomy, &mut reasons);
            self.adjust_for_kind(level, kind, &counted, &sensitivity, &mut reasons)
        };

        let (notice_required, notice_reason) = notice(&exposed, &resolved, &sensitivity, taxonomy);
        Classification {
            risk,
            reasons,
            notice_required,
            notice_reason,
        }
    }

    /// Steps 2-4: the highest level over the counted categories, combinations and aggregation.
    fn level_of(
        &self,
        counted: &BTreeSet<CategoryId>,
        lowered: &BTreeSet<CategoryId>,
        sensitivity: &dyn Fn(&CategoryId) -> Sensitivity,
        taxonomy: &Taxonomy,
        reasons: &mut Vec<String>,
    ) -> RiskLevel {
        let mut level = RiskLevel::Low;
        let mut take = |rule_level: RiskLevel, only_lowered: bool| {
            let l = if only_lowered { lower(rule_level) } else { rule_level };
            level = level.max(l);
        };

        // Step 2: per sensitivity group (categories without an override), then the overrides.
        for s in [Sensitivity::Sensitive, Sensitivity::Ordinary, Sensitivity::NotPersonal] {
            let group: BTreeSet<CategoryId> = counted
                .iter()
                .filter(|c| sensitivity(c) == s && !self.overrides.contains_key(*c))
                .cloned()
                .collect();
            if group.is_empty() {
                continue;
            }
            let unknown: Vec<String> = group
                .iter()
                .filter(|c| taxonomy.get(c).is_none())
                .map(|c| format!("'{c}'"))
                .collect();
            if !unknown.is_empty() {
                reasons.push(format!(
                    "unknown data category {} treated as sensitive",
                    join_words(&unknown)
                ));
            }
            let rule = self.base(s);
            take(rule.level, group.is_subset(lowered));
            reasons.push(fill(&rule.reason, &group, taxonomy));
        }
        for (c, rule) in self.overrides.iter().filter(|(c, _)| counted.contains(*c)) {
            take(rule.level, lowered.contains(c));
            reasons.push(rule.reason.clone());
        }

        // Step 3: combinations and aggregation; held only through lowered categories = one less.
        let unlowered: BTreeSet<CategoryId> = counted.difference(lowered).cloned().collect();
        for combo in &self.combinations {
            if combo.holds(&unlowered) {
                take(combo.level, false);
                reasons.push(combo.reason.clone());
            } else if combo.holds(counted) {
                take(combo.level, true);
                reasons.push(format!(
                    "{} (counted one level lower because of the measures taken)",
                    combo.reason
                ));
            }
        }
        if let Some(agg) = &self.aggregation {
            let members: BTreeSet<CategoryId> = counted
                .iter()
                .filter(|c| taxonomy.get(c).is_some() && sensitivity(c) == agg.sensitivity && !agg.exclude.contains(*c))
                .cloned()
                .collect();
            if members.len() >= agg.min_count {
                let full = members.difference(lowered).count() >= agg.min_count;
                take(agg.level, !full);
                let reason = fill(&agg.reason, &members, taxonomy);
                reasons.push(if full {
                    reason
                } else {
                    format!("{reason} (counted one level lower because of the measures taken)")
                });
            }
        }
        level
    }

    /// Step 5: the incident kind's adjustment.
    fn adjust_for_kind(
        &self,
        level: RiskLevel,
        kind: IncidentKind,
        counted: &BTreeSet<CategoryId>,
        sensitivity: &dyn Fn(&CategoryId) -> Sensitivity,
        reasons: &mut Vec<String>,
    ) -> RiskLevel {
        let Some(rule) = self.kinds.get(&kind) else {
            // Rules::parse requires every kind; kept total for safety.
            return level;
        };
        if rule.unless_sensitive && counted.iter().any(|c| sensitivity(c) == Sensitivity::Sensitive) {
            let blocked = match rule.change {
                Change::Keep => rule.reason.clone(),
                Change::Lower => format!(
                    "{}; not lowered because sensitive personal information is involved",
                    rule.reason
                ),
                Change::Raise => format!(
                    "{}; not raised because sensitive personal information is involved",
                    rule.reason
                ),
                Change::AtLeast(_) | Change::AtMost(_) => format!(
                    "{}; not adjusted because sensitive personal information is involved",
                    rule.reason
                ),
            };
            reasons.push(blocked);
            return level;
        }
        let adjusted = match rule.change {
            Change::Keep => level,
            Change::Lower => lower(level),
            Change::Raise => raise(level),
            Change::AtLeast(l) => level.max(l),
            Change::AtMost(l) => level.min(l),
        };
        reasons.push(match adjusted.cmp(&level) {
            std::cmp::Ordering::Equal => rule.reason.clone(),
            std::cmp::Ordering::Less => format!("{}: risk lowered from {level} to {adjusted}", rule.reason),
            std::cmp::Ordering::Greater => format!("{}: risk raised from {level} to {adjusted}", rule.reason),
        });
        adjusted
    }
}

/// Step 6: whether individual notice is required, and why.
fn notice(
    exposed: &BTreeSet<CategoryId>,
    resolved: &[(&Mitigation, BTreeSet<CategoryId>)],
    sensitivity: &dyn Fn(&CategoryId) -> Sensitivity,
    taxonomy: &Taxonomy,
) -> (bool, String) {
    if exposed.is_empty() {
        return (
            true,
            "required: no exposed category was given, so nothing shows that harm is avoided \
             (platform privacy policy 5.4)"
                .to_owned(),
        );
    }
    let avoiding: Vec<&(&Mitigation, BTreeSet<CategoryId>)> = resolved.iter().filter(|(r, _)| r.avoids_harm).collect();
    let covered: BTreeSet<&CategoryId> = avoiding.iter().flat_map(|(_, cats)| cats.iter()).collect();
    let uncovered: Vec<&CategoryId> = exposed.iter().filter(|c| !covered.contains(c)).collect();
    if uncovered.is_empty() {
        let measures: Vec<String> = avoiding
            .iter()
            .map(|(r, cats)| format!("{} [{}]", r.name, join_words(&labels(cats.iter(), taxonomy))))
            .collect();
        return (
            false,
            format!(
                "may be skipped under PIPL Art. 57 para 2: the measures taken effectively avoid harm ({}); \
                 still listed and recorded; a responder may override",
                measures.join(", ")
            ),
        );
    }
    let not_covered = if covered.is_empty() {
        String::new()
    } else {
        format!(
            "; the measures taken do not avoid harm for {}",
            join_words(&labels(uncovered.iter().copied(), taxonomy))
        )
    };
    if exposed.iter().all(|c| sensitivity(c) == Sensitivity::NotPersonal) {
        return (
            true,
            format!(
                "required by the platform's promise to its merchants (privacy policy 5.4, merchant contract), \
                 not by PIPL: only business information that is not personal was exposed{not_covered}"
            ),
        );
    }
    (
        true,
        format!(
            "required: personal information held about the merchant may have been leaked, altered or lost \
             (PIPL Art. 57; platform privacy policy 5.4){not_covered}"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taxonomy() -> Taxonomy {
        Taxonomy::builtin().expect("taxonomy")
    }

    fn rules(t: &Taxonomy) -> Rules {
        Rules::builtin(t).expect("builtin rules parse")
    }

    fn cats(ids: &[&str]) -> Vec<CategoryId> {
        ids.iter().map(|c| c.parse().expect("category id")).collect()
    }

    fn m(id: &str, categories: &[&str]) -> AppliedMitigation {
        AppliedMitigation {
            id: id.to_owned(),
            categories: cats(categories),
        }
    }

    use IncidentKind as K;
    use RiskLevel::{High, Low, Medium};

    /// Exposed categories, kind, measures -> expected level and a substring of one reason.
    type Row = (
        &'static [&'static str],
        IncidentKind,
        Vec<AppliedMitigation>,
        RiskLevel,
        &'static str,
    );

    #[test]
    fn table_of_categories_kinds_and_measures() {
        let t = taxonomy();
        let r = rules(&t);
        #[rustfmt::skip]
        let table: Vec<Row> = vec![
            // each sensitivity and the per-category overrides
            (&["id_number"], K::Leak, vec![], High, "sensitive personal information was exposed (ID document number)"),
            (&["email_address"], K::Leak, vec![], Medium, "personal information was exposed (email address)"),
            (&["business_license"], K::Leak, vec![], Low, "not personal information for an enterprise"),
            (&["phone_number"], K::Leak, vec![], Medium, "receives SMS codes and password resets"),
            (&["face_image"], K::Leak, vec![], High, "biometric data"),
            (&["account_credentials"], K::Leak, vec![], High, "can be taken over"),
            (&["contact_persons"], K::Leak, vec![], Medium, "third parties"),
            // each combination
            (&["real_name", "id_number"], K::Leak, vec![], High, "name together with ID number enables identity fraud"),
            (&["account_credentials", "phone_number"], K::Leak, vec![], High, "enable account takeover"),
            (&["email_address", "account_credentials"], K::Leak, vec![], High, "enable account takeover"),
            (&["settlement_account", "real_name"], K::Leak, vec![], High, "enables financial fraud"),
            (&["id_number", "settlement_account"], K::Leak, vec![], High, "enables financial fraud"),
            (&["phone_number", "real_name", "postal_address"], K::Leak, vec![], High, "enable targeted scams"),
            (&["id_photo", "id_number"], K::Leak, vec![], High, "face-verification checks"),
            (&["face_image", "id_number"], K::Leak, vec![], High, "face-verification checks"),
            (&["trademark_registrant"], K::Leak, vec![], High, "trademark hijacking"),
            (&["real_name", "phone_number"], K::Leak, vec![], Medium, "personal information was exposed (legal name)"),
            // aggregation of ordinary categories; third parties do not count towards it
            (&["device_identifiers", "network_info", "service_logs"], K::Leak, vec![], High, "GB/T 35273 aggregation"),
            (&["contact_persons", "sub_account_phones", "email_address"], K::Leak, vec![], Medium, "of third parties"),
            // each kind adjustment
            (&["email_address"], K::Loss, vec![], Low, "availability only): risk lowered from medium to low"),
            (&["id_number"], K::Loss, vec![], High, "not lowered because sensitive personal information is involved"),
            (&["business_license"], K::Ransomware, vec![], Medium, "risk raised from low to medium"),
            (&["id_number"], K::Ransomware, vec![], High, "copied out before it is encrypted"),
            (&["real_name", "id_number"], K::DenialOfService, vec![], Low, "denial of service with no data access"),
            (&["settlement_account"], K::Tampering, vec![], High, "misdirect money and goods"),
            (&["email_address"], K::UnauthorizedAccess, vec![], Medium, "treated as a leak"),
            (&["email_address"], K::Malware, vec![], Medium, "malware may have collected"),
            (&["email_address"], K::Other, vec![], Medium, "other incident"),
            (&["email_address"], K::Leak, vec![], Medium, "leaked or may have leaked"),
            // each mitigation effect
            (&["id_number"], K::Leak, vec![m("encrypted_uncompromised_key", &[])], Low,
                "encrypted with a key that was not compromised: ID document number does not count"),
            (&["id_number", "email_address"], K::Leak, vec![m("encrypted_uncompromised_key", &["id_number"])], Medium,
                "ID document number does not count"),
            (&["real_name", "id_number"], K::Leak, vec![m("encrypted_uncompromised_key", &["id_number"])], Medium,
                "personal information was exposed (legal name)"),
            (&["account_credentials"], K::Leak, vec![m("credentials_reset", &[])], Medium,
                "credentials were reset before the leak was known: risk lowered for account name and password"),
            (&["account_credentials", "phone_number"], K::Leak, vec![m("credentials_reset", &[])], Medium,
                "account takeover (counted one level lower because of the measures taken)"),
            (&["settlement_account", "real_name"], K::Leak, vec![m("tokenised", &["settlement_account"])], Medium,
                "stored only as tokens"),
            (&["email_address", "postal_address"], K::Leak, vec![m("recovered_before_access", &[])], Low,
                "email address; shop, shipping and return addresses do not count"),
            (&["email_address"], K::Ransomware, vec![m("access_revoked_before_use", &[])], Low,
                "whatever the incident kind"),
            (&["email_address"], K::Leak, vec![m("magic_dust", &[])], Medium, "unknown measure 'magic_dust' was ignored"),
            // unknown categories count as sensitive
            (&["favourite_colour"], K::Leak, vec![], High, "unknown data category 'favourite_colour' treated as sensitive"),
        ];
        assert!(table.len() >= 15);
        for (exposed, kind, mitigations, level, reason) in &table {
            let c = r.classify(&cats(exposed), *kind, mitigations, &t);
            assert_eq!(c.risk, *level, "{exposed:?} {kind} {mitigations:?}: {:?}", c.reasons);
            assert!(
                c.reasons.iter().any(|x| x.contains(reason)),
                "{exposed:?} {kind} {mitigations:?}: no reason containing {reason:?} in {:?}",
                c.reasons
            );
        }
    }

    #[test]
    fn classification_is_deterministic_whatever_the_input_order() {
        let t = taxonomy();
        let r = rules(&t);
        let a = r.classify(
            &cats(&["real_name", "id_number", "phone_number", "id_number"]),
            K::Leak,
            &[m("tokenised", &["phone_number"]), m("credentials_reset", &[])],
            &t,
        );
        let b = r.classify(
            &cats(&["phone_number", "id_number", "real_name"]),
            K::Leak,
            &[m("credentials_reset", &[]), m("tokenised", &["phone_number"])],
            &t,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn notice_is_skipped_only_when_every_category_is_covered_by_measures_that_avoid_harm() {
        let t = taxonomy();
        let r = rules(&t);

        let all = r.classify(
            &cats(&["id_number", "email_address"]),
            K::Leak,
            &[m("encrypted_uncompromised_key", &[])],
            &t,
        );
        assert!(!all.notice_required);
        assert!(all.notice_reason.contains("may be skipped under PIPL Art. 57 para 2"));
        assert!(
            all.notice_reason
                .contains("strong encryption with a key that was not compromised")
        );
        assert!(
            all.notice_reason
                .contains("still listed and recorded; a responder may override")
        );

        let split = r.classify(
            &cats(&["id_number", "settlement_account"]),
            K::Leak,
            &[
                m("encrypted_uncompromised_key", &["id_number"]),
                m("tokenised", &["settlement_account"]),
            ],
            &t,
        );
        assert!(!split.notice_required, "{}", split.notice_reason);
        assert!(split.notice_reason.contains("stored only as tokens"));

        let one_left = r.classify(
            &cats(&["id_number", "email_address"]),
            K::Leak,
            &[m("encrypted_uncompromised_key", &["id_number"])],
            &t,
        );
        assert!(one_left.notice_required);
        assert!(
            one_left
                .notice_reason
                .contains("PIPL Art. 57; platform privacy policy 5.4")
        );
        assert!(one_left.notice_reason.contains("do not avoid harm for email address"));

        let lowered_only = r.classify(
            &cats(&["account_credentials"]),
            K::Leak,
            &[m("credentials_reset", &[])],
            &t,
        );
        assert!(lowered_only.notice_required, "credentials_reset does not avoid harm");

        let plain = r.classify(&cats(&["email_address"]), K::Leak, &[], &t);
        assert!(plain.notice_required);
        assert!(
            plain
                .notice_reason
                .starts_with("required: personal information held about the merchant")
        );

        let business = r.classify(&cats(&["business_license"]), K::Leak, &[], &t);
        assert!(business.notice_required);
        assert!(business.notice_reason.contains("platform's promise"));
        assert!(business.notice_reason.contains("not by PIPL"));
    }

    #[test]
    fn builtin_rules_parse_and_give_every_category_a_level() {
        let t = taxonomy();
        let r = rules(&t);
        assert_eq!(r.kinds.len(), IncidentKind::ALL.len());
        for info in t.all() {
            let c = r.classify(std::slice::from_ref(&info.id), K::Leak, &[], &t);
            assert!(!c.reasons.is_empty(), "{} has no reason", info.id);
            assert!(c.notice_required, "{} alone must be notified", info.id);
            let expected = match info.sensitivity {
                Sensitivity::Sensitive => High,
                Sensitivity::Ordinary => Medium,
                Sensitivity::NotPersonal => Low,
            };
            assert_eq!(c.risk, expected, "{}: {:?}", info.id, c.reasons);
        }
        let ids: Vec<&str> = r.mitigation_ids().collect();
        for id in [
            "access_revoked_before_use",
            "credentials_reset",
            "encrypted_uncompromised_key",
            "recovered_before_access",
            "tokenised",
        ] {
            assert!(ids.contains(&id), "{id} missing");
        }
    }

    const MINIMAL: &str = r#"
[sensitivity.sensitive]
level = "high"
reason = "sensitive ({categories})"
[sensitivity.ordinary]
level = "medium"
reason = "ordinary ({categories})"
[sensitivity.not_personal]
level = "low"
reason = "not personal ({categories})"

[[combination]]
id = "identity_fraud"
all_of = ["real_name", "id_number"]
level = "high"
reason = "identity fraud"

[[kind]]
kind = "leak"
change = "keep"
reason = "leak"
[[kind]]
kind = "tampering"
change = "keep"
reason = "tampering"
[[kind]]
kind = "loss"
change = "lower"
reason = "loss"
[[kind]]
kind = "unauthorized_access"
change = "keep"
reason = "access"
[[kind]]
kind = "ransomware"
change = "at_least"
level = "medium"
reason = "ransomware"
[[kind]]
kind = "malware"
change = "keep"
reason = "malware"
[[kind]]
kind = "denial_of_service"
change = "at_most"
level = "low"
reason = "dos"
[[kind]]
kind = "other"
change = "keep"
reason = "other"

[[mitigation]]
id = "credentials_reset"
name = "reset"
covers = ["account_credentials"]
effect = "lowers"
avoids_harm = false
reason = "reset {categories}"
"#;

    fn refused(text: &str) -> String {
        match Rules::parse(text, &taxonomy()) {
            Ok(_) => panic!("rules should be refused"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn rules_naming_unknown_things_are_refused_with_the_rule_named() {
        let t = taxonomy();
        assert!(Rules::parse(MINIMAL, &t).is_ok());

        let e = refused(&MINIMAL.replace(r#"["real_name", "id_number"]"#, r#"["real_name", "passport_scan"]"#));
        assert!(
            e.contains("combination 'identity_fraud'") && e.contains("passport_scan"),
            "{e}"
        );

        let e = refused(&MINIMAL.replace(
            "level = \"high\"\nreason = \"identity fraud\"",
            "level = \"severe\"\nreason = \"x\"",
        ));
        assert!(
            e.contains("combination 'identity_fraud'") && e.contains("unknown level 'severe'"),
            "{e}"
        );

        let e = refused(&MINIMAL.replace("kind = \"other\"", "kind = \"earthquake\""));
        assert!(e.contains("kind 'earthquake'"), "{e}");

        let e = refused(&MINIMAL.replace("kind = \"other\"", "kind = \"leak\""));
        assert!(e.contains("kind 'leak'") && e.contains("twice"), "{e}");

        let e = refused(&MINIMAL.replace("[sensitivity.not_personal]", "[sensitivity.secret]"));
        assert!(e.contains("sensitivity.secret"), "{e}");

        let e = refused(&MINIMAL.replace(r#"covers = ["account_credentials"]"#, r#"covers = ["pin_code"]"#));
        assert!(
            e.contains("mitigation 'credentials_reset'") && e.contains("pin_code"),
            "{e}"
        );

        let e = refused(&MINIMAL.replace("effect = \"lowers\"", "effect = \"erases\""));
        assert!(
            e.contains("mitigation 'credentials_reset'") && e.contains("erases"),
            "{e}"
        );

        let e = refused(&MINIMAL.replace("change = \"at_most\"\nlevel = \"low\"", "change = \"at_most\""));
        assert!(
            e.contains("kind 'denial_of_service'") && e.contains("needs a level"),
            "{e}"
        );

        let e = refused(&format!(
            "{MINIMAL}\n[[category]]\nid = \"shoe_size\"\nlevel = \"low\"\nreason = \"x\"\n"
        ));
        assert!(e.contains("category 'shoe_size'"), "{e}");
    }

    #[test]
    fn check_mitigations_names_the_field_and_what_is_known() {
        let t = taxonomy();
        let r = rules(&t);
        assert!(
            r.check_mitigations(
                &[m("credentials_reset", &["account_credentials"]), m("tokenised", &[])],
                &t
            )
            .is_ok()
        );

        let e = r
            .check_mitigations(&[m("credentials_reset", &[]), m("wishful_thinking", &[])], &t)
            .expect_err("unknown id");
        assert_eq!(e.field, "mitigations[1].id");
        assert!(
            e.reason.contains("wishful_thinking") && e.reason.contains("credentials_reset"),
            "{}",
            e.reason
        );

        let e = r
            .check_mitigations(
                &[m("credentials_reset", &["account_credentials", "favourite_colour"])],
                &t,
            )
            .expect_err("unknown category");
        assert_eq!(e.field, "mitigations[0].categories[1]");
        assert!(e.reason.contains("favourite_colour"));

        let e = r
            .check_mitigations(&[m("credentials_reset", &["face_image"])], &t)
            .expect_err("not covered");
        assert_eq!(e.field, "mitigations[0].categories[0]");
        assert!(e.reason.contains("it applies to: account_credentials"), "{}", e.reason);
    }

    #[test]
    fn applied_mitigations_read_from_incident_facts_json() {
        let a: AppliedMitigation =
            serde_json::from_str(r#"{"id": "credentials_reset", "categories": ["account_credentials"]}"#)
                .expect("json");
        assert_eq!(a, m("credentials_reset", &["account_credentials"]));
        let all: AppliedMitigation = serde_json::from_str(r#"{"id": "tokenised"}"#).expect("json");
        assert!(all.categories.is_empty());
        assert_eq!(serde_json::to_string(&all).expect("ser"), r#"{"id":"tokenised"}"#);
        assert!(serde_json::from_str::<AppliedMitigation>(r#"{"id": "x", "note": "y"}"#).is_err());
    }
}
