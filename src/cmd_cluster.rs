//! `stead cluster init|status`: the cluster's certificates and its state in etcd.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use stead_cluster::pki::{self, CaMode, InitReport, InitRequest, Layout, Member};

/// Output format of the cluster verbs.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// For people.
    Text,
    /// One JSON document.
    Json,
}

/// `stead cluster` subcommands.
#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Make the cluster's CA and the certificates of every etcd member, agent and the
    /// operator, and print the etcd flags of each member.
    Init(InitArgs),
}

/// `stead cluster init` arguments.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// Directory of the certificates (created; keys are written 0600).
    #[arg(long, default_value = "/etc/stead/pki")]
    dir: PathBuf,
    /// An etcd member and node, NAME=IP (repeat for each).
    #[arg(long = "node", value_name = "NAME=IP", required = true)]
    nodes: Vec<Member>,
    /// Sign with the CA already in DIR (adding nodes).
    #[arg(long, conflicts_with = "force_new_ca")]
    reuse_ca: bool,
    /// Replace a CA already in DIR: every certificate it signed stops working.
    #[arg(long)]
    force_new_ca: bool,
    /// Validity of the member and client certificates in days (the CA: ten times this).
    #[arg(long, default_value_t = 825)]
    days: u32,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    output: Format,
}

/// Runs a `stead cluster` subcommand.
pub fn run(cmd: ClusterCmd) -> Result<u8> {
    match cmd {
        ClusterCmd::Init(a) => init(a),
    }
}

fn init(a: InitArgs) -> Result<u8> {
    let ca = match (a.reuse_ca, a.force_new_ca) {
        (true, _) => CaMode::Reuse,
        (_, true) => CaMode::Replace,
        _ => CaMode::New,
    };
    let report = pki::init(&InitRequest {
        layout: Layout::new(&a.dir),
        members: a.nodes,
        ca,
        days: a.days,
    })?;
    match a.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => print_init(&report),
    }
    Ok(0)
}

fn print_init(r: &InitReport) {
    let ca = if r.ca_created { "created" } else { "reused" };
    println!("CA {ca}: {}", r.ca_cert.display());
    println!(
        "operator client certificate: {} (key {})",
        r.admin.0.display(),
        r.admin.1.display()
    );
    for m in &r.members {
        println!();
        println!(
            "# {}: agent certificate {} (key {})",
            m.name,
            m.agent.0.display(),
            m.agent.1.display()
        );
        println!("etcd --data-dir=/var/lib/etcd/stead \\");
        let n = m.etcd_flags.len();
        for (i, f) in m.etcd_flags.iter().enumerate() {
            let end = if i + 1 < n { " \\" } else { "" };
            println!("  {f}{end}");
        }
    }
}
