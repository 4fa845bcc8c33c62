//! Tap devices (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`, no vnet header, no offloads).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};

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
                // SAFETY: the caller hands us an open tap descriptor it keeps open for
                // this call (`TapSource::Fd`); it is only borrowed to duplicate it
                // (F_DUPFD_CLOEXEC), and the duplicate is ours.
                let borrowed = unsafe { BorrowedFd::borrow_raw(*fd) };
                File::from(
                    borrowed
                        .try_clone_to_owned()
                        .map_err(VmmError::io("dup tap fd"))?,
                )
            }
        };
        set_nonblocking(&file)?;
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
            .custom_flags(OFlag::O_CLOEXEC.bits())
            .open("/dev/net/tun")
            .map_err(VmmError::io("open /dev/net/tun"))?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // A raw ioctl: nix's ioctl macros would generate an unsafe fn with the same
        // contract.
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

fn set_nonblocking(fd: impl AsFd) -> Result<(), VmmError> {
    let fd = fd.as_fd();
    let fail = |e: Errno| VmmError::io("fcntl O_NONBLOCK")(e.into());
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL).map_err(fail)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(fail)?;
    Ok(())
}
