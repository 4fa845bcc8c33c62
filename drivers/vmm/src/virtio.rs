//! virtio-mmio (version 2) transport, virtio-blk and virtio-net devices, and the
//! device thread that serves their queues.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::tap::Tap;
use crate::{DiskConfig, VmmError, lock};

/// Offset of the QueueNotify register (target of the ioeventfds).
pub(crate) const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR_ID: u32 = 0x5354_4544; // "STED"
const QUEUE_MAX: u16 = 256;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;
const SECTOR: u64 = 512;
const BLK_ID_BYTES: usize = 20;

/// virtio_net_hdr_v1 (with num_buffers), as used with VIRTIO_F_VERSION_1.
const NET_HDR_LEN: usize = 12;
const MAX_FRAME: usize = 65536;

/// A virtio-blk device on a raw file.
pub(crate) struct Blk {
    file: File,
    read_only: bool,
    sectors: u64,
    id: [u8; BLK_ID_BYTES],
}

impl Blk {
    pub(crate) fn open(cfg: &DiskConfig) -> Result<Blk, VmmError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .open(&cfg.path)
            .map_err(VmmError::io(format!("open disk {}", cfg.path.display())))?;
        let len = file
            .metadata()
            .map_err(VmmError::io(format!("stat disk {}", cfg.path.display())))?
            .len();
        let mut id = [0u8; BLK_ID_BYTES];
        let name = cfg
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (d, s) in id.iter_mut().zip(name.bytes()) {
            *d = s;
        }
        Ok(Blk {
            file,
            read_only: cfg.read_only,
            sectors: len / SECTOR,
            id,
        })
    }

    /// Serves one request; returns the number of bytes written into the chain. Every
    /// guest-supplied address, length and sector is checked: a request that does not
    /// fit guest memory or the disk gets `VIRTIO_BLK_S_IOERR`, never a panic or a
    /// wrapped offset.
    fn handle(&mut self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> u32 {
        let (Some(hdr), Some(status)) = (descs.first(), descs.last()) else {
            return 0;
        };
        if descs.len() < 2 || hdr.is_write_only() || hdr.len() < 16 || !status.is_write_only() {
            return 0;
        }
        let req_type: u32 = mem.read_obj(hdr.addr()).unwrap_or(u32::MAX);
        let sector: u64 = hdr
            .addr()
            .0
            .checked_add(8)
            .and_then(|a| mem.read_obj(GuestAddress(a)).ok())
            .unwrap_or(u64::MAX);
        let data = &descs[1..descs.len() - 1];
        let mut written = 0u32;
        let st = match req_type {
            VIRTIO_BLK_T_IN => self.read(data, mem, sector, &mut written),
            VIRTIO_BLK_T_OUT if self.read_only => VIRTIO_BLK_S_IOERR,
            VIRTIO_BLK_T_OUT => self.write(data, mem, sector),
            VIRTIO_BLK_T_FLUSH => {
                if self.read_only || self.file.sync_data().is_ok() {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                }
            }
            VIRTIO_BLK_T_GET_ID => match data.first() {
                Some(d) if d.is_write_only() => {
                    let n = usize::try_from(d.len()).map_or(BLK_ID_BYTES, |l| l.min(BLK_ID_BYTES));
                    if mem.write_slice(&self.id[..n], d.addr()).is_ok() {
                        written = n as u32; // n <= BLK_ID_BYTES
                        VIRTIO_BLK_S_OK
                    } else {
                        VIRTIO_BLK_S_IOERR
                    }
                }
                _ => VIRTIO_BLK_S_IOERR,
            },
            _ => VIRTIO_BLK_S_UNSUPP,
        };
        if mem.write_obj(st, status.addr()).is_ok() {
            written.saturating_add(1)
        } else {
            written
        }
    }

    /// The byte offset of `sector` when `bytes` from there fit the disk.
    fn in_range(&self, sector: u64, bytes: u64) -> Option<u64> {
        let off = sector.checked_mul(SECTOR)?;
        let end = off.checked_add(bytes)?;
        (end <= self.sectors.checked_mul(SECTOR)?).then_some(off)
    }

    /// Checks the data descriptors of a request: every one lies wholly in guest memory
    /// and has the direction `write_only`. Returns the disk offset of the transfer and
    /// its total length (which fits the disk from `sector` on and a `u32`).
    fn check_data(
        &self,
        data: &[Descriptor],
        mem: &GuestMemoryMmap,
        sector: u64,
        write_only: bool,
    ) -> Option<(u64, u32)> {
        let mut total = 0u32;
        for d in data {
            if d.is_write_only() != write_only || guest_range(mem, d).is_none() {
                return None;
            }
            total = total.checked_add(d.len())?;
        }
        Some((self.in_range(sector, u64::from(total))?, total))
    }

    fn read(&self, data: &[Descriptor], mem: &GuestMemoryMmap, sector: u64, n: &mut u32) -> u8 {
        let Some((off, total)) = self.check_data(data, mem, sector, true) else {
            return VIRTIO_BLK_S_IOERR;
        };
        let copied = copy_data(data, mem, off, |buf, at, dst| {
            self.file.read_exact_at(buf, at).is_ok() && mem.write_slice(buf, dst).is_ok()
        });
        if !copied {
            return VIRTIO_BLK_S_IOERR;
        }
        *n = total;
        VIRTIO_BLK_S_OK
    }

    fn write(&self, data: &[Descriptor], mem: &GuestMemoryMmap, sector: u64) -> u8 {
        let Some((off, _)) = self.check_data(data, mem, sector, false) else {
            return VIRTIO_BLK_S_IOERR;
        };
        let copied = copy_data(data, mem, off, |buf, at, src| {
            mem.read_slice(buf, src).is_ok() && self.file.write_all_at(buf, at).is_ok()
        });
        if copied {
            VIRTIO_BLK_S_OK
        } else {
            VIRTIO_BLK_S_IOERR
        }
    }
}

