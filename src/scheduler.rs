//! Schedules: cron expressions (the `cron` crate) in the configuration drive the periodic jobs
//! of `tocsin serve`. Expressions have 6 or 7 fields, seconds first; a 5-field Unix expression
//! is rejected with a message that says so rather than being misread.

use std::str::FromStr;

use chrono::{DateTime, Utc};

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("'{0}' has 5 fields; Tocsin schedules have seconds first (6 or 7 fields), e.g. '0 */5 * * * *'")]
    UnixForm(String),
    #[error("'{expr}' is not a valid schedule: {reason}")]
    Invalid { expr: String, reason: String },
}

/// A parsed cron schedule, seconds first.
#[derive(Debug, Clone)]
pub struct Schedule(cron::Schedule);

impl Schedule {
    pub fn parse(expr: &str) -> Result<Self, ScheduleError> {
        let fields = expr.split_whitespace().count();
        if fields == 5 {
            return Err(ScheduleError::UnixForm(expr.to_owned()));
        }
        cron::Schedule::from_str(expr)
            .map(Self)
            .map_err(|e| ScheduleError::Invalid {
                expr: expr.to_owned(),
                reason: e.to_string(),
            })
    }

    /// The next firing strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.0.after(&after).next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_first_schedules_parse_and_unix_ones_are_explained() {
        let s = Schedule::parse("*/10 * * * * *").expect("valid");
        let t = crate::time::parse_ts("2026-11-30T00:00:05Z").expect("time");
        assert_eq!(
            s.next_after(t).map(crate::time::fmt_ts).as_deref(),
            Some("2026-11-30T00:00:10.000000Z")
        );
        assert!(matches!(
            Schedule::parse("*/5 * * * *"),
            Err(ScheduleError::UnixForm(_))
        ));
        assert!(Schedule::parse("not a schedule").is_err());
    }
}
