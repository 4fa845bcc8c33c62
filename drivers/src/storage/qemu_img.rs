//! Disk images through `qemu-img` (apt `qemu-utils`): create, inspect, resize, convert.
//!
//! Every command names the format of an image stead made (`-f`), so a raw volume whose
//! guest wrote a qcow2 header is never read as qcow2. Only images brought in from outside
//! (`source.file`, `source.url`) are probed, and [`check_importable`] refuses those that
//! would make QEMU open other files (a backing file, an external data file).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use serde::Deserialize;
use serde_json::Value;
use stead_host::progress::{self, Meter};
use stead_reconciler::driver::DriverError;
use stead_schema::{ByteSize, VolumeFormat};
use tracing::debug;

/// The package that ships `qemu-img`.
pub const PACKAGE: &str = "qemu-utils";

/// Image formats accepted as import sources: single-file formats without references to
/// other files (vmdk is left out: its descriptors name extent files).
pub const IMPORT_FORMATS: &[&str] = &["raw", "qcow2", "vdi", "vhdx", "vpc", "qed"];

/// What `qemu-img info --output=json` says about one image.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The image's format (`raw`, `qcow2`, …).
    pub format: String,
    /// The size the guest sees, in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host, when known.
    #[serde(default)]
    pub actual_size: Option<u64>,
    /// The backing file as written in the image (relative to the image's directory or
    /// absolute), if any.
    #[serde(default)]
    pub backing_filename: Option<String>,
    /// The backing file resolved to a path, if any.
    #[serde(default)]
    pub full_backing_filename: Option<String>,
    /// The backing file's format, if recorded.
    #[serde(default)]
    pub backing_filename_format: Option<String>,
    /// Format-specific details (qcow2: compat, lazy refcounts, data file, bitmaps, …).
    #[serde(default)]
    pub format_specific: Option<Value>,
}

impl ImageInfo {
    /// The external data file of a qcow2 image, if it has one.
    pub fn data_file(&self) -> Option<&str> {
        self.format_specific
            .as_ref()?
            .get("data")?
            .get("data-file")?
            .as_str()
    }
}

/// The `qemu-img` name of a volume format.
pub fn format_name(f: VolumeFormat) -> &'static str {
    match f {
        VolumeFormat::Raw => "raw",
        VolumeFormat::Qcow2 => "qcow2",
    }
}

fn path_arg(p: &Path) -> Result<String, DriverError> {
    let s = p
        .to_str()
        .ok_or_else(|| DriverError::Refused(format!("{} is not UTF-8", p.display())))?;
    // qemu-img reads `proto:...` and `json:{...}` as protocol strings; an absolute path
    // never is one.
    if !p.is_absolute() {
        return Err(DriverError::Refused(format!(
            "{} is not an absolute path",
            p.display()
        )));
    }
    Ok(s.to_string())
}

fn run(args: &[String]) -> Result<String, DriverError> {
    let mut argv = vec!["qemu-img".to_string()];
    argv.extend_from_slice(args);
    super::run_tool(&argv, PACKAGE)
}

/// Parses `qemu-img info --output=json`.
pub fn parse_info(json: &str) -> Result<ImageInfo, DriverError> {
    serde_json::from_str(json)
        .map_err(|e| DriverError::Other(format!("unexpected qemu-img info output: {e}")))
}

/// Information about the image at `path`: read as `format`, or probed when `None`.
/// Opens the image shared (`-U`), so it works while a VM has it open.
pub fn info(path: &Path, format: Option<&str>) -> Result<ImageInfo, DriverError> {
    let mut args = vec!["info".to_string(), "-U".into(), "--output=json".into()];
    if let Some(f) = format {
        args.extend(["-f".into(), f.to_string()]);
    }
    args.push(path_arg(path)?);
    parse_info(&run(&args)?)
}

/// The argv of `qemu-img create` for a new image of `format` and `size` bytes at
/// `path`, optionally on top of `backing` (a path relative to `path`'s directory, and
/// its format).
pub fn create_args(
    path: &Path,
    format: VolumeFormat,
    size: u64,
    backing: Option<(&str, VolumeFormat)>,
) -> Result<Vec<String>, DriverError> {
    let mut args = vec!["create".to_string(), "-q".into()];
    args.extend(["-f".into(), format_name(format).into()]);
    if let Some((file, fmt)) = backing {
        if file.starts_with('-') || file.contains(':') || file.contains(',') {
            return Err(DriverError::Refused(format!(
                "backing file name {file:?} is not a plain file name"
            )));
        }
        args.extend(["-b".into(), file.to_string()]);
        args.extend(["-F".into(), format_name(fmt).into()]);
    }
    args.push(path_arg(path)?);
    args.push(size.to_string());
    Ok(args)
}

/// Creates (or overwrites, keeping its inode) the image at `path`.
pub fn create(
    path: &Path,
    format: VolumeFormat,
    size: u64,
    backing: Option<(&str, VolumeFormat)>,
) -> Result<(), DriverError> {
    run(&create_args(path, format, size, backing)?).map(drop)
}

/// Grows the image at `path` to `size` bytes (`qemu-img resize`). Never shrinks.
pub fn grow(path: &Path, format: VolumeFormat, size: u64) -> Result<(), DriverError> {
    run(&[
        "resize".into(),
        "-q".into(),
        "-f".into(),
        format_name(format).into(),
        path_arg(path)?,
        size.to_string(),
    ])
    .map(drop)
}

