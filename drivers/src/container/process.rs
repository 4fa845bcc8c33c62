//! The clone path: starting a container's init and exec'ing into a running container.
//!
//! Only ever called from the single-threaded shim (never from a tokio or otherwise
//! multi-threaded process), so the cloned child may allocate and run ordinary Rust.
//!
//! Start sequence (parent = shim, child = future init):
//! 1. `clone(NEWNS|NEWPID|NEWUTS|NEWIPC|NEWNET[|NEWUSER])`; the child blocks on a pipe;
//! 2. the child moves itself into its cgroup (v1: `0` into each `tasks` file the parent
//!    opened for it, see [`Cgroup::self_join_files`]; on v2 the parent writes its pid to
//!    `cgroup.procs`); the parent writes `uid_map`/`gid_map` (unprivileged), creates the
//!    veth pairs (peer directly in the child's netns), then releases it;
//! 3. child: become root of its user namespace, `unshare(NEWCGROUP)`, new session with the
//!    console pty as controlling tty, `lo` up when there is no veth, mounts (rootfs,
//!    /proc, /sys ro, /dev tmpfs with bind mounted device nodes, /dev/pts newinstance,
//!    /dev/shm, volumes; every target resolved and created inside the rootfs through an
//!    fd, see `inroot`), `pivot_root`, masked
//!    and read-only /proc paths, hostname, capability bounding set, `no_new_privs`,
//!    seccomp, `execve`;
//! 4. errors travel back over a close-on-exec pipe: EOF without data = exec succeeded.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Pid, Uid, chdir, execve, pipe2, pivot_root, sethostname};
use seccompiler::BpfProgram;
use stead_host::cgroup::Cgroup;
use stead_reconciler::driver::DriverError;

use super::config::{ContainerConfig, RootfsMount};
use super::inroot::{self, Root};
use super::security;

/// Default PATH inside containers.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Device nodes bind-mounted from the host into the container's /dev.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

fn errno_ctx(ctx: &str) -> impl FnOnce(nix::Error) -> String + '_ {
    move |e| format!("{ctx}: {e}")
}

/// Everything the cloned child needs, prepared by the parent before `clone`.
struct ChildCtx<'a> {
    cfg: &'a ContainerConfig,
    go_r: RawFd,
    go_w: RawFd,
    err_r: RawFd,
    err_w: RawFd,
    console: RawFd,
    console_path: PathBuf,
    seccomp: &'a [BpfProgram],
    /// v1 `tasks` files of the container's cgroup, opened by the shim: the child writes `0`
    /// to each (empty on v2: the shim moves it).
    join: &'a [OwnedFd],
}

