//! The whole import: reads every Proxmox file under a root, in dependency order
//! (storage and networks before the guests that use them, guests before the backup jobs
//! that name them), and returns the manifest files and the report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use stead_schema::{Kind, ResourceRef};

use crate::guest::{Volumes, name_volumes};
use crate::jobs::{Target, import_jobs};
use crate::model::{Manifest, render_files};
use crate::names::Taken;
use crate::network::{Networks, group};
use crate::qemu::{Ctx, GuestFile, Imported};
use crate::reader::{self, ParseError};
use crate::report::Report;
use crate::storage::{Pool, import_storage};

/// What to import.
#[derive(Debug, Clone)]
pub struct Options {
    /// The root the Proxmox files are read under (`/` on the host itself).
    pub root: PathBuf,
    /// Only the guests of this node.
    pub node: Option<String>,
    /// Import the rest when a file cannot be parsed (it is listed in the report).
    pub skip_invalid: bool,
}

/// What an import produced.
#[derive(Debug)]
pub struct Output {
    /// Manifest files: path relative to the output directory → YAML.
    pub files: BTreeMap<String, String>,
    /// The report (also rendered as `IMPORT-REPORT.md`).
    pub report: Report,
}

/// Name of the report file.
pub const REPORT_FILE: &str = "IMPORT-REPORT.md";

/// Runs the import. Errors: every malformed line of every file (all at once), unless
/// `skip_invalid`.
pub fn import(opts: &Options) -> Result<Output, Vec<ParseError>> {
    let _span = tracing::debug_span!("import_proxmox", root = %opts.root.display()).entered();
    check_root(opts)?;
    let mut run = Run {
        opts,
        report: Report::default(),
        errors: Vec::new(),
        manifests: Vec::new(),
    };
    let pools = run.storage();
    let networks = run.networks();
    let guests = run.guests();
    run.guest_manifests(&guests, &pools, &networks);
    run.jobs(&guests, &pools);
    if !run.errors.is_empty() {
        run.errors
            .sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        return Err(run.errors);
    }
    for m in &run.manifests {
        *run.report
            .written
            .entry(m.kind.as_str().to_string())
            .or_default() += 1;
    }
    let mut files = render_files(&run.manifests);
    let problems = self_check(&files);
    if !problems.is_empty() {
        return Err(problems);
    }
    files.insert(REPORT_FILE.to_string(), run.report.render());
    Ok(Output {
        files,
        report: run.report,
    })
}

/// Refuses a root without `etc/pve`, and a `--node` without its directory: an import of
/// nothing is a mistake, not an empty result.
fn check_root(opts: &Options) -> Result<(), Vec<ParseError>> {
    let pve = opts.root.join("etc/pve");
    if !pve.is_dir() {
        return Err(vec![ParseError::new(
            &pve,
            0,
            "no Proxmox VE configuration here (is --root right?)",
        )]);
    }
    if let Some(node) = &opts.node {
        let dir = pve.join("nodes").join(node);
        if !dir.is_dir() {
            return Err(vec![ParseError::new(
                &dir,
                0,
                format!("no node `{node}` (is --node right?)"),
            )]);
        }
    }
    Ok(())
}

/// A guest that parsed, with its kind and stead name.
#[derive(Debug)]
pub struct NamedGuest {
    /// VirtualMachine or Container.
    pub kind: Kind,
    /// The stead name.
    pub name: String,
    /// The parsed file.
    pub file: GuestFile,
}

/// State of one import run.
struct Run<'a> {
    opts: &'a Options,
    report: Report,
    errors: Vec<ParseError>,
    manifests: Vec<Manifest>,
}