/// Walks the data descriptors of a block request (checked by `check_data`) from disk
/// offset `off` on, one [`COPY_CHUNK`] at most at a time: `step(buf, disk offset, guest
/// address)` moves one chunk between the disk and guest memory through `buf`. False
/// when a step fails (the request then ends with an I/O error).
fn copy_data(
    data: &[Descriptor],
    mem: &GuestMemoryMmap,
    mut off: u64,
    mut step: impl FnMut(&mut [u8], u64, GuestAddress) -> bool,
) -> bool {
    let mut buf = vec![0u8; COPY_CHUNK];
    for d in data {
        let Some((addr, len)) = guest_range(mem, d) else {
            return false;
        };
        let mut done = 0usize;
        while done < len {
            let k = (len - done).min(COPY_CHUNK);
            // done < len <= u32::MAX and off + total fits the disk (check_data).
            let (Some(at), Some(guest)) = (
                off.checked_add(done as u64),
                addr.0.checked_add(done as u64),
            ) else {
                return false;
            };
            if !step(&mut buf[..k], at, GuestAddress(guest)) {
                return false;
            }
            done += k;
        }
        off += u64::from(d.len());
    }
    true
}

/// Block data is copied through a buffer of this size (a guest descriptor of up to
/// 4 GiB never becomes a host allocation of that size).
const COPY_CHUNK: usize = 64 * 1024;

/// The guest range of `d` when it lies wholly in guest memory (no wrap past 2^64).
fn guest_range(mem: &GuestMemoryMmap, d: &Descriptor) -> Option<(GuestAddress, usize)> {
    let len = usize::try_from(d.len()).ok()?;
    d.addr().0.checked_add(u64::from(d.len()))?;
    GuestMemoryBackend::check_range(mem, d.addr(), len).then_some((d.addr(), len))
}

/// A virtio-net device on a tap (no offloads, no mergeable buffers).
pub(crate) struct Net {
    tap: Tap,
    mac: [u8; 6],
    pending_rx: Option<Vec<u8>>,
    buf: Vec<u8>,
}

