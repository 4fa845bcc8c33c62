//! The text form of backup results, as the command line prints them (one function per
//! report, each returning its lines without a final newline).

use super::store::{BackupInfo, GcReport, PruneReport, RestoreReport, VerifyReport};

/// `b` bytes in binary units with one decimal (`512 B`, `1.5 KiB`, … `TiB`).
pub fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A backup just written: its consistency (if recorded) and its figures.
pub fn backup_written(info: &BackupInfo) -> Vec<String> {
    let s = &info.stats;
    let mut lines = Vec::new();
    if let Some(c) = &info.consistency {
        lines.push(format!("{}: consistency: {c}", info.id));
    }
    let secs = s.duration_ms.max(1) as f64 / 1000.0;
    // Disk images backed up block-wise say how much was actually read.
    let read = s
        .read_bytes
        .map(|r| format!("; {} read", human(r)))
        .unwrap_or_default();
    lines.push(format!(
        "{}: {} ({} unchanged, not read{read}), {} new ({} stored), {} zero, {:.1}s, {:.0} MB/s",
        info.id,
        human(s.bytes),
        human(s.reused_bytes),
        human(s.new_bytes),
        human(s.stored_bytes),
        human(s.zero_bytes),
        secs,
        s.bytes as f64 / 1e6 / secs
    ));
    lines
}

/// A table of backups, header first.
pub fn backup_table(list: &[BackupInfo]) -> Vec<String> {
    let mut lines = vec![format!(
        "{:<56} {:>10} {:>10}  INPUTS",
        "BACKUP", "SIZE", "NEW"
    )];
    for b in list {
        lines.push(format!(
            "{:<56} {:>10} {:>10}  {}",
            b.id,
            human(b.stats.bytes),
            human(b.stats.stored_bytes),
            b.inputs.join(",")
        ));
    }
    lines
}

/// Every problem found, then the verdict.
pub fn verify_result(r: &VerifyReport) -> Vec<String> {
    let mut lines: Vec<String> = r
        .problems
        .iter()
        .map(|p| format!("{}: {p}", r.id))
        .collect();
    lines.push(format!(
        "{}: {} ({} files, {} chunks, {} checked)",
        r.id,
        if r.ok() { "ok" } else { "FAILED" },
        r.files,
        r.chunks,
        human(r.bytes)
    ));
    lines
}

/// Where each input was restored.
pub fn restored(r: &RestoreReport) -> Vec<String> {
    r.restored
        .iter()
        .map(|(n, p)| format!("restored {}:{n} to {}", r.id, p.display()))
        .collect()
}

/// Each decision, then what was removed (or would be, in a dry run).
pub fn prune_result(r: &PruneReport) -> Vec<String> {
    let mut lines: Vec<String> = r
        .decisions
        .iter()
        .map(|(id, what)| format!("{id} {what}"))
        .collect();
    lines.push(match &r.gc {
        Some(gc) => format!(
            "removed {} backups; gc removed {} chunks ({}), kept {}",
            r.removed.len(),
            gc.removed,
            human(gc.removed_bytes),
            gc.kept
        ),
        None => format!("dry run: would remove {} backups", r.removed.len()),
    });
    lines
}

/// A garbage collection's figures.
pub fn gc_result(r: &GcReport) -> String {
    format!(
        "gc: {} chunks referenced, {} kept, {} removed ({}), {} temp files removed",
        r.referenced,
        r.kept,
        r.removed,
        human(r.removed_bytes),
        r.temp_removed
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_wise_backup_reports_the_bytes_it_read() {
        use crate::backup::store::{BackupInfo, Stats};
        let info = BackupInfo {
            id: "VirtualMachine/vm/2026-01-01T00:00:00Z".into(),
            resource: "VirtualMachine/vm".into(),
            time: chrono::DateTime::UNIX_EPOCH,
            manifest: "/m.json".into(),
            inputs: vec!["disk0".into()],
            stats: Stats {
                bytes: 2 << 30,
                reused_bytes: (2 << 30) - (12 << 20),
                read_bytes: Some(10 << 20),
                duration_ms: 500,
                ..Stats::default()
            },
            consistency: Some("crash-consistent".into()),
        };
        let lines = backup_written(&info);
        assert_eq!(
            lines[0],
            format!("{}: consistency: crash-consistent", info.id)
        );
        assert!(
            lines[1].contains("2.0 GiB (2.0 GiB unchanged, not read; 10.0 MiB read)"),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn bytes_are_shown_in_binary_units() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
        assert_eq!(human(u64::MAX), "16777216.0 TiB");
    }

    #[test]
    fn a_dry_prune_says_what_it_would_remove() {
        let r = PruneReport {
            decisions: vec![
                ("Volume/x/2".into(), "keep-last".into()),
                ("Volume/x/1".into(), "remove".into()),
            ],
            removed: vec!["Volume/x/1".into()],
            gc: None,
        };
        assert_eq!(
            prune_result(&r),
            vec![
                "Volume/x/2 keep-last",
                "Volume/x/1 remove",
                "dry run: would remove 1 backups"
            ]
        );
    }

    #[test]
    fn gc_figures_are_one_line() {
        let r = GcReport {
            referenced: 3,
            kept: 3,
            removed: 2,
            removed_bytes: 2048,
            temp_removed: 1,
        };
        assert_eq!(
            gc_result(&r),
            "gc: 3 chunks referenced, 3 kept, 2 removed (2.0 KiB), 1 temp files removed"
        );
    }
}
