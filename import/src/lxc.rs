//! `pct.conf(5)` → a Container and its Volumes.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use stead_schema::{
    ByteSize, Cidr, ContainerInterface, ContainerSpec, IfName, Kind, MacAddr, MountSpec, Name,
    Placement, ResourceLimits, RestartPolicy, RootfsSpec,
};

use crate::guest::{
    DiskSource, VolRef, VolumeUse, parse_size, parse_source, run_state, volume_format,
};
use crate::qemu::{
    Ctx, GuestFile, Imported, imported_guest, network_for, numbered, report_sections,
};
use crate::reader::{Entry, ParseError, property_string};
use crate::report::Report;

/// The volumes a container config names.
pub fn volume_refs(conf: &crate::reader::GuestConf) -> Vec<VolRef> {
    conf.main
        .entries
        .iter()
        .filter(|e| e.key == "rootfs" || numbered(&e.key, "mp"))
        .filter_map(|e| match parse_source(property_string(&e.value).0) {
            Ok(DiskSource::Volume(v)) => Some(v),
            _ => None,
        })
        .collect()
}

/// Keys the container mapping reads.
const HANDLED: &[&str] = &[
    "hostname",
    "memory",
    "cores",
    "unprivileged",
    "onboot",
    "startup",
    "rootfs",
];

/// Why a container key is not carried over.
fn unmapped_reason(key: &str) -> String {
    let why = match key {
        "swap" => "swap limits",
        "features" => "container features (nesting, keyctl, fuse, mounts)",
        "cpulimit" | "cpuunits" => "CPU limits other than `cores`",
        "nameserver" | "searchdomain" => "DNS settings (the container's own files keep them)",
        "hookscript" => "hook scripts",
        "arch" | "ostype" => "the OS type (stead runs the container's own init)",
        "tags" => "Proxmox tags",
        "lock" => "a Proxmox lock (the guest was in a backup, migration or snapshot)",
        "parent" => "the current snapshot (snapshots are not imported)",
        "protection" => "deletion protection",
        "console" | "tty" | "cmode" => "console settings",
        "digest" => "Proxmox bookkeeping",
        _ if key.starts_with("lxc.") => "a raw LXC setting",
        _ if numbered(key, "dev") => "device passthrough",
        _ if numbered(key, "unused") => "an unused (detached) volume",
        "description" => "the container's notes (a manifest's comments can keep them)",
        "timezone" => "the time zone (the container's own files keep it)",
        _ => "a setting the Container kind has no field for",
    };
    format!("{why}: not carried over")
}

/// Imports a container config as the Container `name`.
pub fn import_ct(g: &GuestFile, name: &str, ctx: &Ctx) -> Result<Imported, Vec<ParseError>> {
    let file = g.path.as_path();
    let main = &g.conf.main;
    let mut report = Report::default();
    let mut errors = Vec::new();
    let mut parts = CtParts::default();
    report_sections(file, &g.conf.sections, &mut report);
    for e in &main.entries {
        let r = if e.key == "rootfs" {
            parts.volume(ctx, file, e, None, &mut report)
        } else if numbered(&e.key, "mp") {
            parts.mount_point(ctx, file, e, &mut report)
        } else if numbered(&e.key, "net") {
            parts.net(ctx, file, e, &mut report)
        } else {
            if !HANDLED.contains(&e.key.as_str()) {
                report.note(file, e.line, &e.key, unmapped_reason(&e.key));
            }
            Ok(())
        };
        if let Err(m) = r {
            errors.push(ParseError::new(file, e.line, format!("{}: {m}", e.key)));
        }
    }
    let resources = resources(file, main, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let rootfs = match parts.rootfs.take() {
        Some(v) => RootfsSpec {
            volume: Some(v),
            ..RootfsSpec::default()
        },
        None => {
            let path = PathBuf::from(format!("/var/lib/lxc/{}/rootfs", g.vmid));
            report.note(file, 0, "rootfs", format!("no importable root file system: the container is imported with `rootfs.path: {}`; point it at its root file system", path.display()));
            RootfsSpec {
                path: Some(path),
                ..RootfsSpec::default()
            }
        }
    };
    let spec = ContainerSpec {
        rootfs,
        hostname: hostname(file, main.get("hostname"), &mut report),
        command: None,
        env: Default::default(),
        unprivileged: main.value("unprivileged") == Some("1"),
        resources,
        interfaces: parts.interfaces,
        mounts: parts.mounts,
        state: run_state(file, main.get("onboot"), &mut report),
        restart_policy: RestartPolicy::Always,
        stop_timeout: crate::guest::stop_timeout(file, main.get("startup"), &mut report),
        deletion_policy: None,
        placement: Placement::default(),
        depends_on: vec![],
    };
    Ok(imported_guest(
        g,
        Kind::Container,
        name,
        &spec,
        parts.volumes,
        report,
    ))
}

/// `hostname`, when stead accepts it (letters, digits, `-` and `.`, at most 64).
fn hostname(file: &Path, e: Option<&Entry>, report: &mut Report) -> Option<String> {
    let e = e?;
    let ok = e.value.len() <= 64
        && e.value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if ok {
        return Some(e.value.clone());
    }
    report.note(
        file,
        e.line,
        "hostname",
        format!(
            "`{}` is not a host name stead accepts: the container's name is used",
            e.value
        ),
    );
    None
}

/// `cores` → `resources.cpus`, `memory` (MiB) → `resources.memory`.
fn resources(
    file: &Path,
    main: &crate::reader::Section,
    errors: &mut Vec<ParseError>,
) -> ResourceLimits {
    let mut num = |key: &str| -> Option<u64> {
        let e = main.get(key)?;
        match e.value.parse::<u64>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                errors.push(ParseError::new(
                    file,
                    e.line,
                    format!("{key}: `{}` is not a positive number", e.value),
                ));
                None
            }
        }
    };
    ResourceLimits {
        cpus: num("cores").map(|c| c as f64),
        memory: Some(ByteSize(
            num("memory").unwrap_or(512).saturating_mul(1 << 20),
        )),
        pids: None,
    }
}

