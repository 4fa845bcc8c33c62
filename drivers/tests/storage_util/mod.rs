//! Shared helpers for the storage integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use stead_reconciler::driver::HostEnv;
use stead_schema::{
    ByteSize, Content, DeletionPolicy, Kind, Metadata, Name, Origin, PoolType, Resource,
    ResourceId, Spec, StoragePoolSpec, VolumeFormat, VolumeSource, VolumeSpec,
};

pub type World = BTreeMap<ResourceId, Resource>;

pub fn env(dir: &Path) -> HostEnv {
    HostEnv {
        state_dir: dir.join("state"),
        run_dir: dir.join("run"),
        cgroup_parent: format!("stead-test-{}", std::process::id()),
        netns: None,
        self_exe: PathBuf::from("/nonexistent/stead"),
        fence_file: None,
    }
}

pub fn res(kind: Kind, name: &str, spec: Spec) -> Resource {
    Resource {
        id: ResourceId::new(kind, name),
        metadata: Metadata {
            name: Name(name.to_string()),
            ..Default::default()
        },
        spec,
        origin: Origin::default(),
    }
}

pub fn pool(name: &str, t: PoolType, path: &Path) -> Resource {
    res(
        Kind::StoragePool,
        name,
        Spec::StoragePool(StoragePoolSpec {
            pool_type: t,
            path: path.to_path_buf(),
            content: vec![Content::Images, Content::Rootdir],
            nfs: None,
            lvm: None,
            zfs: None,
            shared: false,
            depends_on: vec![],
        }),
    )
}

pub fn volume(name: &str, pool: &str, size: u64) -> Resource {
    res(
        Kind::Volume,
        name,
        Spec::Volume(VolumeSpec {
            pool: Name(pool.to_string()),
            size: ByteSize(size),
            format: VolumeFormat::Raw,
            source: None,
            template: false,
            clone: None,
            deletion_policy: DeletionPolicy::Retain,
            replication: None,
            depends_on: vec![],
        }),
    )
}

pub fn with_source(mut r: Resource, file: &Path) -> Resource {
    if let Spec::Volume(v) = &mut r.spec {
        v.source = Some(VolumeSource {
            file: Some(file.to_path_buf()),
            ..VolumeSource::default()
        });
    }
    r
}

pub fn with_policy(mut r: Resource, p: DeletionPolicy) -> Resource {
    if let Spec::Volume(v) = &mut r.spec {
        v.deletion_policy = p;
    }
    r
}

pub fn world(rs: &[&Resource]) -> World {
    rs.iter().map(|r| (r.id.clone(), (*r).clone())).collect()
}

pub const MI: u64 = 1 << 20;

/// Allocated bytes of a file.
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p)
        .map(|m| m.blocks() * 512)
        .unwrap_or(u64::MAX)
}

