//! Real-KVM tests with the tiny guest built from `guests/`.

#![allow(clippy::unwrap_used)] // unwrap is fine in tests

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use common::{kvm_or_skip, serial, tiny, wait_serial};
use stead_vmm::{ControlClient, DiskConfig, ExitReason, RunState, Vm};

#[test]
fn serial_hello() {
    if !kvm_or_skip("serial_hello") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let mut cfg = tiny("hello");
    cfg.serial_log = Some(log.clone());
    let vm = Vm::new(cfg).unwrap();
    let h = vm.handle();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    vm.set_serial_callback(std::sync::Arc::new(move |b: &[u8]| {
        seen2.lock().unwrap().extend_from_slice(b)
    }));
    let exit = vm.run().unwrap();
    let out = serial(&h);
    assert!(
        out.contains("hello from stead tiny guest"),
        "serial: {out:?}"
    );
    assert_eq!(exit, ExitReason::Shutdown);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), out);
    assert_eq!(*seen.lock().unwrap(), out.as_bytes());
}

#[test]
fn i8042_reset_exits_cleanly() {
    if !kvm_or_skip("i8042_reset_exits_cleanly") {
        return;
    }
    let vm = Vm::new(tiny("reset")).unwrap();
    let h = vm.handle();
    assert_eq!(vm.run().unwrap(), ExitReason::Reset);
    assert!(serial(&h).contains("resetting"));
    assert_eq!(h.state(), RunState::Exited);
}

fn disk_with_sector0(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut data = vec![0u8; 1 << 20];
    data[..16].copy_from_slice(b"STEAD-SECTOR-0!!");
    f.write_all(&data).unwrap();
    path
}

#[test]
fn virtio_blk_read_write_flush() {
    if !kvm_or_skip("virtio_blk_read_write_flush") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = disk_with_sector0(dir.path());
    let mut cfg = tiny("blk");
    cfg.disks.push(DiskConfig {
        path: path.clone(),
        read_only: false,
    });
    let vm = Vm::new(cfg).unwrap();
    let h = vm.handle();
    assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
    let out = serial(&h);
    assert!(out.contains("blk: capacity=2048 ro=0"), "serial: {out}");
    assert!(
        out.contains("blk: read status=0 sector0=STEAD-SECTOR-0!!"),
        "serial: {out}"
    );
    assert!(out.contains("blk: write status=0"), "serial: {out}");
    assert!(out.contains("blk: flush status=0"), "serial: {out}");
    assert!(
        out.contains("blk: id status=0 id=disk.img"),
        "serial: {out}"
    );
    assert!(out.contains("blk: done"), "serial: {out}");
    let mut f = std::fs::File::open(&path).unwrap();
    let mut sector1 = vec![0u8; 512];
    f.seek(SeekFrom::Start(512)).unwrap();
    f.read_exact(&mut sector1).unwrap();
    let expect: Vec<u8> = b"STEAD-PATTERN-1-"
        .iter()
        .copied()
        .cycle()
        .take(512)
        .collect();
    assert_eq!(sector1, expect);
}