/// Starts init for `cfg`: returns its pid in the shim's pid namespace.
pub(crate) fn start_init(
    cfg: &ContainerConfig,
    cgroup: &Cgroup,
    console: BorrowedFd<'_>,
    console_path: &Path,
) -> Result<Pid, DriverError> {
    let (go_r, go_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| DriverError::io("pipe", e.into()))?;
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| DriverError::io("pipe", e.into()))?;
    let seccomp = security::seccomp_programs()?;
    // Opened here, with the shim's credentials: the kernel checks those of the opener, so
    // the child may write them after entering its user namespace.
    let join = cgroup
        .self_join_files()
        .map(|files| open_for_join(&files))
        .transpose()?;
    if let RootfsMount::Overlay { target, .. } = &cfg.rootfs {
        fs::create_dir_all(target)
            .map_err(|e| DriverError::io(format!("mkdir {}", target.display()), e))?;
    }
    let ctx = ChildCtx {
        cfg,
        go_r: go_r.as_raw_fd(),
        go_w: go_w.as_raw_fd(),
        err_r: err_r.as_raw_fd(),
        err_w: err_w.as_raw_fd(),
        console: console.as_raw_fd(),
        console_path: console_path.to_path_buf(),
        seccomp: &seccomp,
        join: join.as_deref().unwrap_or_default(),
    };
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWNET;
    if cfg.idmap.is_some() {
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    let mut stack = vec![0u8; 1 << 20];
    let cb = Box::new(|| child_entry(&ctx));
    // SAFETY: the shim is single-threaded, so the child starts with a consistent heap and
    // no locks held by other threads; the child runs `child_entry`, which only ends by
    // `execve` or `_exit`, and the stack outlives the clone call (the child has its own
    // copy of the address space, no CLONE_VM).
    let pid = unsafe { nix::sched::clone(cb, &mut stack, flags, Some(Signal::SIGCHLD as i32)) }
        .map_err(|e| DriverError::io("clone container init", e.into()))?;
    drop(go_r);
    drop(err_w);
    let mut go_w = fs::File::from(go_w);
    let mut err_r = fs::File::from(err_r);

    // Two releases: after the id maps (the child then builds its mount tree in parallel
    // with us), and after the cgroup attach and network (the child then enters its cgroup
    // namespace and execs). On v2 the attach can wait for an RCU grace period, so
    // overlapping it with the mount work shortens the start; on v1 the child joined itself
    // without that wait.
    let setup = (|| -> Result<(), DriverError> {
        if let Some(m) = cfg.idmap {
            let map = format!("0 {} {}\n", m.base, m.size);
            for f in ["uid_map", "gid_map"] {
                let p = stead_host::ProcFs::host().pid_file(pid, f);
                fs::write(&p, &map)
                    .map_err(|e| DriverError::io(format!("write {}", p.display()), e))?;
            }
        }
        go_w.write_all(b"1")
            .map_err(|e| DriverError::io("release container init", e))?;
        if join.is_none() {
            cgroup.add_pid(pid.as_raw())?;
        }
        super::network::attach(cfg, pid)?;
        go_w.write_all(b"2")
            .map_err(|e| DriverError::io("release container init", e))?;
        Ok(())
    })();
    if let Err(e) = setup {
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
        // The child may have failed first (and that made our step fail): its reason.
        let mut msg = String::new();
        let _ = err_r.read_to_string(&mut msg);
        if !msg.is_empty() {
            return Err(DriverError::Other(format!("container init: {msg} ({e})")));
        }
        return Err(e);
    }
    drop(go_w);
    let mut msg = String::new();
    let _ = err_r.read_to_string(&mut msg);
    if !msg.is_empty() {
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(DriverError::Other(format!("container init: {msg}")));
    }
    Ok(pid)
}

/// Opens the cgroup files that a child process writes `0` to, to join the cgroup itself.
fn open_for_join(paths: &[PathBuf]) -> Result<Vec<OwnedFd>, DriverError> {
    paths
        .iter()
        .map(|p| {
            fs::OpenOptions::new()
                .write(true)
                .open(p)
                .map(OwnedFd::from)
                .map_err(|e| DriverError::io(format!("open {}", p.display()), e))
        })
        .collect()
}

/// Moves the calling (single-threaded) process into a cgroup by writing `0` to each of
/// `files` (v1 `tasks` or `cgroup.procs`).
fn join_cgroup(files: &[OwnedFd]) -> Result<(), String> {
    for f in files {
        match nix::unistd::write(f, b"0") {
            Ok(1) => {}
            Ok(n) => return Err(format!("join cgroup: short write ({n} bytes)")),
            Err(e) => return Err(format!("join cgroup: {e}")),
        }
    }
    Ok(())
}

fn child_entry(ctx: &ChildCtx<'_>) -> isize {
    let _ = nix::unistd::close(ctx.go_w);
    let _ = nix::unistd::close(ctx.err_r);
    let err = match child_setup(ctx) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    // SAFETY: err_w is the child's copy of the error pipe's write end, open until exit.
    let w = unsafe { BorrowedFd::borrow_raw(ctx.err_w) };
    let _ = nix::unistd::write(w, err.as_bytes());
    // SAFETY: _exit is always safe; it skips atexit handlers that belong to the shim.
    unsafe { libc::_exit(127) }
}

