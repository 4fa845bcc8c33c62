//! Progress of long byte transfers (copies, unpacks, backups), without a terminal library.
//!
//! Library code advances a [`Progress`]; how (or whether) it is shown is the caller's
//! business: the CLI implements it with a terminal progress bar, tests and daemons use
//! [`NoProgress`]. Code that is handed a [`Progress`] uses it; code deep inside a driver,
//! whose callers have no way to pass one, asks [`start`] for one: the binary may
//! [`install`] a [`Reporter`] once at start-up (as it installs its log subscriber), else
//! every progress is a [`NoProgress`].

use std::sync::{Arc, OnceLock};

/// A progress display advanced by bytes.
pub trait Progress: Send + Sync {
    /// Sets the total number of bytes expected.
    fn set_length(&self, len: u64);
    /// Advances by `delta` bytes.
    fn inc(&self, delta: u64);
    /// Moves to `pos` bytes done.
    fn set_position(&self, pos: u64);
    /// Replaces the label shown with the progress.
    fn set_message(&self, msg: &str);
    /// Ends the progress and removes it from the display.
    fn finish(&self);
}

impl std::fmt::Debug for dyn Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

/// Shows nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_length(&self, _len: u64) {}
    fn inc(&self, _delta: u64) {}
    fn set_position(&self, _pos: u64) {}
    fn set_message(&self, _msg: &str) {}
    fn finish(&self) {}
}

/// How a progress is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meter {
    /// A copy or a backup: bytes, rate and time left.
    Transfer,
    /// An unpack: bytes and time left.
    Unpack,
}

/// Makes a [`Progress`] for a labelled task.
pub trait Reporter: Send + Sync {
    /// A new progress for `label`, laid out as `meter`. Nothing is shown before the
    /// first [`Progress::set_length`], so a progress that is never used leaves no trace.
    fn start(&self, label: &str, meter: Meter) -> Arc<dyn Progress>;
}

static REPORTER: OnceLock<Box<dyn Reporter>> = OnceLock::new();

/// Installs the process's reporter; the first call wins (`false` if one was installed).
pub fn install(reporter: Box<dyn Reporter>) -> bool {
    REPORTER.set(reporter).is_ok()
}

/// A progress for `label` from the installed [`Reporter`], else a [`NoProgress`].
pub fn start(label: &str, meter: Meter) -> Arc<dyn Progress> {
    match REPORTER.get() {
        Some(r) => r.start(label, meter),
        None => Arc::new(NoProgress),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_reporter_progress_is_silent() {
        let p = start("copy", Meter::Transfer);
        p.set_length(10);
        p.inc(5);
        p.set_position(10);
        p.set_message("done");
        p.finish();
    }
}
