//! Tap devices (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`, no vnet header, no offloads).
//!
//! The VMM never creates a tap: it attaches to a persistent one that its owner (stead's
//! VM driver, or a test) made beforehand. `TUNSETIFF` by name would create a missing
//! tap, and that tap (unmarked, living as long as the VMM) would stand in the way of the
//! one its owner makes next, so [`Tap::attach`] checks that the name exists before and
//! that the device is persistent after, and drops a device it made by mistake.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};

use crate::{TapSource, VmmError};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_PERSIST: libc::c_short = 0x0800;

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
            TapSource::Name(name) => Self::attach(name)?,
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

    /// Attaches to the existing persistent tap interface `name` and returns its queue fd.
    /// A missing or non-persistent tap is an error, and nothing is left created.
    pub fn attach(name: &str) -> Result<File, VmmError> {
        if name.is_empty() || name.len() > 15 || name.contains('\0') {
            return Err(VmmError::Config(format!("bad tap name {name:?}")));
        }
        let missing = || {
            VmmError::Config(format!(
                "tap {name} does not exist (the VMM attaches only to a persistent tap made before it starts)"
            ))
        };
        if !link_exists(name) {
            return Err(missing());
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
        tun_ioctl(&file, TUNSETIFF, &mut req).map_err(VmmError::io(format!("TUNSETIFF {name}")))?;
        // Deleted between the check and TUNSETIFF: the ioctl made a fresh tap, which goes
        // away with `file`.
        let mut got = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        tun_ioctl(&file, TUNGETIFF, &mut got).map_err(VmmError::io(format!("TUNGETIFF {name}")))?;
        if got.flags & IFF_PERSIST == 0 {
            return Err(missing());
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

/// Whether a network interface named `name` exists in this network namespace.
fn link_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads the NUL-terminated string `c`, which outlives the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// A TUN ioctl that reads and/or writes a `struct ifreq`.
fn tun_ioctl(file: &File, request: libc::c_ulong, req: &mut IfReq) -> io::Result<()> {
    // A raw ioctl: nix's ioctl macros would generate an unsafe fn with the same contract.
    // SAFETY: TUNSETIFF and TUNGETIFF read and write a struct ifreq, which IfReq matches
    // in size and layout (16-byte name, flags, padding to 40 bytes); `req` outlives the
    // call and `file` is an open tun fd.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), request as _, req as *mut IfReq) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(fd: impl AsFd) -> Result<(), VmmError> {
    let fd = fd.as_fd();
    let fail = |e: Errno| VmmError::io("fcntl O_NONBLOCK")(e.into());
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL).map_err(fail)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(fail)?;
    Ok(())
}