/// Root file system, mounts, interfaces and volumes being assembled.
#[derive(Default)]
struct CtParts {
    rootfs: Option<Name>,
    mounts: Vec<MountSpec>,
    interfaces: Vec<ContainerInterface>,
    volumes: Vec<((String, String), VolumeUse)>,
}

impl CtParts {
    /// `rootfs` (mount point `None`) or an `mpN` volume: the Volume it names.
    fn volume(
        &mut self,
        ctx: &Ctx,
        file: &Path,
        e: &Entry,
        mp: Option<&str>,
        report: &mut Report,
    ) -> Result<(), String> {
        let (first, opts) = property_string(&e.value);
        let src = parse_source(first)?;
        let size = opts
            .iter()
            .find(|(k, _)| *k == "size")
            .map(|(_, v)| parse_size(v))
            .transpose()?;
        let r = match src {
            DiskSource::Volume(r) => r,
            DiskSource::HostPath(p) => {
                report.note(file, e.line, &e.key, format!("a bind mount of the host path `{p}`: not carried over (stead mounts Volumes)"));
                return Ok(());
            }
            _ => return Err(format!("`{}` is not STORAGE:VOLUME", first.unwrap_or(""))),
        };
        let Some(pool) = ctx.pools.get(&r.storage) else {
            report.note(
                file,
                e.line,
                &e.key,
                format!("storage `{}` is not imported: not carried over", r.storage),
            );
            return Ok(());
        };
        let Some(size) = size else {
            report.note(file, e.line, &e.key, "no `size`: not carried over");
            return Ok(());
        };
        let format = match volume_format(&r, pool) {
            Ok(f) => f,
            Err(m) => {
                report.note(file, e.line, &e.key, m);
                return Ok(());
            }
        };
        for (k, v) in &opts {
            if !matches!(*k, "size" | "mp" | "ro") {
                report.note(
                    file,
                    e.line,
                    &format!("{}.{k}", e.key),
                    crate::reasons::mount_option(k, v),
                );
            }
        }
        let name = Name(
            ctx.volume_names
                .get(&r.key())
                .cloned()
                .unwrap_or_else(|| crate::names::sanitize(&r.stem)),
        );
        self.volumes.push((
            r.key(),
            VolumeUse {
                pool: pool.name.clone(),
                size,
                format,
                template: false,
                clone_of: r.base_key(),
                file: String::new(),
                origin: (file.to_path_buf(), e.line, e.key.clone()),
            },
        ));
        match mp {
            None => self.rootfs = Some(name),
            Some(path) => self.mounts.push(MountSpec {
                volume: name,
                path: PathBuf::from(path),
                read_only: opts.iter().any(|(k, v)| *k == "ro" && *v == "1"),
            }),
        }
        Ok(())
    }

