//! Host capacity for the overview: CPUs, memory, load and the storage pools' file
//! systems. Cheap reads (two small proc files, one statvfs per pool), each optional.

use std::io::Read;
use std::path::Path;

use serde_json::Value;
use stead_host::procfs::ProcFs;
use stead_reconciler::driver::Observed;
use stead_schema::Kind;

use super::{Capacity, PoolUsage, Snapshot};

/// What the host has now; pools from the snapshot's observed StoragePools.
pub(crate) fn read(snap: Option<&Snapshot>) -> Capacity {
    let proc = ProcFs::host();
    let meminfo = std::fs::read_to_string(proc.root().join("meminfo")).unwrap_or_default();
    let loadavg = std::fs::read_to_string(proc.root().join("loadavg")).unwrap_or_default();
    let pools = snap
        .map(|s| {
            s.observed
                .iter()
                .filter(|(id, o)| id.kind == Kind::StoragePool && o.exists)
                .filter_map(|(id, o)| pool_usage(&id.name, o))
                .collect()
        })
        .unwrap_or_default();
    Capacity {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_total_bytes: meminfo_kib(&meminfo, "MemTotal") * 1024,
        memory_available_bytes: meminfo_kib(&meminfo, "MemAvailable") * 1024,
        load1: loadavg
            .split_whitespace()
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0.0),
        pools,
    }
}

/// A `Key:   123 kB` line's number (0 when absent).
pub fn meminfo_kib(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A pool's file-system usage from its observed path.
fn pool_usage(name: &str, o: &Observed) -> Option<PoolUsage> {
    let path = o.status.get("path").and_then(Value::as_str)?;
    let st = rustix::fs::statvfs(Path::new(path)).ok()?;
    Some(PoolUsage {
        name: name.to_string(),
        total_bytes: st.f_blocks.saturating_mul(st.f_frsize),
        available_bytes: st.f_bavail.saturating_mul(st.f_frsize),
    })
}

/// The last 8 KiB of a workload's console log (its observed `consoleLog`), cut to whole
/// lines, with control characters other than newlines and tabs removed.
pub fn console_tail(o: &Observed) -> Option<String> {
    const TAIL: u64 = 8 << 10;
    let path = o.status.get("consoleLog").and_then(Value::as_str)?;
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(TAIL);
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(start)).ok()?;
    let mut buf = Vec::new();
    f.take(TAIL).read_to_end(&mut buf).ok()?;
    Some(clean_tail(&buf, start > 0))
}

/// Text of a log tail: lossy UTF-8, a partial first line dropped when `cut`, control
/// characters (escape sequences' ESC too) removed.
pub fn clean_tail(buf: &[u8], cut: bool) -> String {
    let text = String::from_utf8_lossy(buf);
    let text = if cut {
        text.split_once('\n').map_or("", |(_, rest)| rest)
    } else {
        &text
    };
    text.chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_lines_are_read_in_kib() {
        let t = "MemTotal:       16384 kB\nMemFree:  1 kB\nMemAvailable:    8192 kB\n";
        assert_eq!(meminfo_kib(t, "MemTotal"), 16384);
        assert_eq!(meminfo_kib(t, "MemAvailable"), 8192);
        assert_eq!(meminfo_kib(t, "Nope"), 0);
    }

    #[test]
    fn a_tail_drops_its_partial_line_and_control_characters() {
        assert_eq!(
            clean_tail(b"tial\nline \x1b[1mone\nlast", true),
            "line [1mone\nlast"
        );
        assert_eq!(clean_tail(b"a\r\nb", false), "a\nb");
    }
}