/// A btrfs file system on a loop device, mounted in a temp dir. Drop unmounts and
/// detaches even on panic.
pub struct LoopBtrfs {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub dev: Option<String>,
    pub mnt: PathBuf,
    mounted: bool,
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl LoopBtrfs {
    /// Makes one, or returns the reason it cannot (for a SKIP line).
    pub fn new() -> Result<LoopBtrfs, String> {
        Self::with_size(256 << 20)
    }

    /// Like [`LoopBtrfs::new`] with a sparse image of `size` bytes.
    pub fn with_size(size: u64) -> Result<LoopBtrfs, String> {
        let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !fs
            .lines()
            .any(|l| l.split_whitespace().last() == Some("btrfs"))
        {
            return Err("kernel lacks btrfs".into());
        }
        if run("mkfs.btrfs", &["--version"]).is_err() {
            return Err("mkfs.btrfs not installed (apt btrfs-progs)".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let image = dir.path().join("btrfs.img");
        let mnt = dir.path().join("mnt");
        let mut me = LoopBtrfs {
            dir,
            image,
            dev: None,
            mnt,
            mounted: false,
        };
        std::fs::File::create(&me.image)
            .and_then(|f| f.set_len(size))
            .map_err(|e| e.to_string())?;
        let img = me.image.to_string_lossy().into_owned();
        run("mkfs.btrfs", &["-q", "-f", &img])?;
        me.dev = Some(run("losetup", &["-f", "--show", &img])?);
        std::fs::create_dir(&me.mnt).map_err(|e| e.to_string())?;
        let dev = me.dev.clone().unwrap_or_default();
        nix::mount::mount(
            Some(dev.as_str()),
            &me.mnt,
            Some("btrfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| format!("mount {dev}: {e}"))?;
        me.mounted = true;
        Ok(me)
    }

    /// Whether `losetup -a` still lists this image.
    pub fn image_attached(image: &Path) -> bool {
        run("losetup", &["-a"])
            .map(|t| t.contains(&*image.to_string_lossy()))
            .unwrap_or(false)
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        if self.mounted && nix::mount::umount2(&self.mnt, nix::mount::MntFlags::empty()).is_err() {
            let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Some(dev) = &self.dev {
            let _ = run("losetup", &["-d", dev]);
        }
    }
}

/// Runs `f` on a thread with its own private mount namespace: mounts made there never
/// reach the host and go away with the thread, even when `f` panics.
pub fn in_private_mount_ns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare mount namespace");
        rustix::mount::mount_change(
            "/",
            rustix::mount::MountPropagationFlags::PRIVATE
                | rustix::mount::MountPropagationFlags::REC,
        )
        .expect("make mounts private");
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Mounts a tmpfs of `size` bytes at `at` (in the calling thread's mount namespace).
pub fn mount_tmpfs(at: &Path, size: u64) {
    std::fs::create_dir_all(at).expect("mkdir mount point");
    let opts = std::ffi::CString::new(format!("size={size}")).expect("options");
    rustix::mount::mount(
        "stead-test",
        at,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        Some(opts.as_c_str()),
    )
    .expect("mount tmpfs");
}

pub fn with_format(mut r: Resource, f: VolumeFormat) -> Resource {
    if let Spec::Volume(v) = &mut r.spec {
        v.format = f;
    }
    r
}

pub fn with_url(mut r: Resource, url: &str, sha256: &str) -> Resource {
    if let Spec::Volume(v) = &mut r.spec {
        v.source = Some(VolumeSource {
            url: Some(url.to_string()),
            sha256: Some(sha256.to_string()),
            ..VolumeSource::default()
        });
    }
    r
}

pub fn with_sha256(mut r: Resource, sha256: &str) -> Resource {
    if let Spec::Volume(v) = &mut r.spec
        && let Some(s) = &mut v.source
    {
        s.sha256 = Some(sha256.to_string());
    }
    r
}

pub fn as_template(mut r: Resource) -> Resource {
    if let Spec::Volume(v) = &mut r.spec {
        v.template = true;
    }
    r
}

pub fn with_clone(mut r: Resource, from: &str, linked: bool) -> Resource {
    if let Spec::Volume(v) = &mut r.spec {
        v.clone = Some(stead_schema::VolumeClone {
            from: Name(from.to_string()),
            linked,
        });
    }
    r
}

/// Runs a command; its stdout, or why it failed.
pub fn run_cmd(cmd: &str, args: &[&str]) -> Result<String, String> {
    run(cmd, args)
}

/// Why qemu-img or qemu-io cannot run here (for a SKIP line), or `None`.
pub fn qemu_tools_missing() -> Option<String> {
    for t in ["qemu-img", "qemu-io"] {
        if run(t, &["--version"]).is_err() {
            return Some(format!("{t} not installed (apt qemu-utils)"));
        }
    }
    None
}

/// The hex SHA-256 of a file.
pub fn sha256_hex(p: &Path) -> String {
    use sha2::Digest;
    let data = std::fs::read(p).expect("read for sha256");
    hex::encode(sha2::Sha256::digest(&data))
}

/// Serves `body` over HTTP/1.0 on 127.0.0.1 for `requests` requests, from a thread.
/// Returns the URL and the thread (joined by the caller, after its requests).
pub fn serve_http(body: Vec<u8>, requests: usize) -> (String, std::thread::JoinHandle<usize>) {
    let len = body.len();
    serve_http_declaring(body, requests, len)
}

/// [`serve_http`], announcing `declared` bytes in Content-Length whatever the body's size.
pub fn serve_http_declaring(
    body: Vec<u8>,
    requests: usize,
    declared: usize,
) -> (String, std::thread::JoinHandle<usize>) {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let h = std::thread::spawn(move || {
        let mut served = 0;
        for _ in 0..requests {
            let Ok((s, _)) = l.accept() else { break };
            let mut r = BufReader::new(s.try_clone().expect("clone stream"));
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line == "\r\n" || line == "\n" {
                    break;
                }
                line.clear();
            }
            let mut s = s;
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n"
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
            served += 1;
        }
        served
    });
    (format!("http://127.0.0.1:{port}/images/base.qcow2"), h)
}
