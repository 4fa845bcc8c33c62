//! The one mountinfo parser, and mount lookups by canonical path.
//!
//! Mount points in mountinfo are canonical absolute paths with space, tab, newline and
//! backslash escaped as `\ooo`. Lookups canonicalize the path asked about first, so
//! `a/../b`, a symlinked run dir or a trailing slash find the same mount.

use std::io;
use std::path::{Component, Path, PathBuf};

use crate::fs::HostError;

/// Where the mount table of the calling thread is read from. `thread-self` (not `self`)
/// so that a thread that unshared its mount namespace sees its own mounts.
pub const MOUNTINFO: &str = "/proc/thread-self/mountinfo";

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount id (unique per mount, as `statx` reports in `stx_mnt_id`).
    pub mount_id: u64,
    /// Device of the mounted file system (`major`, `minor`).
    pub dev: (u32, u32),
    /// Root of the mount inside its file system (`/` unless a bind of a subdirectory).
    pub root: PathBuf,
    /// Mount point (canonical, absolute).
    pub mount_point: PathBuf,
    /// File-system type (`nfs4`, `btrfs`, `cgroup`, …).
    pub fstype: String,
    /// Mount source (`server:/export`, `/dev/loop0`, …).
    pub source: String,
    /// Super-block options (for cgroup v1, the controllers: `rw,cpu,cpuacct`).
    pub super_options: String,
}

/// Decodes mountinfo's `\ooo` octal escapes. An escape whose value does not fit a byte
/// (`\610`), or that is cut short, is kept literally.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match decode_octal(b.get(i..i + 4)) {
            Some(v) if b[i] == b'\\' => {
                out.push(v);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `\ooo` → the byte, if the three digits are octal and the value is at most 255.
fn decode_octal(esc: Option<&[u8]>) -> Option<u8> {
    let digits = esc?.get(1..4)?;
    let mut v: u8 = 0;
    for d in digits {
        if !(b'0'..=b'7').contains(d) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(d - b'0')?;
    }
    Some(v)
}

fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (maj, min) = s.split_once(':')?;
    Some((maj.parse().ok()?, min.parse().ok()?))
}

fn parse_line(line: &str) -> Option<MountEntry> {
    // <id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <src> <super opts>
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields.iter().position(|f| *f == "-")?;
    if sep < 6 {
        return None;
    }
    Some(MountEntry {
        mount_id: fields[0].parse().ok()?,
        dev: parse_dev(fields[2])?,
        root: PathBuf::from(unescape(fields[3])),
        mount_point: PathBuf::from(unescape(fields[4])),
        fstype: (*fields.get(sep + 1)?).to_string(),
        source: unescape(fields.get(sep + 2)?),
        super_options: fields.get(sep + 3).copied().unwrap_or("").to_string(),
    })
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

/// A snapshot of the mount table.
#[derive(Debug, Clone, Default)]
pub struct MountTable {
    entries: Vec<MountEntry>,
}

impl MountTable {
    /// Reads the calling thread's mount table ([`MOUNTINFO`]).
    pub fn read() -> Result<Self, HostError> {
        Self::read_from(Path::new(MOUNTINFO))
    }

    /// Reads a mount table from `path` (tests pass a file of their own).
    pub fn read_from(path: &Path) -> Result<Self, HostError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| HostError::new("read mount table", path, e))?;
        Ok(Self::parse(&text))
    }

    /// A table from mountinfo text.
    pub fn parse(text: &str) -> Self {
        Self {
            entries: parse_mountinfo(text),
        }
    }

    /// All mounts, in mount order (later mounts stack over earlier ones).
    pub fn entries(&self) -> &[MountEntry] {
        &self.entries
    }

    /// The topmost mount whose mount point is `path` (compared canonically).
    pub fn at(&self, path: &Path) -> Option<&MountEntry> {
        let p = canonical(path);
        self.entries.iter().rev().find(|m| m.mount_point == p)
    }

    /// Mounts strictly below `path` (compared canonically), outermost first.
    pub fn below(&self, path: &Path) -> Vec<&MountEntry> {
        let p = canonical(path);
        let mut out: Vec<&MountEntry> = self
            .entries
            .iter()
            .filter(|m| m.mount_point != p && m.mount_point.starts_with(&p))
            .collect();
        out.sort_by_key(|m| m.mount_point.components().count());
        out
    }
}

