//! Firmware of QEMU VMs.
//!
//! BIOS is QEMU's built-in SeaBIOS (`bios-256k.bin`, found by QEMU itself). UEFI is OVMF,
//! found through the JSON firmware descriptors QEMU packages install
//! (`/usr/share/qemu/firmware/*.json`, the interop format of QEMU's
//! `docs/interop/firmware.json`): the first descriptor, in file-name order, with
//! interface `uefi`, a `flash` mapping, an x86_64 target for the q35 machine and the
//! wanted secure-boot features (secure boot: `secure-boot` and `enrolled-keys`; without:
//! no `secure-boot` and no `requires-smm`) whose files exist.
//!
//! Each UEFI VM owns a copy of the descriptor's NVRAM template ([`ensure_nvram`]), made
//! once and kept across restarts and stead restarts (under the state dir, not the run
//! dir), so the guest's boot entries survive.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use stead_reconciler::driver::DriverError;

/// Where QEMU packages install firmware descriptors.
pub const DESCRIPTOR_DIR: &str = "/usr/share/qemu/firmware";

/// The environment variable that moves the firmware descriptor directory (another QEMU
/// build's `share/qemu/firmware`, or a test's).
pub const DESCRIPTOR_DIR_ENV: &str = "STEAD_QEMU_FIRMWARE_DIR";

/// The firmware descriptor directory: `$STEAD_QEMU_FIRMWARE_DIR` when set and not empty,
/// else [`DESCRIPTOR_DIR`].
pub fn descriptor_dir() -> PathBuf {
    std::env::var_os(DESCRIPTOR_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DESCRIPTOR_DIR), PathBuf::from)
}

/// The OVMF files of a UEFI VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uefi {
    /// Read-only code image (`OVMF_CODE*.fd`).
    pub code: PathBuf,
    /// NVRAM template (`OVMF_VARS*.fd`), copied once per VM.
    pub vars_template: PathBuf,
    /// The firmware needs SMM (`-machine smm=on`, secure pflash).
    pub requires_smm: bool,
    /// The descriptor it came from.
    pub descriptor: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Descriptor {
    #[serde(default)]
    interface_types: Vec<String>,
    mapping: Mapping,
    #[serde(default)]
    targets: Vec<Target>,
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Mapping {
    #[serde(default)]
    device: String,
    executable: Option<FlashFile>,
    nvram_template: Option<FlashFile>,
}

#[derive(Debug, Deserialize)]
struct FlashFile {
    filename: PathBuf,
}

#[derive(Debug, Deserialize)]
struct Target {
    architecture: String,
    #[serde(default)]
    machines: Vec<String>,
}

/// Whether a descriptor machine pattern (`pc-q35-*`) matches machine `m` (`pc-q35-7.2`).
fn machine_matches(pattern: &str, m: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => m.starts_with(prefix),
        None => pattern == m,
    }
}

impl Descriptor {
    fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }

    /// Whether this descriptor is a flash UEFI firmware for x86_64 q35 with the wanted
    /// secure-boot setting.
    fn fits(&self, secure_boot: bool) -> bool {
        let q35 = self.targets.iter().any(|t| {
            t.architecture == "x86_64" && t.machines.iter().any(|m| machine_matches(m, "pc-q35-"))
        });
        let sb = if secure_boot {
            self.has("secure-boot") && self.has("enrolled-keys")
        } else {
            !self.has("secure-boot") && !self.has("requires-smm")
        };
        self.interface_types.iter().any(|t| t == "uefi")
            && self.mapping.device == "flash"
            && q35
            && sb
    }
}

/// The error when no usable OVMF is installed.
fn missing(secure_boot: bool, detail: &str) -> DriverError {
    let what = if secure_boot {
        "firmware uefi with secureBoot needs OVMF with enrolled keys"
    } else {
        "firmware uefi needs OVMF"
    };
    DriverError::NotReady(format!("{what}: install the ovmf package ({detail})"))
}

/// Finds the OVMF firmware for a UEFI VM in descriptor directory `dir` (normally
/// [`DESCRIPTOR_DIR`]). A descriptor whose files are missing is skipped; none usable is a
/// clear error naming the package.
pub fn find_uefi(dir: &Path, secure_boot: bool) -> Result<Uefi, DriverError> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect(),
        Err(e) => {
            return Err(missing(
                secure_boot,
                &format!("no firmware descriptors in {}: {e}", dir.display()),
            ));
        }
    };
    files.sort();
    let mut skipped = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let Ok(d) = serde_json::from_str::<Descriptor>(&text) else {
            tracing::debug!(file = %f.display(), "not a firmware descriptor");
            continue;
        };
        if !d.fits(secure_boot) {
            continue;
        }
        let (Some(code), Some(vars)) = (&d.mapping.executable, &d.mapping.nvram_template) else {
            continue;
        };
        if let Some(absent) = [&code.filename, &vars.filename]
            .into_iter()
            .find(|p| !p.is_file())
        {
            skipped.push(format!("{} is missing", absent.display()));
            continue;
        }
        return Ok(Uefi {
            code: code.filename.clone(),
            vars_template: vars.filename.clone(),
            requires_smm: d.has("requires-smm"),
            descriptor: f,
        });
    }
    let detail = if skipped.is_empty() {
        format!("no matching descriptor in {}", dir.display())
    } else {
        skipped.join("; ")
    };
    Err(missing(secure_boot, &detail))
}

