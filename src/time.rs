//! One fixed text form for instants in storage and the ledger: UTC, microseconds, `Z`.
//! Fixed width means text order is time order, so SQL can compare them as strings.

use chrono::{DateTime, SecondsFormat, Utc};

/// `2026-11-28T03:45:00.000000Z`
pub fn fmt_ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parses any RFC 3339 instant into UTC.
pub fn parse_ts(s: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc))
}

/// A human form for notices: `2026-11-28 03:45 UTC`.
pub fn human(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// A human form in the reader's time: China Standard Time (UTC+8, no daylight saving) for
/// `zh-CN` readers, UTC otherwise.
pub fn human_for(t: DateTime<Utc>, locale: crate::domain::Locale) -> String {
    match locale {
        crate::domain::Locale::ZhCn => (t + chrono::Duration::hours(8))
            .format("%Y-%m-%d %H:%M（北京时间）")
            .to_string(),
        crate::domain::Locale::En => human(t),
    }
}

/// The date of a notice in the reader's calendar: `28 November 2026`, `2026年11月29日`.
pub fn human_date_for(t: DateTime<Utc>, locale: crate::domain::Locale) -> String {
    match locale {
        crate::domain::Locale::ZhCn => (t + chrono::Duration::hours(8)).format("%Y年%-m月%-d日").to_string(),
        crate::domain::Locale::En => t.format("%-d %B %Y").to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_form_round_trips_and_sorts_as_text() {
        let a = parse_ts("2026-11-28T03:45:00+08:00").expect("valid");
        let b = parse_ts("2026-11-28T03:45:00.5Z").expect("valid");
        assert_eq!(fmt_ts(a), "2026-11-27T19:45:00.000000Z");
        assert_eq!(parse_ts(&fmt_ts(b)).expect("round trip"), b);
        assert!(fmt_ts(a) < fmt_ts(b));
    }

    #[test]
    fn chinese_readers_get_beijing_time() {
        let t = parse_ts("2026-11-28T20:30:00Z").expect("valid");
        assert_eq!(
            human_for(t, crate::domain::Locale::ZhCn),
            "2026-11-29 04:30（北京时间）"
        );
        assert_eq!(human_for(t, crate::domain::Locale::En), "2026-11-28 20:30 UTC");
    }
}