impl Net {
    pub(crate) fn new(tap: Tap, mac: [u8; 6]) -> Net {
        Net {
            tap,
            mac,
            pending_rx: None,
            buf: vec![0; MAX_FRAME],
        }
    }

    fn tx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, VmmError> {
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut frame = Vec::new();
            for d in chain {
                let Some((_, len)) = guest_range(mem, &d) else {
                    break;
                };
                let start = frame.len();
                let Some(end) = start.checked_add(len) else {
                    break;
                };
                if d.is_write_only() || end > MAX_FRAME + NET_HDR_LEN {
                    break;
                }
                frame.resize(end, 0);
                if mem.read_slice(&mut frame[start..], d.addr()).is_err() {
                    frame.truncate(start);
                    break;
                }
            }
            if frame.len() > NET_HDR_LEN {
                // A full tap queue drops the frame, as a NIC would.
                let _ = self.tap.write(&frame[NET_HDR_LEN..]);
            }
            q.add_used(mem, head, 0)
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            used = true;
        }
        Ok(used)
    }

    /// Moves frames from the tap into RX buffers. Returns (used any, keep polling tap).
    fn rx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<(bool, bool), VmmError> {
        let mut used = false;
        loop {
            if self.pending_rx.is_none() {
                match self.tap.read(&mut self.buf) {
                    Ok(n) => self.pending_rx = Some(self.buf[..n].to_vec()),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok((used, true)),
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(VmmError::Io {
                            what: "read tap".into(),
                            source: e,
                        });
                    }
                }
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // No guest buffer: stop polling the tap until the guest adds some.
                return Ok((used, false));
            };
            let head = chain.head_index();
            let frame = self.pending_rx.take().unwrap_or_default();
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr[10] = 1; // num_buffers
            let mut src: Vec<u8> = hdr.to_vec();
            src.extend_from_slice(&frame);
            let mut off = 0usize;
            for d in chain {
                if off >= src.len() {
                    break;
                }
                if !d.is_write_only() {
                    break;
                }
                let Some((_, len)) = guest_range(mem, &d) else {
                    break;
                };
                // off < src.len(): n > 0 and off + n <= src.len().
                let n = len.min(src.len() - off);
                if mem.write_slice(&src[off..off + n], d.addr()).is_err() {
                    break;
                }
                off += n;
            }
            // off <= src.len() <= NET_HDR_LEN + MAX_FRAME.
            let len = u32::try_from(off).map_err(|_| VmmError::Memory("RX length".into()))?;
            q.add_used(mem, head, len)
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            used = true;
        }
    }
}

/// The device behind a transport.
pub(crate) enum DeviceKind {
    Blk(Blk),
    Net(Net),
}

impl DeviceKind {
    fn device_id(&self) -> u32 {
        match self {
            DeviceKind::Net(_) => 1,
            DeviceKind::Blk(_) => 2,
        }
    }
    fn features(&self) -> u64 {
        match self {
            DeviceKind::Blk(b) => {
                VIRTIO_F_VERSION_1
                    | VIRTIO_BLK_F_FLUSH
                    | if b.read_only { VIRTIO_BLK_F_RO } else { 0 }
            }
            DeviceKind::Net(_) => VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC,
        }
    }
    fn num_queues(&self) -> usize {
        match self {
            DeviceKind::Blk(_) => 1,
            DeviceKind::Net(_) => 2,
        }
    }
    fn config(&self) -> Vec<u8> {
        match self {
            DeviceKind::Blk(b) => b.sectors.to_le_bytes().to_vec(),
            DeviceKind::Net(n) => n.mac.to_vec(),
        }
    }
}

/// virtio-mmio v2 register file plus the device.
pub(crate) struct MmioTransport {
    dev: DeviceKind,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    irq: EventFd,
    pub(crate) queue_evts: Vec<EventFd>,
}