    /// `mpN: STORAGE:VOLUME,mp=PATH,size=S` (or a bind mount of a host path).
    fn mount_point(
        &mut self,
        ctx: &Ctx,
        file: &Path,
        e: &Entry,
        report: &mut Report,
    ) -> Result<(), String> {
        let (_, opts) = property_string(&e.value);
        let Some((_, mp)) = opts.iter().find(|(k, _)| *k == "mp") else {
            return Err("no `mp=PATH`".into());
        };
        if !mp.starts_with('/') {
            return Err(format!("mount point `{mp}` is not an absolute path"));
        }
        self.volume(ctx, file, e, Some(mp), report)
    }

    /// `netN: name=eth0,bridge=BR,hwaddr=MAC,ip=CIDR,gw=IP,tag=T`.
    fn net(
        &mut self,
        ctx: &Ctx,
        file: &Path,
        e: &Entry,
        report: &mut Report,
    ) -> Result<(), String> {
        let (_, opts) = property_string(&e.value);
        let (mut name, mut bridge, mut mac, mut address, mut gateway, mut vlan) =
            (None, None, None, None, None, None);
        for (k, v) in &opts {
            match *k {
                "name" => {
                    name = Some(
                        v.parse::<IfName>()
                            .map_err(|_| format!("`{v}` is not an interface name"))?,
                    )
                }
                "bridge" => bridge = Some(*v),
                "hwaddr" => {
                    mac = Some(
                        v.parse::<MacAddr>()
                            .map_err(|_| format!("`{v}` is not a MAC address"))?,
                    )
                }
                "ip" if *v == "dhcp" || *v == "manual" => report.note(
                    file,
                    e.line,
                    &format!("{}.ip", e.key),
                    format!(
                        "`ip={v}`: stead gives container interfaces a static address; none set"
                    ),
                ),
                "ip" => {
                    address = Some(
                        v.parse::<Cidr>()
                            .map_err(|_| format!("`{v}` is not an address/prefix"))?,
                    )
                }
                "gw" => {
                    gateway = Some(
                        v.parse::<IpAddr>()
                            .map_err(|_| format!("`{v}` is not an IP address"))?,
                    )
                }
                "tag" => {
                    vlan = Some(
                        v.parse::<u16>()
                            .map_err(|_| format!("tag `{v}` is not a VLAN id"))?,
                    )
                }
                "type" if *v == "veth" => {}
                k => report.note(
                    file,
                    e.line,
                    &format!("{}.{k}", e.key),
                    crate::reasons::nic_option(k, v),
                ),
            }
        }
        let Some(name) = name else {
            return Err("no `name=`".into());
        };
        let Some(bridge) = bridge else {
            report.note(
                file,
                e.line,
                &e.key,
                "no bridge: interface not carried over",
            );
            return Ok(());
        };
        let Some(network) = network_for(ctx, file, e, bridge, &mut vlan, report) else {
            return Ok(());
        };
        let (address, gateway) = in_subnet(file, e, &network, address, gateway, report);
        self.interfaces.push(ContainerInterface {
            name,
            network: Name(network.name),
            address,
            gateway,
            mac,
            vlan,
        });
        Ok(())
    }
}

