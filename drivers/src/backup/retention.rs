//! Proxmox VE / Proxmox Backup Server prune semantics (pure).
//!
//! Rules run in the order `last`, `hourly`, `daily`, `weekly`, `monthly`, `yearly`. Each rule
//! walks the backups newest first. It skips backups an earlier rule already marked (kept *or*
//! removed) and backups whose period already holds a backup kept by an earlier rule. For every
//! other backup it computes the period; the first (newest) backup of a period not seen yet is
//! kept, until the rule has `N` periods — then the rule stops. Later backups of a period the rule
//! has already taken are marked for removal, which also hides them from later rules. Whatever
//! no rule keeps is removed. With no rule at all (all absent or zero) everything is kept.
//!
//! Periods are computed in a time zone: hour, day, ISO-8601 week (Monday start, ISO week-year),
//! month and year; `last` treats every backup as its own period.

use std::collections::HashSet;
use std::fmt;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use stead_schema::kinds::Retention;

/// A prune rule, in the order the rules are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// `keepLast`.
    Last,
    /// `keepHourly`.
    Hourly,
    /// `keepDaily`.
    Daily,
    /// `keepWeekly`.
    Weekly,
    /// `keepMonthly`.
    Monthly,
    /// `keepYearly`.
    Yearly,
    /// No rule is configured: everything is kept.
    All,
}

impl Rule {
    /// The rules in application order (without [`Rule::All`]).
    pub const ORDER: [Rule; 6] = [
        Rule::Last,
        Rule::Hourly,
        Rule::Daily,
        Rule::Weekly,
        Rule::Monthly,
        Rule::Yearly,
    ];

    /// The name used in CLI output (`keep-last`, …).
    pub fn name(self) -> &'static str {
        match self {
            Rule::Last => "keep-last",
            Rule::Hourly => "keep-hourly",
            Rule::Daily => "keep-daily",
            Rule::Weekly => "keep-weekly",
            Rule::Monthly => "keep-monthly",
            Rule::Yearly => "keep-yearly",
            Rule::All => "keep-all",
        }
    }

    fn count(self, r: &Retention) -> u32 {
        match self {
            Rule::Last => r.keep_last,
            Rule::Hourly => r.keep_hourly,
            Rule::Daily => r.keep_daily,
            Rule::Weekly => r.keep_weekly,
            Rule::Monthly => r.keep_monthly,
            Rule::Yearly => r.keep_yearly,
            Rule::All => None,
        }
        .unwrap_or(0)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// True when at least one rule keeps something (otherwise pruning keeps everything).
pub fn has_rules(r: &Retention) -> bool {
    Rule::ORDER.iter().any(|rule| rule.count(r) > 0)
}

/// The decision for one backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Kept by this rule.
    Keep(Rule),
    /// To be removed.
    Remove,
}

impl Mark {
    /// True for [`Mark::Keep`].
    pub fn is_keep(self) -> bool {
        matches!(self, Mark::Keep(_))
    }
}

/// One backup with its decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Index of the backup in the input slice.
    pub index: usize,
    /// Its time.
    pub time: DateTime<Utc>,
    /// Keep or remove.
    pub mark: Mark,
}

/// Period key of a backup for a rule. `index` makes every backup its own period for `last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Period {
    Own(usize),
    Hour(i32, u32, u32, u32),
    Day(i32, u32, u32),
    IsoWeek(i32, u32),
    Month(i32, u32),
    Year(i32),
}

fn period<Z: TimeZone>(rule: Rule, index: usize, t: &DateTime<Utc>, tz: &Z) -> Period {
    let l = t.with_timezone(tz);
    match rule {
        Rule::Last | Rule::All => Period::Own(index),
        Rule::Hourly => Period::Hour(l.year(), l.month(), l.day(), l.hour()),
        Rule::Daily => Period::Day(l.year(), l.month(), l.day()),
        Rule::Weekly => {
            let w = l.iso_week();
            Period::IsoWeek(w.year(), w.week())
        }
        Rule::Monthly => Period::Month(l.year(), l.month()),
        Rule::Yearly => Period::Year(l.year()),
    }
}

