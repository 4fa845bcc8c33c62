//! Legacy devices on the port-I/O bus (16550 serial, i8042, stead power port) and
//! dispatch of port-I/O and MMIO exits.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::virtio::MmioTransport;
use crate::{SERIAL_RING_BYTES, Shared, lock};

/// stead power port: any byte written here powers the VM off ([`crate::ExitReason::Shutdown`]).
pub const POWER_PORT: u16 = 0x600;
/// Test-only port (see [`crate::VmConfig::test_forbidden_syscall_port`]).
pub const FORBIDDEN_SYSCALL_PORT: u16 = 0x5ec;

const COM1: u16 = 0x3f8;
const I8042_DATA: u16 = 0x60;
const I8042_CMD: u16 = 0x64;

/// Interrupt trigger backed by an irqfd.
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Serial output sink: log file, in-memory ring, callback.
pub struct SerialOut {
    file: Option<File>,
    shared: Arc<Shared>,
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(f) = &mut self.file {
            // A full disk must not stop the guest; the ring still has the output.
            let _ = f.write_all(buf);
        }
        {
            // Ring and console client are updated under the ring lock, so a console
            // attaching (replay of the ring, then live output) sees every byte once.
            let mut ring = lock(&self.shared.serial_ring);
            for b in buf {
                if ring.len() == SERIAL_RING_BYTES {
                    ring.pop_front();
                }
                ring.push_back(*b);
            }
            let mut console = lock(&self.shared.console);
            if let Some(c) = console.as_mut()
                && let Err(e) = c.write_all(buf)
                && e.kind() != io::ErrorKind::WouldBlock
            {
                *console = None;
            }
        }
        let cb = lock(&self.shared.serial_callback).clone();
        if let Some(cb) = cb {
            cb(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The emulated 16550.
pub type SerialDevice = Serial<IrqTrigger, NoEvents, SerialOut>;

pub(crate) fn new_serial(irq: EventFd, file: Option<File>, shared: Arc<Shared>) -> SerialDevice {
    Serial::new(IrqTrigger(irq), SerialOut { file, shared })
}

/// Minimal i8042 controller: status/data ports, controller self-test and command
/// byte, CPU reset (command 0xFE), and Ctrl-Alt-Del injection (scan code set 2).
pub struct I8042 {
    buf: VecDeque<u8>,
    ctr: u8,
    pending_cmd: Option<u8>,
    irq: EventFd,
}

const CTR_KBD_INT: u8 = 0x01;
const CTR_POST_OK: u8 = 0x04;
const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;

impl I8042 {
    pub(crate) fn new(irq: EventFd) -> Self {
        I8042 {
            buf: VecDeque::new(),
            ctr: CTR_KBD_INT | CTR_POST_OK,
            pending_cmd: None,
            irq,
        }
    }

    fn push(&mut self, b: u8) {
        if self.buf.len() < 16 {
            self.buf.push_back(b);
        }
        if self.ctr & CTR_KBD_INT != 0 {
            let _ = self.irq.write(1);
        }
    }

    /// Queues Ctrl+Alt+Del make codes (set 2: 0x14, 0x11, 0xe0 0x71) and raises IRQ 1.
    pub fn inject_ctrl_alt_del(&mut self) {
        for b in [0x14, 0x11, 0xe0, 0x71] {
            self.push(b);
        }
    }

    fn read(&mut self, port: u16) -> u8 {
        match port {
            I8042_CMD => {
                let mut s = STATUS_SYS;
                if !self.buf.is_empty() {
                    s |= STATUS_OBF;
                }
                if self.pending_cmd.is_some() {
                    s |= STATUS_CMD;
                }
                s
            }
            _ => {
                let b = self.buf.pop_front().unwrap_or(0);
                if !self.buf.is_empty() && self.ctr & CTR_KBD_INT != 0 {
                    let _ = self.irq.write(1);
                }
                b
            }
        }
    }

    /// Returns true when the guest asked for a CPU reset.
    fn write(&mut self, port: u16, v: u8) -> bool {
        if port == I8042_CMD {
            match v {
                0xfe => return true,
                0x20 => {
                    let c = self.ctr;
                    self.push(c);
                }
                0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.pending_cmd = Some(v),
                0xaa => self.push(0x55),
                0xab => self.push(0x00),
                _ => {}
            }
            return false;
        }
        match self.pending_cmd.take() {
            Some(0x60) => self.ctr = v,
            Some(0xd1) if v & 1 == 0 => return true, // output port: reset line low
            Some(_) => {}
            None => match v {
                0xff => {
                    self.push(0xfa);
                    self.push(0xaa);
                }
                _ => self.push(0xfa),
            },
        }
        false
    }
}

/// What a vCPU must do after an I/O exit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum IoAction {
    None,
    Reset,
    PowerOff,
    ForbiddenSyscall,
}

/// All emulated devices, shared by the vCPU threads.
pub(crate) struct Bus {
    serial: Mutex<SerialDevice>,
    i8042: Arc<Mutex<I8042>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    forbidden_port: bool,
}

impl Bus {
    pub(crate) fn new(
        serial: SerialDevice,
        i8042: Arc<Mutex<I8042>>,
        virtio: Vec<Arc<Mutex<MmioTransport>>>,
        forbidden_port: bool,
    ) -> Self {
        Bus {
            serial: Mutex::new(serial),
            i8042,
            virtio,
            forbidden_port,
        }
    }

    /// Queues serial input; returns how many bytes were accepted.
    pub(crate) fn serial_input(&self, data: &[u8]) -> usize {
        let mut serial = lock(&self.serial);
        let n = data.len().min(serial.fifo_capacity());
        if n == 0 {
            return 0;
        }
        serial.enqueue_raw_bytes(&data[..n]).unwrap_or(0)
    }

    pub(crate) fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            COM1..=0x3ff if data.len() == 1 => {
                data[0] = lock(&self.serial).read((port - COM1) as u8);
            }
            I8042_DATA | I8042_CMD if data.len() == 1 => {
                data[0] = lock(&self.i8042).read(port);
            }
            _ => {}
        }
    }