impl MmioTransport {
    pub(crate) fn new(dev: DeviceKind, irq: EventFd) -> Result<Self, VmmError> {
        let n = dev.num_queues();
        let mut queues = Vec::with_capacity(n);
        let mut queue_evts = Vec::with_capacity(n);
        for _ in 0..n {
            queues.push(Queue::new(QUEUE_MAX).map_err(|e| VmmError::Config(e.to_string()))?);
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(VmmError::io("eventfd"))?);
        }
        Ok(MmioTransport {
            dev,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            irq,
            queue_evts,
        })
    }

    fn activated(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
    }

    fn reset(&mut self) {
        self.status = 0;
        self.acked_features = 0;
        self.interrupt_status = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        if let DeviceKind::Net(n) = &mut self.dev {
            n.pending_rx = None;
        }
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    pub(crate) fn read(&mut self, off: u64, data: &mut [u8]) {
        if let Some(base) = off.checked_sub(0x100) {
            let cfg = self.dev.config();
            for (i, b) in data.iter_mut().enumerate() {
                *b = usize::try_from(base)
                    .ok()
                    .and_then(|o| o.checked_add(i))
                    .and_then(|o| cfg.get(o))
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v: u32 = match off {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => self.dev.device_id(),
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => self.dev.features() as u32,
                1 => (self.dev.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self.selected().map(|q| q.max_size() as u32).unwrap_or(0),
            0x044 => self.selected().map(|q| q.ready() as u32).unwrap_or(0),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// DriverFeatures (0x020): the 32 bits of the acknowledged features selected by
    /// DriverFeaturesSel (0 or 1; other selectors are ignored).
    fn ack_driver_features(&mut self, v: u32) {
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        let mask = 0xffff_ffffu64 << shift;
        self.acked_features = (self.acked_features & !mask) | ((v as u64) << shift);
    }

    /// Status (0x070): 0 resets the device; FEATURES_OK is refused (left clear) when the
    /// driver acknowledged a feature the device lacks or not VIRTIO_F_VERSION_1;
    /// ACKNOWLEDGE, once set, stays.
    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0
            && self.status & STATUS_FEATURES_OK == 0
            && (self.acked_features & !self.dev.features() != 0
                || self.acked_features & VIRTIO_F_VERSION_1 == 0)
        {
            v &= !STATUS_FEATURES_OK;
        }
        self.status = v | (self.status & STATUS_ACKNOWLEDGE);
    }

    /// QueueDesc/QueueDriver/QueueDevice Low/High (0x080..0x0a4): half of one of the
    /// selected queue's ring addresses.
    fn set_queue_address(&mut self, off: u64, v: u32) {
        let (lo, hi) = if off & 4 == 0 {
            (Some(v), None)
        } else {
            (None, Some(v))
        };
        if let Some(q) = self.selected() {
            match off & !4 {
                0x080 => q.set_desc_table_address(lo, hi),
                0x090 => q.set_avail_ring_address(lo, hi),
                _ => q.set_used_ring_address(lo, hi),
            }
        }
    }

    pub(crate) fn write(&mut self, off: u64, data: &[u8]) {
        if off >= 0x100 || data.len() != 4 {
            return; // config space is read-only for blk and net
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let driver_ok = self.activated();
        match off {
            0x014 => self.device_features_sel = v,
            0x020 if !driver_ok => self.ack_driver_features(v),
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 if !driver_ok => {
                // A size beyond u16 is invalid, not truncated into a valid one.
                if let (Ok(size), Some(q)) = (u16::try_from(v), self.selected()) {
                    q.set_size(size);
                }
            }
            0x044 => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            0x050 => {
                // Normally caught by the ioeventfd in KVM; forward if it reaches us.
                if let Some(e) = self.queue_evts.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            0x064 => self.interrupt_status &= !v,
            0x070 => self.write_status(v),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if !driver_ok => {
                self.set_queue_address(off, v);
            }
            _ => {}
        }
    }

    fn signal_used(&mut self) {
        self.interrupt_status |= 1;
        let _ = self.irq.write(1);
    }

    /// Serves queue `qi`. Returns whether the tap (net only) should be polled.
    fn process(&mut self, qi: usize, mem: &GuestMemoryMmap) -> Result<Option<bool>, VmmError> {
        if !self.activated() {
            return Ok(Some(false));
        }
        let (used, want_tap) = match &mut self.dev {
            DeviceKind::Blk(b) => {
                let Some(q) = self.queues.get_mut(qi) else {
                    return Ok(None);
                };
                let mut used = false;
                while let Some(chain) = q.pop_descriptor_chain(mem) {
                    let head = chain.head_index();
                    let descs: Vec<Descriptor> = chain.collect();
                    let n = b.handle(&descs, mem);
                    q.add_used(mem, head, n)
                        .map_err(|e| VmmError::Memory(e.to_string()))?;
                    used = true;
                }
                (used, None)
            }
            DeviceKind::Net(n) => {
                let (rxq, rest) = self.queues.split_at_mut(1);
                if qi == 1 {
                    (n.tx(&mut rest[0], mem)?, None)
                } else {
                    let (u, w) = n.rx(&mut rxq[0], mem)?;
                    (u, Some(w))
                }
            }
        };
        if used {
            self.signal_used();
        }
        Ok(want_tap)
    }
}

const STOP_TOKEN: u64 = u64::MAX;
const TAP_TOKEN: u64 = 1 << 32;

/// The device thread: waits on queue ioeventfds and taps.
pub(crate) struct Worker {
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    mem: Arc<GuestMemoryMmap>,
    epoll: Epoll,
    tap_fds: Vec<Option<i32>>,
    tap_armed: Vec<bool>,
}

impl Worker {
    pub(crate) fn new(
        transports: Vec<Arc<Mutex<MmioTransport>>>,
        mem: Arc<GuestMemoryMmap>,
    ) -> Result<Worker, VmmError> {
        let epoll = Epoll::new().map_err(VmmError::io("epoll_create"))?;
        let mut tap_fds = Vec::new();
        for (i, t) in transports.iter().enumerate() {
            let t = lock(t);
            for (q, e) in t.queue_evts.iter().enumerate() {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        e.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, ((i as u64) << 8) | q as u64),
                    )
                    .map_err(VmmError::io("epoll_ctl"))?;
            }
            tap_fds.push(match &t.dev {
                DeviceKind::Net(n) => Some(n.tap.as_raw_fd()),
                DeviceKind::Blk(_) => None,
            });
        }
        let n = tap_fds.len();
        Ok(Worker {
            transports,
            mem,
            epoll,
            tap_fds,
            tap_armed: vec![false; n],
        })
    }

    fn arm_tap(&mut self, dev: usize, want: bool) -> io::Result<()> {
        let Some(Some(fd)) = self.tap_fds.get(dev).copied() else {
            return Ok(());
        };
        if self.tap_armed[dev] == want {
            return Ok(());
        }
        let op = if want {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        self.epoll.ctl(
            op,
            fd,
            EpollEvent::new(EventSet::IN, TAP_TOKEN | dev as u64),
        )?;
        self.tap_armed[dev] = want;
        Ok(())
    }

    pub(crate) fn run(mut self, stop: &EventFd) -> Result<(), VmmError> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
            )
            .map_err(VmmError::io("epoll_ctl"))?;
        for dev in 0..self.tap_fds.len() {
            self.arm_tap(dev, true).map_err(VmmError::io("epoll_ctl"))?;
        }
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(VmmError::io("epoll_wait")(e)),
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == STOP_TOKEN {
                    return Ok(());
                }
                let (dev, qi) = if token & TAP_TOKEN != 0 {
                    ((token & 0xffff) as usize, 0usize)
                } else {
                    ((token >> 8) as usize, (token & 0xff) as usize)
                };
                let Some(t) = self.transports.get(dev).cloned() else {
                    continue;
                };
                let mut t = lock(&t);
                if token & TAP_TOKEN == 0
                    && let Some(e) = t.queue_evts.get(qi)
                {
                    let _ = e.read();
                }
                let want = t.process(qi, &self.mem)?;
                drop(t);
                if let Some(want) = want {
                    self.arm_tap(dev, want).map_err(VmmError::io("epoll_ctl"))?;
                }
            }
        }
    }
}

/// Hostile guests against a guest-memory model: no KVM, a 1 MiB `GuestMemoryMmap`.
/// Entry points for the fuzz targets in `fuzz/` (not a stable API): a virtio-blk device
/// behind its MMIO transport, driven the way the device thread drives it on a notify.
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    use vm_memory::GuestMemoryMmap;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::{Blk, DeviceKind, MmioTransport};
    use crate::{DiskConfig, VmmError};

    /// A virtio-blk device on a raw file, as a guest sees it through MMIO.
    pub struct BlkDevice(MmioTransport);

    impl BlkDevice {
        /// Opens the raw image `disk` as a virtio-blk device.
        pub fn open(disk: &Path, read_only: bool) -> Result<BlkDevice, VmmError> {
            let blk = Blk::open(&DiskConfig {
                path: disk.to_path_buf(),
                read_only,
            })?;
            let irq = EventFd::new(EFD_NONBLOCK).map_err(VmmError::io("eventfd"))?;
            MmioTransport::new(DeviceKind::Blk(blk), irq).map(BlkDevice)
        }

        /// A guest write of `data` to the MMIO register at offset `off`.
        pub fn write_reg(&mut self, off: u64, data: &[u8]) {
            self.0.write(off, data);
        }

        /// A guest read of the MMIO register at offset `off` into `data`.
        pub fn read_reg(&mut self, off: u64, data: &mut [u8]) {
            self.0.read(off, data);
        }

        /// What a guest notify of queue `qi` makes the device thread do: serve the queue
        /// against guest memory `mem`.
        pub fn notify(&mut self, qi: usize, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
            self.0.process(qi, mem).map(|_| ())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: u64 = 1 << 20;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const HDR: u64 = 0x3000;
    const STATUS: u64 = 0x3100;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("guest memory")
    }

    fn disk(len: u64) -> (tempfile::TempDir, Blk) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.raw");
        File::create(&path)
            .and_then(|f| f.set_len(len))
            .expect("disk file");
        let blk = Blk::open(&DiskConfig {
            path,
            read_only: false,
        })
        .expect("open disk");
        (dir, blk)
    }

    fn header(mem: &GuestMemoryMmap, ty: u32, sector: u64) -> Descriptor {
        mem.write_obj(ty, GuestAddress(HDR)).expect("type");
        mem.write_obj(sector, GuestAddress(HDR + 8))
            .expect("sector");
        Descriptor::new(HDR, 16, 0, 0)
    }

    fn status_desc() -> Descriptor {
        Descriptor::new(STATUS, 1, F_WRITE, 0)
    }

    fn status(mem: &GuestMemoryMmap) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).expect("status")
    }

    #[test]
    fn blk_header_at_the_top_of_the_address_space_is_refused_not_a_panic() {
        let m = mem();
        let (_d, mut b) = disk(1 << 20);
        let hdr = Descriptor::new(u64::MAX - 7, 16, 0, 0);
        let data = Descriptor::new(0x8000, 512, F_WRITE, 0);
        assert_eq!(b.handle(&[hdr, data, status_desc()], &m), 1);
        assert_eq!(status(&m), VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn blk_data_outside_guest_memory_or_wrapping_is_ioerr() {
        let m = mem();
        let (_d, mut b) = disk(1 << 20);
        for (ty, flags) in [(VIRTIO_BLK_T_IN, F_WRITE), (VIRTIO_BLK_T_OUT, 0)] {
            for (addr, len) in [
                (u64::MAX - 10, 4096),   // addr + len wraps
                (MEM - 100, 4096),       // runs past the end of guest memory
                (0x8000, u32::MAX),      // 4 GiB: no host buffer of that size
                (u64::MAX - 4095, 4096), // ends exactly at 2^64
                (MEM + (1 << 30), 512),  // wholly outside
            ] {
                let hdr = header(&m, ty, 0);
                let data = Descriptor::new(addr, len, flags, 0);
                assert_eq!(
                    b.handle(&[hdr, data, status_desc()], &m),
                    1,
                    "only the status byte: {ty} {addr:#x}+{len:#x}"
                );
                assert_eq!(status(&m), VIRTIO_BLK_S_IOERR, "{ty} {addr:#x}+{len:#x}");
            }
        }
    }

    #[test]
    fn blk_sector_and_length_past_the_disk_are_ioerr() {
        let m = mem();
        let (_d, mut b) = disk(1 << 20);
        for sector in [u64::MAX, u64::MAX / SECTOR, (1 << 20) / SECTOR] {
            let hdr = header(&m, VIRTIO_BLK_T_IN, sector);
            let data = Descriptor::new(0x8000, 512, F_WRITE, 0);
            assert_eq!(b.handle(&[hdr, data, status_desc()], &m), 1);
            assert_eq!(status(&m), VIRTIO_BLK_S_IOERR, "sector {sector}");
        }
        // Two descriptors whose lengths sum past u32: refused, not wrapped.
        let hdr = header(&m, VIRTIO_BLK_T_IN, 0);
        let big = Descriptor::new(0x8000, 0x8000_0000, F_WRITE, 0);
        assert_eq!(b.handle(&[hdr, big, big, status_desc()], &m), 1);
        assert_eq!(status(&m), VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn blk_large_requests_are_copied_in_chunks() {
        let m = mem();
        let (_d, mut b) = disk(1 << 20);
        let n = 3 * COPY_CHUNK as u32 + 512;
        let pattern: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        m.write_slice(&pattern, GuestAddress(0x10000))
            .expect("fill");
        let hdr = header(&m, VIRTIO_BLK_T_OUT, 3);
        let out = Descriptor::new(0x10000, n, 0, 0);
        assert_eq!(b.handle(&[hdr, out, status_desc()], &m), 1);
        assert_eq!(status(&m), VIRTIO_BLK_S_OK);
        let hdr = header(&m, VIRTIO_BLK_T_IN, 3);
        let half = n / 2;
        let in1 = Descriptor::new(0x60000, half, F_WRITE, 0);
        let in2 = Descriptor::new(0x60000 + u64::from(half), n - half, F_WRITE, 0);
        assert_eq!(b.handle(&[hdr, in1, in2, status_desc()], &m), n + 1);
        assert_eq!(status(&m), VIRTIO_BLK_S_OK);
        let mut back = vec![0u8; n as usize];
        m.read_slice(&mut back, GuestAddress(0x60000))
            .expect("read");
        assert!(back == pattern, "data read back differs");
    }

    fn transport() -> (tempfile::TempDir, MmioTransport) {
        let (d, b) = disk(1 << 20);
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        (
            d,
            MmioTransport::new(DeviceKind::Blk(b), irq).expect("transport"),
        )
    }

    fn reg(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn queue_size_beyond_u16_is_refused_not_truncated() {
        let (_d, mut t) = transport();
        reg(&mut t, 0x030, 0);
        reg(&mut t, 0x038, 0x1_0008);
        assert_eq!(t.queues[0].size(), QUEUE_MAX, "0x10008 must not become 8");
        reg(&mut t, 0x038, 8);
        assert_eq!(t.queues[0].size(), 8);
        // A selector past the queues reads as absent and ignores writes.
        reg(&mut t, 0x030, u32::MAX);
        reg(&mut t, 0x038, 4);
        let mut v = [0xffu8; 4];
        t.read(0x034, &mut v);
        assert_eq!(v, [0; 4]);
    }

    #[test]
    fn config_space_reads_past_the_end_are_zero() {
        let (_d, mut t) = transport();
        let mut v = [0u8; 8];
        t.read(0x100, &mut v);
        assert_eq!(u64::from_le_bytes(v), (1 << 20) / SECTOR);
        for off in [0x104, 0x100 + 4096, u64::MAX - 3, u64::MAX] {
            let mut v = [0xffu8; 8];
            t.read(off, &mut v);
            assert!(
                v[..]
                    .iter()
                    .skip(if off == 0x104 { 4 } else { 0 })
                    .all(|b| *b == 0),
                "{off:#x}: {v:?}"
            );
        }
    }

    /// Sets up queue 0 of `t` (size 8) at desc 0x0, avail 0x1000, used 0x2000 and
    /// activates the device.
    fn activate(t: &mut MmioTransport) {
        reg(t, 0x030, 0);
        reg(t, 0x038, 8);
        for (off, v) in [(0x080, 0), (0x084, 0), (0x090, 0x1000), (0x094, 0)] {
            reg(t, off, v);
        }
        reg(t, 0x0a0, 0x2000);
        reg(t, 0x0a4, 0);
        reg(t, 0x044, 1);
        reg(
            t,
            0x070,
            STATUS_ACKNOWLEDGE | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(t.activated());
    }

    fn put_desc(m: &GuestMemoryMmap, i: u64, d: (u64, u32, u16, u16)) {
        let at = i * 16;
        m.write_obj(d.0, GuestAddress(at)).expect("addr");
        m.write_obj(d.1, GuestAddress(at + 8)).expect("len");
        m.write_obj(d.2, GuestAddress(at + 12)).expect("flags");
        m.write_obj(d.3, GuestAddress(at + 14)).expect("next");
    }

    fn used_idx(m: &GuestMemoryMmap) -> u16 {
        m.read_obj(GuestAddress(0x2002)).expect("used idx")
    }

    #[test]
    fn looping_chain_ends_at_the_queue_size() {
        let m = mem();
        let (_d, mut t) = transport();
        activate(&mut t);
        header(&m, VIRTIO_BLK_T_IN, 0);
        put_desc(&m, 0, (HDR, 16, F_NEXT, 1));
        // Descriptor 1 points at itself: a chain that never ends.
        put_desc(&m, 1, (0x4000, 512, F_NEXT | F_WRITE, 1));
        m.write_obj(0u16, GuestAddress(0x1004)).expect("ring[0]");
        m.write_obj(1u16, GuestAddress(0x1002)).expect("avail idx");
        t.process(0, &m).expect("served");
        assert_eq!(used_idx(&m), 1, "the chain is consumed");
        // Next index out of range (descriptor 2 -> 200).
        put_desc(&m, 2, (HDR, 16, F_NEXT, 200));
        m.write_obj(2u16, GuestAddress(0x1006)).expect("ring[1]");
        m.write_obj(2u16, GuestAddress(0x1002)).expect("avail idx");
        t.process(0, &m).expect("served");
        // An avail index far ahead of what the queue can hold: no chain is taken.
        let before = used_idx(&m);
        m.write_obj(2u16 + 100, GuestAddress(0x1002))
            .expect("avail idx");
        let _ = t.process(0, &m);
        assert_eq!(used_idx(&m), before);
        // Rings placed at the top of the address space: an error, not a panic.
        let (_d2, mut t2) = transport();
        reg(&mut t2, 0x030, 0);
        reg(&mut t2, 0x038, 8);
        for (off, v) in [
            (0x080, 0xffff_fff0),
            (0x084, u32::MAX),
            (0x090, 0xffff_fffe),
            (0x094, u32::MAX),
        ] {
            reg(&mut t2, off, v);
        }
        reg(&mut t2, 0x044, 1);
        reg(
            &mut t2,
            0x070,
            STATUS_ACKNOWLEDGE | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        let _ = t2.process(0, &m);
    }
}