/// The address when it lies in a subnet of the Network's host addresses (or the Network
/// has none), and the gateway when it lies in the address's subnet; stead refuses
/// anything else, so it is reported and left out.
fn in_subnet(
    file: &Path,
    e: &Entry,
    net: &crate::network::NetInfo,
    address: Option<Cidr>,
    gateway: Option<IpAddr>,
    report: &mut Report,
) -> (Option<Cidr>, Option<IpAddr>) {
    let Some(addr) = address else {
        return (None, gateway);
    };
    if !net.addresses.is_empty() && !net.addresses.iter().any(|a| a.network() == addr.network()) {
        report.note(file, e.line, &format!("{}.ip", e.key), format!("{addr} is outside the subnets of the host's addresses on `{}`, which stead requires: address and gateway not carried over", net.name));
        return (None, None);
    }
    match gateway {
        Some(gw) if !addr.contains(gw) => {
            report.note(
                file,
                e.line,
                &format!("{}.gw", e.key),
                format!("gateway {gw} is outside {addr}: not carried over"),
            );
            (Some(addr), None)
        }
        g => (Some(addr), g),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::tests::{Fixture, guest};

    fn ct(text: &str) -> (serde_json::Value, Vec<String>, usize) {
        let f = Fixture::new();
        let ctx = f.ctx();
        let g = guest(200, text);
        let i = import_ct(&g, "db", &ctx).unwrap();
        let notes = i.report.notes().iter().map(|n| n.render()).collect();
        (i.manifest.expect("imported").spec, notes, i.volumes.len())
    }

    fn has(notes: &[String], prefix: &str) -> bool {
        notes.iter().any(|n| n.starts_with(prefix))
    }

    #[test]
    fn container_mapping() {
        let (s, notes, vols) = ct(
            "hostname: DB-Primary\ncores: 2\nmemory: 2048\nswap: 512\nrootfs: local-lvm:vm-200-disk-0,size=8G\nmp0: local-lvm:vm-200-disk-1,mp=/srv/data,size=16G,backup=1\nmp1: /mnt/host/share,mp=/shared\nnet0: name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:02:00,ip=10.0.0.20/24,gw=10.0.0.1,tag=20,type=veth,firewall=1\nnet1: name=eth1,bridge=vmbr1,ip=dhcp,tag=5\nunprivileged: 1\nonboot: 1\nfeatures: nesting=1\nlxc.apparmor.profile: unconfined\nnet2: name=eth2,bridge=vmbr0,ip=10.9.0.2/24,gw=10.9.0.1\nnet3: name=eth3,bridge=vmbr1,ip=10.9.0.3/24,gw=10.8.0.1\n",
        );
        assert_eq!(s["rootfs"], serde_json::json!({"volume": "vm-200-disk-0"}));
        assert_eq!(s["hostname"], "DB-Primary");
        assert_eq!(s["resources"]["cpus"], 2.0);
        assert_eq!(s["resources"]["memory"], "2Gi");
        assert_eq!(
            s["mounts"],
            serde_json::json!([{"volume": "vm-200-disk-1", "path": "/srv/data"}])
        );
        assert_eq!(
            s["interfaces"][0],
            serde_json::json!({"name": "eth0", "network": "vmbr0", "address": "10.0.0.20/24", "gateway": "10.0.0.1", "mac": "bc:24:11:00:02:00", "vlan": 20})
        );
        assert_eq!(
            s["interfaces"][1],
            serde_json::json!({"name": "eth1", "network": "vmbr1"})
        );
        assert_eq!(
            s["interfaces"][2],
            serde_json::json!({"name": "eth2", "network": "vmbr0"})
        );
        assert_eq!(
            s["interfaces"][3],
            serde_json::json!({"name": "eth3", "network": "vmbr1", "address": "10.9.0.3/24"})
        );
        assert!(
            has(&notes, "200.conf:14: net2.ip: 10.9.0.2/24 is outside"),
            "{notes:?}"
        );
        assert!(
            has(&notes, "200.conf:15: net3.gw: gateway 10.8.0.1 is outside"),
            "{notes:?}"
        );
        assert!(s.get("unprivileged").is_none(), "true is the default");
        assert_eq!(s["state"], "running");
        assert_eq!(vols, 2);
        for p in [
            "200.conf:4: swap:",
            "200.conf:6: mp0.backup: `backup=1`: BackupSchedules select whole guests, not single mount points: not carried over",
            "200.conf:7: mp1: a bind mount",
            "200.conf:8: net0.firewall: `firewall=1`: stead has no per-interface guest firewall: not carried over",
            "200.conf:9: net1.ip: `ip=dhcp`",
            "200.conf:9: net1.tag: VLAN tag 5",
            "200.conf:12: features:",
            "200.conf:13: lxc.apparmor.profile: a raw LXC",
        ] {
            assert!(has(&notes, p), "{p} in {notes:?}");
        }
    }

    #[test]
    fn privileged_by_default_and_stopped() {
        let (s, notes, _) = ct("rootfs: local:200/vm-200-disk-0.raw,size=4G\n");
        assert_eq!(s["unprivileged"], false);
        assert_eq!(s["state"], "stopped");
        assert_eq!(s["resources"]["memory"], "512Mi");
        assert!(has(&notes, "200.conf:0: onboot: not set"));
    }

    #[test]
    fn bad_lines_are_errors() {
        let f = Fixture::new();
        let ctx = f.ctx();
        for (text, want) in [
            ("rootfs: ,size=8G\n", "200.conf:1: rootfs: empty disk spec"),
            (
                "mp0: local:vm-200-disk-1,size=1G\n",
                "200.conf:1: mp0: no `mp=PATH`",
            ),
            (
                "net0: bridge=vmbr0,ip=10.0.0.1/24\n",
                "200.conf:1: net0: no `name=`",
            ),
            (
                "net0: name=eth0,bridge=vmbr0,ip=10.0.0.300/24\n",
                "200.conf:1: net0: `10.0.0.300/24`",
            ),
        ] {
            let g = guest(200, text);
            let e = import_ct(&g, "db", &ctx).unwrap_err();
            assert!(e[0].to_string().starts_with(want), "{want}: {e:?}");
        }
    }
}
