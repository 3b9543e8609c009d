//! When a scheduled job runs: five-field cron expressions in a named time
//! zone, as a job's `schedule: { cron: "0 2 * * *", timezone: Europe/Berlin }`
//! says.
//!
//! The expression is Vixie cron's: minute (0-59), hour (0-23), day of the
//! month (1-31), month (1-12 or `jan`-`dec`), day of the week (0-7, 0 and 7
//! Sunday, or `sun`-`sat`); each field `*`, a value, a range `a-b`, a list
//! `a,b`, and steps `*/n` or `a-b/n` (`a/n`: from a to the end); `@hourly`,
//! `@daily` (`@midnight`), `@weekly`, `@monthly`, `@yearly` (`@annually`).
//! When both day fields are restricted, a day matching either runs, as in
//! cron. Times are civil times in the zone (the tz database is built in):
//! a time skipped by a daylight-saving jump runs at the same offset after
//! the jump (02:30 in a spring-forward gap runs at 03:30), and a time that
//! happens twice runs once, the first time.
//!
//! A leaf: it knows nothing of jobs, specs or the controller.

use std::fmt;

use jiff::Timestamp;
use jiff::civil::{self, DateTime};
use jiff::tz::TimeZone;

/// A parsed cron expression: for each field, the values it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days_of_month: u32,
    months: u16,
    days_of_week: u8,
    /// Whether the day-of-month and day-of-week fields were `*` (cron's
    /// "either day field" rule applies only when both are restricted).
    dom_any: bool,
    dow_any: bool,
}

/// What is wrong with an expression, and in which field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronError(pub String);

impl fmt::Display for CronError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CronError {}

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
    },
    Field {
        name: "day of the month",
        min: 1,
        max: 31,
        names: &[],
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
        names: &[
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ],
    },
    Field {
        name: "day of the week",
        min: 0,
        max: 7,
        names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
    },
];

impl Cron {
    /// Parse an expression; the error names the field and what is wrong.
    pub fn parse(text: &str) -> Result<Cron, CronError> {
        let text = text.trim();
        let expanded = match text.to_ascii_lowercase().as_str() {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            "@yearly" | "@annually" => "0 0 1 1 *",
            other if other.starts_with('@') => {
                return Err(CronError(format!(
                    "unknown macro `{text}`: use @hourly, @daily, @weekly, @monthly or @yearly"
                )));
            }
            _ => text,
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(CronError(format!(
                "a cron expression has 5 fields (minute hour day-of-month month day-of-week), \
                 `{text}` has {}",
                parts.len()
            )));
        }
        let mut sets = [0u64; 5];
        for (i, (part, field)) in parts.iter().zip(FIELDS.iter()).enumerate() {
            sets[i] = parse_field(part, field)?;
        }
        // Sunday is 0 and 7.
        let mut dow = sets[4];
        if dow & (1 << 7) != 0 {
            dow |= 1;
        }
        Ok(Cron {
            minutes: sets[0],
            hours: sets[1] as u32,
            days_of_month: sets[2] as u32,
            months: sets[3] as u16,
            days_of_week: (dow & 0x7f) as u8,
            dom_any: parts[2] == "*",
            dow_any: parts[4] == "*",
        })
    }

    fn day_matches(&self, dt: DateTime) -> bool {
        let dom = self.days_of_month & (1 << dt.day()) != 0;
        let dow = self.days_of_week & (1 << dt.weekday().to_sunday_zero_offset()) != 0;
        match (self.dom_any, self.dow_any) {
            (true, true) => true,
            (true, false) => dow,
            (false, true) => dom,
            (false, false) => dom || dow,
        }
    }