/// `path` with symlinks resolved. For a path that does not exist (fully), the longest
/// existing prefix is resolved and the rest is normalized lexically (`.` dropped, `..`
/// pops), so the result is still comparable with mount points.
pub fn canonical(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => {
                out.push(other);
                if let Ok(real) = std::fs::canonicalize(&out) {
                    out = real;
                }
            }
        }
    }
    out
}

/// Whether `path` is a mount point in the calling thread's mount table.
pub fn is_mount_point(path: &Path) -> Result<bool, HostError> {
    Ok(MountTable::read()?.at(path).is_some())
}

/// The mount id of an open file (`statx` `STATX_MNT_ID`), falling back to `None` on
/// kernels without it.
pub fn mount_id_of(fd: impl std::os::fd::AsFd) -> io::Result<Option<u64>> {
    use rustix::fs::{AtFlags, StatxFlags, statx};
    let st = statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)?;
    if st.stx_mask & StatxFlags::MNT_ID.bits() != 0 {
        Ok(Some(st.stx_mnt_id))
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
        40 36 0:50 / /srv/pool rw shared:2 - nfs4 fs1:/export/x rw,vers=4.2\n\
        41 36 0:51 / /srv/pool/sub rw - tmpfs tmpfs rw\n\
        25 22 0:22 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";

    #[test]
    fn parses_fields_and_escapes() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].root, PathBuf::from("/mnt1"));
        assert_eq!(m[0].dev, (98, 0));
        assert_eq!(m[1].mount_id, 40);
        assert_eq!(m[1].fstype, "nfs4");
        assert_eq!(m[1].source, "fs1:/export/x");
        assert_eq!(m[3].super_options, "rw,cpu,cpuacct");
    }

    #[test]
    fn unescape_keeps_out_of_range_and_short_escapes_literally() {
        // \610 is 392, not a byte: it used to overflow (a debug-build panic).
        assert_eq!(unescape("a\\610b"), "a\\610b");
        assert_eq!(unescape("\\777"), "\\777");
        assert_eq!(unescape("\\377x").len(), 4); // 0xff → U+FFFD (3 bytes) + x
        assert_eq!(unescape("x\\04"), "x\\04");
        assert_eq!(unescape("x\\"), "x\\");
        assert_eq!(unescape("a\\134b\\011c"), "a\\b\tc");
        assert_eq!(unescape("\\08a"), "\\08a");
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let t = "garbage\n1 2 x / /a rw - tmpfs t rw\n3 2 0:1 / /b rw - tmpfs t rw\n- - -\n";
        let m = parse_mountinfo(t);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].mount_point, PathBuf::from("/b"));
    }

    #[test]
    fn lookups_compare_normalized_paths() {
        let t = MountTable::parse(SAMPLE);
        assert!(t.at(Path::new("/srv/pool/")).is_some());
        assert!(t.at(Path::new("/srv/nonexistent-x/../pool")).is_some());
        assert!(t.at(Path::new("/srv/pool/./sub")).is_some());
        let below: Vec<_> = t
            .below(Path::new("/srv/x/../pool"))
            .iter()
            .map(|m| m.mount_point.clone())
            .collect();
        assert_eq!(below, vec![PathBuf::from("/srv/pool/sub")]);
        assert!(t.below(Path::new("/srv/pool/sub")).is_empty());
        // /srv/poolx is not below /srv/pool (component-wise, not string prefix).
        assert!(t.below(Path::new("/srv/poo")).is_empty());
    }

    #[test]
    fn canonical_resolves_symlinks() {
        let d = tempfile::tempdir().expect("tempdir");
        let real = d.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        std::os::unix::fs::symlink(&real, d.path().join("link")).expect("symlink");
        let real = std::fs::canonicalize(&real).expect("canon");
        assert_eq!(canonical(&d.path().join("link")), real);
        assert_eq!(canonical(&d.path().join("link/missing/..")), real);
        assert_eq!(canonical(&d.path().join("link/new")), real.join("new"));
    }
}
