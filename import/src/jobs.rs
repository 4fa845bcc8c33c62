//! `jobs.cfg` vzdump jobs → BackupSchedules, with Proxmox calendar events turned into
//! 5-field cron patterns.

use std::collections::BTreeMap;
use std::path::Path;

use stead_schema::{
    BackupMode, BackupScheduleSpec, BackupTargets, Compression, Content, CronSpec, Kind, Name,
    ResourceRef, Retention,
};

use crate::model::Manifest;
use crate::names::Taken;
use crate::reader::{Section, property_string};
use crate::report::Report;
use crate::storage::Pool;

/// An imported guest a job may name.
#[derive(Debug, Clone)]
pub struct Target {
    /// VMID.
    pub vmid: u32,
    /// Node it was read from.
    pub node: String,
    /// Its `Kind/name`.
    pub id: ResourceRef,
}

/// Keys a vzdump job maps.
const MAPPED: &[&str] = &[
    "schedule",
    "storage",
    "mode",
    "compress",
    "prune-backups",
    "vmid",
    "all",
    "exclude",
    "enabled",
    "node",
];

/// Imports every section of jobs.cfg.
pub fn import_jobs(
    file: &Path,
    sections: &[Section],
    targets: &[Target],
    pools: &BTreeMap<String, Pool>,
    report: &mut Report,
) -> Vec<Manifest> {
    let mut taken = Taken::default();
    let mut out = Vec::new();
    for (i, s) in sections.iter().enumerate() {
        let head = format!("{}: {}", s.kind, s.id);
        if s.kind != "vzdump" {
            report.note(
                file,
                s.line,
                &head,
                format!(
                    "job type `{}`: stead imports only `vzdump` backup jobs, as BackupSchedules: not carried over",
                    s.kind
                ),
            );
            continue;
        }
        if let Some(e) = s.get("enabled").filter(|e| e.value == "0") {
            report.note(
                file,
                e.line,
                "enabled",
                format!("job `{}` is disabled: skipped", s.id),
            );
            continue;
        }
        let Some(spec) = job_spec(file, s, targets, pools, report) else {
            continue;
        };
        for e in &s.entries {
            if !MAPPED.contains(&e.key.as_str()) {
                report.note(
                    file,
                    e.line,
                    &e.key,
                    crate::reasons::vzdump_key(&e.key, &e.value),
                );
            }
        }
        let name = taken.claim(Some(&s.id), &format!("backup-{}", i + 1));
        out.push(Manifest::new(
            Kind::BackupSchedule,
            &name,
            &spec,
            "backups.yaml",
        ));
    }
    out
}

/// The spec of one vzdump job, or `None` (reported) when it cannot be expressed.
fn job_spec(
    file: &Path,
    s: &Section,
    targets: &[Target],
    pools: &BTreeMap<String, Pool>,
    report: &mut Report,
) -> Option<BackupScheduleSpec> {
    let head = format!("vzdump: {}", s.id);
    let skip = |report: &mut Report, line: usize, key: &str, why: String| {
        report.note(file, line, key, format!("{why}: job `{}` skipped", s.id));
    };
    let Some(sched) = s.get("schedule") else {
        skip(report, s.line, &head, "no `schedule`".into());
        return None;
    };
    let cron = match calendar_to_cron(&sched.value) {
        Ok(c) => c,
        Err(why) => {
            skip(
                report,
                sched.line,
                "schedule",
                format!(
                    "`{}` cannot be expressed as a 5-field cron pattern ({why})",
                    sched.value
                ),
            );
            return None;
        }
    };
    let storage = match s.get("storage") {
        None => {
            skip(report, s.line, &head, "no `storage`".into());
            return None;
        }
        Some(e) => match pools.get(&e.value) {
            Some(p) if p.content.contains(&Content::Backup) => p.name.clone(),
            Some(_) => {
                skip(
                    report,
                    e.line,
                    "storage",
                    format!("storage `{}` has no `backup` content", e.value),
                );
                return None;
            }
            None => {
                skip(
                    report,
                    e.line,
                    "storage",
                    format!("storage `{}` is not imported", e.value),
                );
                return None;
            }
        },
    };
    let names = job_targets(file, s, targets, report);
    if names.is_empty() {
        skip(report, s.line, &head, "no imported guest to back up".into());
        return None;
    }
    Some(BackupScheduleSpec {
        schedule: CronSpec(cron),
        timezone: None,
        targets: BackupTargets {
            selector: None,
            names,
        },
        storage: Name(storage),
        mode: mode(file, s, report),
        compression: compression(file, s, report),
        retention: retention(file, s, report),
        depends_on: vec![],
    })
}

