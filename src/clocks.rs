//! Regulators' clocks: when a report falls due, counted as the regime counts: hours from an
//! instant, calendar days or months in the regulator's own time zone, or working days of its
//! jurisdiction's calendar (weekends, public holidays and the weekend days worked instead).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;
use serde::Deserialize;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ClockError {
    #[error("{field}: '{value}' is not a period (use 4h, 3d, 30wd or 1mo)")]
    Span { field: String, value: String },
    #[error("{field}: '{value}' is not an IANA time zone (for example Asia/Shanghai)")]
    TimeZone { field: String, value: String },
    #[error("calendar {id}: {reason}")]
    Calendar { id: String, reason: String },
}

/// How long a regime allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// Hours from the instant the clock starts (GDPR's 72 hours, CAC's 4).
    Hours(u32),
    /// Until the end of the Nth calendar day after the day the clock starts, in the
    /// regulator's zone (PDPC's "3 calendar days").
    Days(u32),
    /// Until the end of the Nth working day after the day the clock starts.
    WorkingDays(u32),
    /// The same local time N months later, or the month's last day if it is shorter (NIS2's
    /// "one month").
    Months(u32),
}

impl Span {
    pub fn parse(field: &str, text: &str) -> Result<Self, ClockError> {
        let bad = || ClockError::Span {
            field: field.to_owned(),
            value: text.to_owned(),
        };
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (n, unit) = t.split_at(split);
        let n: u32 = n.parse().map_err(|_| bad())?;
        if n == 0 {
            return Err(bad());
        }
        match unit {
            "h" => Ok(Span::Hours(n)),
            "d" => Ok(Span::Days(n)),
            "wd" => Ok(Span::WorkingDays(n)),
            "mo" => Ok(Span::Months(n)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Span::Hours(n) => write!(f, "{n}h"),
            Span::Days(n) => write!(f, "{n}d"),
            Span::WorkingDays(n) => write!(f, "{n}wd"),
            Span::Months(n) => write!(f, "{n}mo"),
        }
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Span::parse("period", &text).map_err(serde::de::Error::custom)
    }
}

/// An IANA time zone read from configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Zone(pub Tz);

impl Zone {
    pub fn parse(field: &str, text: &str) -> Result<Self, ClockError> {
        Tz::from_str(text.trim()).map(Zone).map_err(|_| ClockError::TimeZone {
            field: field.to_owned(),
            value: text.to_owned(),
        })
    }
    pub fn name(&self) -> &'static str {
        self.0.name()
    }
}

impl<'de> Deserialize<'de> for Zone {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Zone::parse("time_zone", &text).map_err(serde::de::Error::custom)
    }
}

