//! Intel MultiProcessor Specification 1.4 table, so that Linux finds every vCPU, the
//! IOAPIC and the ISA interrupt routing without ACPI.
//!
//! Layout, written at 0x9FC00 (start of the last KiB below 640 KiB, which Linux scans
//! and the e820 map reserves): floating pointer (16 bytes), then the configuration
//! table: header, one processor entry per vCPU, an ISA bus, the IOAPIC, IOAPIC
//! interrupt entries for IRQ 0..=23 (identity to the IOAPIC pins), and the LINT0
//! (ExtINT) / LINT1 (NMI) local interrupt entries.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::VmmError;

/// Guest address of the MP floating pointer.
pub const MPTABLE_START: u64 = 0x9fc00;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IRQ_MAX: u8 = 23;
const BUS_ISA: u8 = 0;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer + configuration table for `vcpus` processors.
pub fn build(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus; // first id after the local APICs
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let mut e = vec![0u8, id, APIC_VERSION, 1 | if id == 0 { 2 } else { 0 }];
        e.extend_from_slice(&0x0600u32.to_le_bytes()); // cpu signature (family 6)
        e.extend_from_slice(&0x0201u32.to_le_bytes()); // features: FPU, APIC
        e.extend_from_slice(&[0; 8]);
        entries.extend_from_slice(&e);
        count += 1;
    }
    entries.extend_from_slice(&[1, BUS_ISA, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX {
        // type 3: I/O interrupt, mp_INT, default polarity/trigger.
        entries.extend_from_slice(&[3, 0, 0, 0, BUS_ISA, irq, ioapic_id, irq]);
        count += 1;
    }
    // type 4: local interrupts: ExtINT on LINT0 of all, NMI on LINT1 of all.
    entries.extend_from_slice(&[4, 3, 0, 0, BUS_ISA, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, BUS_ISA, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"STEAD   "); // OEM id
    table.extend_from_slice(b"STEAD-VMM   "); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&((MPTABLE_START + 16) as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // feature bytes: configuration table present
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    fp
}

/// Writes the MP table for `vcpus` processors into guest memory.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), VmmError> {
    let t = build(vcpus);
    if MPTABLE_START + t.len() as u64 > 0xa0000 {
        return Err(VmmError::Config(
            "MP table does not fit below 640 KiB".into(),
        ));
    }
    mem.write_slice(&t, GuestAddress(MPTABLE_START))
        .map_err(|e| VmmError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for vcpus in [1u8, 2, 32] {
            let t = build(vcpus);
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count as usize, vcpus as usize + 1 + 1 + 24 + 2);
            assert!(MPTABLE_START + t.len() as u64 <= 0xa0000);
            // Processor entries: vCPU 0 is the BSP, all enabled.
            assert_eq!(table[44], 0);
            assert_eq!(table[44 + 3], 3);
        }
    }
}
