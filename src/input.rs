//! Reading untrusted JSON objects field by field, so every rejection names its field.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::domain::FieldError;
use crate::time::parse_ts;

/// A JSON object being parsed; `finish` rejects fields nobody asked for.
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    seen: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    pub fn of(value: &'a Value) -> Result<Self, FieldError> {
        match value {
            Value::Object(map) => Ok(Self { map, seen: Vec::new() }),
            _ => Err(FieldError::new("(record)", "must be a JSON object")),
        }
    }

    fn raw(&mut self, name: &'static str) -> Option<&'a Value> {
        self.seen.push(name);
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// A required string of `min..=max` characters (trimmed).
    pub fn string(&mut self, name: &'static str, min: usize, max: usize) -> Result<String, FieldError> {
        self.opt_string(name, min, max)?
            .ok_or_else(|| FieldError::new(name, "is required"))
    }

    pub fn opt_string(&mut self, name: &'static str, min: usize, max: usize) -> Result<Option<String>, FieldError> {
        match self.raw(name) {
            None => Ok(None),
            Some(Value::String(s)) => {
                let s = s.trim();
                let n = s.chars().count();
                if n == 0 && min == 0 {
                    Ok(None)
                } else if n == 0 {
                    Err(FieldError::new(name, "must not be empty"))
                } else if n < min {
                    Err(FieldError::new(name, format!("must be at least {min} characters")))
                } else if n > max {
                    Err(FieldError::new(name, format!("must be at most {max} characters")))
                } else {
                    Ok(Some(s.to_owned()))
                }
            }
            Some(_) => Err(FieldError::new(name, "must be a string")),
        }
    }

    /// A required value parsed by `FromStr`, errors reported under `name`.
    pub fn parsed<T: std::str::FromStr<Err = FieldError>>(&mut self, name: &'static str) -> Result<T, FieldError> {
        let raw = self.string(name, 1, 10_000)?;
        raw.parse().map_err(|e: FieldError| FieldError::new(name, e.reason))
    }

    pub fn opt_parsed<T: std::str::FromStr<Err = FieldError>>(
        &mut self,
        name: &'static str,
    ) -> Result<Option<T>, FieldError> {
        self.opt_string(name, 0, 10_000)?
            .map(|raw| raw.parse().map_err(|e: FieldError| FieldError::new(name, e.reason)))
            .transpose()
    }

    pub fn time(&mut self, name: &'static str) -> Result<DateTime<Utc>, FieldError> {
        self.opt_time(name)?.ok_or_else(|| FieldError::new(name, "is required"))
    }

    pub fn opt_time(&mut self, name: &'static str) -> Result<Option<DateTime<Utc>>, FieldError> {
        self.opt_string(name, 0, 64)?
            .map(|raw| {
                parse_ts(&raw)
                    .map_err(|_| FieldError::new(name, "must be an RFC 3339 date-time such as 2026-11-28T03:45:00Z"))
            })
            .transpose()
    }

    pub fn opt_bool(&mut self, name: &'static str) -> Result<Option<bool>, FieldError> {
        match self.raw(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(FieldError::new(name, "must be true or false")),
        }
    }

    /// An optional array of strings, each parsed by `parse` (which gets the element's field name).
    pub fn list<T>(
        &mut self,
        name: &'static str,
        mut parse: impl FnMut(&str, &str) -> Result<T, FieldError>,
    ) -> Result<Vec<T>, FieldError> {
        match self.raw(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let field = format!("{name}[{i}]");
                    match item {
                        Value::String(s) => parse(s, &field),
                        _ => Err(FieldError::new(field, "must be a string")),
                    }
                })
                .collect(),
            Some(_) => Err(FieldError::new(name, "must be an array of strings")),
        }
    }

    pub fn opt_object(&mut self, name: &'static str) -> Result<Value, FieldError> {
        match self.raw(name) {
            None => Ok(Value::Object(Map::new())),
            Some(v @ Value::Object(_)) => Ok(v.clone()),
            Some(_) => Err(FieldError::new(name, "must be an object")),
        }
    }

    /// Rejects any field that was not asked for.
    pub fn finish(self) -> Result<(), FieldError> {
        match self.map.keys().find(|k| !self.seen.contains(&k.as_str())) {
            Some(unknown) => Err(FieldError::new(unknown.clone(), "is not a known field")),
            None => Ok(()),
        }
    }
}
