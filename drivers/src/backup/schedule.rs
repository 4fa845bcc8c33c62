//! Cron schedules in a time zone: next fire times (DST-correct via croner) and catch-up after
//! downtime (missed runs are run once, not once per missed occurrence).

use std::path::Path;

use chrono::{DateTime, Utc};
pub use chrono_tz::Tz;
use croner::Cron;
use stead_schema::kinds::BackupScheduleSpec;

use super::BackupError;

/// The host's local time zone as an IANA zone: `$TZ`, else `/etc/timezone`, else the target of
/// the `/etc/localtime` symlink, else UTC.
pub fn host_zone() -> Tz {
    let from_name = |s: &str| s.trim().trim_start_matches(':').parse::<Tz>().ok();
    if let Some(tz) = std::env::var("TZ").ok().as_deref().and_then(from_name) {
        return tz;
    }
    if let Some(tz) = std::fs::read_to_string("/etc/timezone")
        .ok()
        .as_deref()
        .and_then(from_name)
    {
        return tz;
    }
    if let Ok(target) = std::fs::read_link("/etc/localtime")
        && let Some(tz) = zone_from_zoneinfo_path(&target)
    {
        return tz;
    }
    Tz::UTC
}

fn zone_from_zoneinfo_path(p: &Path) -> Option<Tz> {
    let s = p.to_str()?;
    let idx = s.find("zoneinfo/")?;
    s[idx + "zoneinfo/".len()..].parse().ok()
}

/// What a schedule should do at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Run now. `slot` is the newest scheduled occurrence at or before now (record it as the
    /// last run); `missed` counts the occurrences since the last run that collapse into this one
    /// run (1 = on time), capped at [`MISSED_CAP`].
    Run {
        /// The occurrence this run stands for.
        slot: DateTime<Utc>,
        /// Occurrences since the last run (≥ 1), capped.
        missed: u32,
    },
    /// Nothing to do before this instant.
    Wait(DateTime<Utc>),
    /// The pattern never fires again.
    Never,
}

/// Counting missed occurrences stops here.
pub const MISSED_CAP: u32 = 10_000;

/// A parsed cron pattern bound to a time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
}

impl Schedule {
    /// Parses a 5-field pattern or `@daily`-style alias (day-of-month OR day-of-week, as cron).
    pub fn parse(pattern: &str, tz: Tz) -> Result<Self, BackupError> {
        let spec: stead_schema::values::CronSpec = pattern
            .parse()
            .map_err(|e| BackupError::Schedule(format!("{e}")))?;
        Self::from_spec(&spec, tz)
    }

    fn from_spec(spec: &stead_schema::values::CronSpec, tz: Tz) -> Result<Self, BackupError> {
        let cron = spec
            .pattern()
            .map_err(|e| BackupError::Schedule(format!("{e}")))?;
        Ok(Schedule { cron, tz })
    }

    /// The schedule of a `BackupSchedule` spec, in its time zone (default: host local).
    pub fn for_spec(spec: &BackupScheduleSpec) -> Result<Self, BackupError> {
        let tz = spec
            .timezone
            .as_ref()
            .map(|t| t.0)
            .unwrap_or_else(host_zone);
        Self::from_spec(&spec.schedule, tz)
    }

    /// The zone the pattern is evaluated in.
    pub fn zone(&self) -> Tz {
        self.tz
    }