/// Undoes what the shim's process state would leak into the container: blocked signals
/// (the shim blocks SIGCHLD/SIGTERM for its signalfd) and ignored SIGPIPE (Rust's runtime
/// ignores it); both survive `execve`.
fn reset_signals() -> Result<(), String> {
    nix::sys::signal::SigSet::empty()
        .thread_set_mask()
        .map_err(errno_ctx("unblock signals"))?;
    // SAFETY: restoring the default disposition of SIGPIPE; no handler is involved.
    unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) }
        .map_err(errno_ctx("reset SIGPIPE"))?;
    Ok(())
}

/// Makes `fds` this process's stdin, stdout and stderr.
fn dup_stdio([i, o, e]: [BorrowedFd<'_>; 3]) -> Result<(), String> {
    nix::unistd::dup2_stdin(i).map_err(errno_ctx("dup2 stdin"))?;
    nix::unistd::dup2_stdout(o).map_err(errno_ctx("dup2 stdout"))?;
    nix::unistd::dup2_stderr(e).map_err(errno_ctx("dup2 stderr"))
}

fn wait_release(go: BorrowedFd<'_>, want: u8) -> Result<(), String> {
    let mut b = [0u8; 1];
    loop {
        match nix::unistd::read(go, &mut b) {
            Ok(1) if b[0] == want => return Ok(()),
            Err(nix::Error::EINTR) => continue,
            _ => return Err("parent went away before releasing init".into()),
        }
    }
}

/// Becomes root of the container's user namespace (when it has an id map) and drops the
/// supplementary groups: the first step of the container's init and of an exec'd process
/// once inside the namespaces.
fn become_root(cfg: &ContainerConfig) -> Result<(), String> {
    if cfg.idmap.is_some() {
        nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
            .map_err(errno_ctx("setresgid 0"))?;
        nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
            .map_err(errno_ctx("setresuid 0"))?;
    }
    nix::unistd::setgroups(&[]).map_err(errno_ctx("setgroups"))
}

fn child_setup(ctx: &ChildCtx<'_>) -> Result<std::convert::Infallible, String> {
    let cfg = ctx.cfg;
    reset_signals()?;
    join_cgroup(ctx.join)?;
    for fd in ctx.join {
        // The child's copies, not needed after the join (this process never drops them:
        // it ends by execve or _exit).
        let _ = nix::unistd::close(fd.as_raw_fd());
    }
    // Wait until the parent has written the id maps.
    // SAFETY: go_r is the read end of the start pipe, open in the child.
    let go = unsafe { BorrowedFd::borrow_raw(ctx.go_r) };
    wait_release(go, b'1')?;
    become_root(cfg)?;
    nix::unistd::setsid().map_err(errno_ctx("setsid"))?;
    // SAFETY: console is the pty slave fd inherited from the shim.
    let console = unsafe { BorrowedFd::borrow_raw(ctx.console) };
    dup_stdio([console; 3])?;
    // SAFETY: TIOCSCTTY on fd 0 (the pty slave) with arg 0; this process leads a new session.
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("console as controlling tty: {e}"));
    }
    if ctx.console > 2 {
        let _ = nix::unistd::close(ctx.console);
    }

    if cfg.interfaces.is_empty() {
        // Still privileged in the new netns (root of its user namespace, if any): with
        // interfaces, the shim brings `lo` up with the first veth instead.
        super::network::loopback_up_here().map_err(|e| e.to_string())?;
    }
    setup_mounts(ctx)?;
    sethostname(&cfg.hostname).map_err(errno_ctx("sethostname"))?;
    let (path, argv, envp) = command(cfg, &BTreeMap::new())?;
    // Wait for the cgroup attach and the network; the cgroup namespace is rooted at the
    // container's cgroup, so it is created only now.
    wait_release(go, b'2')?;
    unshare(CloneFlags::CLONE_NEWCGROUP).map_err(errno_ctx("unshare cgroup namespace"))?;
    security::restrict(ctx.seccomp, cfg.idmap.is_some())?;
    execve(&path, &argv, &envp).map_err(|e| format!("exec {path:?}: {e}"))?;
    Err("execve returned".into())
}

fn mnt(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    mount(src, target, fstype, flags, data).map_err(|e| {
        format!(
            "mount {} on {} ({}): {e}",
            src.map(|s| s.display().to_string()).unwrap_or_default(),
            target.display(),
            fstype.unwrap_or("bind")
        )
    })
}