impl Run<'_> {
    /// `root/rel`.
    fn path(&self, rel: &str) -> PathBuf {
        self.opts.root.join(rel)
    }

    /// Reads and parses `path`; a file that fails is an error, or with `--skip-invalid`
    /// a line in the report.
    fn load<T>(
        &mut self,
        path: &Path,
        parse: impl Fn(&Path, &str) -> Result<T, Vec<ParseError>>,
    ) -> Option<T> {
        let result = reader::read_text(path).and_then(|text| parse(path, &text));
        self.keep(path, result)
    }

    /// The value, or its errors recorded (see [`Run::load`]).
    fn keep<T>(&mut self, path: &Path, result: Result<T, Vec<ParseError>>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(errors) if self.opts.skip_invalid => {
                self.report
                    .skipped
                    .extend(errors.iter().map(|e| e.to_string()));
                self.report
                    .note(path, 0, "file", "invalid: skipped (--skip-invalid)");
                None
            }
            Err(errors) => {
                self.errors.extend(errors);
                None
            }
        }
    }

    /// `etc/pve/storage.cfg` → pools by storage id.
    fn storage(&mut self) -> BTreeMap<String, Pool> {
        let path = self.path("etc/pve/storage.cfg");
        if !path.exists() {
            self.report.note(
                &path,
                0,
                "file",
                "missing: no StoragePools, so no guest disks are imported",
            );
            return BTreeMap::new();
        }
        let Some(sections) = self.load(&path, reader::parse_section_config) else {
            return BTreeMap::new();
        };
        let (pools, manifests) = import_storage(&path, &sections, &mut self.report);
        self.manifests.extend(manifests);
        pools.into_iter().map(|p| (p.id.clone(), p)).collect()
    }

    /// `etc/network/interfaces`, `interfaces.d/*` (except `sdn`) and the SDN configs.
    fn networks(&mut self) -> Networks {
        let mut files = Vec::new();
        let main = self.path("etc/network/interfaces");
        let mut paths = vec![main.clone()];
        paths.extend(
            sorted_entries(&self.path("etc/network/interfaces.d"))
                .into_iter()
                .filter(|p| p.file_name().is_some_and(|n| n != "sdn")),
        );
        for p in paths {
            if !p.is_file() {
                if p == main {
                    self.report
                        .note(&p, 0, "file", "missing: no Networks or Bonds");
                }
                continue;
            }
            if let Some(parsed) = self.load(&p, reader::parse_interfaces) {
                files.push((p, parsed));
            }
        }
        let mut nets = Networks::default();
        nets.import_interfaces(&group(files), &mut self.report);
        let zpath = self.path("etc/pve/sdn/zones.cfg");
        let vpath = self.path("etc/pve/sdn/vnets.cfg");
        if zpath.is_file() && vpath.is_file() {
            let zones = self
                .load(&zpath, reader::parse_section_config)
                .unwrap_or_default();
            let vnets = self
                .load(&vpath, reader::parse_section_config)
                .unwrap_or_default();
            nets.import_sdn((&zpath, &zones), (&vpath, &vnets), &mut self.report);
        }
        let spath = self.path("etc/pve/sdn/subnets.cfg");
        if spath.is_file()
            && let Some(subnets) = self.load(&spath, reader::parse_section_config)
        {
            for s in subnets {
                self.report.note(
                    &spath,
                    s.line,
                    &format!("{}: {}", s.kind, s.id),
                    "SDN subnets (IPAM, DHCP, SNAT): not carried over",
                );
            }
        }
        self.manifests.append(&mut nets.manifests);
        nets
    }

    /// Every guest config under `etc/pve/nodes/*/{qemu-server,lxc}/`, by VMID, named.
    fn guests(&mut self) -> Vec<NamedGuest> {
        let mut found: BTreeMap<u32, (Kind, PathBuf, String)> = BTreeMap::new();
        for node_dir in sorted_entries(&self.path("etc/pve/nodes")) {
            let Some(node) = node_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
            else {
                continue;
            };
            let is_real_dir = std::fs::symlink_metadata(&node_dir).is_ok_and(|m| m.is_dir());
            if !is_real_dir || self.opts.node.as_ref().is_some_and(|n| *n != node) {
                continue;
            }
            for (sub, kind) in [
                ("qemu-server", Kind::VirtualMachine),
                ("lxc", Kind::Container),
            ] {
                for path in sorted_entries(&node_dir.join(sub)) {
                    let vmid = path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_suffix(".conf"))
                        .and_then(|n| n.parse::<u32>().ok());
                    let Some(vmid) = vmid else {
                        self.report.note(
                            &path,
                            0,
                            "file",
                            "not a `VMID.conf` guest config: skipped",
                        );
                        continue;
                    };
                    if let Some((_, first, _)) = found.get(&vmid) {
                        let msg = format!(
                            "VMID {vmid} is also configured in {}: skipped",
                            first.display()
                        );
                        self.report.note(&path, 0, "file", msg);
                        continue;
                    }
                    found.insert(vmid, (kind, path, node.clone()));
                }
            }
        }
        tracing::debug!(guests = found.len(), "guest configs found");
        let mut taken: BTreeMap<Kind, Taken> = BTreeMap::new();
        let mut out = Vec::new();
        for (vmid, (kind, path, node)) in found {
            let Some(conf) = self.load(&path, reader::parse_guest) else {
                continue;
            };
            let (key, prefix) = if kind == Kind::VirtualMachine {
                ("name", "vm")
            } else {
                ("hostname", "ct")
            };
            let name = taken
                .entry(kind)
                .or_default()
                .claim(conf.main.value(key), &format!("{prefix}-{vmid}"));
            out.push(NamedGuest {
                kind,
                name,
                file: GuestFile {
                    vmid,
                    node,
                    path,
                    conf,
                },
            });
        }
        out
    }

    /// VirtualMachines, Containers and the Volumes they use.
    fn guest_manifests(
        &mut self,
        guests: &[NamedGuest],
        pools: &BTreeMap<String, Pool>,
        networks: &Networks,
    ) {
        let mut keys = BTreeSet::new();
        for g in guests {
            let refs = match g.kind {
                Kind::VirtualMachine => crate::qemu::volume_refs(&g.file.conf),
                _ => crate::lxc::volume_refs(&g.file.conf),
            };
            keys.extend(
                refs.iter()
                    .filter(|r| pools.contains_key(&r.storage))
                    .map(|r| r.key()),
            );
        }
        let volume_names = name_volumes(&keys);
        let ctx = Ctx {
            pools,
            networks: &networks.by_bridge,
            volume_names: &volume_names,
            root: &self.opts.root,
        };
        let mut volumes = Volumes::default();
        volumes.names = volume_names.clone();
        let mut workloads = Vec::new();
        for g in guests {
            let result = match g.kind {
                Kind::VirtualMachine => crate::qemu::import_vm(&g.file, &g.name, &ctx),
                _ => crate::lxc::import_ct(&g.file, &g.name, &ctx),
            };
            let Some(Imported {
                manifest,
                volumes: used,
                report,
            }) = self.keep(&g.file.path, result)
            else {
                continue;
            };
            for (k, u) in used {
                volumes.declare(k, u);
            }
            self.report.extend(report);
            workloads.extend(manifest);
        }
        self.manifests
            .extend(volumes.manifests(pools, &mut self.report));
        release_conflicts(&mut workloads, guests, &self.manifests, &mut self.report);
        self.manifests.extend(workloads);
    }

    /// `etc/pve/jobs.cfg` → BackupSchedules.
    fn jobs(&mut self, guests: &[NamedGuest], pools: &BTreeMap<String, Pool>) {
        let path = self.path("etc/pve/jobs.cfg");
        if !path.is_file() {
            return;
        }
        let Some(sections) = self.load(&path, reader::parse_section_config) else {
            return;
        };
        let targets: Vec<Target> = guests
            .iter()
            .filter(|g| {
                self.manifests
                    .iter()
                    .any(|m| m.kind == g.kind && m.name == g.name)
            })
            .map(|g| Target {
                vmid: g.file.vmid,
                node: g.file.node.clone(),
                id: ResourceRef {
                    kind: g.kind,
                    name: g.name.clone(),
                },
            })
            .collect();
        let manifests = import_jobs(&path, &sections, &targets, pools, &mut self.report);
        self.manifests.extend(manifests);
    }
}