/// `vmid 100,101` → those guests; `all 1` (with `exclude`, limited to `node`) → every
/// other imported guest.
fn job_targets(
    file: &Path,
    s: &Section,
    targets: &[Target],
    report: &mut Report,
) -> Vec<ResourceRef> {
    let ids = |v: &str| -> Vec<u32> {
        v.split([',', ' '])
            .filter_map(|x| x.trim().parse().ok())
            .collect()
    };
    if s.value("all") == Some("1") {
        let exclude = s.value("exclude").map(ids).unwrap_or_default();
        let node = s.value("node");
        return targets
            .iter()
            .filter(|t| !exclude.contains(&t.vmid) && node.is_none_or(|n| n == t.node))
            .map(|t| t.id.clone())
            .collect();
    }
    let Some(e) = s.get("vmid") else {
        if let Some(p) = s.get("pool") {
            report.note(
                file,
                p.line,
                "pool",
                "a Proxmox resource pool as the job's selection: not carried over",
            );
        }
        return vec![];
    };
    let mut out = Vec::new();
    for vmid in ids(&e.value) {
        match targets.iter().find(|t| t.vmid == vmid) {
            Some(t) => out.push(t.id.clone()),
            None => report.note(
                file,
                e.line,
                "vmid",
                format!("guest {vmid} is not imported: left out of the job"),
            ),
        }
    }
    out
}

/// `mode`: snapshot | stop (suspend is taken as snapshot).
fn mode(file: &Path, s: &Section, report: &mut Report) -> BackupMode {
    match s.get("mode") {
        Some(e) if e.value == "stop" => BackupMode::Stop,
        Some(e) if e.value != "snapshot" => {
            report.note(
                file,
                e.line,
                "mode",
                format!("`{}`: snapshot mode is used", e.value),
            );
            BackupMode::Snapshot
        }
        _ => BackupMode::Snapshot,
    }
}

/// `compress`: zstd | 0; other algorithms become zstd.
fn compression(file: &Path, s: &Section, report: &mut Report) -> Compression {
    match s.get("compress") {
        Some(e) if e.value == "0" => Compression::None,
        Some(e) if e.value != "zstd" => {
            report.note(
                file,
                e.line,
                "compress",
                format!("`{}`: stead compresses with zstd", e.value),
            );
            Compression::Zstd
        }
        _ => Compression::Zstd,
    }
}

/// `prune-backups keep-last=N,keep-daily=N,…` → `retention`.
fn retention(file: &Path, s: &Section, report: &mut Report) -> Retention {
    let mut r = Retention::default();
    let Some(e) = s.get("prune-backups") else {
        return r;
    };
    for (k, v) in property_string(&e.value).1 {
        let n = v.parse::<u32>().ok();
        match k {
            "keep-last" => r.keep_last = n,
            "keep-hourly" => r.keep_hourly = n,
            "keep-daily" => r.keep_daily = n,
            "keep-weekly" => r.keep_weekly = n,
            "keep-monthly" => r.keep_monthly = n,
            "keep-yearly" => r.keep_yearly = n,
            _ => report.note(
                file,
                e.line,
                &format!("prune-backups.{k}"),
                crate::reasons::prune_option(k, v),
            ),
        }
    }
    r
}