/// Mounts `src` on the directory `rel` of the container's root (resolved and created
/// inside it, see [`inroot`]).
fn mount_dir(
    root: &Root,
    src: Option<&Path>,
    rel: &str,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    let fd = root.mkdir_all(Path::new(rel))?;
    mnt(src, &inroot::fd_path(&fd), fstype, flags, data).map_err(|e| format!("{e} ({rel})"))
}

/// Bind-mounts the host file `src` on the file `rel` of the container's root.
fn bind_file(root: &Root, src: &Path, rel: &str) -> Result<(), String> {
    let fd = root.touch(Path::new(rel))?;
    mnt(
        Some(src),
        &inroot::fd_path(&fd),
        None,
        MsFlags::MS_BIND,
        None,
    )
    .map_err(|e| format!("{e} ({rel})"))
}

/// Makes the mount now at `rel` read-only (looked up again: the fd of the directory
/// under a fresh mount refers to the covered one).
fn remount_ro(root: &Root, rel: &str) -> Result<(), String> {
    let fd = root
        .lookup(Path::new(rel))
        .map_err(|e| format!("open {rel} in the rootfs: {e}"))?;
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    mnt(None, &inroot::fd_path(&fd), None, flags, None).map_err(|e| format!("{e} ({rel})"))
}

fn symlink_in(root: &Root, dir: &str, name: &str, target: &str) {
    if let Ok(d) = root.lookup(Path::new(dir)) {
        // Best effort: an existing entry stays (the /dev tmpfs is fresh anyway).
        let _ = rustix::fs::symlinkat(target, &d, name);
    }
}

fn mount_rootfs(rootfs: &RootfsMount) -> Result<(), String> {
    match rootfs {
        RootfsMount::Dir { path } | RootfsMount::Image { target: path, .. } => mnt(
            Some(path),
            path,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        ),
        RootfsMount::Overlay {
            lower,
            upper,
            work,
            target,
        } => {
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                upper.display(),
                work.display()
            );
            mnt(
                Some(Path::new("overlay")),
                target,
                Some("overlay"),
                MsFlags::empty(),
                Some(&opts),
            )
        }
    }
}

/// `/proc`, `/sys` (read-only), `/dev` (tmpfs with bind-mounted nodes, pts, shm, mqueue,
/// console).
fn mount_kernel_fs(root: &Root, console: &Path) -> Result<(), String> {
    let nsd = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_dir(
        root,
        Some(Path::new("proc")),
        "proc",
        Some("proc"),
        nsd,
        None,
    )?;
    let ro = nsd | MsFlags::MS_RDONLY;
    mount_dir(
        root,
        Some(Path::new("sysfs")),
        "sys",
        Some("sysfs"),
        ro,
        None,
    )?;
    let dev_flags = MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME;
    let dev_opts = Some("mode=755,size=65536k");
    mount_dir(
        root,
        Some(Path::new("tmpfs")),
        "dev",
        Some("tmpfs"),
        dev_flags,
        dev_opts,
    )?;
    for d in DEVICES {
        bind_file(root, &Path::new("/dev").join(d), &format!("dev/{d}"))?;
    }
    let pts_flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    let pts_opts = Some("newinstance,ptmxmode=0666,mode=0620,gid=5");
    let devpts = Some(Path::new("devpts"));
    mount_dir(root, devpts, "dev/pts", Some("devpts"), pts_flags, pts_opts)?;
    symlink_in(root, "dev", "ptmx", "pts/ptmx");
    let shm_opts = Some("mode=1777,size=65536k");
    mount_dir(
        root,
        Some(Path::new("shm")),
        "dev/shm",
        Some("tmpfs"),
        nsd,
        shm_opts,
    )?;
    // Best effort: a kernel without POSIX mqueues just has no /dev/mqueue content.
    let mq = Some(Path::new("mqueue"));
    let _ = mount_dir(root, mq, "dev/mqueue", Some("mqueue"), nsd, None);
    bind_file(root, console, "dev/console")?;
    for (l, t) in stead_host::confine::DEV_PROC_LINKS {
        symlink_in(root, "dev", l, t);
    }
    Ok(())
}