/// A MAC used by two guests, or a container address used twice on one network (or equal
/// to a host address on it), is kept by the first (in VMID order) and left out of the
/// others (reported): stead refuses both.
fn release_conflicts(
    workloads: &mut [Manifest],
    guests: &[NamedGuest],
    others: &[Manifest],
    report: &mut Report,
) {
    let mut macs: BTreeSet<String> = BTreeSet::new();
    let mut ips: BTreeSet<(String, String)> = BTreeSet::new();
    for n in others.iter().filter(|m| m.kind == Kind::Network) {
        for a in n.spec["addresses"].as_array().into_iter().flatten() {
            let ip = a
                .as_str()
                .unwrap_or_default()
                .split('/')
                .next()
                .unwrap_or_default();
            ips.insert((n.name.clone(), ip.to_string()));
        }
    }
    for w in workloads.iter_mut() {
        let Some(g) = guests.iter().find(|g| g.kind == w.kind && g.name == w.name) else {
            continue;
        };
        let file = g.file.path.as_path();
        let Some(ifaces) = w.spec.get_mut("interfaces").and_then(|v| v.as_array_mut()) else {
            continue;
        };
        for iface in ifaces.iter_mut() {
            let Some(obj) = iface.as_object_mut() else {
                continue;
            };
            if let Some(mac) = obj.get("mac").and_then(|m| m.as_str()).map(str::to_string)
                && !macs.insert(mac.clone())
            {
                let (line, key) = net_line(g, &mac);
                report.note(file, line, &key, format!("MAC {mac} is already used by a guest with a lower VMID: left out (stead derives one)"));
                obj.remove("mac");
            }
            let network = obj
                .get("network")
                .and_then(|n| n.as_str())
                .unwrap_or_default()
                .to_string();
            if let Some(addr) = obj
                .get("address")
                .and_then(|a| a.as_str())
                .map(str::to_string)
            {
                let ip = addr.split('/').next().unwrap_or_default().to_string();
                if !ips.insert((network.clone(), ip.clone())) {
                    let (line, key) = net_line(g, &ip);
                    report.note(file, line, &key, format!("address {ip} on `{network}` is already used (by the host or a guest with a lower VMID): address and gateway left out"));
                    obj.remove("address");
                    obj.remove("gateway");
                }
            }
        }
    }
}

