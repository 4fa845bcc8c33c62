//! The fence deadline file: how a node's agent tells the supervisors of its HA workloads
//! until when they may run, so they stop them even when the agent itself is stopped.
//!
//! The file holds one decimal number and a newline: the deadline in nanoseconds of
//! `CLOCK_BOOTTIME` (monotonic, counts suspend, the same for every process of the host),
//! `0` once the node is fenced. The agent replaces it atomically at every change. A reader
//! treats a missing, empty or unparsable file as expired (fail safe).
//!
//! The reading side ([`FenceFile::expired`]) allocates nothing, so a supervisor's watchdog
//! thread can poll it next to a thread that forks.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The content meaning "fenced now".
pub const FENCED: &str = "0\n";

/// The file's content for a deadline at `deadline` on `CLOCK_BOOTTIME`.
pub fn deadline_content(deadline: Duration) -> String {
    format!("{}\n", deadline.as_nanos())
}

/// Whether `content` says the deadline has passed at `boottime`: it passed, the node is
/// fenced (`0`), or the content is unreadable.
pub fn expired(content: &[u8], boottime: Duration) -> bool {
    match parse_nanos(content) {
        Some(deadline) => deadline == 0 || boottime.as_nanos() >= deadline,
        None => true,
    }
}

/// The deadline in `content` (decimal nanoseconds, surrounding ASCII white space allowed),
/// without allocating.
fn parse_nanos(content: &[u8]) -> Option<u128> {
    let text = content.trim_ascii();
    if text.is_empty() {
        return None;
    }
    let mut n: u128 = 0;
    for &b in text {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u128::from(b - b'0'))?;
    }
    Some(n)
}

/// Now on `CLOCK_BOOTTIME`.
pub fn boottime_now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// A fence deadline file to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceFile {
    path: PathBuf,
}

impl FenceFile {
    /// The file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the deadline has passed now (an unreadable file counts as passed). Reads
    /// into a stack buffer: no allocation for paths shorter than a few hundred bytes.
    pub fn expired(&self) -> bool {
        let mut buf = [0u8; 64];
        match read_small(&self.path, &mut buf) {
            Some(n) => expired(&buf[..n], boottime_now()),
            None => true,
        }
    }
}

/// Reads at most `buf.len()` bytes of the file at `path`; `None` if it cannot be read or is
/// longer than the buffer.
fn read_small(path: &Path, buf: &mut [u8]) -> Option<usize> {
    let fd = rustix::fs::open(
        path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    let mut file = std::fs::File::from(fd);
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => return Some(n),
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    // A full buffer: only fine if nothing follows.
    let mut extra = [0u8; 1];
    matches!(file.read(&mut extra), Ok(0)).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_passes_at_its_nanosecond() {
        let boot = Duration::from_secs(1000);
        let text = deadline_content(boot + Duration::from_millis(2500));
        assert_eq!(text, "1002500000000\n");
        assert!(!expired(text.as_bytes(), boot));
        assert!(!expired(
            text.as_bytes(),
            boot + Duration::from_millis(2499)
        ));
        assert!(expired(text.as_bytes(), boot + Duration::from_millis(2500)));
    }

    #[test]
    fn fenced_and_unreadable_contents_are_expired() {
        let boot = Duration::from_secs(1);
        assert!(expired(FENCED.as_bytes(), boot));
        assert!(expired(b"garbage", boot));
        assert!(expired(b"", boot));
        assert!(expired(b"  \n", boot));
        assert!(expired(b"-5", boot));
        assert!(expired(
            b"99999999999999999999999999999999999999999999",
            boot
        ));
        assert!(!expired(b" 5000000000 \n", boot));
    }

    #[test]
    fn the_file_is_read_and_missing_means_expired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = FenceFile::new(dir.path().join("deadline"));
        assert!(f.expired(), "missing");
        let later = boottime_now() + Duration::from_secs(60);
        std::fs::write(f.path(), deadline_content(later)).expect("write");
        assert!(!f.expired());
        std::fs::write(f.path(), FENCED).expect("write");
        assert!(f.expired());
        std::fs::write(f.path(), vec![b'1'; 100]).expect("write");
        assert!(f.expired(), "too long to be a deadline");
        assert!(boottime_now() > Duration::ZERO);
    }
}
