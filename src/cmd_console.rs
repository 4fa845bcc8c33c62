//! `stead console Kind/name` and `stead logs Kind/name`: a workload's serial console or
//! console log. Dispatches on the kind; each workload kind plugs in one match arm.

use anyhow::{Result, bail};
use stead_reconciler::driver::HostEnv;
use stead_schema::{Kind, ResourceId};

/// Arguments of `stead console`.
#[derive(clap::Args, Debug)]
pub struct ConsoleArgs {
    /// The workload: `VirtualMachine/NAME` (or `vm/NAME`) or `Container/NAME`.
    target: String,
}

/// Arguments of `stead logs`.
#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// The workload: `VirtualMachine/NAME` (or `vm/NAME`) or `Container/NAME`.
    target: String,
    /// Keep printing new output.
    #[arg(short, long)]
    follow: bool,
}

/// A workload that has a console.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Vm(String),
    Container(String),
}

fn parse_target(s: &str) -> Result<Target> {
    let id = ResourceId::parse_loose(s)?;
    match id.kind {
        Kind::VirtualMachine => Ok(Target::Vm(id.name)),
        Kind::Container => Ok(Target::Container(id.name)),
        k => bail!("{k} has no console: expected VirtualMachine/NAME or Container/NAME"),
    }
}

/// Runs `stead console`.
pub fn run_console(args: ConsoleArgs, env: &HostEnv) -> Result<u8> {
    match parse_target(&args.target)? {
        Target::Vm(name) => stead_drivers::vm::console(&env.run_dir, &name)?,
        Target::Container(name) => stead_drivers::container::console(&env.run_dir, &name)?,
    }
    Ok(0)
}

/// Runs `stead logs`.
pub fn run_logs(args: LogsArgs, env: &HostEnv) -> Result<u8> {
    let mut out = std::io::stdout();
    match parse_target(&args.target)? {
        Target::Vm(name) => stead_drivers::vm::logs(&env.run_dir, &name, args.follow, &mut out)?,
        Target::Container(name) => {
            stead_drivers::container::logs(&env.run_dir, &name, args.follow, &mut out)?
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("vm/web").ok(), Some(Target::Vm("web".into())));
        assert_eq!(
            parse_target("VirtualMachine/a").ok(),
            Some(Target::Vm("a".into()))
        );
        assert_eq!(
            parse_target("ct/c1").ok(),
            Some(Target::Container("c1".into()))
        );
        assert!(parse_target("volume/x").is_err());
        assert!(parse_target("vm").is_err());
        assert!(parse_target("vm/").is_err());
    }
}
