//! Shell completions: `stead completions bash|zsh|fish` prints a script that asks the
//! binary itself for candidates (`STEAD_COMPLETE=<shell> stead -- <words>`), so that
//! resource arguments complete `Kind/name` from the state dir as well as subcommands,
//! flags and paths.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::engine::{ArgValueCompleter, CompletionCandidate};
use clap_complete::env::{CompleteEnv, Shells};
use stead_schema::Kind;

/// The environment variable that switches the binary into completion mode.
pub(crate) const COMPLETE_VAR: &str = "STEAD_COMPLETE";

/// Arguments that take `Kind/name`: subcommand path, argument id, the kinds it accepts
/// (empty: every kind).
const RESOURCE_ARGS: &[(&[&str], &str, &[Kind])] = &[
    (&["get"], "what", &[]),
    (&["console"], "target", WORKLOADS),
    (&["logs"], "target", WORKLOADS),
    (&["exec"], "target", &[Kind::Container]),
    (&["migrate"], "resource", WORKLOADS),
    (&["snapshot", "create"], "target", SNAPSHOTTABLE),
    (&["snapshot", "list"], "target", SNAPSHOTTABLE),
    (&["snapshot", "rollback"], "target", SNAPSHOTTABLE),
    (&["snapshot", "delete"], "target", SNAPSHOTTABLE),
    (&["backup", "run"], "target", SNAPSHOTTABLE),
    (&["backup", "list"], "resource", SNAPSHOTTABLE),
    (&["backup", "verify"], "backup", SNAPSHOTTABLE),
    (&["backup", "restore"], "backup", SNAPSHOTTABLE),
    (&["backup", "prune"], "resource", SNAPSHOTTABLE),
];

const WORKLOADS: &[Kind] = &[Kind::VirtualMachine, Kind::Container];
const SNAPSHOTTABLE: &[Kind] = &[Kind::Volume, Kind::VirtualMachine, Kind::Container];

/// Answers a completion request and exits when [`COMPLETE_VAR`] is set; returns
/// otherwise. Called first thing in `main`.
pub(crate) fn answer_if_asked() {
    CompleteEnv::with_factory(command)
        .var(COMPLETE_VAR)
        .bin("stead")
        .completer("stead")
        .complete();
}

/// Writes the registration script for `shell` (what `stead completions SHELL` prints).
pub(crate) fn write_script(
    shell: clap_complete::Shell,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    let name = shell.to_string();
    let shells = Shells::builtins();
    let Some(completer) = shells.completer(&name) else {
        return Err(std::io::Error::other(format!(
            "no completion support for {name}"
        )));
    };
    completer.write_registration(COMPLETE_VAR, "stead", "stead", "stead", out)
}

/// The command line definition with the `Kind/name` completers attached.
pub(crate) fn command() -> clap::Command {
    let mut cmd = crate::Cli::command();
    for (path, arg, kinds) in RESOURCE_ARGS {
        cmd = attach(cmd, path, arg, kinds);
    }
    cmd
}

/// Attaches a `Kind/name` completer to `arg` of the subcommand at `path`, when both exist.
fn attach(
    cmd: clap::Command,
    path: &[&str],
    arg: &'static str,
    kinds: &'static [Kind],
) -> clap::Command {
    match path.split_first() {
        // `mut_args` keeps the arguments' order (`mut_arg` moves the argument last, which
        // reorders positionals).
        None => cmd.mut_args(|a| {
            if a.get_id() != arg {
                return a;
            }
            a.add(ArgValueCompleter::new(move |current: &OsStr| {
                resource_candidates(kinds, current)
            }))
        }),
        Some((first, rest)) => {
            if cmd.find_subcommand(first).is_none() {
                return cmd;
            }
            cmd.mut_subcommand(*first, |sub| attach(sub, rest, arg, kinds))
        }
    }
}

/// The owned resources of `kinds` whose `Kind/name` starts with `current` (the kind
/// matched case-insensitively).
fn resource_candidates(kinds: &[Kind], current: &OsStr) -> Vec<CompletionCandidate> {
    let current = current.to_string_lossy().to_ascii_lowercase();
    let state_dir = state_dir_from(std::env::args_os(), std::env::var_os("STEAD_STATE_DIR"));
    owned_ids(&state_dir)
        .into_iter()
        .filter(|(kind, _)| {
            kinds.is_empty() || Kind::parse_loose(kind).is_some_and(|k| kinds.contains(&k))
        })
        .map(|(kind, name)| format!("{kind}/{name}"))
        .filter(|id| id.to_ascii_lowercase().starts_with(&current))
        .map(CompletionCandidate::new)
        .collect()
}

/// The state dir of the command line being completed: its last `--state-dir`, else
/// `$STEAD_STATE_DIR`, else the default.
fn state_dir_from(args: impl IntoIterator<Item = OsString>, env: Option<OsString>) -> PathBuf {
    let mut found: Option<OsString> = None;
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        if a == "--state-dir" {
            found = args.next().or(found);
        } else if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--state-dir=")) {
            found = Some(v.into());
        }
    }
    found.or(env).map_or_else(default_state_dir, PathBuf::from)
}

/// The `--state-dir` default of the command line definition.
fn default_state_dir() -> PathBuf {
    crate::Cli::command()
        .get_arguments()
        .find(|a| a.get_id() == "state_dir")
        .and_then(|a| a.get_default_values().first().map(PathBuf::from))
        .unwrap_or_default()
}

/// `(kind, name)` of every resource in the state DB's inventory, opened read-only; empty
/// when there is no DB or it cannot be read (completion prints no errors).
fn owned_ids(state_dir: &Path) -> Vec<(String, String)> {
    stead_reconciler::state::inventory_names_read_only(state_dir).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_resource_argument_exists() {
        let cmd = crate::Cli::command();
        for (path, arg, _) in RESOURCE_ARGS {
            let mut sub = &cmd;
            for p in *path {
                sub = sub
                    .find_subcommand(p)
                    .unwrap_or_else(|| panic!("no subcommand {path:?}"));
            }
            assert!(
                sub.get_arguments().any(|a| a.get_id() == arg),
                "{path:?} has no argument {arg}"
            );
        }
    }

    #[test]
    fn the_state_dir_comes_from_the_line_then_the_environment() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            state_dir_from(
                args(&["stead", "--", "stead", "--state-dir", "/a", "get", ""]),
                Some("/env".into())
            ),
            PathBuf::from("/a")
        );
        assert_eq!(
            state_dir_from(args(&["stead", "get", "--state-dir=/b"]), None),
            PathBuf::from("/b")
        );
        assert_eq!(
            state_dir_from(args(&["stead", "get"]), Some("/env".into())),
            PathBuf::from("/env")
        );
        assert_eq!(
            state_dir_from(args(&["stead"]), None),
            PathBuf::from("/var/lib/stead")
        );
    }
}
