//! The template set: handlebars in strict mode (a missing variable is an error, never an
//! empty string), one registry that escapes for HTML and Atom and one that does not for text.
//! Templates are embedded from `templates/`; `paths.templates` points at a directory that
//! replaces them, so an operator can change wording without a rebuild.

use std::collections::BTreeMap;
use std::path::Path;

use handlebars::Handlebars;
use include_dir::{Dir, include_dir};
use serde::Serialize;

static EMBEDDED: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/templates");

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {name}: {reason}")]
    Load { name: String, reason: String },
    #[error("rendering {name}: {reason}")]
    Render { name: String, reason: String },
    #[error("reading templates from {path}: {reason}")]
    Dir { path: String, reason: String },
}

pub struct Templates {
    text: Handlebars<'static>,
    html: Handlebars<'static>,
    /// The sources by name, kept so that a draft can freeze exactly what it was rendered from.
    sources: BTreeMap<String, String>,
    hash: String,
}

/// Templates whose output is markup and must be escaped: `*.html.hbs`, `*.atom.hbs`.
fn is_markup(name: &str) -> bool {
    name.ends_with(".html") || name.ends_with(".atom")
}

impl Templates {
    /// The templates shipped in the binary.
    pub fn embedded() -> Result<Self, TemplateError> {
        let mut sources = Vec::new();
        collect_embedded(&EMBEDDED, &mut sources);
        Self::from_sources(sources)
    }

    /// Templates from a directory laid out like `templates/`.
    pub fn from_dir(dir: &Path) -> Result<Self, TemplateError> {
        let mut sources = Vec::new();
        collect_dir(dir, dir, &mut sources)?;
        Self::from_sources(sources)
    }

    /// Templates frozen by a draft (a JSON object of name to source).
    pub fn from_json(json: &str) -> Result<Self, TemplateError> {
        let sources: BTreeMap<String, String> = serde_json::from_str(json).map_err(|e| TemplateError::Load {
            name: "frozen template set".into(),
            reason: e.to_string(),
        })?;
        Self::from_sources(sources.into_iter().collect())
    }

    /// The content hash of the whole set: equal hashes render identically.
    pub fn set_hash(&self) -> &str {
        &self.hash
    }

    pub fn sources_json(&self) -> String {
        serde_json::to_string(&self.sources).unwrap_or_default()
    }

    fn from_sources(sources: Vec<(String, String)>) -> Result<Self, TemplateError> {
        let sources: BTreeMap<String, String> = sources.into_iter().collect();
        let hash = crate::ledger::content_hash(serde_json::to_string(&sources).unwrap_or_default().as_bytes());
        let mut text = Handlebars::new();
        text.set_strict_mode(true);
        text.register_escape_fn(handlebars::no_escape);
        let mut html = Handlebars::new();
        html.set_strict_mode(true);
        for (name, source) in sources.clone() {
            let load = |e: handlebars::TemplateError| TemplateError::Load {
                name: name.clone(),
                reason: e.to_string(),
            };
            if is_markup(&name) {
                html.register_template_string(&name, source).map_err(load)?;
            } else {
                // Text templates are also partials of the markup ones (a notice's sections in the
                // HTML email), where the HTML registry escapes what they render.
                html.register_template_string(&name, &source).map_err(load)?;
                text.register_template_string(&name, source).map_err(load)?;
            }
        }
        Ok(Self {
            text,
            html,
            sources,
            hash,
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.text.has_template(name) || self.html.has_template(name)
    }

    /// Renders `name` (without `.hbs`), choosing the registry by the name's extension.
    pub fn render<T: Serialize>(&self, name: &str, context: &T) -> Result<String, TemplateError> {
        let registry = if is_markup(name) { &self.html } else { &self.text };
        registry
            .render(name, context)
            .map(|s| s.trim().to_owned())
            .map_err(|e| TemplateError::Render {
                name: name.to_owned(),
                reason: e.to_string(),
            })
    }
}

fn collect_embedded(dir: &Dir<'static>, out: &mut Vec<(String, String)>) {
    for file in dir.files() {
        let path = file.path().to_string_lossy().replace('\\', "/");
        if let (Some(name), Some(text)) = (path.strip_suffix(".hbs"), file.contents_utf8()) {
            out.push((name.to_owned(), text.to_owned()));
        }
    }
    for sub in dir.dirs() {
        collect_embedded(sub, out);
    }
}

fn collect_dir(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) -> Result<(), TemplateError> {
    let err = |e: std::io::Error| TemplateError::Dir {
        path: dir.display().to_string(),
        reason: e.to_string(),
    };
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let path = entry.map_err(err)?.path();
        if path.is_dir() {
            collect_dir(root, &path, out)?;
        } else if let Some(rel) = path.strip_prefix(root).ok().and_then(|p| p.to_str())
            && let Some(name) = rel.replace('\\', "/").strip_suffix(".hbs")
        {
            out.push((name.to_owned(), std::fs::read_to_string(&path).map_err(err)?));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_templates_load_and_strict_mode_refuses_missing_variables() {
        let t = Templates::embedded().expect("load");
        assert!(t.has("notice/en/impact") && t.has("notice/zh-CN/email.html") && t.has("bulletin/feed.atom"));
        let err = t
            .render("notice/en/contact", &serde_json::json!({}))
            .expect_err("strict");
        assert!(err.to_string().contains("notice/en/contact"));
    }
}