/// Volume bind mounts, each at its target resolved inside the root.
fn mount_volumes(root: &Root, mounts: &[super::config::MountConfig]) -> Result<(), String> {
    for m in mounts {
        let rel = m.target.to_string_lossy();
        let fd = root.mkdir_all(Path::new(rel.as_ref()))?;
        inroot::refuse_kernel_fs(&fd, &rel)?;
        let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
        mnt(Some(&m.source), &inroot::fd_path(&fd), None, flags, None)
            .map_err(|e| format!("{e} ({rel})"))?;
        if m.read_only {
            remount_ro(root, &rel)?;
        }
    }
    Ok(())
}

fn setup_mounts(ctx: &ChildCtx<'_>) -> Result<(), String> {
    let cfg = ctx.cfg;
    let none: Option<&Path> = None;
    mnt(
        none,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    mount_rootfs(&cfg.rootfs)?;
    // Opened after the rootfs mount, so lookups start on it; everything below is
    // resolved through this fd, never by host path.
    let root = Root::open(cfg.rootfs.root())?;
    mount_kernel_fs(&root, &ctx.console_path)?;
    mount_volumes(&root, &cfg.mounts)?;

    // pivot_root(".", ".") then detach the old root stacked on top (as runc does).
    rustix::process::fchdir(root.as_fd()).map_err(|e| format!("chdir rootfs: {e}"))?;
    drop(root);
    pivot_root(".", ".").map_err(errno_ctx("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(errno_ctx("detach old root"))?;
    chdir("/").map_err(errno_ctx("chdir /"))?;
    mask_paths()
}

/// After `pivot_root`: absolute paths resolve inside the container (its own /proc, /sys).
fn mask_paths() -> Result<(), String> {
    let none: Option<&Path> = None;
    let nsd = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for f in security::MASKED_FILES {
        let p = Path::new(f);
        if p.exists() {
            mnt(
                Some(Path::new("/dev/null")),
                p,
                None,
                MsFlags::MS_BIND,
                None,
            )?;
        }
    }
    for d in security::MASKED_DIRS {
        let p = Path::new(d);
        if p.is_dir() {
            mnt(
                Some(Path::new("tmpfs")),
                p,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | nsd,
                Some("size=0"),
            )?;
        }
    }
    for d in security::READONLY_PATHS {
        let p = Path::new(d);
        if p.exists() {
            mnt(Some(p), p, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
            mnt(
                none,
                p,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nsd,
                None,
            )?;
        }
    }
    Ok(())
}

type Command = (CString, Vec<CString>, Vec<CString>);

fn cstr(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("NUL byte in {s:?}"))
}

/// Resolves the program (PATH lookup inside the current root) and builds argv and envp.
fn command(cfg: &ContainerConfig, extra_env: &BTreeMap<String, String>) -> Result<Command, String> {
    command_for(&cfg.command, cfg, extra_env)
}

fn command_for(
    args: &[String],
    cfg: &ContainerConfig,
    extra_env: &BTreeMap<String, String>,
) -> Result<Command, String> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    env.insert("HOME".into(), "/root".into());
    env.insert("TERM".into(), "linux".into());
    env.insert("container".into(), "stead".into());
    env.insert("HOSTNAME".into(), cfg.hostname.clone());
    env.extend(cfg.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(extra_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let prog = args.first().ok_or("empty command")?;
    let path = if prog.contains('/') {
        PathBuf::from(prog)
    } else {
        let search = env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
        search
            .split(':')
            .map(|d| Path::new(d).join(prog))
            .find(|p| p.is_file())
            .ok_or_else(|| format!("{prog}: not found in PATH {search}"))?
    };
    let path = cstr(&path.to_string_lossy())?;
    let argv = args
        .iter()
        .map(|a| cstr(a))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = env
        .iter()
        .map(|(k, v)| cstr(&format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((path, argv, envp))
}

/// Starts `args` inside the running container whose init is `init_pid`, with `stdio` as
/// its fds 0, 1, 2. Returns the pid of a helper process (child of the caller) that exits
/// with the command's status (128+signal when killed).
pub(crate) fn spawn_exec(
    cfg: &ContainerConfig,
    cgroup: &Cgroup,
    init_pid: Pid,
    args: &[String],
    env: &BTreeMap<String, String>,
    stdio: &[OwnedFd],
) -> Result<Pid, DriverError> {
    let seccomp = security::seccomp_programs()?;
    // Open the namespaces before forking, so errors are reported here.
    let mut kinds = vec![
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ];
    if cfg.idmap.is_some() {
        kinds.push(("user", CloneFlags::CLONE_NEWUSER));
    }
    let mut ns = Vec::new();
    for (k, f) in kinds {
        let p = stead_host::ProcFs::host().pid_ns(init_pid, k);
        let file =
            fs::File::open(&p).map_err(|e| DriverError::io(format!("open {}", p.display()), e))?;
        ns.push((file, f));
    }
    // The helper joins the cgroup itself, lock-free on v1 (see `Cgroup::self_join_files`).
    let join = open_for_join(
        &cgroup
            .self_join_files()
            .unwrap_or_else(|| cgroup.procs_files()),
    )?;
    // SAFETY: called from the single-threaded shim; the child only runs this function's
    // code and ends with execve or _exit.
    match unsafe { nix::unistd::fork() }.map_err(|e| DriverError::io("fork", e.into()))? {
        nix::unistd::ForkResult::Parent { child } => Ok(child),
        nix::unistd::ForkResult::Child => {
            let code = match exec_child(cfg, &join, &ns, args, env, stdio, &seccomp) {
                Ok(code) => code,
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "stead exec: {e}");
                    let _ = stdio.get(2).map(|f| {
                        let _ = nix::unistd::write(f, format!("stead exec: {e}\n").as_bytes());
                    });
                    126
                }
            };
            // SAFETY: _exit ends the helper without running the shim's atexit handlers.
            unsafe { libc::_exit(code) }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn exec_child(
    cfg: &ContainerConfig,
    join: &[OwnedFd],
    ns: &[(fs::File, CloneFlags)],
    args: &[String],
    env: &BTreeMap<String, String>,
    stdio: &[OwnedFd],
    seccomp: &[BpfProgram],
) -> Result<i32, String> {
    join_cgroup(join)?;
    for (f, kind) in ns {
        setns(f.as_fd(), *kind).map_err(|e| format!("setns {kind:?}: {e}"))?;
    }
    become_root(cfg)?;
    // SAFETY: still single-threaded (a fork of the single-threaded shim).
    match unsafe { nix::unistd::fork() }.map_err(errno_ctx("fork into pid namespace"))? {
        nix::unistd::ForkResult::Parent { child } => loop {
            match nix::sys::wait::waitpid(child, None) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, c)) => return Ok(c),
                Ok(nix::sys::wait::WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
                Ok(_) => continue,
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(format!("wait: {e}")),
            }
        },
        nix::unistd::ForkResult::Child => {
            let r = (|| -> Result<std::convert::Infallible, String> {
                let [i, o, e] = match stdio {
                    [i, o, e, ..] => [i.as_fd(), o.as_fd(), e.as_fd()],
                    _ => return Err(format!("exec needs 3 fds, got {}", stdio.len())),
                };
                dup_stdio([i, o, e])?;
                nix::unistd::setsid().map_err(errno_ctx("setsid"))?;
                reset_signals()?;
                chdir("/").map_err(errno_ctx("chdir /"))?;
                let (path, argv, envp) = command_for(args, cfg, env)?;
                security::restrict(seccomp, cfg.idmap.is_some())?;
                execve(&path, &argv, &envp).map_err(|e| format!("exec {path:?}: {e}"))?;
                Err("execve returned".into())
            })();
            let msg = match r {
                Ok(never) => match never {},
                Err(e) => e,
            };
            let _ = writeln!(std::io::stderr(), "stead exec: {msg}");
            // SAFETY: ends the helper child without unwinding.
            unsafe { libc::_exit(127) }
        }
    }
}
