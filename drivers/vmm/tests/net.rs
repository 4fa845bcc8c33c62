//! virtio-net on a tap, inside a private network namespace created by the test.

#![allow(clippy::unwrap_used)] // unwrap is fine in tests

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::{kvm_or_skip, serial, tiny, wait_serial};
use stead_vmm::{ExitReason, NetConfig, TapSource, Vm};

const TAP: &str = "steadtap0";
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

fn check(r: libc::c_int, what: &str) {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req
}

fn link_up(name: &str) {
    // SAFETY: plain socket/ioctl calls on a fresh descriptor with a valid ifreq.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        check(s, "socket");
        let s = OwnedFd::from_raw_fd(s);
        let mut req = ifreq(name);
        check(
            libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req),
            "SIOCGIFFLAGS",
        );
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        check(
            libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req),
            "SIOCSIFFLAGS",
        );
    }
}

fn packet_socket(name: &str) -> (OwnedFd, libc::c_int) {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: FFI calls with valid pointers; the descriptor is owned right away.
    unsafe {
        let ifindex = libc::if_nametoindex(cname.as_ptr()) as libc::c_int;
        assert!(ifindex > 0, "if_nametoindex");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let s = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            proto as i32,
        );
        check(s, "socket(AF_PACKET)");
        let s = OwnedFd::from_raw_fd(s);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        check(
            libc::bind(
                s.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ),
            "bind",
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        check(
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            ),
            "SO_RCVTIMEO",
        );
        (s, ifindex)
    }
}

/// Opens (creating) tap `name` the way an external creator would hand it over.
fn open_tap(name: &str) -> OwnedFd {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let path = std::ffi::CString::new("/dev/net/tun").unwrap();
    // SAFETY: open + TUNSETIFF with a valid ifreq; the descriptor is owned right away.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        check(fd, "open /dev/net/tun");
        let fd = OwnedFd::from_raw_fd(fd);
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        check(
            libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req),
            "TUNSETIFF",
        );
        fd
    }
}

/// Makes tap `name` persistent, the way stead's VM driver hands taps to the VMM by name.
fn make_persistent_tap(name: &str) {
    const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
    let fd = open_tap(name);
    // SAFETY: TUNSETPERSIST takes an integer argument by value on an open tun fd.
    check(
        unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) },
        "TUNSETPERSIST",
    );
}

fn link_exists(name: &str) -> bool {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: if_nametoindex reads the NUL-terminated string, which outlives the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

fn net_test_body(pass_fd: bool) {
    // SAFETY: unshare affects only this (dedicated) thread's network namespace.
    check(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        "unshare(CLONE_NEWNET)",
    );
    let mut cfg = tiny("net");
    // Either the VMM attaches to a persistent tap by name, or it gets (and duplicates)
    // our fd.
    let own_fd = pass_fd.then(|| open_tap(TAP));
    if !pass_fd {
        make_persistent_tap(TAP);
    }
    cfg.nets.push(NetConfig {
        tap: match &own_fd {
            Some(fd) => TapSource::Fd(fd.as_raw_fd()),
            None => TapSource::Name(TAP.into()),
        },
        mac: GUEST_MAC,
    });
    let vm = Vm::new(cfg).unwrap();
    let h = vm.handle();
    link_up(TAP);
    let (sock, ifindex) = packet_socket(TAP);
    let runner = std::thread::spawn(move || vm.run().unwrap());

    // Guest -> host: the guest's broadcast frame shows up on the tap.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = false;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline && !got {
        // SAFETY: recv into a valid buffer of the given length.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 14 {
            continue;
        }
        let f = &buf[..n as usize];
        got = f[12..14] == ETHERTYPE
            && f[6..12] == GUEST_MAC
            && f[..6] == [0xff; 6]
            && f[14..].starts_with(b"stead-guest-tx");
    }
    assert!(
        got,
        "guest frame not seen on the tap; serial: {}",
        serial(&h)
    );
    assert!(wait_serial(&h, "net: tx done", Duration::from_secs(10)));

    // Host -> guest: a frame sent on the tap reaches the guest, which echoes it.
    let mut frame = Vec::new();
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    frame.extend_from_slice(&ETHERTYPE);
    frame.extend_from_slice(b"hello-from-host");
    frame.resize(60, 0);
    // SAFETY: sockaddr_ll is plain data; sendto reads `frame` and `sll` only.
    unsafe {
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&GUEST_MAC);
        let n = libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        check(n as libc::c_int, "sendto");
    }
    assert!(
        wait_serial(&h, "net: rx hello-from-host", Duration::from_secs(20)),
        "serial: {}",
        serial(&h)
    );
    assert_eq!(runner.join().unwrap(), ExitReason::Shutdown);
    assert!(serial(&h).contains("net: mac=52:54:00:12:34:56"));
    drop(own_fd);
}

fn have_tun(name: &str) -> bool {
    if std::path::Path::new("/dev/net/tun").exists() {
        return true;
    }
    println!("SKIP {name}: /dev/net/tun absent");
    false
}

#[test]
fn virtio_net_frames_both_ways() {
    if !kvm_or_skip("virtio_net_frames_both_ways") || !have_tun("virtio_net_frames_both_ways") {
        return;
    }
    // A dedicated thread owns the private network namespace; it ends with the test,
    // and the namespace (with its tap) goes away with the last descriptor.
    std::thread::spawn(|| net_test_body(false)).join().unwrap();
}

#[test]
fn virtio_net_on_passed_tap_fd() {
    if !kvm_or_skip("virtio_net_on_passed_tap_fd") || !have_tun("virtio_net_on_passed_tap_fd") {
        return;
    }
    std::thread::spawn(|| net_test_body(true)).join().unwrap();
}

#[test]
fn a_tap_named_but_missing_is_refused_and_not_created() {
    const NAME: &str = "a_tap_named_but_missing_is_refused_and_not_created";
    if !kvm_or_skip(NAME) || !have_tun(NAME) {
        return;
    }
    std::thread::spawn(|| {
        // SAFETY: unshare affects only this (dedicated) thread's network namespace.
        check(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            "unshare(CLONE_NEWNET)",
        );
        let mut cfg = tiny("net");
        cfg.nets.push(NetConfig {
            tap: TapSource::Name(TAP.into()),
            mac: GUEST_MAC,
        });
        let Err(e) = Vm::new(cfg.clone()) else {
            panic!("a VM on a missing tap was built");
        };
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(!link_exists(TAP), "the VMM created {TAP}");
        // A tap that is not persistent (held by someone else) is refused too.
        let held = open_tap(TAP);
        assert!(Vm::new(cfg).is_err());
        drop(held);
        assert!(!link_exists(TAP));
    })
    .join()
    .unwrap();
}
