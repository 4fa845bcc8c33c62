//! `stead import proxmox`: writes the manifests of a Proxmox VE host's configuration
//! into `--out`, all at once (through a temporary directory beside it) or not at all.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use stead_import::proxmox::{self, REPORT_FILE};

/// `stead import …`.
#[derive(Subcommand, Debug)]
pub(crate) enum ImportCmd {
    /// Read a Proxmox VE host's configuration (guests, storage, network, backup jobs, SDN)
    /// and write stead manifests plus IMPORT-REPORT.md. Exit 1 with every FILE:LINE error
    /// when an input cannot be parsed.
    Proxmox(ProxmoxArgs),
}

/// `stead import proxmox` options.
#[derive(Args, Debug)]
pub(crate) struct ProxmoxArgs {
    /// The root the Proxmox files are read under (etc/pve, etc/network).
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
    /// Only the guests of this node (etc/pve/nodes/NAME).
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// Output directory: empty, new, or an earlier import (replaced).
    #[arg(long, value_name = "DIR", default_value = "proxmox-import")]
    out: PathBuf,
    /// Import the rest when a file cannot be parsed, and list it in the report.
    #[arg(long)]
    skip_invalid: bool,
}

/// Runs `stead import`.
pub(crate) fn run(cmd: ImportCmd) -> Result<u8> {
    match cmd {
        ImportCmd::Proxmox(args) => import_proxmox(&args),
    }
}

fn import_proxmox(args: &ProxmoxArgs) -> Result<u8> {
    let _span = tracing::info_span!("import", root = %args.root.display()).entered();
    let earlier = check_out_dir(&args.out)?;
    let opts = proxmox::Options {
        root: args.root.clone(),
        node: args.node.clone(),
        skip_invalid: args.skip_invalid,
    };
    let output = match proxmox::import(&opts) {
        Ok(o) => o,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!(
                "error: {} input error(s); nothing written to {}",
                errors.len(),
                args.out.display()
            );
            return Ok(1);
        }
    };
    write_all(&args.out, &output.files, earlier)?;
    eprint!("{}", output.report.render());
    let manifests: usize = output.report.written.values().sum();
    println!(
        "wrote {manifests} manifests and {REPORT_FILE} to {}{}",
        args.out.display(),
        if earlier {
            " (replacing the earlier import)"
        } else {
            ""
        }
    );
    Ok(0)
}

/// Checks `out`: absent, an empty directory, or an earlier import (which is replaced;
/// returns true). Anything else is refused.
fn check_out_dir(out: &Path) -> Result<bool> {
    let meta = match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", out.display())),
        Ok(m) => m,
    };
    if !meta.is_dir() {
        bail!("--out {} exists and is not a directory", out.display());
    }
    let empty = std::fs::read_dir(out)
        .with_context(|| format!("cannot read {}", out.display()))?
        .next()
        .is_none();
    if empty {
        return Ok(false);
    }
    if is_earlier_import(out) {
        return Ok(true);
    }
    bail!(
        "refusing to overwrite {}: it is not empty and not an earlier import (no {REPORT_FILE} written by `stead import`); choose a new or empty --out",
        out.display()
    )
}

/// Whether `dir` holds a report of an earlier import.
fn is_earlier_import(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(REPORT_FILE))
        .is_ok_and(|t| t.starts_with(stead_import::report::TITLE))
}

/// Writes `files` into a temporary directory beside `out` and renames it into place
/// (replacing an earlier import); on failure nothing is left behind.
fn write_all(
    out: &Path,
    files: &std::collections::BTreeMap<String, String>,
    earlier: bool,
) -> Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let base = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "proxmox-import".into());
    let tmp = parent.join(format!(".{base}.tmp-{}", std::process::id()));
    let old = parent.join(format!(".{base}.old-{}", std::process::id()));
    let written = write_tree(&tmp, files).and_then(|()| {
        if earlier {
            std::fs::rename(out, &old)
                .with_context(|| format!("cannot move the earlier import {}", out.display()))?;
        } else if out.exists() {
            std::fs::remove_dir(out)
                .with_context(|| format!("cannot replace {}", out.display()))?;
        }
        std::fs::rename(&tmp, out).with_context(|| format!("cannot rename into {}", out.display()))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        if earlier && !out.exists() {
            let _ = std::fs::rename(&old, out);
        }
        return Err(e);
    }
    if earlier {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("cannot remove the earlier import at {}", old.display()))?;
    }
    Ok(())
}

/// Writes every file under `dir` (made new).
fn write_tree(dir: &Path, files: &std::collections::BTreeMap<String, String>) -> Result<()> {
    std::fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (rel, text) in files {
        let path = dir.join(rel);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
