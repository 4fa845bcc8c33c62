//! Consoles of supervised workloads, both ends:
//! - in the supervisor: the size-capped console log ([`ConsoleLog`], [`trim_log`]) and the
//!   fan-out of console output to attached clients ([`Clients`]);
//! - in the CLI: `stead console` ([`attach`], one relay between the terminal and a
//!   workload's console socket) and `stead logs` ([`copy_log`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stead_reconciler::driver::DriverError;

/// Size cap of a workload's console log: past it, the oldest half is dropped.
pub const LOG_CAP: u64 = 1 << 20;

/// Detach key of [`attach`]: Ctrl-].
pub const CONSOLE_DETACH: u8 = 0x1d;

/// Keeps the newest half (from a line start) of the log at `p` once it passes `cap`
/// bytes; returns the new length when it trimmed. In place, so a writer appending through
/// its own `O_APPEND` descriptor (the supervisor, or the VMM process) keeps writing at the
/// new end. Only the kept half is read: the log may be far larger than the cap.
pub fn trim_log(p: &Path, cap: u64) -> Option<u64> {
    let f = OpenOptions::new().read(true).write(true).open(p).ok()?;
    let len = f.metadata().ok()?.len();
    if len <= cap {
        return None;
    }
    let keep = cap / 2;
    let mut data = vec![0u8; usize::try_from(keep).ok()?];
    f.read_exact_at(&mut data, len - keep).ok()?;
    let start = data.iter().position(|b| *b == b'\n').map_or(0, |nl| nl + 1);
    f.write_all_at(&data[start..], 0).ok()?;
    let kept = (data.len() - start) as u64;
    f.set_len(kept).ok()?;
    Some(kept)
}

/// A console log the supervisor appends to itself, trimmed at [`LOG_CAP`].
#[derive(Debug)]
pub struct ConsoleLog {
    path: PathBuf,
    file: Option<File>,
    size: u64,
}

impl ConsoleLog {
    /// Opens (creates) the log at `path` for appending. Failing to open it is not fatal:
    /// output is then only relayed, not logged.
    pub fn open(path: PathBuf) -> Self {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .ok();
        let size = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        ConsoleLog { path, file, size }
    }

    /// Appends `data`, trimming the log when it passes the cap.
    pub fn write(&mut self, data: &[u8]) {
        if let Some(f) = &mut self.file
            && f.write_all(data).is_ok()
        {
            self.size += data.len() as u64;
        }
        if self.size > LOG_CAP
            && let Some(kept) = trim_log(&self.path, LOG_CAP)
        {
            self.size = kept;
        }
    }
}

/// Console clients attached to a supervisor (over its control socket): what the workload
/// prints goes to all of them, what any of them types goes to the workload.
#[derive(Debug, Default)]
pub struct Clients {
    conns: Vec<UnixStream>,
}

impl Clients {
    /// Adds a client (its connection is made non-blocking).
    pub fn add(&mut self, conn: UnixStream) {
        let _ = conn.set_nonblocking(true);
        self.conns.push(conn);
    }

    /// The clients' descriptors, to poll for input (in the order [`Clients::relay_input`]
    /// expects their readiness).
    pub fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.conns.iter().map(|c| c.as_fd())
    }

    /// Sends workload output to every client; a client whose connection failed is dropped
    /// (one that is merely slow misses this output).
    pub fn broadcast(&mut self, data: &[u8]) {
        self.conns.retain_mut(
            |c| !matches!(c.write(data), Err(e) if e.kind() != io::ErrorKind::WouldBlock),
        );
    }

    /// Reads what the clients marked `ready` typed and writes it to `workload`; clients
    /// that hung up or failed are dropped.
    pub fn relay_input(&mut self, ready: &[bool], workload: &mut impl Write) {
        let mut keep = Vec::with_capacity(self.conns.len());
        let mut buf = [0u8; 4096];
        for (i, mut c) in std::mem::take(&mut self.conns).into_iter().enumerate() {
            if !ready.get(i).copied().unwrap_or(false) {
                keep.push(c);
                continue;
            }
            match c.read(&mut buf) {
                Ok(0) => {}
                Ok(n) => {
                    let _ = workload.write_all(&buf[..n]);
                    keep.push(c);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => keep.push(c),
                Err(_) => {}
            }
        }
        self.conns = keep;
    }
}

