//! Tap devices (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`, no vnet header, no offloads).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::{TapSource, VmmError};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A non-blocking tap file descriptor.
#[derive(Debug)]
pub struct Tap {
    file: File,
}

impl Tap {
    /// Opens the tap named by `src`, or duplicates the given descriptor.
    pub fn open(src: &TapSource) -> Result<Tap, VmmError> {
        let file = match src {
            TapSource::Name(name) => Self::create(name)?,
            TapSource::Fd(fd) => {
                // SAFETY: F_DUPFD_CLOEXEC on a caller-provided descriptor; the result is
                // checked and becomes owned by us.
                let dup = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 0) };
                if dup < 0 {
                    return Err(VmmError::io("dup tap fd")(io::Error::last_os_error()));
                }
                // SAFETY: `dup` is a fresh descriptor we own exclusively.
                File::from(unsafe { OwnedFd::from_raw_fd(dup) })
            }
        };
        set_nonblocking(file.as_raw_fd())?;
        Ok(Tap { file })
    }

    /// Creates (or attaches to) the tap interface `name` and returns its queue fd.
    pub fn create(name: &str) -> Result<File, VmmError> {
        if name.is_empty() || name.len() > 15 || name.contains('\0') {
            return Err(VmmError::Config(format!("bad tap name {name:?}")));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(VmmError::io("open /dev/net/tun"))?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq matches in
        // size and layout (16-byte name, flags, padding to 40 bytes).
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if r < 0 {
            return Err(VmmError::io(format!("TUNSETIFF {name}"))(
                io::Error::last_os_error(),
            ));
        }
        Ok(file)
    }

    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    pub(crate) fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn set_nonblocking(fd: RawFd) -> Result<(), VmmError> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; results are checked.
    let r = unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 {
            fl
        } else {
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK)
        }
    };
    if r < 0 {
        return Err(VmmError::io("fcntl O_NONBLOCK")(io::Error::last_os_error()));
    }
    Ok(())
}