/// The per-VM NVRAM file of VM `name` under `state_dir` (`<state_dir>/vms/<name>/nvram.fd`):
/// outside the run dir, so it survives reboots of the host; backups include it.
pub fn nvram_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("vms").join(name).join("nvram.fd")
}

/// Creates the VM's NVRAM at `path` from `template` unless it exists already (the guest's
/// variables are kept). Returns whether it was created.
pub fn ensure_nvram(path: &Path, template: &Path) -> Result<bool, DriverError> {
    if path.exists() {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        // Searchable, not listable: QEMU's unprivileged user opens the NVRAM by path.
        stead_host::fs::create_missing_dirs(dir, 0o711)
            .map_err(crate::storage::fsutil::host_err)?;
    }
    let data = std::fs::read(template)
        .map_err(|e| DriverError::io(format!("read {}", template.display()), e))?;
    stead_host::write_atomic_mode(path, &data, 0o600).map_err(crate::storage::fsutil::host_err)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(code: &Path, vars: &Path, machines: &str, features: &str) -> String {
        format!(
            r#"{{"description":"t","interface-types":["uefi"],
                "mapping":{{"device":"flash","executable":{{"filename":"{}","format":"raw"}},
                            "nvram-template":{{"filename":"{}","format":"raw"}}}},
                "targets":[{{"architecture":"x86_64","machines":[{machines}]}}],
                "features":[{features}],"tags":[]}}"#,
            code.display(),
            vars.display()
        )
    }

    /// A descriptor dir like Debian's: enrolled secure boot (40), secure boot with an
    /// empty store (50), plain (60); plus files `code-*.fd`/`vars-*.fd`.
    fn debian_like(dir: &Path) {
        for n in ["ms", "sb", "plain"] {
            std::fs::write(dir.join(format!("code-{n}.fd")), b"code").expect("code");
            std::fs::write(dir.join(format!("vars-{n}.fd")), b"vars").expect("vars");
        }
        let f = |n: &str| {
            (
                dir.join(format!("code-{n}.fd")),
                dir.join(format!("vars-{n}.fd")),
            )
        };
        let (c, v) = f("ms");
        let sb = r#""acpi-s3","enrolled-keys","requires-smm","secure-boot""#;
        std::fs::write(
            dir.join("40-ms.json"),
            descriptor(&c, &v, r#""pc-q35-*""#, sb),
        )
        .expect("w");
        let (c, v) = f("sb");
        std::fs::write(
            dir.join("50-sb.json"),
            descriptor(&c, &v, r#""pc-q35-*""#, r#""requires-smm","secure-boot""#),
        )
        .expect("w");
        let (c, v) = f("plain");
        std::fs::write(
            dir.join("60-plain.json"),
            descriptor(&c, &v, r#""pc-i440fx-*","pc-q35-*""#, r#""acpi-s3""#),
        )
        .expect("w");
        std::fs::write(dir.join("README"), b"not json").expect("w");
        std::fs::write(dir.join("70-junk.json"), b"{").expect("w");
    }

    #[test]
    fn plain_uefi_skips_secure_boot_firmware() {
        let t = tempfile::tempdir().expect("tmp");
        debian_like(t.path());
        let u = find_uefi(t.path(), false).expect("uefi");
        assert_eq!(u.code, t.path().join("code-plain.fd"));
        assert_eq!(u.vars_template, t.path().join("vars-plain.fd"));
        assert!(!u.requires_smm);
    }

    #[test]
    fn secure_boot_takes_the_enrolled_keys_firmware() {
        let t = tempfile::tempdir().expect("tmp");
        debian_like(t.path());
        let u = find_uefi(t.path(), true).expect("uefi");
        assert_eq!(u.code, t.path().join("code-ms.fd"));
        assert!(u.requires_smm);
    }

    #[test]
    fn missing_files_or_descriptors_name_the_package() {
        let t = tempfile::tempdir().expect("tmp");
        debian_like(t.path());
        std::fs::remove_file(t.path().join("code-plain.fd")).expect("rm");
        let e = find_uefi(t.path(), false).expect_err("no code");
        let s = e.to_string();
        assert!(s.contains("install the ovmf package"), "{s}");
        assert!(s.contains("code-plain.fd is missing"), "{s}");
        let e = find_uefi(&t.path().join("none"), false).expect_err("no dir");
        assert!(e.to_string().contains("firmware uefi needs OVMF"), "{e}");
    }

    #[test]
    fn nvram_is_copied_once() {
        let t = tempfile::tempdir().expect("tmp");
        let tpl = t.path().join("tpl.fd");
        std::fs::write(&tpl, b"template").expect("w");
        let p = nvram_path(&t.path().join("state"), "vm1");
        assert!(p.ends_with("vms/vm1/nvram.fd"));
        assert!(ensure_nvram(&p, &tpl).expect("create"));
        std::fs::write(&p, b"guest wrote this").expect("w");
        assert!(!ensure_nvram(&p, &tpl).expect("keep"));
        assert_eq!(std::fs::read(&p).expect("r"), b"guest wrote this");
    }

    #[test]
    fn machine_patterns() {
        assert!(machine_matches("pc-q35-*", "pc-q35-7.2"));
        assert!(!machine_matches("pc-i440fx-*", "pc-q35-7.2"));
        assert!(machine_matches("q35", "q35"));
    }
}
