//! `stead man [--out DIR]`: manual pages generated from the command line definition,
//! `stead.1` and one page per subcommand (`stead-apply.1`, `stead-snapshot-create.1` …).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;

/// Arguments of `stead man`.
#[derive(clap::Args, Debug)]
pub(crate) struct ManArgs {
    /// Write `stead.1` and a page per subcommand into this directory (created if missing)
    /// instead of printing `stead.1`.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Runs `stead man`.
pub(crate) fn run(args: &ManArgs) -> Result<u8> {
    let cmd = command();
    match &args.out {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let pages = write_pages(cmd, dir)?;
            eprintln!("{} manual pages written to {}", pages.len(), dir.display());
        }
        None => page(cmd).render(&mut std::io::stdout().lock())?,
    }
    Ok(0)
}

/// The command line definition as the pages show it (no `help` subcommand).
fn command() -> clap::Command {
    let mut cmd = crate::Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// The page of one (built) command.
fn page(cmd: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(cmd)
        .manual("stead manual")
        .source(format!("stead {}", env!("CARGO_PKG_VERSION")))
        .date(page_date(
            std::env::var("SOURCE_DATE_EPOCH").ok().as_deref(),
        ))
}

/// The date on the pages, `YYYY-MM-DD`: `SOURCE_DATE_EPOCH` when set (reproducible
/// packages), else today.
fn page_date(source_date_epoch: Option<&str>) -> String {
    let at = source_date_epoch
        .and_then(|s| s.trim().parse::<i64>().ok())
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
        .unwrap_or_else(chrono::Utc::now);
    at.format("%Y-%m-%d").to_string()
}

/// Writes the page of `cmd` and of each of its visible subcommands, recursively, into
/// `dir`; returns the files written.
fn write_pages(cmd: clap::Command, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        written.extend(write_pages(sub.clone(), dir)?);
    }
    let file = page(cmd)
        .generate_to(dir)
        .with_context(|| format!("cannot write a manual page into {}", dir.display()))?;
    written.push(file);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_date_follows_source_date_epoch() {
        assert_eq!(page_date(Some("1780000000")), "2026-05-28");
        assert_eq!(page_date(Some("junk")).len(), 10);
    }

    #[test]
    fn every_visible_subcommand_gets_a_page_and_hidden_ones_none() {
        let dir = tempfile::tempdir().unwrap();
        let pages = write_pages(command(), dir.path()).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "stead.1",
            "stead-apply.1",
            "stead-snapshot-create.1",
            "stead-man.1",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        for hidden in ["stead-shim.1", "stead-vmm.1", "stead-help.1"] {
            assert!(!names.iter().any(|n| n == hidden), "{hidden} written");
        }
    }
}