    /// The first time after `after` (unix seconds) the expression names in
    /// `zone`, as unix seconds; `None` when none comes within eight years
    /// (`0 0 30 2 *`: February has no 30th).
    pub fn next_after(&self, after: i64, zone: &TimeZone) -> Option<i64> {
        let start = Timestamp::from_second(after).ok()?;
        let now = start.to_zoned_datetime(zone.clone()).datetime();
        // The next whole minute of civil time after `after`.
        let mut t = civil::date(now.year(), now.month(), now.day())
            .at(now.hour(), now.minute(), 0, 0)
            .checked_add(jiff::SignedDuration::from_mins(1))
            .ok()?;
        let limit = now.year() + 8;
        while t.year() <= limit {
            if self.months & (1 << t.month()) == 0 {
                t = t
                    .date()
                    .first_of_month()
                    .checked_add(jiff::Span::new().months(1))
                    .ok()?
                    .at(0, 0, 0, 0);
                continue;
            }
            if !self.day_matches(t) {
                t = t.date().tomorrow().ok()?.at(0, 0, 0, 0);
                continue;
            }
            if self.hours & (1 << t.hour()) == 0 {
                t = t
                    .date()
                    .at(t.hour(), 0, 0, 0)
                    .checked_add(jiff::SignedDuration::from_hours(1))
                    .ok()?;
                continue;
            }
            if self.minutes & (1 << t.minute()) == 0 {
                t = t.checked_add(jiff::SignedDuration::from_mins(1)).ok()?;
                continue;
            }
            // Gaps run after the jump, folds once (the earlier time).
            let at = zone
                .to_ambiguous_timestamp(t)
                .compatible()
                .ok()?
                .as_second();
            if at > after {
                return Some(at);
            }
            t = t.checked_add(jiff::SignedDuration::from_mins(1)).ok()?;
        }
        None
    }
}

/// The bits of the values one field allows.
fn parse_field(text: &str, field: &Field) -> Result<u64, CronError> {
    let bad = |why: String| CronError(format!("{} field `{text}`: {why}", field.name));
    let mut set = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let step: u32 =
                    s.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                        bad(format!("the step `{s}` is not a whole number above 0"))
                    })?;
                (r, step)
            }
            None => (item, 1),
        };
        let (low, high) = if range == "*" {
            (field.min, field.max)
        } else if let Some((a, b)) = range.split_once('-') {
            (
                value(a, field).map_err(&bad)?,
                value(b, field).map_err(&bad)?,
            )
        } else {
            let v = value(range, field).map_err(&bad)?;
            // `a/n` runs from a to the end of the field.
            (v, if item.contains('/') { field.max } else { v })
        };
        if low > high {
            return Err(bad(format!("the range {low}-{high} runs backwards")));
        }
        let mut v = low;
        while v <= high {
            set |= 1 << v;
            v += step;
        }
    }
    Ok(set)
}

fn value(text: &str, field: &Field) -> Result<u32, String> {
    let lower = text.to_ascii_lowercase();
    if let Some(i) = field.names.iter().position(|n| *n == lower) {
        return Ok(i as u32 + if field.min == 1 { 1 } else { 0 });
    }
    match text.parse::<u32>() {
        Ok(v) if (field.min..=field.max).contains(&v) => Ok(v),
        Ok(v) => Err(format!("{v} is outside {}-{}", field.min, field.max)),
        Err(_) if text.is_empty() => Err("a value is missing".to_string()),
        Err(_) => Err(format!(
            "`{text}` is not a number{}",
            if field.names.is_empty() {
                String::new()
            } else {
                format!(" or a name ({})", field.names.join(", "))
            }
        )),
    }
}

