//! The cgroup v2 device filter: cgroup2 has no `devices.allow`; access to device nodes is
//! decided by a `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to the cgroup (what runc,
//! crun and youki generate). stead assembles a small allow-list program from the same rules
//! as the v1 controller (`"c 1:3 rwm"`, `"c 136:* rwm"`), loads it with `bpf(2)` and
//! attaches it to the container's cgroup. The kernel keeps it attached until the cgroup is
//! removed; attaching again replaces it.
//!
//! Program, for a context `{u32 access_type (access << 16 | type), u32 major, u32 minor}`:
//! ```text
//! r2 = ctx->access_type & 0xffff; r4 = ctx->major; r5 = ctx->minor
//! for each rule: if r2 == type && r4 == major && r5 == minor (wildcards skipped) return 1
//! return 0
//! ```
//! Every rule grants `rwm`, so the access bits are not checked.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use stead_host::cgroup::{CgroupError, DeviceProgram};
use stead_reconciler::driver::DriverError;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;

/// One allow rule: device type (`None`: any), major and minor (`None`: any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    kind: Option<i32>,
    major: Option<u32>,
    minor: Option<u32>,
}

/// Parses a v1-style rule, `"c 1:3 rwm"`, `"b 7:* rwm"` or `"a"`. Only `rwm` access is
/// supported (the rules stead writes).
pub fn parse_rule(s: &str) -> Result<Rule, DriverError> {
    let bad = || DriverError::Other(format!("bad device rule {s:?}"));
    let mut it = s.split_whitespace();
    let kind = match it.next() {
        Some("c") => Some(DEV_CHAR),
        Some("b") => Some(DEV_BLOCK),
        Some("a") => {
            return Ok(Rule {
                kind: None,
                major: None,
                minor: None,
            });
        }
        _ => return Err(bad()),
    };
    let (ma, mi) = it.next().and_then(|n| n.split_once(':')).ok_or_else(bad)?;
    let num = |x: &str| -> Result<Option<u32>, DriverError> {
        if x == "*" {
            Ok(None)
        } else {
            x.parse().map(Some).map_err(|_| bad())
        }
    };
    if it.next().is_some_and(|a| a != "rwm") {
        return Err(bad());
    }
    Ok(Rule {
        kind,
        major: num(ma)?,
        minor: num(mi)?,
    })
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | (dst & 0x0f);
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    b
}

