//! Which files are manifests, and how they are read. One rule for every reader (the
//! CLI's loader and the controller's directory revision):
//!
//! - a directory means every entry below it whose name ends in `.yaml` or `.yml`,
//!   sorted by path;
//! - an entry (file or directory) whose name starts with `.` is skipped at any depth
//!   below the root (the root itself may be named anything);
//! - symbolic links are followed only to regular files: a link to a directory is not
//!   descended, a link to a FIFO or a device is not read;
//! - a `*.yaml`/`*.yml` entry that is not a regular file is reported as skipped, with
//!   the reason;
//! - a file is read only up to [`MAX_FILE_BYTES`]; a larger one is an error.

use std::fs::{File, FileType};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use walkdir::{DirEntry, WalkDir};

/// The largest manifest file read: 4 MiB.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// Why a manifest directory could not be walked.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {}: {source}", path.display())]
pub struct WalkError {
    /// The entry that failed.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// A manifest-named entry that is not read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The entry.
    pub path: PathBuf,
    /// Why it is not read, e.g. `not a regular file (FIFO)`.
    pub reason: String,
}

/// The manifests found below a directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestDir {
    /// Regular files (or links to them), sorted by path.
    pub files: Vec<PathBuf>,
    /// Manifest-named entries that are not regular files, sorted by path.
    pub skipped: Vec<Skipped>,
}

fn is_hidden(e: &DirEntry) -> bool {
    e.depth() > 0 && e.file_name().as_encoded_bytes().starts_with(b".")
}

