//! The import report: every setting that was not carried over, as
//! `FILE:LINE: key: reason`, rendered to `IMPORT-REPORT.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The first line of every report (how an earlier import is recognised).
pub const TITLE: &str = "# Proxmox VE import report";

/// One setting left out (or changed on the way).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Note {
    /// The file it came from.
    pub file: PathBuf,
    /// Its line (0: the file as a whole).
    pub line: usize,
    /// The key (or `[section]`).
    pub key: String,
    /// Why it was not carried over as it is.
    pub reason: String,
}

impl Note {
    /// `FILE:LINE: key: reason`.
    pub fn render(&self) -> String {
        format!(
            "{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.key,
            self.reason
        )
    }
}

/// What an import wrote and what it left out.
#[derive(Debug, Clone, Default)]
pub struct Report {
    notes: Vec<Note>,
    /// Resources written, per kind.
    pub written: BTreeMap<String, usize>,
    /// Files skipped as invalid (`--skip-invalid`), with their errors.
    pub skipped: Vec<String>,
}

impl Report {
    /// Records a setting that was not carried over.
    pub fn note(&mut self, file: &Path, line: usize, key: &str, reason: impl Into<String>) {
        self.notes.push(Note {
            file: file.to_path_buf(),
            line,
            key: key.to_string(),
            reason: reason.into(),
        });
    }

    /// Moves `other`'s notes into this report.
    pub fn extend(&mut self, other: Report) {
        self.notes.extend(other.notes);
    }

    /// The notes, sorted by file and line.
    pub fn notes(&self) -> Vec<&Note> {
        let mut v: Vec<&Note> = self.notes.iter().collect();
        v.sort();
        v
    }

    /// The report as Markdown.
    pub fn render(&self) -> String {
        let mut s = format!("{TITLE}\n\n");
        if self.written.is_empty() {
            s.push_str("No resources were written.\n");
        } else {
            s.push_str("Written:\n\n");
            for (kind, n) in &self.written {
                let _ = writeln!(s, "- {n} {kind}");
            }
        }
        if !self.skipped.is_empty() {
            s.push_str("\n## Invalid files skipped (--skip-invalid)\n\n");
            for e in &self.skipped {
                let _ = writeln!(s, "- {e}");
            }
        }
        let notes = self.notes();
        s.push_str("\n## Not carried over\n\n");
        if notes.is_empty() {
            s.push_str("Every setting was carried over.\n");
        } else {
            s.push_str("Each line is `FILE:LINE: key: reason`.\n\n");
            for n in notes {
                let _ = writeln!(s, "- {}", n.render());
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sorted_notes() {
        let mut r = Report::default();
        r.note(
            Path::new("b.conf"),
            2,
            "args",
            "raw QEMU arguments are not carried over",
        );
        r.note(
            Path::new("a.conf"),
            9,
            "hostpci0",
            "PCI passthrough is not carried over",
        );
        r.note(
            Path::new("a.conf"),
            3,
            "tpmstate0",
            "TPM state is not carried over",
        );
        r.written.insert("VirtualMachine".into(), 2);
        let text = r.render();
        let a3 = text.find("- a.conf:3: tpmstate0: TPM state").unwrap();
        let a9 = text.find("- a.conf:9: hostpci0:").unwrap();
        let b2 = text.find("- b.conf:2: args:").unwrap();
        assert!(a3 < a9 && a9 < b2);
        assert!(text.contains("- 2 VirtualMachine"));
    }

    #[test]
    fn empty_report_says_so() {
        let text = Report::default().render();
        assert!(text.contains("No resources were written."));
        assert!(text.contains("Every setting was carried over."));
    }
}