/// The line and key of the guest's `netN` entry that mentions `needle`.
fn net_line(g: &NamedGuest, needle: &str) -> (usize, String) {
    let needle = needle.to_ascii_lowercase();
    g.file
        .conf
        .main
        .entries
        .iter()
        .find(|e| e.key.starts_with("net") && e.value.to_ascii_lowercase().contains(&needle))
        .map_or((0, "net".to_string()), |e| (e.line, e.key.clone()))
}

/// Loads and validates the rendered manifests as `stead validate` would: an import
/// never writes manifests stead refuses. A diagnostic here is a gap in the mapping,
/// returned as an error at the output file's line.
pub fn self_check(files: &BTreeMap<String, String>) -> Vec<ParseError> {
    let (mut resources, mut diags) = (Vec::new(), Vec::new());
    for (name, text) in files {
        stead_schema::load::load_str(Path::new(name), text, &mut resources, &mut diags);
    }
    let desired = stead_schema::load::into_desired(resources, &mut diags);
    diags.extend(stead_schema::validate::validate(&desired));
    diags
        .into_iter()
        .map(|d| {
            let msg = format!(
                "the imported manifests would not validate ({}: {}); this is a gap in the import, please report it",
                d.field, d.message
            );
            ParseError::new(&d.file, d.pos.line, msg)
        })
        .collect()
}

/// The entries of `dir`, sorted; none when it cannot be read.
fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}
