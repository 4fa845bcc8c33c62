//! Why an option inside a property string (`scsi0: …,iothread=1`) or a job is not
//! carried over: one specific reason per known option, so the report says what stead
//! lacks rather than only that something was left out.

/// The report's reason for `k=v`, an option of a context that has no field for it.
fn option_reason(k: &str, v: &str, why: &str) -> String {
    format!("`{k}={v}`: {why}: not carried over")
}

/// A disk option of `scsiN`/`virtioN`/`sataN`/`ideN` other than size, media, cache,
/// discard, format and ro.
pub fn disk_option(k: &str, v: &str) -> String {
    let why = match k {
        "iothread" | "aio" => "stead's QEMU picks its own I/O threads and AIO mode",
        "ssd" => "the VirtualMachine kind has no SSD emulation flag",
        "backup" => "BackupSchedules select whole guests, not single disks",
        "replicate" => "Proxmox storage replication has no per-disk opt-out in stead",
        "serial" | "wwn" => "the VirtualMachine kind sets no disk serial or WWN",
        "snapshot" => "QEMU's snapshot mode is not offered",
        "werror" | "rerror" => "stead's QEMU uses its default I/O error policy",
        "shared" => "Proxmox's shared-disk flag has no meaning for a stead Volume",
        "import-from" => "a Proxmox import source (the disk's Volume is adopted as it is)",
        "detect_zeroes" => "stead's QEMU uses its default zero detection",
        _ if k.starts_with("mbps") || k.starts_with("iops") || k.starts_with("bps") => {
            "the VirtualMachine kind has no disk I/O limits"
        }
        _ => "the VirtualMachine kind's disks have no field for it",
    };
    option_reason(k, v, why)
}

/// An option of a VM's `netN` or a container's `netN` other than those mapped.
pub fn nic_option(k: &str, v: &str) -> String {
    let why = match k {
        "firewall" => "stead has no per-interface guest firewall",
        "rate" => "interfaces have no bandwidth limit in stead",
        "queues" => "stead's virtio-net uses its default queue count",
        "mtu" => "stead's interfaces have no `mtu` (set it on the Network)",
        "link_down" => "stead connects every interface",
        "trunks" => "an interface carries one `vlan` in stead, not trunks",
        "ip6" | "gw6" => "stead's container interfaces take one IPv4 `address` and `gateway`",
        _ => "stead's interfaces have no field for it",
    };
    option_reason(k, v, why)
}

/// An option of a container's `rootfs`/`mpN` other than size, mp and ro.
pub fn mount_option(k: &str, v: &str) -> String {
    let why = match k {
        "backup" => "BackupSchedules select whole guests, not single mount points",
        "acl" => "stead mounts a Volume with its file system's default ACL setting",
        "quota" => "stead sets no user quotas inside a Volume",
        "replicate" => "Proxmox storage replication has no per-volume opt-out in stead",
        "shared" => "Proxmox's shared flag has no meaning for a stead Volume",
        "mountoptions" => "a container Volume's mount has no options field",
        _ => "a container's volumes have no field for it",
    };
    option_reason(k, v, why)
}

/// An option of `agent:` other than `enabled`.
pub fn agent_option(k: &str, v: &str) -> String {
    let why = match k {
        "fstrim_cloned_disks" => "stead does not trim through the agent",
        "type" => "stead's agent channel is always virtio-serial",
        "freeze-fs-on-backup" => "stead's backups always freeze through the agent when it answers",
        _ => "`agent` is a plain on/off in stead",
    };
    option_reason(k, v, why)
}

/// An option of `ipconfigN:` other than ip, gw and ip6.
pub fn ipconfig_option(k: &str, v: &str) -> String {
    let why = match k {
        "gw6" => "the generated network config carries only the IPv4 gateway `gw`",
        _ => "`cloudInit.network` is generated from ip, gw and ip6 only",
    };
    option_reason(k, v, why)
}

/// A `prune-backups` option other than the `keep-*` counts stead has.
pub fn prune_option(k: &str, v: &str) -> String {
    let why = match k {
        "keep-all" => "`retention` has no keep-all (leave out retention to keep every backup)",
        _ => "`retention` has only keep-last/hourly/daily/weekly/monthly/yearly",
    };
    option_reason(k, v, why)
}

/// A key of a `vzdump:` job that the BackupSchedule mapping does not read.
pub fn vzdump_key(k: &str, v: &str) -> String {
    let why = match k {
        "mailto"
        | "mailnotification"
        | "notification-mode"
        | "notification-policy"
        | "notification-target" => "stead sends no backup mail or notifications",
        "notes-template" | "protected" => "stead's backups have no notes or protection flag",
        "bwlimit" | "ionice" | "performance" | "pigz" | "zstd" => {
            "stead's backup writer has no I/O or thread tuning"
        }
        "lockwait" | "stopwait" | "tmpdir" | "dumpdir" | "script" => {
            "vzdump's own procedure settings have no meaning for stead's chunk store"
        }
        "repeat-missed" => "stead always runs missed occurrences once after downtime",
        "fleecing" => "stead snapshots the guest's volumes, without a fleecing image",
        "exclude-path" => "stead backs up whole volumes",
        "remove" => "old backups are pruned only by `retention`",
        "starttime" | "dow" => "legacy schedule keys: only `schedule` is read",
        "maxfiles" => "a legacy retention key: only `prune-backups` is read",
        "comment" => "a BackupSchedule has no comment field",
        _ => "a BackupSchedule has no field for it",
    };
    format!("`{k} {v}`: {why}: not carried over")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_options_say_what_stead_lacks() {
        assert_eq!(
            disk_option("iothread", "1"),
            "`iothread=1`: stead's QEMU picks its own I/O threads and AIO mode: not carried over"
        );
        assert!(disk_option("mbps_rd", "50").contains("no disk I/O limits"));
        assert!(nic_option("firewall", "1").contains("no per-interface guest firewall"));
        assert!(nic_option("rate", "12.5").contains("no bandwidth limit"));
        assert!(mount_option("backup", "1").contains("whole guests"));
        assert!(agent_option("fstrim_cloned_disks", "1").contains("trim"));
        assert!(ipconfig_option("gw6", "fd00::1").contains("IPv4 gateway"));
        assert!(prune_option("keep-all", "1").contains("no keep-all"));
        assert_eq!(
            vzdump_key("mailto", "ops@example.com"),
            "`mailto ops@example.com`: stead sends no backup mail or notifications: not carried over"
        );
    }

    #[test]
    fn unknown_options_name_the_kind_that_lacks_them() {
        assert!(disk_option("new-thing", "x").contains("VirtualMachine kind's disks"));
        assert!(nic_option("new-thing", "x").contains("interfaces have no field"));
        assert!(vzdump_key("new-thing", "x").contains("BackupSchedule has no field"));
    }
}
