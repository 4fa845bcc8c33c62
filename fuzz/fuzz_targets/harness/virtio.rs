//! virtio-blk queue processing against a 1 MiB guest-memory model: the input programs the
//! queue registers (size, ring addresses) and fills guest memory (descriptor table, avail
//! ring, request headers, data); then the guest notifies. The device must never panic, loop
//! forever, or touch memory outside the guest's (ASan checks the last).
use std::path::PathBuf;
use std::sync::OnceLock;

use stead_vmm::virtio_fuzzing::BlkDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 1 << 20;
const DISK: u64 = 1 << 20;
const HEADER: usize = 16;

/// A 1 MiB raw disk shared by all runs (its content does not matter).
fn disk() -> Option<&'static PathBuf> {
    static DISK_PATH: OnceLock<Option<(tempfile::TempDir, PathBuf)>> = OnceLock::new();
    DISK_PATH
        .get_or_init(|| {
            let dir = tempfile::tempdir().ok()?;
            let path = dir.path().join("disk.raw");
            std::fs::File::create(&path)
                .and_then(|f| f.set_len(DISK))
                .ok()?;
            Some((dir, path))
        })
        .as_ref()
        .map(|(_, p)| p)
}

fn u16_at(h: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([h[i], h[i + 1]])
}

fn reg(d: &mut BlkDevice, off: u64, v: u32) {
    d.write_reg(off, &v.to_le_bytes());
}

/// Programs the selected queue from the header as a driver would and sets DRIVER_OK.
fn program_queue(d: &mut BlkDevice, h: &[u8]) {
    let addr = |i: usize| u32::from(u16_at(h, i)) * 16;
    reg(d, 0x030, u32::from((h[8] >> 1) & 1)); // QueueSel: 0, or 1 (absent on blk)
    reg(d, 0x038, u32::from(u16_at(h, 0))); // QueueNum
    reg(d, 0x024, 0); // DriverFeaturesSel
    reg(d, 0x020, u32::from_le_bytes([h[12], h[13], h[14], h[15]]));
    for (lo, hi, v) in [
        (0x080, 0x084, addr(2)),
        (0x090, 0x094, addr(4)),
        (0x0a0, 0x0a4, addr(6)),
    ] {
        reg(d, lo, v);
        reg(d, hi, 0);
    }
    reg(d, 0x044, 1); // QueueReady
    reg(d, 0x070, 1 | 2 | 8 | 4); // ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
}

/// One fuzz input; panics on a broken property. Returns the used ring's index afterwards
/// (how many requests the device completed), 0 when the input was too short to run.
pub fn run(data: &[u8]) -> u16 {
    if data.len() < HEADER {
        return 0;
    }
    let (h, body) = data.split_at(HEADER);
    let Some(disk) = disk() else { return 0 };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return 0;
    };
    let body = &body[..body.len().min(MEM)];
    if mem.write_slice(body, GuestAddress(0)).is_err() {
        return 0;
    }
    let Ok(mut dev) = BlkDevice::open(disk, h[8] & 1 == 1) else {
        return 0;
    };
    program_queue(&mut dev, h);
    for _ in 0..=(h[9] % 3) {
        let _ = dev.notify(usize::from((h[8] >> 1) & 1), &mem);
    }
    let mut v = [0u8; 8];
    dev.read_reg(u64::from(u16_at(h, 10)), &mut v);
    let used = u64::from(u16_at(h, 6)) * 16;
    mem.read_obj(GuestAddress(used + 2)).unwrap_or(0)
}