    pub(crate) fn pio_write(&self, port: u16, data: &[u8]) -> IoAction {
        match port {
            COM1..=0x3ff if data.len() == 1 => {
                // Output errors (a failing irqfd write) must not stop the guest.
                let _ = lock(&self.serial).write((port - COM1) as u8, data[0]);
                IoAction::None
            }
            I8042_DATA | I8042_CMD if data.len() == 1 => {
                if lock(&self.i8042).write(port, data[0]) {
                    IoAction::Reset
                } else {
                    IoAction::None
                }
            }
            POWER_PORT => IoAction::PowerOff,
            FORBIDDEN_SYSCALL_PORT if self.forbidden_port => IoAction::ForbiddenSyscall,
            _ => IoAction::None,
        }
    }

    fn transport(&self, addr: u64) -> Option<(&Arc<Mutex<MmioTransport>>, u64)> {
        let off = addr.checked_sub(VIRTIO_MMIO_BASE)?;
        let idx = (off / VIRTIO_MMIO_SIZE) as usize;
        self.virtio.get(idx).map(|t| (t, off % VIRTIO_MMIO_SIZE))
    }

    pub(crate) fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.transport(addr) {
            Some((t, off)) => lock(t).read(off, data),
            None => data.fill(0xff),
        }
    }

    pub(crate) fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((t, off)) = self.transport(addr) {
            lock(t).write(off, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn i8042_reset_selftest_and_ctrl_alt_del() {
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let mut k = I8042::new(irq.try_clone().expect("clone"));
        assert!(!k.write(I8042_CMD, 0xaa));
        assert_eq!(k.read(I8042_CMD) & STATUS_OBF, STATUS_OBF);
        assert_eq!(k.read(I8042_DATA), 0x55);
        assert_eq!(k.read(I8042_CMD) & STATUS_OBF, 0);
        k.inject_ctrl_alt_del();
        assert!(irq.read().expect("irq raised") >= 1);
        let codes: Vec<u8> = (0..4).map(|_| k.read(I8042_DATA)).collect();
        assert_eq!(codes, [0x14, 0x11, 0xe0, 0x71]);
        assert!(k.write(I8042_CMD, 0xfe));
        // Output-port write with the reset line low also resets.
        assert!(!k.write(I8042_CMD, 0xd1));
        assert!(k.write(I8042_DATA, 0xfe));
    }
}
