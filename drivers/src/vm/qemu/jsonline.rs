//! Newline-delimited JSON over a unix stream socket, with deadlines: the framing shared by
//! the QMP and guest agent clients.
//!
//! Reads go through our own buffer, so a read that times out in the middle of a line keeps
//! the bytes already received and the next read continues the same line.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

/// The longest line accepted (QEMU's replies for big block graphs stay far below it).
pub(crate) const MAX_LINE: usize = 16 << 20;

/// Why a line could not be read or written.
#[derive(Debug)]
pub(crate) enum LineError {
    /// The deadline passed first.
    Timeout,
    /// The peer closed the connection.
    Closed,
    /// A line grew past [`MAX_LINE`].
    TooLong,
    /// Any other socket error.
    Io(io::Error),
}

impl From<io::Error> for LineError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => LineError::Timeout,
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::UnexpectedEof => LineError::Closed,
            _ => LineError::Io(e),
        }
    }
}

/// One connection speaking JSON lines.
#[derive(Debug)]
pub(crate) struct JsonLines {
    stream: UnixStream,
    /// Bytes received and not yet handed out.
    buf: Vec<u8>,
}

/// Time left until `deadline`, or `Timeout` if none is left.
fn remaining(deadline: Instant) -> Result<Duration, LineError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(LineError::Timeout)
    } else {
        Ok(left)
    }
}

impl JsonLines {
    /// Wraps a connected stream.
    pub(crate) fn new(stream: UnixStream) -> Self {
        JsonLines {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes` whole before `deadline`, passing `fds` (SCM_RIGHTS) with the first byte.
    pub(crate) fn write(
        &mut self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
        deadline: Instant,
    ) -> Result<(), LineError> {
        self.stream.set_write_timeout(Some(remaining(deadline)?))?;
        let mut sent = 0;
        if !fds.is_empty() {
            let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
            let cmsg = [ControlMessage::ScmRights(&raw)];
            let iov = [IoSlice::new(bytes)];
            sent = loop {
                match sendmsg::<()>(
                    self.stream.as_raw_fd(),
                    &iov,
                    &cmsg,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                ) {
                    Ok(n) => break n,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(io::Error::from(e).into()),
                }
            };
        }
        while sent < bytes.len() {
            self.stream.set_write_timeout(Some(remaining(deadline)?))?;
            match self.stream.write(&bytes[sent..]) {
                Ok(0) => return Err(LineError::Closed),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Serializes `value` and sends it as one line.
    pub(crate) fn send_json(
        &mut self,
        value: &serde_json::Value,
        fds: &[BorrowedFd<'_>],
        deadline: Instant,
    ) -> Result<(), LineError> {
        let mut line = serde_json::to_vec(value)
            .map_err(|e| LineError::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        line.push(b'\n');
        self.write(&line, fds, deadline)
    }

    /// Reads more bytes into the buffer (at least one) before `deadline`.
    fn fill(&mut self, deadline: Instant) -> Result<(), LineError> {
        let mut chunk = [0u8; 8192];
        loop {
            self.stream.set_read_timeout(Some(remaining(deadline)?))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(LineError::Closed),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next non-blank line, without its line ending (`\n` or `\r\n`).
    pub(crate) fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>, LineError> {
        let mut scanned = 0;
        loop {
            if let Some(pos) = self.buf[scanned..].iter().position(|b| *b == b'\n') {
                let end = scanned + pos;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    scanned = 0;
                    continue;
                }
                return Ok(line);
            }
            scanned = self.buf.len();
            if scanned > MAX_LINE {
                self.buf.clear();
                return Err(LineError::TooLong);
            }
            self.fill(deadline)?;
        }
    }

    /// Drops everything received up to and including the next `byte` (the guest agent's
    /// 0xFF sentinel), reading as needed.
    pub(crate) fn discard_through(&mut self, byte: u8, deadline: Instant) -> Result<(), LineError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == byte) {
                self.buf.drain(..=pos);
                return Ok(());
            }
            self.buf.clear();
            self.fill(deadline)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn lines_are_split_on_newline_with_crlf_and_blank_lines_dropped() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        let mut c = JsonLines::new(a);
        b.write_all(b"{\"a\":1}\r\n\n  \r\n{\"b\"").expect("w");
        assert_eq!(c.read_line(deadline()).expect("l1"), b"{\"a\":1}");
        b.write_all(b":2}\n").expect("w");
        assert_eq!(c.read_line(deadline()).expect("l2"), b"{\"b\":2}");
    }

    #[test]
    fn a_timeout_keeps_the_partial_line_for_the_next_read() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        let mut c = JsonLines::new(a);
        b.write_all(b"{\"half\":").expect("w");
        let short = Instant::now() + Duration::from_millis(50);
        assert!(matches!(c.read_line(short), Err(LineError::Timeout)));
        b.write_all(b"true}\n").expect("w");
        assert_eq!(c.read_line(deadline()).expect("line"), b"{\"half\":true}");
    }

    #[test]
    fn a_closed_peer_is_reported_as_closed() {
        let (a, b) = UnixStream::pair().expect("pair");
        let mut c = JsonLines::new(a);
        drop(b);
        assert!(matches!(c.read_line(deadline()), Err(LineError::Closed)));
    }

    #[test]
    fn discard_through_drops_stale_bytes_up_to_the_sentinel() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        let mut c = JsonLines::new(a);
        b.write_all(b"{\"stale\":1}\ngarbage").expect("w");
        b.write_all(&[0xff]).expect("w");
        b.write_all(b"{\"return\":7}\n").expect("w");
        c.discard_through(0xff, deadline()).expect("sentinel");
        assert_eq!(c.read_line(deadline()).expect("line"), b"{\"return\":7}");
    }

    #[test]
    fn written_fds_arrive_with_the_line() {
        use std::os::fd::AsFd;
        let (a, b) = UnixStream::pair().expect("pair");
        let mut c = JsonLines::new(a);
        let f = tempfile::tempfile().expect("tmp");
        c.send_json(&serde_json::json!({"x": 1}), &[f.as_fd()], deadline())
            .expect("send");
        let mut buf = [0u8; 64];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let msg = nix::sys::socket::recvmsg::<()>(
            b.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .expect("recvmsg");
        let n = msg.bytes;
        let got: Vec<RawFd> = msg
            .cmsgs()
            .expect("cmsgs")
            .flat_map(|c| match c {
                nix::sys::socket::ControlMessageOwned::ScmRights(r) => r,
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(got.len(), 1);
        for fd in got {
            // SAFETY: the kernel installed this descriptor for this test alone.
            drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        }
        assert_eq!(&buf[..n], b"{\"x\":1}\n");
    }
}