/// The zone a schedule's `timezone` names (an IANA name such as
/// `Europe/Berlin`, or `UTC`).
pub fn zone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name).map_err(|_| {
        format!("unknown time zone `{name}`: use an IANA name such as `UTC` or `Europe/Berlin`")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(zone: &str, y: i16, mo: i8, d: i8, h: i8, mi: i8) -> i64 {
        let tz = super::zone(zone).expect("zone");
        tz.to_ambiguous_timestamp(civil::date(y, mo, d).at(h, mi, 0, 0))
            .compatible()
            .expect("time")
            .as_second()
    }

    fn next(expr: &str, zone: &str, after: i64) -> i64 {
        Cron::parse(expr)
            .expect("parses")
            .next_after(after, &super::zone(zone).expect("zone"))
            .expect("a next time")
    }

    #[test]
    fn daily_at_two_in_berlin_is_one_in_utc_in_winter_and_midnight_in_summer() {
        let winter = at("UTC", 2026, 12, 2, 6, 0);
        assert_eq!(
            next("0 2 * * *", "Europe/Berlin", winter),
            at("UTC", 2026, 12, 3, 1, 0)
        );
        let summer = at("UTC", 2026, 7, 1, 6, 0);
        assert_eq!(
            next("0 2 * * *", "Europe/Berlin", summer),
            at("UTC", 2026, 7, 2, 0, 0)
        );
    }

    #[test]
    fn the_next_time_is_strictly_after_and_steps_lists_and_names_work() {
        let t = at("UTC", 2026, 1, 1, 0, 0);
        assert_eq!(next("0 0 * * *", "UTC", t), at("UTC", 2026, 1, 2, 0, 0));
        assert_eq!(
            next("*/15 * * * *", "UTC", t + 60),
            at("UTC", 2026, 1, 1, 0, 15)
        );
        assert_eq!(
            next("5,35 9-17/4 * * *", "UTC", t),
            at("UTC", 2026, 1, 1, 9, 5)
        );
        // 2026-01-01 is a Thursday: the first Monday is the 5th.
        assert_eq!(next("30 8 * * mon", "UTC", t), at("UTC", 2026, 1, 5, 8, 30));
        assert_eq!(next("0 0 1 jun *", "UTC", t), at("UTC", 2026, 6, 1, 0, 0));
        assert_eq!(next("@monthly", "UTC", t), at("UTC", 2026, 2, 1, 0, 0));
        // Sunday is 0 and 7.
        assert_eq!(next("0 0 * * 7", "UTC", t), next("0 0 * * 0", "UTC", t));
        // Both day fields restricted: either matches (the 13th, or a Friday).
        assert_eq!(next("0 0 13 * fri", "UTC", t), at("UTC", 2026, 1, 2, 0, 0));
        // Leap day.
        assert_eq!(next("0 0 29 2 *", "UTC", t), at("UTC", 2028, 2, 29, 0, 0));
        assert_eq!(
            Cron::parse("0 0 30 2 *")
                .expect("parses")
                .next_after(t, &zone("UTC").expect("utc")),
            None
        );
    }

    #[test]
    fn a_time_in_a_dst_gap_runs_after_the_jump_and_one_in_a_fold_runs_once() {
        // 2026-03-29 02:30 does not exist in Berlin (02:00 -> 03:00).
        let before = at("UTC", 2026, 3, 28, 12, 0);
        let gap = next("30 2 * * *", "Europe/Berlin", before);
        assert_eq!(gap, at("UTC", 2026, 3, 29, 1, 30)); // 03:30 CEST
        // 2026-10-25 02:30 happens twice in Berlin: it runs the first time only.
        let before = at("UTC", 2026, 10, 24, 12, 0);
        let first = next("30 2 * * *", "Europe/Berlin", before);
        assert_eq!(first, at("UTC", 2026, 10, 25, 0, 30)); // 02:30 CEST
        let again = next("30 2 * * *", "Europe/Berlin", first);
        assert_eq!(again, at("UTC", 2026, 10, 26, 1, 30)); // the next day, CET
    }

    #[test]
    fn bad_expressions_say_which_field_and_why() {
        let err = |e: &str| Cron::parse(e).expect_err("refused").to_string();
        assert!(err("0 2 * *").contains("has 4"), "{}", err("0 2 * *"));
        assert!(err("60 * * * *").contains("minute field `60`: 60 is outside 0-59"));
        assert!(err("0 25 * * *").contains("hour field"));
        assert!(err("0 0 0 * *").contains("day of the month field `0`: 0 is outside 1-31"));
        assert!(err("0 0 * foo *").contains("month field `foo`: `foo` is not a number or a name"));
        assert!(err("*/0 * * * *").contains("the step `0`"));
        assert!(err("0 5-1 * * *").contains("runs backwards"));
        assert!(err("@often").contains("unknown macro"));
        assert!(zone("Mars/Olympus").is_err());
        assert!(zone("Europe/Berlin").is_ok());
        assert!(zone("UTC").is_ok());
    }
}