/// Computes keep/remove for `times` under `retention`, with periods in `tz`.
///
/// Returns one [`Decision`] per input, sorted newest first (ties keep input order).
pub fn compute<Z: TimeZone>(
    times: &[DateTime<Utc>],
    retention: &Retention,
    tz: &Z,
) -> Vec<Decision> {
    let mut order: Vec<usize> = (0..times.len()).collect();
    order.sort_by(|&a, &b| times[b].cmp(&times[a]));

    if !has_rules(retention) {
        return order
            .into_iter()
            .map(|i| Decision {
                index: i,
                time: times[i],
                mark: Mark::Keep(Rule::All),
            })
            .collect();
    }

    // marks[pos] for the backup at position pos of `order`.
    let mut marks: Vec<Option<Mark>> = vec![None; order.len()];
    for rule in Rule::ORDER {
        let keep = rule.count(retention) as usize;
        if keep == 0 {
            continue;
        }
        let key = |pos: usize| period(rule, order[pos], &times[order[pos]], tz);
        // Periods already holding a backup kept by an earlier rule.
        let already: HashSet<Period> = (0..order.len())
            .filter(|&pos| matches!(marks[pos], Some(Mark::Keep(_))))
            .map(key)
            .collect();
        let mut taken: HashSet<Period> = HashSet::new();
        for (pos, mark) in marks.iter_mut().enumerate() {
            if mark.is_some() {
                continue;
            }
            let p = key(pos);
            if already.contains(&p) {
                continue;
            }
            if taken.contains(&p) {
                *mark = Some(Mark::Remove);
            } else {
                if taken.len() >= keep {
                    break;
                }
                taken.insert(p);
                *mark = Some(Mark::Keep(rule));
            }
        }
    }

    order
        .into_iter()
        .zip(marks)
        .map(|(i, m)| Decision {
            index: i,
            time: times[i],
            mark: m.unwrap_or(Mark::Remove),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::Tz;

    fn ts(s: &str) -> DateTime<Utc> {
        match DateTime::parse_from_rfc3339(s) {
            Ok(t) => t.with_timezone(&Utc),
            Err(e) => panic!("bad test timestamp {s}: {e}"),
        }
    }

    fn ret(l: u32, h: u32, d: u32, w: u32, m: u32, y: u32) -> Retention {
        let o = |n: u32| (n > 0).then_some(n);
        Retention {
            keep_last: o(l),
            keep_hourly: o(h),
            keep_daily: o(d),
            keep_weekly: o(w),
            keep_monthly: o(m),
            keep_yearly: o(y),
        }
    }

    /// Kept timestamps (input order preserved: oldest first as given) for `times` in zone `tz`.
    fn kept(times: &[&str], r: Retention, tz: Tz) -> Vec<String> {
        let parsed: Vec<_> = times.iter().map(|s| ts(s)).collect();
        let mut d = compute(&parsed, &r, &tz);
        d.retain(|d| d.mark.is_keep());
        d.sort_by_key(|d| d.index);
        d.into_iter().map(|d| times[d.index].to_string()).collect()
    }

    const SIMPLE: [&str; 4] = [
        "2019-12-02T11:59:15Z",
        "2019-12-03T11:59:15Z",
        "2019-12-04T11:59:15Z",
        "2019-12-04T12:59:15Z",
    ];
    const SIMPLE2: [&str; 9] = [
        "2018-11-15T11:59:15Z",
        "2019-11-15T11:59:15Z",
        "2019-11-21T11:59:15Z",
        "2019-11-22T11:59:15Z",
        "2019-11-29T11:59:15Z",
        "2019-12-01T11:59:15Z",
        "2019-12-02T11:59:15Z",
        "2019-12-03T11:59:15Z",
        "2019-12-04T11:59:15Z",
    ];
    const HOURLY: [&str; 6] = [
        "2019-11-15T09:39:15Z",
        "2019-11-15T10:49:15Z",
        "2019-11-15T10:59:15Z",
        "2019-11-15T11:39:15Z",
        "2019-11-15T11:49:15Z",
        "2019-11-15T11:59:15Z",
    ];

    #[test]
    fn retention_table() {
        let utc = Tz::UTC;
        let berlin: Tz = Tz::Europe__Berlin;
        let ny: Tz = Tz::America__New_York;
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, &[&str], Retention, Tz, &[&str])> = vec![
            // keep-last alone
            ("last 4 of 4", &SIMPLE, ret(4, 0, 0, 0, 0, 0), utc, &SIMPLE),
            ("last 3", &SIMPLE, ret(3, 0, 0, 0, 0, 0), utc, &SIMPLE[1..]),
            ("last 1", &SIMPLE, ret(1, 0, 0, 0, 0, 0), utc, &SIMPLE[3..]),
            (
                "last 10 of 4",
                &SIMPLE,
                ret(10, 0, 0, 0, 0, 0),
                utc,
                &SIMPLE,
            ),
            // no rule at all keeps everything (zero is "off")
            ("no rules", &SIMPLE, ret(0, 0, 0, 0, 0, 0), utc, &SIMPLE),
            // daily alone: several backups in one day keep only the newest of that day
            (
                "daily 3",
                &SIMPLE,
                ret(0, 0, 3, 0, 0, 0),
                utc,
                &[SIMPLE[0], SIMPLE[1], SIMPLE[3]],
            ),
            (
                "daily 2",
                &SIMPLE,
                ret(0, 0, 2, 0, 0, 0),
                utc,
                &[SIMPLE[1], SIMPLE[3]],
            ),
            (
                "daily 1 of many days",
                &SIMPLE2,
                ret(0, 0, 1, 0, 0, 0),
                utc,
                &[SIMPLE2[8]],
            ),
            // last + daily: keep-last takes the two newest, daily then skips their day
            ("last2 daily2", &SIMPLE, ret(2, 0, 2, 0, 0, 0), utc, &SIMPLE),
            (
                "last1 daily1",
                &SIMPLE2,
                ret(1, 0, 1, 0, 0, 0),
                utc,
                &SIMPLE2[7..],
            ),
            // weekly alone: all in one ISO week
            (
                "weekly 5 one week",
                &SIMPLE,
                ret(0, 0, 0, 5, 0, 0),
                utc,
                &SIMPLE[3..],
            ),
            // daily + weekly: weekly skips the week the daily rule already covers
            (
                "daily1 weekly5",
                &SIMPLE,
                ret(0, 0, 1, 5, 0, 0),
                utc,
                &SIMPLE[3..],
            ),
            (
                "daily1 weekly1",
                &SIMPLE2,
                ret(0, 0, 1, 1, 0, 0),
                utc,
                &[SIMPLE2[5], SIMPLE2[8]],
            ),
            (
                "daily1 weekly1 monthly1",
                &SIMPLE2,
                ret(0, 0, 1, 1, 1, 0),
                utc,
                &[SIMPLE2[3], SIMPLE2[5], SIMPLE2[8]],
            ),
            // monthly + yearly: yearly skips 2019 (kept by monthly) and takes 2018
            (
                "monthly1 yearly1",
                &SIMPLE2,
                ret(0, 0, 0, 0, 1, 1),
                utc,
                &[SIMPLE2[0], SIMPLE2[8]],
            ),
            (
                "monthly3",
                &SIMPLE2,
                ret(0, 0, 0, 0, 3, 0),
                utc,
                &[SIMPLE2[0], SIMPLE2[4], SIMPLE2[8]],
            ),
            (
                "yearly5",
                &SIMPLE2,
                ret(0, 0, 0, 0, 0, 5),
                utc,
                &[SIMPLE2[0], SIMPLE2[8]],
            ),
            // hourly with several backups per hour
            (
                "hourly 3",
                &HOURLY,
                ret(0, 3, 0, 0, 0, 0),
                utc,
                &[HOURLY[0], HOURLY[2], HOURLY[5]],
            ),
            (
                "hourly 2",
                &HOURLY,
                ret(0, 2, 0, 0, 0, 0),
                utc,
                &[HOURLY[2], HOURLY[5]],
            ),
            // last then hourly: hourly must skip the hour last kept, and the removed-in-hour
            // backups of the hours it takes are not available to later rules
            (
                "last2 hourly1 daily1",
                &HOURLY,
                ret(2, 1, 1, 0, 0, 0),
                utc,
                &[HOURLY[2], HOURLY[4], HOURLY[5]],
            ),
            // ISO week at the year boundary: 2021-01-02 (Sat) belongs to 2020-W53 with
            // 2020-12-28 and 2020-12-31; 2021-01-04 is 2021-W01.
            (
                "iso week 2020/2021",
                &[
                    "2020-12-28T10:00:00Z",
                    "2020-12-31T10:00:00Z",
                    "2021-01-02T10:00:00Z",
                    "2021-01-04T10:00:00Z",
                ],
                ret(0, 0, 0, 3, 0, 0),
                utc,
                &["2021-01-02T10:00:00Z", "2021-01-04T10:00:00Z"],
            ),
            // 2024-12-30 (Mon) is 2025-W01, the same ISO week as 2025-01-05.
            (
                "iso week-year 2025",
                &[
                    "2024-12-29T10:00:00Z",
                    "2024-12-30T10:00:00Z",
                    "2025-01-05T10:00:00Z",
                ],
                ret(0, 0, 0, 2, 0, 0),
                utc,
                &["2024-12-29T10:00:00Z", "2025-01-05T10:00:00Z"],
            ),
            // ... but the yearly rule uses the calendar year
            (
                "calendar year at iso boundary",
                &[
                    "2024-12-29T10:00:00Z",
                    "2024-12-30T10:00:00Z",
                    "2025-01-05T10:00:00Z",
                ],
                ret(0, 0, 0, 0, 0, 2),
                utc,
                &["2024-12-30T10:00:00Z", "2025-01-05T10:00:00Z"],
            ),
            // Time zones: 22:30Z and 23:30Z on Jan 1 are Jan 1 23:30 and Jan 2 00:30 in Berlin.
            (
                "daily utc",
                &["2024-01-01T22:30:00Z", "2024-01-01T23:30:00Z"],
                ret(0, 0, 2, 0, 0, 0),
                utc,
                &["2024-01-01T23:30:00Z"],
            ),
            (
                "daily berlin",
                &["2024-01-01T22:30:00Z", "2024-01-01T23:30:00Z"],
                ret(0, 0, 2, 0, 0, 0),
                berlin,
                &["2024-01-01T22:30:00Z", "2024-01-01T23:30:00Z"],
            ),
            // 2024-03-11 00:30Z is still March 10 (EDT) in New York.
            (
                "daily new york",
                &[
                    "2024-03-10T23:30:00Z",
                    "2024-03-11T00:30:00Z",
                    "2024-03-11T05:00:00Z",
                ],
                ret(0, 0, 2, 0, 0, 0),
                ny,
                &["2024-03-11T00:30:00Z", "2024-03-11T05:00:00Z"],
            ),
            // Sunday 23:30 UTC is Monday in Berlin: a new ISO week there.
            (
                "weekly berlin",
                &["2024-01-07T12:00:00Z", "2024-01-07T23:30:00Z"],
                ret(0, 0, 0, 2, 0, 0),
                berlin,
                &["2024-01-07T12:00:00Z", "2024-01-07T23:30:00Z"],
            ),
            (
                "weekly utc",
                &["2024-01-07T12:00:00Z", "2024-01-07T23:30:00Z"],
                ret(0, 0, 0, 2, 0, 0),
                utc,
                &["2024-01-07T23:30:00Z"],
            ),
            // New Year's Eve in New York is already the new year in UTC.
            (
                "yearly new york",
                &["2023-12-31T20:00:00Z", "2024-01-01T03:00:00Z"],
                ret(0, 0, 0, 0, 0, 2),
                ny,
                &["2024-01-01T03:00:00Z"],
            ),
        ];
        for (name, times, r, tz, expect) in cases {
            let got = kept(times, r, tz);
            let expect: Vec<String> = expect.iter().map(|s| s.to_string()).collect();
            assert_eq!(got, expect, "case {name}");
        }
    }

    #[test]
    fn decisions_are_newest_first_with_rule() {
        let times: Vec<_> = SIMPLE2.iter().map(|s| ts(s)).collect();
        let d = compute(&times, &ret(1, 0, 1, 1, 1, 1), &Tz::UTC);
        let got: Vec<(usize, Mark)> = d.iter().map(|d| (d.index, d.mark)).collect();
        assert_eq!(
            got,
            vec![
                (8, Mark::Keep(Rule::Last)),
                (7, Mark::Keep(Rule::Daily)),
                // weekly: 12-02 shares W49 with the kept 12-03 and 12-04 → skipped, unmarked
                (6, Mark::Remove),
                (5, Mark::Keep(Rule::Weekly)),
                // 11-29 shares W48 with 12-01 that weekly just kept → weekly marks it removed,
                // so monthly cannot take it and keeps 11-22 for November instead
                (4, Mark::Remove),
                (3, Mark::Keep(Rule::Monthly)),
                (2, Mark::Remove),
                (1, Mark::Remove),
                (0, Mark::Keep(Rule::Yearly)),
            ]
        );
        for w in d.windows(2) {
            assert!(w[0].time >= w[1].time);
        }
    }

    #[test]
    fn rule_marks_period_siblings_for_removal_hiding_them_from_later_rules() {
        // Two backups on the newest day; daily=1 keeps the newer and marks the older for
        // removal, so weekly (a different week would be needed anyway) cannot take it, while
        // the older backup of the previous week stays available to weekly.
        let times = [
            "2024-05-06T08:00:00Z", // Mon W19
            "2024-05-13T08:00:00Z", // Mon W20
            "2024-05-13T09:00:00Z", // Mon W20
        ];
        assert_eq!(
            kept(&times, ret(0, 0, 1, 2, 0, 0), Tz::UTC),
            vec![
                "2024-05-06T08:00:00Z".to_string(),
                "2024-05-13T09:00:00Z".to_string()
            ]
        );
    }

    #[test]
    fn empty_input() {
        assert!(compute(&[], &ret(1, 0, 0, 0, 0, 0), &Tz::UTC).is_empty());
    }
}

/// `stead backup simulate-prune`: reads RFC 3339 timestamps (one per line; blank lines and
/// `#` comments ignored), returns one line per backup, newest first: the timestamp as given,
/// then `keep` or `remove`, then with `show_rule` the rule that kept it.
pub fn simulate<Z: TimeZone>(
    input: &str,
    retention: &Retention,
    tz: &Z,
    show_rule: bool,
) -> Result<String, super::BackupError> {
    let mut raw = Vec::new();
    let mut times = Vec::new();
    for (n, line) in input.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let t = DateTime::parse_from_rfc3339(l).map_err(|e| {
            super::BackupError::Invalid(format!(
                "line {}: {l:?} is not an RFC 3339 timestamp: {e}",
                n + 1
            ))
        })?;
        raw.push(l);
        times.push(t.with_timezone(&Utc));
    }
    let mut out = String::new();
    for d in compute(&times, retention, tz) {
        out.push_str(raw[d.index]);
        match d.mark {
            Mark::Keep(rule) if show_rule => {
                out.push_str(" keep ");
                out.push_str(rule.name());
            }
            Mark::Keep(_) => out.push_str(" keep"),
            Mark::Remove => out.push_str(" remove"),
        }
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod simulate_tests {
    use super::*;

    #[test]
    fn simulate_prints_newest_first_with_rules() {
        let input = "# backups\n2019-12-02T11:59:15Z\n\n2019-12-04T12:59:15+00:00\n2019-12-03T11:59:15Z\n2019-12-04T11:59:15Z\n";
        let r = Retention {
            keep_last: Some(1),
            keep_daily: Some(2),
            ..Retention::default()
        };
        let out = simulate(input, &r, &chrono_tz::Tz::UTC, true).expect("simulate");
        assert_eq!(
            out,
            "2019-12-04T12:59:15+00:00 keep keep-last\n\
             2019-12-04T11:59:15Z remove\n\
             2019-12-03T11:59:15Z keep keep-daily\n\
             2019-12-02T11:59:15Z keep keep-daily\n"
        );
        let out = simulate(input, &r, &chrono_tz::Tz::UTC, false).expect("simulate");
        assert!(out.starts_with("2019-12-04T12:59:15+00:00 keep\n"));
        let err = simulate("2019-12-02 11:59\n", &r, &chrono_tz::Tz::UTC, false);
        assert!(err.is_err_and(|e| e.to_string().contains("line 1")));
    }
}