#[test]
fn virtio_blk_read_only_refuses_write() {
    if !kvm_or_skip("virtio_blk_read_only_refuses_write") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = disk_with_sector0(dir.path());
    let before = std::fs::read(&path).unwrap();
    let mut cfg = tiny("blk");
    cfg.disks.push(DiskConfig {
        path: path.clone(),
        read_only: true,
    });
    let vm = Vm::new(cfg).unwrap();
    let h = vm.handle();
    assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
    let out = serial(&h);
    assert!(out.contains("ro=1"), "serial: {out}");
    assert!(
        out.contains("blk: read status=0 sector0=STEAD-SECTOR-0!!"),
        "serial: {out}"
    );
    assert!(out.contains("blk: write status=1"), "serial: {out}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn smp_each_vcpu_reports() {
    if !kvm_or_skip("smp_each_vcpu_reports") {
        return;
    }
    let mut cfg = tiny("smp");
    cfg.vcpus = 4;
    let vm = Vm::new(cfg).unwrap();
    let h = vm.handle();
    assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
    let out = serial(&h);
    for id in 0..4 {
        assert!(
            out.contains(&format!("smp: cpu {id} of 4\n")),
            "serial: {out}"
        );
    }
    assert!(out.contains("smp: all cpus reported"), "serial: {out}");
}

#[test]
fn handle_pause_resume_shutdown() {
    if !kvm_or_skip("handle_pause_resume_shutdown") {
        return;
    }
    let mut cfg = tiny("tick");
    cfg.vcpus = 2;
    let vm = Vm::new(cfg).unwrap();
    let h = vm.handle();
    let t = std::thread::spawn(move || vm.run().unwrap());
    assert!(
        wait_serial(&h, "tick 2\n", Duration::from_secs(10)),
        "{}",
        serial(&h)
    );
    h.pause().unwrap();
    assert_eq!(h.state(), RunState::Paused);
    let len = h.serial_output().len();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(h.serial_output().len(), len, "guest ran while paused");
    h.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.serial_output().len() == len && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(h.serial_output().len() > len, "guest did not resume");
    h.shutdown().unwrap();
    assert_eq!(t.join().unwrap(), ExitReason::Shutdown);
    assert!(
        serial(&h).contains("tick: ctrl-alt-del, rebooting"),
        "{}",
        serial(&h)
    );
}

#[test]
fn control_socket_pause_resume_shutdown() {
    if !kvm_or_skip("control_socket_pause_resume_shutdown") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mut cfg = tiny("tick");
    cfg.run_dir = Some(run_dir.clone());
    cfg.serial_log = Some(dir.path().join("serial.log"));
    cfg.seccomp = true; // confines the spawned thread running the VMM main loop too
    let t = std::thread::spawn(move || stead_vmm::run_vmm_process(cfg).unwrap());
    let sock = run_dir.join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        match ControlClient::connect(&sock) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("{e}"),
        }
    };
    // "created" until Vm::run starts the vCPUs.
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = c.request("status").unwrap();
        if st.contains("\"state\":\"running\"") || Instant::now() > deadline {
            break st;
        }
        assert!(st.contains("\"state\":\"created\""), "{st}");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(
        st.contains("\"ok\":true") && st.contains("\"state\":\"running\""),
        "{st}"
    );
    // state.json follows right after the state change.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = std::fs::read_to_string(run_dir.join("state.json")).unwrap();
        if state.contains("\"state\":\"running\"") {
            break;
        }
        assert!(Instant::now() < deadline, "{state}");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(c.request("pause").unwrap().contains("\"state\":\"paused\""));
    assert!(
        std::fs::read_to_string(run_dir.join("state.json"))
            .unwrap()
            .contains("\"state\":\"paused\"")
    );
    assert!(
        c.request("{\"command\":\"status\"}")
            .unwrap()
            .contains("paused")
    );
    assert!(
        c.request("resume")
            .unwrap()
            .contains("\"state\":\"running\"")
    );
    assert!(c.request("bogus").unwrap().contains("\"ok\":false"));
    assert!(c.request("shutdown").unwrap().contains("\"ok\":true"));
    drop(c);
    assert_eq!(t.join().unwrap(), ExitReason::Shutdown);
    assert!(!sock.exists(), "control socket left behind");
    let state = std::fs::read_to_string(run_dir.join("state.json")).unwrap();
    assert!(
        state.contains("\"state\":\"exited\"") && state.contains("shutdown"),
        "{state}"
    );
}