/// A jurisdiction's working days: weekdays but the weekend, minus public holidays, plus the
/// weekend days declared working days (China's 调休). Only the years listed are known.
#[derive(Debug, Clone)]
pub struct Calendar {
    pub id: String,
    weekend: Vec<Weekday>,
    holidays: BTreeSet<NaiveDate>,
    workdays: BTreeSet<NaiveDate>,
    years: BTreeSet<i32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CalendarFile {
    id: String,
    #[serde(default = "default_weekend")]
    weekend: Vec<String>,
    /// Years whose holidays and worked weekend days are listed.
    years: Vec<i32>,
    #[serde(default)]
    holidays: Vec<NaiveDate>,
    #[serde(default)]
    workdays: Vec<NaiveDate>,
}

fn default_weekend() -> Vec<String> {
    vec!["sat".into(), "sun".into()]
}

impl Calendar {
    pub fn parse(text: &str) -> Result<Self, ClockError> {
        let f: CalendarFile = toml::from_str(text).map_err(|e| ClockError::Calendar {
            id: "?".into(),
            reason: e.to_string(),
        })?;
        let err = |reason: String| ClockError::Calendar {
            id: f.id.clone(),
            reason,
        };
        let weekend = f
            .weekend
            .iter()
            .map(|d| {
                d.parse::<Weekday>()
                    .map_err(|_| err(format!("weekend: '{d}' is not a day")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let years: BTreeSet<i32> = f.years.iter().copied().collect();
        for d in f.holidays.iter().chain(&f.workdays) {
            if !years.contains(&d.year()) {
                return Err(err(format!("{d} is outside the years listed ({:?})", f.years)));
            }
        }
        if let Some(d) = f.holidays.iter().find(|d| f.workdays.contains(d)) {
            return Err(err(format!("{d} is both a holiday and a working day")));
        }
        Ok(Self {
            id: f.id.clone(),
            weekend,
            holidays: f.holidays.into_iter().collect(),
            workdays: f.workdays.into_iter().collect(),
            years,
        })
    }

    /// Whether `day` is a working day, and whether the calendar knows its year.
    pub fn is_working_day(&self, day: NaiveDate) -> (bool, bool) {
        let working = if self.workdays.contains(&day) {
            true
        } else if self.holidays.contains(&day) {
            false
        } else {
            !self.weekend.contains(&day.weekday())
        };
        (working, self.years.contains(&day.year()))
    }
}

/// When a clock runs out. `assumed` is set when working days were counted through a year the
/// calendar does not list (only its weekends were known): the date may move when the year's
/// holidays are added.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Due {
    pub at: DateTime<Utc>,
    pub assumed: bool,
}

/// The deadline of a clock that started at `start`, counted in `zone` (and `calendar` for
/// working days; without one, Monday to Friday).
pub fn due(start: DateTime<Utc>, span: Span, zone: Zone, calendar: Option<&Calendar>) -> Due {
    let tz = zone.0;
    let local = start.with_timezone(&tz);
    let end_of = |day: NaiveDate| -> DateTime<Utc> {
        // The last instant of the local day: the next day's first, less a second.
        let next = day.checked_add_days(Days::new(1)).unwrap_or(day);
        first_instant(tz, next) - chrono::Duration::seconds(1)
    };
    match span {
        Span::Hours(n) => Due {
            at: start + chrono::Duration::hours(i64::from(n)),
            assumed: false,
        },
        Span::Days(n) => Due {
            at: end_of(local.date_naive() + Days::new(u64::from(n))),
            assumed: false,
        },
        Span::WorkingDays(n) => {
            let mut day = local.date_naive();
            let mut left = n;
            let mut assumed = false;
            while left > 0 {
                day = day + Days::new(1);
                let (working, known) = match calendar {
                    Some(c) => c.is_working_day(day),
                    None => (!matches!(day.weekday(), Weekday::Sat | Weekday::Sun), true),
                };
                assumed |= !known;
                if working {
                    left -= 1;
                }
            }
            Due {
                at: end_of(day),
                assumed,
            }
        }
        Span::Months(n) => {
            let target = local
                .date_naive()
                .checked_add_months(Months::new(n))
                .unwrap_or(local.date_naive());
            let at = tz
                .from_local_datetime(&target.and_time(local.time()))
                .earliest()
                .map(|t| t.with_timezone(&Utc))
                // A local time skipped by a daylight-saving change: the day's end instead.
                .unwrap_or_else(|| end_of(target));
            Due { at, assumed: false }
        }
    }
}

/// The first instant of a local day (midnight, or later where a zone skips it).
fn first_instant(tz: Tz, day: NaiveDate) -> DateTime<Utc> {
    (0..24)
        .filter_map(|h| NaiveTime::from_hms_opt(h, 0, 0))
        .find_map(|t| tz.from_local_datetime(&day.and_time(t)).earliest())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| Utc.from_utc_datetime(&day.and_time(NaiveTime::MIN)))
}

/// One regulator clock of one incident, as `tocsin deadlines` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClockView {
    pub incident_id: String,
    pub reference: String,
    pub regulator: String,
    pub regulator_name: String,
    pub stage: &'static str,
    /// What the regime calls the report ("early warning"), in English and Chinese.
    pub label_en: String,
    pub label_zh: String,
    pub from: &'static str,
    pub period: String,
    /// When the clock started; `None` while the moment it starts from has not come.
    pub started_at: Option<DateTime<Utc>>,
    pub due_at: Option<DateTime<Utc>>,
    /// The deadline on the regulator's clock: `2026-12-01 18:00 Asia/Shanghai`.
    pub due_local: Option<String>,
    pub time_zone: &'static str,
    /// Minutes until the deadline (negative once past); `None` when filed or not started.
    pub minutes_left: Option<i64>,
    /// `open`, `overdue`, `filed`, `filed_late` or `waiting` (not started).
    pub status: &'static str,
    pub filed_at: Option<DateTime<Utc>>,
    /// Working days counted through a year the calendar does not list yet.
    pub calendar_assumed: bool,
}

/// What an incident's clocks start from, gathered by the engine.
pub struct ClockInputs<'a> {
    pub incident: &'a crate::model::Incident,
    pub aware_at: DateTime<Utc>,
    /// When a responder confirmed it, and when it was closed.
    pub assessed_at: Option<DateTime<Utc>>,
    pub handling_ended_at: Option<DateTime<Utc>>,
    /// Filings submitted: (regulator, stage, when).
    pub submitted: &'a [(String, String, DateTime<Utc>)],
    pub class: crate::domain::OperatorClass,
}

/// Every clock of the profiles that apply, for one incident.
pub fn clock_views(
    inputs: &ClockInputs<'_>,
    regulators: &crate::filing::Regulators,
    applying: &[&crate::filing::RegulatorProfile],
    now: DateTime<Utc>,
) -> Vec<ClockView> {
    use crate::filing::{ClockStart, Stage};
    let filed = |regulator: &str, stage: Stage| {
        inputs
            .submitted
            .iter()
            .filter(|(r, s, _)| r == regulator && s == stage.as_str())
            .map(|(_, _, at)| *at)
            .min()
    };
    let mut views = Vec::new();
    for p in applying {
        for c in &p.clocks {
            let started_at = match c.from {
                ClockStart::Aware => Some(inputs.aware_at),
                ClockStart::Detected => Some(inputs.incident.detected_at),
                ClockStart::Assessed => inputs.assessed_at,
                ClockStart::HandlingEnded => inputs.handling_ended_at,
                ClockStart::InitialFiled => filed(&p.id, Stage::Initial),
                ClockStart::UpdateFiled => filed(&p.id, Stage::Update),
            };
            let span = c.span(inputs.class);
            let due = started_at.map(|s| due(s, span, p.time_zone, regulators.calendar_of(p)));
            let filed_at = filed(&p.id, c.stage);
            let status = match (due, filed_at) {
                (None, None) => "waiting",
                (Some(d), Some(f)) if f > d.at => "filed_late",
                (_, Some(_)) => "filed",
                (Some(d), None) if now > d.at => "overdue",
                (Some(_), None) => "open",
            };
            let tz = p.time_zone.0;
            views.push(ClockView {
                incident_id: inputs.incident.id.to_string(),
                reference: inputs.incident.reference.clone(),
                regulator: p.id.clone(),
                regulator_name: p.name_en.clone(),
                stage: c.stage.as_str(),
                label_en: c
                    .label_en
                    .clone()
                    .unwrap_or_else(|| format!("{} report", c.stage.as_str())),
                label_zh: c.label_zh.clone().unwrap_or_else(|| c.stage.as_str().to_owned()),
                from: c.from.as_str(),
                period: span.to_string(),
                started_at,
                due_at: due.map(|d| d.at),
                due_local: due.map(|d| format!("{} {}", d.at.with_timezone(&tz).format("%Y-%m-%d %H:%M"), tz.name())),
                time_zone: tz.name(),
                minutes_left: match (due, filed_at) {
                    (Some(d), None) => Some((d.at - now).num_minutes()),
                    _ => None,
                },
                status,
                filed_at,
                calendar_assumed: due.is_some_and(|d| d.assumed),
            });
        }
    }
    views
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::parse_ts;

    const CN: &str = include_str!("../config/calendars/cn.toml");

    fn at(s: &str) -> DateTime<Utc> {
        parse_ts(s).expect("valid instant")
    }
    fn zone(name: &str) -> Zone {
        Zone::parse("time_zone", name).expect("zone")
    }

    #[test]
    fn periods_parse_and_bad_ones_name_the_field() {
        assert_eq!(Span::parse("p", "72h"), Ok(Span::Hours(72)));
        assert_eq!(Span::parse("p", "3d"), Ok(Span::Days(3)));
        assert_eq!(Span::parse("p", "30wd"), Ok(Span::WorkingDays(30)));
        assert_eq!(Span::parse("p", "1mo"), Ok(Span::Months(1)));
        for bad in ["", "h", "0h", "3 weeks", "-1d", "2y"] {
            let e = Span::parse("clocks.within", bad).expect_err(bad).to_string();
            assert!(e.starts_with("clocks.within: "), "{e}");
        }
        assert!(Zone::parse("time_zone", "Mars/Olympus").is_err());
    }

    #[test]
    fn hours_are_absolute_whatever_the_zone() {
        let start = at("2026-03-28T10:00:00Z");
        // Across the night Europe moves to summer time, 72 hours are still 72 hours.
        let d = due(start, Span::Hours(72), zone("Europe/Brussels"), None);
        assert_eq!(d.at, at("2026-03-31T10:00:00Z"));
    }

    #[test]
    fn calendar_days_end_at_midnight_in_the_regulators_zone() {
        // 23:30 UTC on 1 June is already 2 June in Singapore: three days from then end at
        // the end of 5 June, Singapore time (15:59:59 UTC).
        let d = due(at("2026-06-01T23:30:00Z"), Span::Days(3), zone("Asia/Singapore"), None);
        assert_eq!(d.at, at("2026-06-05T15:59:59Z"));
        // The same instant counted in UTC ends a day earlier.
        let d = due(at("2026-06-01T23:30:00Z"), Span::Days(3), zone("UTC"), None);
        assert_eq!(d.at, at("2026-06-04T23:59:59Z"));
    }

    #[test]
    fn working_days_skip_holidays_and_count_the_weekend_days_worked_in_china() {
        let cn = Calendar::parse(CN).expect("calendar");
        let shanghai = zone("Asia/Shanghai");
        // Aware on Friday 13 February 2026 (Beijing time): Saturday 14 is worked (调休), then
        // the Spring Festival holiday runs 15-23 February; 24 is the next working day.
        let d = due(at("2026-02-13T02:00:00Z"), Span::WorkingDays(2), shanghai, Some(&cn));
        assert_eq!(d.at, at("2026-02-24T15:59:59Z"));
        assert!(!d.assumed);
        // Without the calendar only weekends count: Monday 16 and Tuesday 17.
        let d = due(at("2026-02-13T02:00:00Z"), Span::WorkingDays(2), shanghai, None);
        assert_eq!(d.at, at("2026-02-17T15:59:59Z"));
        // National Day: aware on Wednesday 30 September; 1-7 October are off, so the second
        // working day is Friday 9 and the third Saturday 10 (worked in exchange).
        let d = due(at("2026-09-30T01:00:00Z"), Span::WorkingDays(2), shanghai, Some(&cn));
        assert_eq!(d.at, at("2026-10-09T15:59:59Z"));
        let d = due(at("2026-09-30T01:00:00Z"), Span::WorkingDays(3), shanghai, Some(&cn));
        assert_eq!(d.at, at("2026-10-10T15:59:59Z"));
    }

    #[test]
    fn working_days_past_the_known_years_are_flagged() {
        let cn = Calendar::parse(CN).expect("calendar");
        let d = due(
            at("2026-12-28T02:00:00Z"),
            Span::WorkingDays(10),
            zone("Asia/Shanghai"),
            Some(&cn),
        );
        assert!(d.assumed, "2027's holidays are not in the calendar yet");
    }

    #[test]
    fn months_keep_the_local_time_and_clamp_to_the_months_end() {
        let d = due(
            at("2026-01-31T09:00:00Z"),
            Span::Months(1),
            zone("Europe/Brussels"),
            None,
        );
        assert_eq!(d.at, at("2026-02-28T09:00:00Z"));
        // Across the change to summer time the local time (10:00) is kept, not the UTC one.
        let d = due(
            at("2026-03-10T09:00:00Z"),
            Span::Months(1),
            zone("Europe/Brussels"),
            None,
        );
        assert_eq!(d.at, at("2026-04-10T08:00:00Z"));
    }

    #[test]
    fn a_calendar_refuses_dates_outside_its_years_and_contradictions() {
        let bad = "id = \"x\"\nyears = [2026]\nholidays = [\"2027-01-01\"]\n";
        assert!(
            Calendar::parse(bad)
                .expect_err("outside")
                .to_string()
                .contains("2027-01-01")
        );
        let both = "id = \"x\"\nyears = [2026]\nholidays = [\"2026-01-01\"]\nworkdays = [\"2026-01-01\"]\n";
        assert!(Calendar::parse(both).expect_err("both").to_string().contains("both"));
    }
}