/// Refuses an outside image that QEMU could not use on its own: a format not in
/// [`IMPORT_FORMATS`], a backing file, or an external data file.
pub fn check_importable(src: &Path, info: &ImageInfo) -> Result<(), DriverError> {
    if !IMPORT_FORMATS.contains(&info.format.as_str()) {
        return Err(DriverError::Refused(format!(
            "image {} is in format {}, which is not imported (use one of {})",
            src.display(),
            info.format,
            IMPORT_FORMATS.join(", ")
        )));
    }
    if let Some(b) = &info.backing_filename {
        return Err(DriverError::Refused(format!(
            "image {} has a backing file ({b}); import a standalone image \
             (qemu-img convert flattens it)",
            src.display()
        )));
    }
    if let Some(d) = info.data_file() {
        return Err(DriverError::Refused(format!(
            "image {} keeps its data in another file ({d}); import a standalone image",
            src.display()
        )));
    }
    Ok(())
}

/// Parses the percentages that `qemu-img convert -p` prints (`    (12.50/100%)\r`).
pub fn parse_percent(line: &str) -> Option<f64> {
    let inner = line.trim().strip_prefix('(')?.strip_suffix("/100%)")?;
    inner.parse().ok()
}

/// Converts `src` (read as `src_format`) into `dst` as `dst_format` (`qemu-img convert`,
/// sparse), showing progress under `label`. `dst` may exist: it is rewritten in place.
pub fn convert(
    src: &Path,
    src_format: &str,
    dst: &Path,
    dst_format: VolumeFormat,
    virtual_size: u64,
    label: &str,
) -> Result<(), DriverError> {
    let args = [
        "convert".to_string(),
        "-p".into(),
        "-f".into(),
        src_format.to_string(),
        "-O".into(),
        format_name(dst_format).into(),
        path_arg(src)?,
        path_arg(dst)?,
    ];
    let line = format!("qemu-img {}", args.join(" "));
    debug!(command = %line, "running");
    let mut child = Command::new("qemu-img")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DriverError::Unsupported(format!("qemu-img not found (install {PACKAGE})"))
            } else {
                DriverError::io(format!("run {line}"), e)
            }
        })?;
    let stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = e.read_to_string(&mut s);
            s
        })
    });
    let bar = progress::start(label, Meter::Transfer);
    bar.set_length(virtual_size);
    if let Some(mut out) = child.stdout.take() {
        let mut buf = [0u8; 256];
        let mut pending = String::new();
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            pending.push_str(&String::from_utf8_lossy(&buf[..n]));
            while let Some(i) = pending.find(['\r', '\n']) {
                if let Some(p) = parse_percent(&pending[..i]) {
                    bar.set_position((virtual_size as f64 * p / 100.0) as u64);
                }
                pending.drain(..=i);
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| DriverError::io(format!("wait for {line}"), e))?;
    bar.finish();
    let err = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    if !status.success() {
        return Err(DriverError::Command {
            command: line,
            status: status.to_string(),
            stderr: err.trim().to_string(),
        });
    }
    debug!(src = %src.display(), dst = %dst.display(), size = %ByteSize(virtual_size), "converted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_parses_a_linked_clone() {
        let j = r#"{
            "virtual-size": 67108864, "filename": "/p/images/c.qcow2", "cluster-size": 65536,
            "format": "qcow2", "actual-size": 200704, "full-backing-filename": "/p/images/t.qcow2",
            "backing-filename": "t.qcow2", "backing-filename-format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "lazy-refcounts": false,
              "refcount-bits": 16, "corrupt": false, "extended-l2": false}},
            "dirty-flag": false }"#;
        let i = parse_info(j).expect("parse");
        assert_eq!(i.format, "qcow2");
        assert_eq!(i.virtual_size, 64 << 20);
        assert_eq!(i.backing_filename.as_deref(), Some("t.qcow2"));
        assert_eq!(i.data_file(), None);
        assert!(check_importable(Path::new("/x"), &i).is_err());
    }

    #[test]
    fn an_external_data_file_or_an_odd_format_is_not_imported() {
        let j = r#"{"virtual-size": 1, "format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"data-file": "/etc/shadow"}}}"#;
        let i = parse_info(j).expect("parse");
        assert_eq!(i.data_file(), Some("/etc/shadow"));
        let e = check_importable(Path::new("/x"), &i).expect_err("refused");
        assert!(e.to_string().contains("/etc/shadow"), "{e}");
        let vmdk = parse_info(r#"{"virtual-size": 1, "format": "vmdk"}"#).expect("parse");
        assert!(check_importable(Path::new("/x"), &vmdk).is_err());
        let raw = parse_info(r#"{"virtual-size": 1, "format": "raw"}"#).expect("parse");
        assert!(check_importable(Path::new("/x"), &raw).is_ok());
    }

    #[test]
    fn convert_progress_lines() {
        assert_eq!(parse_percent("    (12.50/100%)"), Some(12.5));
        assert_eq!(parse_percent("(100.00/100%)"), Some(100.0));
        assert_eq!(parse_percent("qemu-img: error"), None);
    }

    #[test]
    fn create_args_name_formats_and_a_relative_backing_file() {
        let a = create_args(
            Path::new("/p/images/c.qcow2"),
            VolumeFormat::Qcow2,
            1 << 30,
            Some(("t.raw", VolumeFormat::Raw)),
        )
        .expect("args");
        assert_eq!(
            a,
            [
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "t.raw",
                "-F",
                "raw",
                "/p/images/c.qcow2",
                "1073741824"
            ]
        );
        assert!(
            create_args(
                Path::new("/p/c"),
                VolumeFormat::Qcow2,
                1,
                Some(("json:{}", VolumeFormat::Raw))
            )
            .is_err()
        );
        assert!(create_args(Path::new("rel"), VolumeFormat::Raw, 1, None).is_err());
    }
}