/// How [`attach`] behaves at the edges.
#[derive(Debug, Clone, Default)]
pub struct AttachOptions {
    /// Shown on a terminal when attaching and detaching (`Kind/name`); `None`: silent.
    pub banner: Option<String>,
    /// When stdin (not a terminal) ends: keep showing output this long, then return.
    /// `None`: return at once.
    pub linger: Option<Duration>,
}

/// `stead console`: relays between this process's stdin/stdout and a workload's console
/// connection `conn` until Ctrl-] ([`CONSOLE_DETACH`]), the end of stdin (see
/// [`AttachOptions::linger`]) or the connection closing. On a terminal, stdin is in raw
/// mode meanwhile.
pub fn attach(conn: &UnixStream, opts: &AttachOptions) -> Result<(), DriverError> {
    use nix::sys::termios;
    let stdin = io::stdin();
    let saved = termios::tcgetattr(&stdin).ok();
    if let Some(t) = &saved {
        if let Some(b) = &opts.banner {
            eprint!("Connected to {b}; Ctrl-] detaches.\r\n");
        }
        let mut raw = t.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw);
    }
    let result = relay(conn, opts.linger);
    if let Some(t) = &saved {
        let _ = termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, t);
        if let Some(b) = &opts.banner {
            eprint!("\r\nDetached from {b}.\r\n");
        }
    }
    result
}

/// The poll timeout left of a linger period; `None` once it is over.
fn linger_timeout(until: Option<Instant>) -> Option<nix::poll::PollTimeout> {
    use nix::poll::PollTimeout;
    match until {
        None => Some(PollTimeout::NONE),
        Some(t) => {
            let left = t.saturating_duration_since(Instant::now());
            (!left.is_zero()).then(|| {
                PollTimeout::try_from(left.as_millis().min(60_000) as i32)
                    .unwrap_or(PollTimeout::ZERO)
            })
        }
    }
}

/// What one step of the relay decided.
enum Step {
    Continue,
    Done,
}