/// A Proxmox calendar event (`sat 02:00`, `mon..fri 21:30`, `*-*-* 03:00`, `daily`,
/// `02:30`, `*/15`) as a 5-field cron pattern; the reason when it has none (a year,
/// seconds, …).
pub fn calendar_to_cron(ev: &str) -> Result<String, String> {
    let ev = ev.trim();
    if let Some(c) = special(ev) {
        return Ok(c.to_string());
    }
    let (mut dow, mut dom, mut month, mut hour, mut minute) = (
        "*".to_string(),
        "*".to_string(),
        "*".to_string(),
        None,
        None,
    );
    for (i, tok) in ev.split_whitespace().enumerate() {
        if i == 0 && tok.starts_with(|c: char| c.is_ascii_alphabetic()) {
            dow = weekdays(tok)?;
        } else if tok.contains('-') {
            let parts: Vec<&str> = tok.split('-').collect();
            let (m, d) = match parts.as_slice() {
                [y, m, d] if *y == "*" => (*m, *d),
                [_, _, _] => return Err("a specific year".into()),
                [m, d] => (*m, *d),
                _ => return Err(format!("date `{tok}`")),
            };
            month = field(m, 1, 12)?;
            dom = field(d, 1, 31)?;
        } else if tok.contains(':') {
            let parts: Vec<&str> = tok.split(':').collect();
            if parts.len() == 3 && !matches!(parts[2], "0" | "00") {
                return Err("seconds".into());
            }
            if !(2..=3).contains(&parts.len()) {
                return Err(format!("time `{tok}`"));
            }
            hour = Some(field(parts[0], 0, 23)?);
            minute = Some(field(parts[1], 0, 59)?);
        } else if minute.is_none() {
            minute = Some(field(tok, 0, 59)?);
            hour = Some("*".into());
        } else {
            return Err(format!("`{tok}`"));
        }
    }
    let minute = minute.unwrap_or_else(|| "0".into());
    let hour = hour.unwrap_or_else(|| "0".into());
    let cron = format!("{minute} {hour} {dom} {month} {dow}");
    cron.parse::<CronSpec>().map_err(|e| e.0)?;
    Ok(cron)
}

/// The fixed-name events.
fn special(ev: &str) -> Option<&'static str> {
    Some(match ev {
        "minutely" => "* * * * *",
        "hourly" => "0 * * * *",
        "daily" => "0 0 * * *",
        "weekly" => "0 0 * * 1",
        "monthly" => "0 0 1 * *",
        "yearly" | "annually" => "0 0 1 1 *",
        "quarterly" => "0 0 1 1,4,7,10 *",
        "semiannually" => "0 0 1 1,7 *",
        _ => return None,
    })
}

/// `mon..fri,sun` → `1-5,0`.
fn weekdays(tok: &str) -> Result<String, String> {
    const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
    let day = |d: &str| {
        DAYS.iter()
            .position(|x| *x == d.to_ascii_lowercase().get(..3).unwrap_or(""))
            .ok_or_else(|| format!("weekday `{d}`"))
    };
    let mut out = Vec::new();
    for part in tok.split(',') {
        match part.split_once("..") {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                if a <= b {
                    out.push(format!("{a}-{b}"));
                } else {
                    out.push(format!("{a}-6"));
                    out.push(format!("0-{b}"));
                }
            }
            None => out.push(day(part)?.to_string()),
        }
    }
    Ok(out.join(","))
}