    /// The first occurrence strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The newest occurrence at or before `t`.
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.tz), true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// Occurrences strictly after `t`, in order.
    pub fn iter_after(&self, t: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        let mut cur = t;
        std::iter::from_fn(move || {
            let n = self.next_after(cur)?;
            cur = n;
            Some(n)
        })
    }

    /// Decides whether to run at `now`, given the slot of the last run (`None`: never ran;
    /// then the schedule starts counting at `now` and waits for its next occurrence, as cron).
    ///
    /// However long the downtime, at most one run is due: its slot is the newest occurrence at
    /// or before `now`, and recording that slot makes the next call wait for the next one.
    pub fn due(&self, last_slot: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Due {
        let Some(last) = last_slot else {
            return self.next_after(now).map_or(Due::Never, Due::Wait);
        };
        let Some(first) = self.next_after(last) else {
            return Due::Never;
        };
        if first > now {
            return Due::Wait(first);
        }
        let slot = self.latest_at_or_before(now).unwrap_or(first).max(first);
        let missed = self
            .iter_after(last)
            .take_while(|t| *t <= now)
            .take(MISSED_CAP as usize)
            .count() as u32;
        Due::Run {
            slot,
            missed: missed.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(s: &str) -> DateTime<Utc> {
        match DateTime::parse_from_rfc3339(s) {
            Ok(t) => t.with_timezone(&Utc),
            Err(e) => panic!("bad test timestamp {s}: {e}"),
        }
    }

    fn sched(p: &str, tz: Tz) -> Schedule {
        match Schedule::parse(p, tz) {
            Ok(s) => s,
            Err(e) => panic!("{p}: {e}"),
        }
    }

    fn next_n(s: &Schedule, from: &str, n: usize) -> Vec<String> {
        s.iter_after(utc(from))
            .take(n)
            .map(|t| t.with_timezone(&s.zone()).to_rfc3339())
            .collect()
    }

    #[test]
    fn basic_patterns_utc() {
        let s = sched("0 2 * * *", Tz::UTC);
        assert_eq!(
            next_n(&s, "2025-01-01T02:00:00Z", 2),
            ["2025-01-02T02:00:00+00:00", "2025-01-03T02:00:00+00:00"]
        );
        let s = sched("*/15 * * * 1-5", Tz::UTC);
        // 2025-01-03 is a Friday: next after Fri 23:50 is Monday 00:00
        assert_eq!(
            next_n(&s, "2025-01-03T23:50:00Z", 1),
            ["2025-01-06T00:00:00+00:00"]
        );
        let s = sched("@daily", Tz::UTC);
        assert_eq!(
            next_n(&s, "2025-01-01T00:00:00Z", 1),
            ["2025-01-02T00:00:00+00:00"]
        );
        let s = sched("@hourly", Tz::UTC);
        assert_eq!(
            next_n(&s, "2025-01-01T00:59:59Z", 1),
            ["2025-01-01T01:00:00+00:00"]
        );
        let s = sched("@weekly", Tz::UTC);
        // weekly = Sunday midnight
        assert_eq!(
            next_n(&s, "2025-01-01T00:00:00Z", 1),
            ["2025-01-05T00:00:00+00:00"]
        );
        let s = sched("@monthly", Tz::UTC);
        assert_eq!(
            next_n(&s, "2025-01-15T00:00:00Z", 1),
            ["2025-02-01T00:00:00+00:00"]
        );
        let s = sched("@yearly", Tz::UTC);
        assert_eq!(
            next_n(&s, "2025-01-15T00:00:00Z", 1),
            ["2026-01-01T00:00:00+00:00"]
        );
        assert!(Schedule::parse("0 2 * *", Tz::UTC).is_err());
    }

    #[test]
    fn dom_or_dow_like_cron() {
        // Vixie cron: both restricted → either matches. 1st of month OR any Monday.
        let s = sched("0 0 1 * 1", Tz::UTC);
        assert_eq!(
            next_n(&s, "2025-01-01T00:00:00Z", 3),
            [
                "2025-01-06T00:00:00+00:00",
                "2025-01-13T00:00:00+00:00",
                "2025-01-20T00:00:00+00:00"
            ]
        );
        assert_eq!(
            next_n(&s, "2025-01-27T00:00:00Z", 1),
            ["2025-02-01T00:00:00+00:00"]
        );
    }

    #[test]
    fn time_zone_is_applied() {
        let s = sched("0 2 * * *", Tz::Europe__Berlin);
        // 02:00 CET = 01:00Z in winter, 02:00 CEST = 00:00Z in summer
        assert_eq!(
            s.next_after(utc("2025-01-10T00:00:00Z")),
            Some(utc("2025-01-10T01:00:00Z"))
        );
        assert_eq!(
            s.next_after(utc("2025-07-10T01:00:00Z")),
            Some(utc("2025-07-11T00:00:00Z"))
        );
    }

    #[test]
    fn dst_spring_forward_berlin_skipped_hour_runs_once() {
        // 2025-03-30: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
        let s = sched("30 2 * * *", Tz::Europe__Berlin);
        let runs = next_n(&s, "2025-03-29T12:00:00Z", 3);
        assert_eq!(
            runs,
            [
                "2025-03-30T03:00:00+02:00", // carried to the first instant after the gap
                "2025-03-31T02:30:00+02:00",
                "2025-04-01T02:30:00+02:00"
            ]
        );
        // An hourly job loses the 02:xx hour and does not double the 03:xx hour.
        let s = sched("15 * * * *", Tz::Europe__Berlin);
        let runs = next_n(&s, "2025-03-30T00:00:00+01:00", 3);
        assert_eq!(
            runs,
            [
                "2025-03-30T00:15:00+01:00",
                "2025-03-30T01:15:00+01:00",
                "2025-03-30T03:15:00+02:00"
            ]
        );
    }

    #[test]
    fn dst_fall_back_berlin_no_double_run() {
        // 2025-10-26: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice.
        let s = sched("30 2 * * *", Tz::Europe__Berlin);
        let runs = next_n(&s, "2025-10-25T12:00:00Z", 3);
        assert_eq!(
            runs,
            [
                "2025-10-26T02:30:00+02:00",
                "2025-10-27T02:30:00+01:00",
                "2025-10-28T02:30:00+01:00"
            ]
        );
        // Starting between the two 02:30s (02:45 CEST) must not give the second 02:30 CET.
        let runs = next_n(&s, "2025-10-26T00:45:00Z", 1);
        assert_eq!(runs, ["2025-10-27T02:30:00+01:00"]);
    }

    #[test]
    fn dst_new_york_both_transitions() {
        let s = sched("30 2 * * *", Tz::America__New_York);
        // 2025-03-09 02:00 EST → 03:00 EDT: the 02:30 run moves to 03:00 EDT, once.
        assert_eq!(
            next_n(&s, "2025-03-08T12:00:00Z", 2),
            ["2025-03-09T03:00:00-04:00", "2025-03-10T02:30:00-04:00"]
        );
        // 2025-11-02 02:00 EDT → 01:00 EST: 01:30 happens twice, a 01:30 job runs once.
        let s = sched("30 1 * * *", Tz::America__New_York);
        assert_eq!(
            next_n(&s, "2025-11-01T12:00:00Z", 2),
            ["2025-11-02T01:30:00-04:00", "2025-11-03T01:30:00-05:00"]
        );
    }

    #[test]
    fn missed_runs_after_downtime_run_once() {
        let s = sched("0 2 * * *", Tz::UTC);
        let last = utc("2025-01-06T02:00:00Z");
        // Down from Monday 02:00 until Thursday 10:00: three occurrences missed, one run due.
        let now = utc("2025-01-09T10:00:00Z");
        assert_eq!(
            s.due(Some(last), now),
            Due::Run {
                slot: utc("2025-01-09T02:00:00Z"),
                missed: 3
            }
        );
        // Once that run is recorded, the next is Friday 02:00.
        assert_eq!(
            s.due(Some(utc("2025-01-09T02:00:00Z")), now),
            Due::Wait(utc("2025-01-10T02:00:00Z"))
        );
        // On time.
        assert_eq!(
            s.due(Some(last), utc("2025-01-07T02:00:00Z")),
            Due::Run {
                slot: utc("2025-01-07T02:00:00Z"),
                missed: 1
            }
        );
        // Never ran: wait for the next occurrence.
        assert_eq!(s.due(None, now), Due::Wait(utc("2025-01-10T02:00:00Z")));
    }

    #[test]
    fn missed_runs_count_is_capped() {
        let s = sched("* * * * *", Tz::UTC);
        let last = Tz::UTC
            .with_ymd_and_hms(2020, 1, 1, 0, 0, 0)
            .single()
            .map(|t| t.to_utc());
        let now = utc("2025-01-01T00:00:30Z");
        match s.due(last, now) {
            Due::Run { slot, missed } => {
                assert_eq!(slot, utc("2025-01-01T00:00:00Z"));
                assert_eq!(missed, MISSED_CAP);
            }
            other => panic!("expected a run, got {other:?}"),
        }
    }

    #[test]
    fn zoneinfo_path_parses() {
        assert_eq!(
            zone_from_zoneinfo_path(Path::new("/usr/share/zoneinfo/Europe/Berlin")),
            Some(Tz::Europe__Berlin)
        );
        assert_eq!(zone_from_zoneinfo_path(Path::new("/etc/foo")), None);
    }
}