/// The relay loop of [`attach`].
fn relay(conn: &UnixStream, linger: Option<Duration>) -> Result<(), DriverError> {
    use nix::poll::{PollFd, PollFlags, poll};
    let stdin = io::stdin();
    let mut buf = [0u8; 4096];
    let mut stdin_open = true;
    let mut linger_until: Option<Instant> = None;
    loop {
        let Some(timeout) = linger_timeout(linger_until) else {
            return Ok(());
        };
        let mut fds = vec![PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
        if stdin_open {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(DriverError::io("poll", e.into())),
        }
        let conn_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let stdin_ready = stdin_open && fds[1].revents().is_some_and(|r| !r.is_empty());
        if conn_ready && let Step::Done = output_step(conn, &mut buf)? {
            return Ok(());
        }
        if stdin_ready {
            match input_step(conn, &mut buf)? {
                Some(Step::Done) => return Ok(()),
                Some(Step::Continue) => {}
                None => {
                    let Some(l) = linger else {
                        return Ok(());
                    };
                    stdin_open = false;
                    linger_until = Some(Instant::now() + l);
                }
            }
        }
    }
}

/// Copies what the console sent to stdout; `Done` when it closed.
fn output_step(conn: &UnixStream, buf: &mut [u8]) -> Result<Step, DriverError> {
    let n = (&*conn)
        .read(buf)
        .map_err(|e| DriverError::io("console read", e))?;
    if n == 0 {
        return Ok(Step::Done);
    }
    let mut out = io::stdout();
    out.write_all(&buf[..n])
        .map_err(|e| DriverError::io("stdout", e))?;
    out.flush().map_err(|e| DriverError::io("stdout", e))?;
    Ok(Step::Continue)
}

/// Sends what stdin gave to the console; `Done` at the detach key, `None` at the end of
/// stdin.
fn input_step(conn: &UnixStream, buf: &mut [u8]) -> Result<Option<Step>, DriverError> {
    let n = io::stdin()
        .lock()
        .read(buf)
        .map_err(|e| DriverError::io("stdin", e))?;
    if n == 0 {
        return Ok(None);
    }
    if let Some(i) = buf[..n].iter().position(|b| *b == CONSOLE_DETACH) {
        let _ = (&*conn).write_all(&buf[..i]);
        return Ok(Some(Step::Done));
    }
    (&*conn)
        .write_all(&buf[..n])
        .map_err(|e| DriverError::io("console write", e))?;
    Ok(Some(Step::Continue))
}

/// Copies a supervisor's console log (`path`, opened with `open`) to `out`; with
/// `follow`, keeps copying new output every 200 ms while `alive()` holds. The supervisor
/// trims the log in place: when it shrank, copying starts over from its beginning.
pub fn copy_log(
    path: &Path,
    open: impl Fn() -> Result<File, DriverError>,
    follow: bool,
    alive: impl Fn() -> bool,
    out: &mut dyn Write,
) -> Result<(), DriverError> {
    let mut f = open()?;
    let mut pos = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if len < pos {
            f = open()?;
            pos = 0;
        }
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| DriverError::io("read log", e))?;
            if n == 0 {
                break;
            }
            pos += n as u64;
            out.write_all(&buf[..n])
                .map_err(|e| DriverError::io("write log", e))?;
        }
        out.flush().map_err(|e| DriverError::io("flush", e))?;
        if !follow || !alive() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn console_log_is_capped() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("console.log");
        let mut log = ConsoleLog::open(p.clone());
        let line = vec![b'x'; 1023]
            .into_iter()
            .chain([b'\n'])
            .collect::<Vec<u8>>();
        for _ in 0..3000 {
            log.write(&line);
        }
        let len = fs::metadata(&p).expect("meta").len();
        assert!(len <= LOG_CAP, "{len}");
        assert!(len >= LOG_CAP / 2 - 1024, "{len}");
        let data = fs::read(&p).expect("read");
        assert_eq!(data.first(), Some(&b'x'));
        assert_eq!(data.last(), Some(&b'\n'));
    }

    #[test]
    fn log_is_trimmed_in_place_to_the_newest_half() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("console.log");
        let mut text = String::new();
        for i in 0..1000 {
            text.push_str(&format!("line {i:04}\n"));
        }
        fs::write(&p, &text).expect("write");
        // An appending writer keeps its descriptor across the trim (like the VMM).
        let mut appender = OpenOptions::new().append(true).open(&p).expect("open");
        let kept = trim_log(&p, 4096).expect("trimmed");
        let after = fs::read_to_string(&p).expect("read");
        assert_eq!(kept, after.len() as u64);
        assert!(after.len() <= 2048 && after.len() > 2030, "{}", after.len());
        assert!(after.starts_with("line "), "starts at a line: {after:.20}");
        assert!(after.ends_with("line 0999\n"));
        appender.write_all(b"next\n").expect("append");
        let after2 = fs::read_to_string(&p).expect("read");
        assert_eq!(after2.len(), after.len() + 5, "appends land at the new end");
        assert_eq!(trim_log(&p, 1 << 20), None);
        assert_eq!(
            fs::read_to_string(&p).expect("read"),
            after2,
            "under the cap: untouched"
        );
    }

    /// Peak resident memory of this process, in KiB.
    fn peak_rss_kib() -> u64 {
        stead_host::process::Proc::host()
            .status_kib(std::process::id() as i32, "VmHWM")
            .expect("VmHWM")
    }

    #[test]
    fn huge_log_is_trimmed_without_reading_it_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("console.log");
        // 256 MiB, sparse, with real lines at the end.
        let f = File::create(&p).expect("create");
        f.set_len(256 << 20).expect("grow");
        let tail = "x".repeat(100) + "\n";
        let tail = tail.repeat(1000);
        f.write_all_at(tail.as_bytes(), 256 << 20).expect("tail");
        drop(f);
        let before = peak_rss_kib();
        trim_log(&p, 64 << 10);
        let grew = peak_rss_kib().saturating_sub(before);
        assert!(grew < 16 << 10, "peak RSS grew by {grew} KiB");
        let after = fs::read_to_string(&p).expect("read");
        assert!(
            after.len() <= 32 << 10 && after.len() > 31 << 10,
            "{}",
            after.len()
        );
        assert!(after.starts_with('x') && after.ends_with("x\n"));
    }

    #[test]
    fn clients_get_output_and_send_input() {
        let (a, mut a_peer) = UnixStream::pair().expect("pair");
        let (b, b_peer) = UnixStream::pair().expect("pair");
        let mut clients = Clients::default();
        clients.add(a);
        clients.add(b);
        assert_eq!(clients.fds().count(), 2);
        drop(b_peer);
        clients.broadcast(b"hello");
        let mut got = [0u8; 5];
        a_peer.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hello");
        a_peer.write_all(b"typed").expect("write");
        let mut sink = Vec::new();
        clients.relay_input(&[true, true], &mut sink);
        assert_eq!(sink, b"typed");
        assert_eq!(clients.fds().count(), 1, "the hung-up client is dropped");
    }
}