#[test]
fn shutdown_is_forced_after_timeout() {
    if !kvm_or_skip("shutdown_is_forced_after_timeout") {
        return;
    }
    // The "halt" guest ignores Ctrl-Alt-Del, so the shutdown must be forced.
    let mut cfg = tiny("halt");
    cfg.shutdown_timeout = Duration::from_millis(300);
    let vm = Vm::new(cfg).unwrap();
    let h = vm.handle();
    let t = std::thread::spawn(move || vm.run().unwrap());
    assert!(wait_serial(&h, "halting", Duration::from_secs(10)));
    let start = Instant::now();
    h.shutdown().unwrap();
    let exit = t.join().unwrap();
    assert_eq!(exit, ExitReason::Shutdown);
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn kill_stops_at_once() {
    if !kvm_or_skip("kill_stops_at_once") {
        return;
    }
    let vm = Vm::new(tiny("tick")).unwrap();
    let h = vm.handle();
    let t = std::thread::spawn(move || vm.run().unwrap());
    assert!(wait_serial(&h, "tick 1\n", Duration::from_secs(10)));
    h.kill();
    assert_eq!(t.join().unwrap(), ExitReason::Killed);
}

#[test]
fn kill_before_run_is_not_lost() {
    if !kvm_or_skip("kill_before_run_is_not_lost") {
        return;
    }
    // run_vmm_process serves the control socket before Vm::run starts the vCPUs, so a
    // kill can arrive first; the run must then end at once instead of running the guest.
    let vm = Vm::new(tiny("idle")).unwrap();
    let h = vm.handle();
    h.kill();
    let t = std::thread::spawn(move || vm.run().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the run ignored a kill sent before it started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(t.join().unwrap(), ExitReason::Killed);
    assert_eq!(h.state(), RunState::Exited);
}

#[test]
fn bad_config_is_rejected() {
    let mut cfg = tiny("hello");
    cfg.vcpus = 0;
    assert!(matches!(Vm::new(cfg), Err(stead_vmm::VmmError::Config(_))));
    let mut cfg = tiny("hello");
    cfg.mem_bytes = 1 << 20;
    assert!(matches!(Vm::new(cfg), Err(stead_vmm::VmmError::Config(_))));
}

#[test]
fn interrupts_via_irqfd() {
    if !kvm_or_skip("interrupts_via_irqfd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny("irq");
    cfg.disks.push(DiskConfig {
        path: disk_with_sector0(dir.path()),
        read_only: true,
    });
    let vm = Vm::new(cfg).unwrap();
    let h = vm.handle();
    assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
    let out = serial(&h);
    assert!(out.contains("irq: serial irq4 ok"), "serial: {out}");
    assert!(out.contains("irq: virtio irq5 ok"), "serial: {out}");
}

#[test]
fn pvh_elf_boot() {
    if !kvm_or_skip("pvh_elf_boot") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = disk_with_sector0(dir.path());
    let mut cfg = tiny("blk");
    cfg.kernel = stead_vmm::TINY_GUEST_PVH_IMAGE.into();
    cfg.disks.push(DiskConfig {
        path,
        read_only: false,
    });
    let vm = Vm::new(cfg).unwrap();
    let h = vm.handle();
    assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
    let out = serial(&h);
    assert!(
        out.contains("blk: read status=0 sector0=STEAD-SECTOR-0!!"),
        "serial: {out}"
    );
    assert!(out.contains("blk: done"), "serial: {out}");
}

#[test]
fn serial_console_socket() {
    if !kvm_or_skip("serial_console_socket") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mut cfg = tiny("echo");
    cfg.run_dir = Some(run_dir.clone());
    let t = std::thread::spawn(move || stead_vmm::run_vmm_process(cfg).unwrap());
    let sock = run_dir.join("console.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("{e}"),
        }
    };
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut seen = Vec::new();
    let mut read_until = |c: &mut std::os::unix::net::UnixStream, needle: &str| {
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let n = c.read(&mut buf).unwrap();
            assert!(
                n > 0,
                "console closed; got {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    };
    // The greeting may predate the connection: it comes from the replayed buffer.
    read_until(&mut c, "echo: ready\n");
    c.write_all(b"hello, console").unwrap();
    read_until(&mut c, "HELLO, CONSOLE");
    c.write_all(b"q").unwrap();
    read_until(&mut c, "echo: bye");
    assert_eq!(t.join().unwrap(), ExitReason::Shutdown);
    let state = std::fs::read_to_string(run_dir.join("state.json")).unwrap();
    assert!(
        state.contains("console.sock") && state.contains("started_unix"),
        "{state}"
    );
    assert!(!sock.exists(), "console socket left behind");
    assert!(!run_dir.join("control.sock").exists());
}

#[test]
fn mptable_seen_by_guest() {
    if !kvm_or_skip("mptable_seen_by_guest") {
        return;
    }
    // The PVH ELF takes the kernel path, which writes the MP table.
    let mut cfg = tiny("mptable");
    cfg.kernel = stead_vmm::TINY_GUEST_PVH_IMAGE.into();
    cfg.vcpus = 3;
    let vm = Vm::new(cfg).unwrap();
    let h = vm.handle();
    assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
    let out = serial(&h);
    assert!(
        out.contains("mptable: checksums ok cpus=3 ioapics=1 irqs=24"),
        "serial: {out}"
    );
}

#[test]
fn acpi_tables_seen_by_guest() {
    if !kvm_or_skip("acpi_tables_seen_by_guest") {
        return;
    }
    // The PVH ELF takes the kernel path, which writes the ACPI tables; two virtio
    // disks give two LNRO0005 devices in the DSDT.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny("acpi");
    cfg.kernel = stead_vmm::TINY_GUEST_PVH_IMAGE.into();
    cfg.vcpus = 3;
    for name in ["a.img", "b.img"] {
        let path = dir.path().join(name);
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        cfg.disks.push(DiskConfig {
            path,
            read_only: true,
        });
    }
    let vm = Vm::new(cfg).unwrap();
    let h = vm.handle();
    // The guest powers off through the FADT sleep control register.
    assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
    let out = serial(&h);
    assert!(
        out.contains("acpi: checksums ok fadt madt hw_reduced=1 cpus=3 ioapics=1 virtio=2"),
        "serial: {out}"
    );
    assert!(!out.contains("did not power off"), "serial: {out}");
}

#[test]
fn acpi_tables_absent_for_flat_images_and_when_disabled() {
    if !kvm_or_skip("acpi_tables_absent_for_flat_images_and_when_disabled") {
        return;
    }
    let flat = tiny("acpi");
    let mut disabled = tiny("acpi");
    disabled.kernel = stead_vmm::TINY_GUEST_PVH_IMAGE.into();
    disabled.acpi = false;
    for cfg in [flat, disabled] {
        let vm = Vm::new(cfg).unwrap();
        let h = vm.handle();
        assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
        let out = serial(&h);
        assert!(out.contains("acpi: no RSDP"), "serial: {out}");
    }
}