/// Whether `name` ends in `.yaml` or `.yml`.
pub fn is_manifest_name(name: &Path) -> bool {
    matches!(
        name.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

/// Names a file type for a "not a regular file" message.
pub fn describe_type(ft: FileType) -> &'static str {
    if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Walks `root` by the rule in this module's documentation.
pub fn walk_manifest_dir(root: &Path) -> Result<ManifestDir, WalkError> {
    let mut out = ManifestDir::default();
    let walk = WalkDir::new(root)
        .follow_links(false)
        .into_iter()
        .filter_entry(|e| !is_hidden(e));
    for entry in walk {
        let entry = entry.map_err(|e| WalkError {
            path: e.path().unwrap_or(root).to_path_buf(),
            source: e.into(),
        })?;
        if entry.depth() == 0 || entry.file_type().is_dir() || !is_manifest_name(entry.path()) {
            continue;
        }
        let path = entry.into_path();
        // Follows a symbolic link; stat never blocks, unlike opening a FIFO.
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => out.files.push(path),
            Ok(m) => out.skipped.push(Skipped {
                path,
                reason: format!("not a regular file ({})", describe_type(m.file_type())),
            }),
            Err(e) => out.skipped.push(Skipped {
                path,
                reason: format!("cannot follow: {e}"),
            }),
        }
    }
    out.files.sort();
    out.skipped.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Why a manifest file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Opening, inspecting or reading failed.
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    /// The path is not a regular file (after following symbolic links).
    #[error("skipped: not a regular file ({0})")]
    NotRegular(&'static str),
    /// The file is larger than [`MAX_FILE_BYTES`]; `line` is where the limit falls.
    #[error("file is larger than the manifest size limit of {} MiB", MAX_FILE_BYTES >> 20)]
    TooLarge {
        /// The 1-based line holding byte [`MAX_FILE_BYTES`].
        line: usize,
    },
    /// The file is not UTF-8.
    #[error("not UTF-8 text: {0}")]
    NotUtf8(#[from] std::string::FromUtf8Error),
}

/// Reads a manifest file: only a regular file (a FIFO is opened without blocking and
/// refused), never more than [`MAX_FILE_BYTES`] + 1 bytes.
pub fn read_manifest(path: &Path) -> Result<String, ReadError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits() as i32)
        .open(path)?;
    let ft = file.metadata()?.file_type();
    if !ft.is_file() {
        return Err(ReadError::NotRegular(describe_type(ft)));
    }
    read_capped(file, MAX_FILE_BYTES)
}

fn read_capped(file: File, cap: u64) -> Result<String, ReadError> {
    let mut buf = Vec::new();
    file.take(cap.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > cap {
        let within = buf.get(..buf.len() - 1).unwrap_or_default();
        let line = 1 + within.iter().filter(|b| **b == b'\n').count();
        return Err(ReadError::TooLarge { line });
    }
    Ok(String::from_utf8(buf)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn rel(root: &Path, paths: &[PathBuf]) -> Vec<String> {
        paths
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn walk_skips_hidden_entries_at_every_depth_and_sorts() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for dir in [".hidden", "a", "a/.git", "b.yaml.d"] {
            std::fs::create_dir(r.join(dir)).unwrap();
        }
        for f in [
            ".hidden/x.yaml",
            ".top.yaml",
            "a/.y.yml",
            "a/.git/z.yaml",
            "a/m.yml",
            "a.yaml",
            "b.yaml.d/c.yaml",
            "notes.txt",
        ] {
            std::fs::write(r.join(f), "x: 1\n").unwrap();
        }
        let m = walk_manifest_dir(r).unwrap();
        assert_eq!(rel(r, &m.files), ["a/m.yml", "a.yaml", "b.yaml.d/c.yaml"]);
        assert!(m.skipped.is_empty(), "{:?}", m.skipped);
    }

    #[test]
    fn walk_follows_links_only_to_regular_files() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("real.yaml"), "x: 1\n").unwrap();
        std::fs::write(outside.path().join("inner.yaml"), "x: 1\n").unwrap();
        symlink(outside.path().join("real.yaml"), r.join("linked.yaml")).unwrap();
        symlink("/dev/zero", r.join("zero.yaml")).unwrap();
        symlink(outside.path(), r.join("dirlink")).unwrap();
        symlink(outside.path(), r.join("dirlink.yaml")).unwrap();
        symlink(r.join("missing"), r.join("dangling.yaml")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            r.join("fifo.yaml"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let m = walk_manifest_dir(r).unwrap();
        assert_eq!(rel(r, &m.files), ["linked.yaml"]);
        let skipped: Vec<(String, &str)> = m
            .skipped
            .iter()
            .map(|s| {
                let p = s.path.strip_prefix(r).unwrap().display().to_string();
                (p, s.reason.as_str())
            })
            .collect();
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        assert_eq!(skipped[0].0, "dangling.yaml");
        assert!(skipped[0].1.starts_with("cannot follow"), "{skipped:?}");
        assert_eq!(
            skipped[1],
            ("dirlink.yaml".into(), "not a regular file (directory)")
        );
        assert_eq!(
            skipped[2],
            ("fifo.yaml".into(), "not a regular file (FIFO)")
        );
        assert_eq!(
            skipped[3],
            ("zero.yaml".into(), "not a regular file (character device)")
        );
    }

    #[test]
    fn read_refuses_fifos_and_devices_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("f.yaml");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(matches!(
            read_manifest(&fifo),
            Err(ReadError::NotRegular("FIFO"))
        ));
        assert!(matches!(
            read_manifest(Path::new("/dev/zero")),
            Err(ReadError::NotRegular("character device"))
        ));
    }

    #[test]
    fn read_stops_one_byte_past_the_cap() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big.yaml");
        let mut text = "a: 1\n".repeat(3);
        text.push_str("b: 22222\n");
        std::fs::write(&p, &text).unwrap();
        let f = File::open(&p).unwrap();
        // 15 bytes of three 5-byte lines, the 16th byte is on line 4.
        match read_capped(f, 15) {
            Err(ReadError::TooLarge { line }) => assert_eq!(line, 4),
            other => panic!("{other:?}"),
        }
        let f = File::open(&p).unwrap();
        assert_eq!(read_capped(f, text.len() as u64).unwrap(), text);
        assert_eq!(read_manifest(&p).unwrap(), text);
    }
}
