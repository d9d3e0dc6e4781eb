//! The data-category taxonomy, as data: `config/categories.toml` (embedded; an operator may
//! correct grades and labels there). Category ids from untrusted input are checked here.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::domain::{CategoryId, FieldError, Locale};

pub const CATEGORIES_TOML: &str = include_str!("../config/categories.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sensitivity {
    Sensitive,
    Ordinary,
    NotPersonal,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryInfo {
    pub id: CategoryId,
    pub sensitivity: Sensitivity,
    pub basis: String,
    pub label_en: String,
    pub label_zh: String,
}

impl CategoryInfo {
    pub fn label(&self, locale: Locale) -> &str {
        match locale {
            Locale::En => &self.label_en,
            Locale::ZhCn => &self.label_zh,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Taxonomy {
    by_id: BTreeMap<CategoryId, CategoryInfo>,
}

#[derive(Debug, thiserror::Error)]
#[error("category taxonomy: {0}")]
pub struct TaxonomyError(String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    category: Vec<CategoryInfo>,
}

impl Taxonomy {
    pub fn parse(toml_text: &str) -> Result<Self, TaxonomyError> {
        let file: File = toml::from_str(toml_text).map_err(|e| TaxonomyError(e.to_string()))?;
        let mut by_id = BTreeMap::new();
        for c in file.category {
            if by_id.insert(c.id.clone(), c.clone()).is_some() {
                return Err(TaxonomyError(format!("category {} is listed twice", c.id)));
            }
        }
        Ok(Self { by_id })
    }

    /// The taxonomy shipped in `config/categories.toml`.
    pub fn builtin() -> Result<Self, TaxonomyError> {
        Self::parse(CATEGORIES_TOML)
    }

    pub fn get(&self, id: &CategoryId) -> Option<&CategoryInfo> {
        self.by_id.get(id)
    }

    pub fn all(&self) -> impl Iterator<Item = &CategoryInfo> {
        self.by_id.values()
    }

    /// Parses a category id from input and checks that the taxonomy knows it.
    pub fn parse_category(&self, raw: &str, field: &str) -> Result<CategoryId, FieldError> {
        let id: CategoryId = raw.parse().map_err(|e: FieldError| FieldError::new(field, e.reason))?;
        if self.by_id.contains_key(&id) {
            Ok(id)
        } else {
            Err(FieldError::new(
                field,
                format!("unknown data category '{raw}' (see config/categories.toml)"),
            ))
        }
    }

    pub fn is_sensitive(&self, id: &CategoryId) -> bool {
        self.get(id).is_some_and(|c| c.sensitivity == Sensitivity::Sensitive)
    }

    pub fn label(&self, id: &CategoryId, locale: Locale) -> String {
        self.get(id)
            .map(|c| c.label(locale).to_owned())
            .unwrap_or_else(|| id.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_taxonomy_has_the_regulation_categories() {
        let t = Taxonomy::builtin().expect("parses");
        assert_eq!(t.all().count(), 22);
        let creds: CategoryId = "account_credentials".parse().expect("id");
        assert!(t.is_sensitive(&creds));
        assert!(!t.label(&creds, Locale::ZhCn).is_empty());
        let err = t
            .parse_category("favourite_colour", "categories[0]")
            .expect_err("unknown");
        assert_eq!(err.field, "categories[0]");
    }

    #[test]
    fn the_json_schemas_list_exactly_the_taxonomy() {
        let t = Taxonomy::builtin().expect("taxonomy");
        let mut ours: Vec<&str> = t.all().map(|c| c.id.as_str()).collect();
        ours.sort();
        for schema in [
            include_str!("../config/schemas/merchant.schema.json"),
            include_str!("../config/schemas/event.schema.json"),
        ] {
            let v: serde_json::Value = serde_json::from_str(schema).expect("schema is JSON");
            let mut listed: Vec<&str> = v["$defs"]["category_id"]["enum"]
                .as_array()
                .expect("category enum")
                .iter()
                .filter_map(|c| c.as_str())
                .collect();
            listed.sort();
            assert_eq!(listed, ours, "config/schemas and config/categories.toml disagree");
        }
    }
}
