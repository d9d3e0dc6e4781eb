//! The watchdog: reminders to the responders (email and SMS) at configured points before each
//! regulator deadline, and an escalation to a second contact once a deadline has passed
//! unfiled. Each reminder is stored (one row per clock, point and recipient) before it is sent
//! and marked sent after, so a restart neither loses nor repeats one; a send a crash
//! interrupted is retried with the same idempotency key (the email's Message-ID, the SMS
//! webhook's `Idempotency-Key`).

use chrono::{DateTime, Duration, Utc};

use crate::clocks::ClockView;
use crate::config::WatchdogSettings;
use crate::domain::{EmailAddress, PhoneNumber};

/// A bad watchdog setting: which one and why.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PlanError {
    pub field: &'static str,
    pub reason: String,
}

/// Someone the watchdog tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contact {
    Email(EmailAddress),
    Phone(PhoneNumber),
}

impl Contact {
    pub fn address(&self) -> &str {
        match self {
            Contact::Email(e) => e.as_str(),
            Contact::Phone(p) => p.as_str(),
        }
    }
    pub fn channel(&self) -> &'static str {
        match self {
            Contact::Email(_) => "email",
            Contact::Phone(_) => "sms",
        }
    }
}

/// The watchdog's settings, parsed.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Reminder points, largest first: (`2h`, two hours).
    pub remind_before: Vec<(String, Duration)>,
    pub responders: Vec<Contact>,
    pub escalation: Vec<Contact>,
}

fn contacts(field: &'static str, text: &str) -> Result<Vec<Contact>, PlanError> {
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            if t.starts_with('+') {
                t.parse().map(Contact::Phone)
            } else {
                t.parse().map(Contact::Email)
            }
            .map_err(|e: crate::domain::FieldError| PlanError {
                field,
                reason: format!("'{t}': {}", e.reason),
            })
        })
        .collect()
}

impl Plan {
    pub fn from_settings(s: &WatchdogSettings) -> Result<Self, PlanError> {
        let mut remind_before = Vec::new();
        for t in s.remind_before.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let bad = || PlanError {
                field: "watchdog.remind_before",
                reason: format!("'{t}' is not a duration like 2h or 30m"),
            };
            let (n, unit) = t.split_at(t.len().saturating_sub(1));
            let n: i64 = n.parse().map_err(|_| bad())?;
            let d = match unit {
                "h" if n > 0 => Duration::hours(n),
                "m" if n > 0 => Duration::minutes(n),
                _ => return Err(bad()),
            };
            remind_before.push((t.to_owned(), d));
        }
        remind_before.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
        remind_before.dedup_by_key(|(_, d)| *d);
        Ok(Self {
            remind_before,
            responders: contacts("watchdog.responders", &s.responders)?,
            escalation: contacts("watchdog.escalation", &s.escalation)?,
        })
    }
}

/// What a clock calls for now.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// `before:2h` or `overdue`.
    pub point: String,
    /// Reminder points passed together with this one, recorded as skipped: a watchdog that
    /// first looks 20 minutes before a deadline sends the 30-minute reminder, not also the
    /// two-hour one.
    pub skipped: Vec<String>,
    pub escalate: bool,
}

/// The reminder (or escalation) a running clock calls for at `now`, if any. Which of them
/// were already sent is the store's to say.
pub fn call(clock: &ClockView, plan: &Plan, now: DateTime<Utc>) -> Option<Call> {
    let due = clock.due_at?;
    if !matches!(clock.status, "open" | "overdue") {
        return None;
    }
    if now >= due {
        // Reminders not sent by now never will be: the escalation says more.
        return Some(Call {
            point: "overdue".into(),
            skipped: Vec::new(),
            escalate: true,
        });
    }
    // Points already reached, largest first: the last is the nearest to the deadline.
    let reached: Vec<String> = plan
        .remind_before
        .iter()
        .filter(|(_, d)| now >= due - *d)
        .map(|(l, _)| format!("before:{l}"))
        .collect();
    let (point, skipped) = reached.split_last()?;
    Some(Call {
        point: point.clone(),
        skipped: skipped.to_vec(),
        escalate: false,
    })
}