/// One calendar field (`*`, `5`, `1..5`, `0/15`, `*/15`, lists) in cron syntax.
fn field(f: &str, min: u32, max: u32) -> Result<String, String> {
    let num = |s: &str| -> Result<u32, String> {
        match s.parse::<u32>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(format!("`{s}` outside {min}..{max}")),
        }
    };
    let mut out = Vec::new();
    for part in f.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                Some(
                    s.parse::<u32>()
                        .map_err(|_| format!("repetition `{part}`"))?,
                ),
            ),
            None => (part, None),
        };
        let range = match range.split_once("..") {
            _ if range == "*" => "*".to_string(),
            Some((a, b)) => format!("{}-{}", num(a)?, num(b)?),
            None if step.is_some() => format!("{}-{max}", num(range)?),
            None => num(range)?.to_string(),
        };
        out.push(match step {
            Some(s) => format!("{range}/{s}"),
            None => range,
        });
    }
    Ok(out.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::parse_section_config;
    use stead_schema::PoolType;

    #[test]
    fn calendar_events() {
        for (ev, cron) in [
            ("sat 02:00", "0 2 * * 6"),
            ("mon..fri 21:30", "30 21 * * 1-5"),
            ("*-*-* 03:00", "0 3 * * *"),
            ("daily", "0 0 * * *"),
            ("02:30", "30 2 * * *"),
            ("weekly", "0 0 * * 1"),
            ("*/15", "*/15 * * * *"),
            ("sun,wed 1:05", "5 1 * * 0,3"),
            ("fri..mon 22:00", "0 22 * * 5-6,0-1"),
            ("mon..fri 8..17,22:0/15", "0-59/15 8-17,22 * * 1-5"),
            ("*-12-25 00:00", "0 0 25 12 *"),
            ("sat", "0 0 * * 6"),
            ("12:05:00", "5 12 * * *"),
        ] {
            assert_eq!(calendar_to_cron(ev).as_deref(), Ok(cron), "{ev}");
        }
    }

    #[test]
    fn inexpressible_events() {
        assert_eq!(
            calendar_to_cron("2027-01-01 00:00"),
            Err("a specific year".into())
        );
        assert_eq!(calendar_to_cron("*:*:30"), Err("seconds".into()));
        assert!(calendar_to_cron("funday 02:00").is_err());
        assert!(calendar_to_cron("25:00").is_err());
    }

    fn pools() -> BTreeMap<String, Pool> {
        let mut m = BTreeMap::new();
        m.insert(
            "nas".into(),
            Pool {
                id: "nas".into(),
                name: "nas".into(),
                pool_type: PoolType::Nfs,
                path: "/mnt/pve/nas".into(),
                content: vec![Content::Backup],
            },
        );
        m.insert(
            "local-lvm".into(),
            Pool {
                id: "local-lvm".into(),
                name: "local-lvm".into(),
                pool_type: PoolType::Lvmthin,
                path: "/dev/pve/data".into(),
                content: vec![Content::Images],
            },
        );
        m
    }

    fn targets() -> Vec<Target> {
        [
            (100, "pve1", Kind::VirtualMachine, "web"),
            (101, "pve1", Kind::VirtualMachine, "db"),
            (200, "pve1", Kind::Container, "dns"),
            (300, "pve2", Kind::Container, "other"),
        ]
        .into_iter()
        .map(|(vmid, node, kind, name)| Target {
            vmid,
            node: node.into(),
            id: ResourceRef {
                kind,
                name: name.into(),
            },
        })
        .collect()
    }

    #[test]
    fn vzdump_jobs() {
        let text = "vzdump: backup-weekly\n\tschedule sat 02:00\n\tall 1\n\texclude 101\n\tnode pve1\n\tstorage nas\n\tmode stop\n\tcompress zstd\n\tprune-backups keep-last=3,keep-daily=7\n\tenabled 1\n\tmailto root@x\n\n\
vzdump: backup-db\n\tschedule mon..fri 21:30\n\tvmid 101,999\n\tstorage nas\n\tmode suspend\n\tcompress lzo\n\n\
vzdump: off\n\tschedule daily\n\tvmid 100\n\tstorage nas\n\tenabled 0\n\n\
vzdump: wrongpool\n\tschedule daily\n\tvmid 100\n\tstorage local-lvm\n\n\
vzdump: yearly\n\tschedule 2027-01-01\n\tvmid 100\n\tstorage nas\n\n\
realm-sync: ldap\n\tschedule daily\n";
        let f = Path::new("jobs.cfg");
        let sections = parse_section_config(f, text).unwrap();
        let mut r = Report::default();
        let m = import_jobs(f, &sections, &targets(), &pools(), &mut r);
        assert_eq!(m.len(), 2);
        let w = &m[0].spec;
        assert_eq!(w["schedule"], "0 2 * * 6");
        assert_eq!(
            w["targets"]["names"],
            serde_json::json!(["VirtualMachine/web", "Container/dns"])
        );
        assert_eq!(w["mode"], "stop");
        assert_eq!(
            w["retention"],
            serde_json::json!({"keepLast": 3, "keepDaily": 7})
        );
        let d = &m[1].spec;
        assert_eq!(d["schedule"], "30 21 * * 1-5");
        assert_eq!(
            d["targets"]["names"],
            serde_json::json!(["VirtualMachine/db"])
        );
        assert_eq!(d["mode"], "snapshot");
        let notes: Vec<String> = r.notes().iter().map(|n| n.render()).collect();
        for p in [
            "jobs.cfg:11: mailto: `mailto root@x`: stead sends no backup mail or notifications: not carried over",
            "jobs.cfg:15: vmid: guest 999 is not imported",
            "jobs.cfg:17: mode: `suspend`",
            "jobs.cfg:18: compress: `lzo`",
            "jobs.cfg:24: enabled: job `off` is disabled",
            "jobs.cfg:29: storage: storage `local-lvm` has no `backup` content",
            "jobs.cfg:32: schedule: `2027-01-01` cannot be expressed",
            "jobs.cfg:36: realm-sync: ldap: job type `realm-sync`: stead imports only `vzdump` backup jobs",
        ] {
            assert!(notes.iter().any(|n| n.starts_with(p)), "{p} in {notes:?}");
        }
    }
}