const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const AND32_K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// The program allowing exactly `rules`.
pub fn program(rules: &[Rule]) -> Vec<[u8; 8]> {
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(AND32_K, 2, 0, 0, 0xffff),
        insn(LDX_W, 4, 1, 4, 0),
        insn(LDX_W, 5, 1, 8, 0),
    ];
    for r in rules {
        // (register, value) pairs to compare; a mismatch jumps past this rule's return.
        let checks: Vec<(u8, i32)> = [
            r.kind.map(|k| (2u8, k)),
            r.major.map(|m| (4u8, m as i32)),
            r.minor.map(|m| (5u8, m as i32)),
        ]
        .into_iter()
        .flatten()
        .collect();
        let n = checks.len();
        for (i, (reg, v)) in checks.into_iter().enumerate() {
            // Instructions left in this block after the jump: the other checks, mov, exit.
            let skip = (n - i - 1 + 2) as i16;
            p.push(insn(JNE_K, reg, 0, skip, v));
        }
        p.push(insn(MOV64_K, 0, 0, 0, 1));
        p.push(insn(EXIT, 0, 0, 0, 0));
    }
    p.push(insn(MOV64_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// Loads the program for `rules` and attaches it to the cgroup2 directory `cgroup`,
/// replacing a program stead attached before.
pub fn attach(cgroup: &Path, rules: &[&str]) -> Result<(), DriverError> {
    let rules = rules
        .iter()
        .map(|r| parse_rule(r))
        .collect::<Result<Vec<_>, _>>()?;
    let prog = program(&rules);
    let license = CString::new("GPL").map_err(|_| DriverError::Other("license".into()))?;
    let mut log = vec![0u8; 4096];
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"stead_devic");
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        ..ProgLoadAttr::default()
    };
    // SAFETY: `attr` points at a properly laid out `union bpf_attr` prefix for
    // BPF_PROG_LOAD; the instruction, license and log buffers it references are alive
    // for the duration of the call. Neither nix nor rustix wraps bpf(2).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        let verifier = String::from_utf8_lossy(&log)
            .trim_end_matches('\0')
            .trim()
            .to_string();
        return Err(DriverError::io(
            format!("load the device filter program (verifier: {verifier})"),
            e,
        ));
    }
    // SAFETY: the kernel returned a new file descriptor (checked non-negative above) that
    // nothing else owns; a raw syscall has no owned-fd return.
    let prog_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let dir =
        File::open(cgroup).map_err(|e| DriverError::io(format!("open {}", cgroup.display()), e))?;
    let attr = ProgAttachAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog_fd.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        ..ProgAttachAttr::default()
    };
    // SAFETY: `attr` is a valid BPF_PROG_ATTACH attribute; both fds are open. No safe
    // wrapper of bpf(2) exists.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attr as *const ProgAttachAttr,
            std::mem::size_of::<ProgAttachAttr>(),
        )
    };
    if r < 0 {
        return Err(DriverError::io(
            format!("attach the device filter to {}", cgroup.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The cgroup v2 device filter as the host cgroup layer's [`DeviceProgram`].
#[derive(Debug, Clone, Copy, Default)]
pub struct BpfDeviceProgram;

impl DeviceProgram for BpfDeviceProgram {
    fn attach(&self, dir: &Path, allow: &[&str]) -> Result<(), CgroupError> {
        attach(dir, allow).map_err(|e| match e {
            DriverError::Io { context, source } => CgroupError::Io { context, source },
            DriverError::Unsupported(m) => CgroupError::Unsupported(m),
            e => CgroupError::Other(e.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse() {
        assert_eq!(
            parse_rule("c 1:3 rwm").expect("rule"),
            Rule {
                kind: Some(DEV_CHAR),
                major: Some(1),
                minor: Some(3)
            }
        );
        assert_eq!(
            parse_rule("c 136:* rwm").expect("rule"),
            Rule {
                kind: Some(DEV_CHAR),
                major: Some(136),
                minor: None
            }
        );
        assert!(parse_rule("c 1:3 r").is_err());
        assert!(parse_rule("x 1:3 rwm").is_err());
        assert!(parse_rule("c 1 rwm").is_err());
    }

    #[test]
    fn program_shape() {
        let p = program(&[
            parse_rule("c 1:3 rwm").expect("rule"),
            parse_rule("c 136:* rwm").expect("rule"),
        ]);
        // 4 loads, (3 checks + mov + exit), (2 checks + mov + exit), mov + exit.
        assert_eq!(p.len(), 4 + 5 + 4 + 2);
        // The first check of rule 1 skips its two other checks, mov and exit.
        assert_eq!(p[4], insn(JNE_K, 2, 0, 4, DEV_CHAR));
        assert_eq!(p[6], insn(JNE_K, 5, 0, 2, 3));
        assert_eq!(p[9], insn(JNE_K, 2, 0, 3, DEV_CHAR));
        assert_eq!(p[10], insn(JNE_K, 4, 0, 2, 136));
        assert_eq!(p[p.len() - 1], insn(EXIT, 0, 0, 0, 0));
    }

    /// Restricts `cg` to /dev/null only; a shell moved into it can write /dev/null but
    /// not read /dev/zero.
    fn device_filter(cg: &stead_host::cgroup::Cgroup) {
        use std::io::{BufRead, BufReader, Write};
        cg.restrict_devices(&["c 1:3 rwm"], &BpfDeviceProgram)
            .expect("restrict");
        let mut sh = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                "read x; if head -c 1 /dev/zero >/dev/null 2>&1; then echo zero-open; else echo zero-denied; fi; if echo x >/dev/null; then echo null-ok; fi",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn sh");
        cg.add_pid(sh.id() as i32).expect("attach sh");
        sh.stdin
            .take()
            .expect("stdin")
            .write_all(b"go\n")
            .expect("go");
        let out: Vec<String> = BufReader::new(sh.stdout.take().expect("stdout"))
            .lines()
            .map_while(Result::ok)
            .collect();
        let _ = sh.wait();
        assert_eq!(out, ["zero-denied", "null-ok"]);
        // Replaced by a wider program: /dev/zero opens again.
        cg.restrict_devices(&["c 1:3 rwm", "c 1:5 rwm"], &BpfDeviceProgram)
            .expect("replace");
    }

    /// The v2 device filter on a real cgroup2 mount: the unified hierarchy of a v1-hybrid
    /// host, or the host's own when it is v2.
    #[test]
    fn v2_device_filter_denies_unlisted_devices() {
        use stead_host::cgroup::Hierarchy;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP v2_device_filter_denies_unlisted_devices: needs root");
            return;
        }
        let host = stead_host::SysFs::host().cgroup_root();
        let host = host.as_path();
        let root = [host.to_path_buf(), host.join("unified")]
            .into_iter()
            .find(|r| stead_host::cgroup::v2::is_unified_root(r));
        let Some(root) = root else {
            eprintln!("SKIP v2_device_filter_denies_unlisted_devices: no cgroup2 mount");
            return;
        };
        let hier = Hierarchy::v2(root);
        let cg = hier.cgroup(&format!("stead-test-{}-bpf", std::process::id()), "c1");
        struct Guard(stead_host::cgroup::Cgroup);
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = self.0.destroy();
            }
        }
        let _guard = Guard(cg.clone());
        cg.create().expect("create");
        device_filter(&cg);
        cg.destroy().expect("destroy");
    }
}