/// The reminder's words: the same in the email subject and the SMS (no personal data: the
/// incident's reference, the regulator and the deadline).
pub fn text(clock: &ClockView, point: &str, now: DateTime<Utc>) -> String {
    let when = clock.due_local.as_deref().unwrap_or("-");
    let left = clock.due_at.map(|d| (d - now).num_minutes()).unwrap_or(0);
    if point == "overdue" {
        format!(
            "[Tocsin] OVERDUE 已逾期: {} {} ({}) was due {when}, {}h{:02}m ago. File it now: tocsin incidents show {}",
            clock.reference,
            clock.label_en,
            clock.regulator,
            -left / 60,
            -left % 60,
            clock.reference
        )
    } else {
        format!(
            "[Tocsin] 提醒 Reminder: {} {} ({}) is due {when}, {}h{:02}m left.",
            clock.reference,
            clock.label_en,
            clock.regulator,
            left / 60,
            left % 60
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::parse_ts;

    fn plan(before: &str) -> Plan {
        Plan::from_settings(&WatchdogSettings {
            schedule: "0 * * * * *".into(),
            remind_before: before.into(),
            responders: "duty@example.com, +8613800000001".into(),
            escalation: "ciso@example.com".into(),
        })
        .expect("plan")
    }

    fn clock(due: &str) -> ClockView {
        let due = parse_ts(due).expect("due");
        ClockView {
            incident_id: "inc_1".into(),
            reference: "INC-2026-0001".into(),
            regulator: "cn-cac".into(),
            regulator_name: "CAC".into(),
            stage: "initial",
            label_en: "initial report".into(),
            label_zh: "初报".into(),
            from: "aware",
            period: "4h".into(),
            started_at: Some(due - Duration::hours(4)),
            due_at: Some(due),
            due_local: Some("2026-11-28 15:45 Asia/Shanghai".into()),
            time_zone: "Asia/Shanghai",
            minutes_left: None,
            status: "open",
            filed_at: None,
            calendar_assumed: false,
        }
    }

    #[test]
    fn settings_parse_and_bad_ones_name_the_field() {
        let p = plan("30m, 2h");
        assert_eq!(
            p.remind_before.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>(),
            ["2h", "30m"]
        );
        assert_eq!(p.responders.len(), 2);
        assert_eq!(p.responders[1].channel(), "sms");
        for (before, responders, field) in [
            ("2 hours", "", "watchdog.remind_before"),
            ("0m", "", "watchdog.remind_before"),
            ("2h", "not-an-address", "watchdog.responders"),
            ("2h", "+86", "watchdog.responders"),
        ] {
            let e = Plan::from_settings(&WatchdogSettings {
                schedule: String::new(),
                remind_before: before.into(),
                responders: responders.into(),
                escalation: String::new(),
            })
            .expect_err(before);
            assert_eq!(e.field, field, "{before} {responders}: {e}");
        }
    }

    #[test]
    fn the_nearest_point_reached_is_called_and_the_ones_passed_with_it_skipped() {
        let p = plan("2h,30m");
        let c = clock("2026-11-28T07:45:00Z");
        let at = |t: &str| parse_ts(t).expect("now");
        assert_eq!(call(&c, &p, at("2026-11-28T05:44:59Z")), None);
        let two = call(&c, &p, at("2026-11-28T05:45:00Z")).expect("2h point");
        assert_eq!(
            (two.point.as_str(), two.skipped.len(), two.escalate),
            ("before:2h", 0, false)
        );
        let late_start = call(&c, &p, at("2026-11-28T07:20:00Z")).expect("30m point");
        assert_eq!(late_start.point, "before:30m");
        assert_eq!(late_start.skipped, ["before:2h"]);
        let overdue = call(&c, &p, at("2026-11-28T07:45:00Z")).expect("overdue");
        assert!(overdue.escalate);
        assert_eq!(overdue.point, "overdue");
        let filed = ClockView {
            status: "filed",
            ..c.clone()
        };
        assert_eq!(call(&filed, &p, at("2026-11-28T07:50:00Z")), None);
        let words = text(&c, "before:2h", at("2026-11-28T05:50:00Z"));
        assert!(
            words.contains("INC-2026-0001") && words.contains("1h55m left"),
            "{words}"
        );
    }
}
