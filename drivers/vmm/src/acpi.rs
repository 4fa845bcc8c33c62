//! ACPI tables for Linux guests: RSDP, XSDT, FADT (hardware-reduced), MADT and a DSDT
//! describing the virtio-mmio transports, COM1 and the i8042.
//!
//! Everything is one blob written at [`ACPI_START`] (0xE0000, inside the BIOS area that
//! Linux scans for "RSD PTR " and that the e820 map reserves):
//!
//! | offset | table |
//! |---|---|
//! | 0x000 | RSDP (revision 2, 36 bytes) |
//! | 0x040 | XSDT (FADT, MADT) |
//! | 0x080 | FADT (revision 6.5, 276 bytes) |
//! | 0x1A0 | MADT |
//! | after the MADT, 16-byte aligned | DSDT |
//!
//! The FADT declares a hardware-reduced platform: no PM1/GPE blocks and no SCI. Reset
//! goes through the reset register (port 0x64 ← 0xFE, the i8042 reset the VMM already
//! handles) and S5 power-off through the sleep control register (port 0x600, the stead
//! power port; `\_S5_` = 5). The sleep status register is port 0x601, which reads 0xFF
//! (WAK_STS set) and ignores writes.

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::VmmError;
use crate::devices::POWER_PORT;

/// Guest address of the table blob; the RSDP is its first 36 bytes.
pub const ACPI_START: u64 = 0xe_0000;
/// End (exclusive) of the area the tables may use (the BIOS area ends at 1 MiB).
pub const ACPI_END: u64 = 0x10_0000;

const OEM_ID: [u8; 6] = *b"STEAD ";
const OEM_TABLE_ID: [u8; 8] = *b"STEADVMM";
const OEM_REVISION: u32 = 1;

const XSDT_OFFSET: u64 = 0x40;
const FADT_OFFSET: u64 = 0x80;
const MADT_OFFSET: u64 = 0x1a0;

const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// ISA IRQs of devices the VMM emulates (i8042 keyboard, COM1), given identity
/// interrupt source overrides so Linux maps them without a legacy PIC.
const ISA_OVERRIDES: [u8; 2] = [1, 4];
const COM1_IRQ: u32 = 4;
const I8042_IRQ: u32 = 1;
const SLEEP_STATUS_PORT: u16 = POWER_PORT + 1;
const I8042_CMD_PORT: u16 = 0x64;

/// IAPC_BOOT_ARCH: 8042 present (bit 1), VGA not present (bit 2), CMOS RTC not
/// present (bit 5; the VMM does not emulate ports 0x70/0x71).
const IAPC_BOOT_ARCH: u16 = (1 << 1) | (1 << 2) | (1 << 5);

/// One virtio-mmio transport as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Base address of the register window.
    pub base: u64,
    /// Size of the register window.
    pub size: u64,
    /// GSI (IOAPIC pin) of its interrupt; edge-triggered, active high (irqfd).
    pub gsi: u32,
}

fn align16(v: u64) -> u64 {
    (v + 15) & !15
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

/// Builds the DSDT: `\_SB_` with COM1 (PNP0501), the i8042 keyboard (PNP0303) and one
/// `LNRO0005` device per virtio-mmio transport, plus `\_S5_`.
fn dsdt(devices: &[MmioDevice]) -> Result<Vec<u8>, VmmError> {
    // A Name serializes its value at once, so the temporaries may go.
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &0u8);
    let com1_crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![
            &aml::IO::new(0x3f8, 0x3f8, 1, 8),
            &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
        ]),
    );
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    let kbd_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303"));
    let kbd_crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![
            &aml::IO::new(0x60, 0x60, 1, 1),
            &aml::IO::new(0x64, 0x64, 1, 1),
            &aml::Interrupt::new(true, true, false, false, I8042_IRQ),
        ]),
    );
    let kbd = aml::Device::new("PS2K".into(), vec![&kbd_hid, &kbd_crs]);

    let mut names: Vec<[aml::Name; 3]> = Vec::with_capacity(devices.len());
    for (uid, d) in (0u32..).zip(devices) {
        let base = u32::try_from(d.base)
            .map_err(|_| VmmError::Config("virtio-mmio window above 4 GiB".into()))?;
        let size = u32::try_from(d.size)
            .map_err(|_| VmmError::Config("virtio-mmio window too large".into()))?;
        names.push([
            aml::Name::new("_HID".into(), &"LNRO0005"),
            aml::Name::new("_UID".into(), &uid),
            aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::Memory32Fixed::new(true, base, size),
                    // Consumer, edge-triggered, active high, exclusive: an irqfd pulse.
                    &aml::Interrupt::new(true, true, false, false, d.gsi),
                ]),
            ),
        ]);
    }
    let mut virtio = Vec::with_capacity(devices.len());
    for (i, n) in names.iter().enumerate() {
        let path = format!("VR{i:02X}");
        virtio.push(aml::Device::new(
            path.as_str().into(),
            n.iter().map(|x| x as &dyn Aml).collect(),
        ));
    }

    let mut sb_children: Vec<&dyn Aml> = vec![&com1, &kbd];
    sb_children.extend(virtio.iter().map(|d| d as &dyn Aml));
    let sb = aml::Scope::new("_SB_".into(), sb_children);
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&5u8, &0u8, &0u8, &0u8]),
    );

    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    sb.to_aml_bytes(&mut body);
    s5.to_aml_bytes(&mut body);
    t.append_slice(&body);
    Ok(t.as_slice().to_vec())
}

/// Builds the MADT: local APIC address, one enabled Local APIC per vCPU (processor
/// UID = APIC id = vCPU id), the IOAPIC (id = vCPU count, GSI base 0), identity
/// interrupt source overrides for the emulated ISA IRQs, and LINT1 = NMI on all CPUs.
fn madt(vcpus: u8) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_bytes(36, &LAPIC_ADDR.to_le_bytes());
    t.write_bytes(40, &0u32.to_le_bytes()); // flags: no PC-AT 8259 setup is promised
    let mut e = Vec::new();
    for id in 0..vcpus {
        // Type 0, length 8: ACPI processor UID, APIC id, flags (enabled).
        e.extend_from_slice(&[0, 8, id, id]);
        e.extend_from_slice(&1u32.to_le_bytes());
    }
    // Type 1, length 12: IOAPIC id, reserved, address, GSI base.
    e.extend_from_slice(&[1, 12, vcpus, 0]);
    e.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes());
    for irq in ISA_OVERRIDES {
        // Type 2, length 10: bus 0 (ISA), source IRQ, GSI, flags 0 (conforms to the
        // bus: edge-triggered, active high).
        e.extend_from_slice(&[2, 10, 0, irq]);
        e.extend_from_slice(&u32::from(irq).to_le_bytes());
        e.extend_from_slice(&0u16.to_le_bytes());
    }
    // Type 4, length 6: Local APIC NMI, all processors (0xFF), flags 0, LINT1.
    e.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.append_slice(&e);
    t.as_slice().to_vec()
}

/// Builds the table blob for `vcpus` processors and `devices`, to be written at
/// [`ACPI_START`]. The RSDP is at offset 0.
pub fn build(vcpus: u8, devices: &[MmioDevice]) -> Result<Vec<u8>, VmmError> {
    let madt = madt(vcpus);
    let dsdt = dsdt(devices)?;
    let dsdt_offset = align16(MADT_OFFSET + madt.len() as u64);
    let end = dsdt_offset + dsdt.len() as u64;
    if ACPI_START + end > ACPI_END {
        return Err(VmmError::Config(
            "ACPI tables do not fit below 1 MiB".into(),
        ));
    }

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(ACPI_START + dsdt_offset)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.reset_reg = io_gas(I8042_CMD_PORT);
    fadt.reset_value = 0xfe;
    fadt.sleep_control_reg = io_gas(POWER_PORT);
    fadt.sleep_status_reg = io_gas(SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"STEADVMM").into();
    let mut fadt_bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut fadt_bytes);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(ACPI_START + FADT_OFFSET);
    xsdt.add_entry(ACPI_START + MADT_OFFSET);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);

    let mut rsdp_bytes = Vec::new();
    Rsdp::new(OEM_ID, ACPI_START + XSDT_OFFSET).to_aml_bytes(&mut rsdp_bytes);

    let mut blob = vec![0u8; end as usize];
    let mut prev_end = 0;
    for (off, bytes) in [
        (0, &rsdp_bytes),
        (XSDT_OFFSET as usize, &xsdt_bytes),
        (FADT_OFFSET as usize, &fadt_bytes),
        (MADT_OFFSET as usize, &madt),
        (dsdt_offset as usize, &dsdt),
    ] {
        if off < prev_end || off + bytes.len() > blob.len() {
            return Err(VmmError::Config(format!(
                "ACPI table layout overlaps at offset {off:#x}"
            )));
        }
        blob[off..off + bytes.len()].copy_from_slice(bytes);
        prev_end = off + bytes.len();
    }
    Ok(blob)
}

/// Writes the tables into guest memory; returns the RSDP's guest address.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8, devices: &[MmioDevice]) -> Result<u64, VmmError> {
    let blob = build(vcpus, devices)?;
    mem.write_slice(&blob, GuestAddress(ACPI_START))
        .map_err(|e| VmmError::Memory(e.to_string()))?;
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from(u32_at(b, off)) | (u64::from(u32_at(b, off + 4)) << 32)
    }

    /// The table at guest address `addr`: checks the signature, that it lies inside
    /// the blob and that its checksum is valid.
    fn table<'a>(blob: &'a [u8], addr: u64, sig: &[u8; 4]) -> &'a [u8] {
        assert!(addr >= ACPI_START, "{addr:#x}");
        let off = (addr - ACPI_START) as usize;
        assert_eq!(&blob[off..off + 4], sig);
        let len = u32_at(blob, off + 4) as usize;
        assert!(len >= 36 && off + len <= blob.len());
        let t = &blob[off..off + len];
        assert_eq!(sum(t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    fn devices(n: u64) -> Vec<MmioDevice> {
        (0..n)
            .map(|i| MmioDevice {
                base: 0xd000_0000 + i * 0x1000,
                size: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect()
    }

    fn find(hay: &[u8], needle: &[u8]) -> Vec<usize> {
        hay.windows(needle.len())
            .enumerate()
            .filter(|(_, w)| *w == needle)
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn tables_for_1_and_4_vcpus_with_2_virtio_devices() {
        for vcpus in [1u8, 4] {
            let devs = devices(2);
            let blob = build(vcpus, &devs).unwrap();
            assert!(ACPI_START + blob.len() as u64 <= ACPI_END);

            // RSDP: signature, revision 2, both checksums, XSDT pointer.
            let rsdp = &blob[..36];
            assert_eq!(&rsdp[..8], b"RSD PTR ");
            assert_eq!(rsdp[15], 2);
            assert_eq!(sum(&rsdp[..20]), 0);
            assert_eq!(u32_at(rsdp, 20), 36);
            assert_eq!(sum(rsdp), 0);
            let xsdt = table(&blob, u64_at(rsdp, 24), b"XSDT");

            // XSDT: exactly FADT and MADT.
            assert_eq!(xsdt.len(), 36 + 16);
            let fadt = table(&blob, u64_at(xsdt, 36), b"FACP");
            let madt = table(&blob, u64_at(xsdt, 44), b"APIC");

            // FADT: 276 bytes (revision 6), hardware-reduced, reset register, boot
            // arch flags, X_DSDT → DSDT.
            assert_eq!(fadt.len(), 276);
            assert_eq!(fadt[8], 6);
            let flags = u32_at(fadt, 112);
            assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
            assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
            let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
            assert_eq!(boot_arch, IAPC_BOOT_ARCH);
            assert_ne!(boot_arch & 2, 0, "8042 present");
            assert_ne!(boot_arch & 4, 0, "VGA not present");
            // RESET_REG: GAS at 116 (system I/O, port 0x64), value 0xFE at 128.
            assert_eq!(fadt[116], 1);
            assert_eq!(u64_at(fadt, 120), 0x64);
            assert_eq!(fadt[128], 0xfe);
            // SLEEP_CONTROL_REG (244) and SLEEP_STATUS_REG (256): ports 0x600/0x601.
            assert_eq!(fadt[244], 1);
            assert_eq!(u64_at(fadt, 248), 0x600);
            assert_eq!(u64_at(fadt, 260), 0x601);
            assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT unused");
            let dsdt = table(&blob, u64_at(fadt, 140), b"DSDT");

            // MADT: LAPIC address, one enabled LAPIC per vCPU, one IOAPIC at
            // 0xFEC00000 with GSI base 0, the ISA overrides and the LINT1 NMI.
            assert_eq!(u32_at(madt, 36), 0xfee0_0000);
            let mut off = 44;
            let (mut lapics, mut ioapics, mut overrides, mut nmis) = (vec![], 0, vec![], 0);
            while off < madt.len() {
                let (kind, len) = (madt[off], madt[off + 1] as usize);
                assert!(len >= 2 && off + len <= madt.len());
                let e = &madt[off..off + len];
                match kind {
                    0 => {
                        assert_eq!(len, 8);
                        assert_eq!(e[2], e[3]);
                        assert_eq!(u32_at(e, 4), 1, "enabled");
                        lapics.push(e[3]);
                    }
                    1 => {
                        assert_eq!(len, 12);
                        assert_eq!(e[2], vcpus, "IOAPIC id after the LAPIC ids");
                        assert_eq!(u32_at(e, 4), 0xfec0_0000);
                        assert_eq!(u32_at(e, 8), 0);
                        ioapics += 1;
                    }
                    2 => {
                        assert_eq!(len, 10);
                        assert_eq!(e[2], 0, "ISA bus");
                        assert_eq!(u32::from(e[3]), u32_at(e, 4), "identity");
                        overrides.push(e[3]);
                    }
                    4 => {
                        assert_eq!(e, [4, 6, 0xff, 0, 0, 1]);
                        nmis += 1;
                    }
                    k => panic!("unexpected MADT entry type {k}"),
                }
                off += len;
            }
            assert_eq!(off, madt.len());
            assert_eq!(lapics, (0..vcpus).collect::<Vec<_>>());
            assert_eq!(ioapics, 1);
            assert_eq!(overrides, [1, 4]);
            assert_eq!(nmis, 1);

            // DSDT: the two LNRO0005 devices, each with Memory32Fixed(base, 4 KiB)
            // and an edge/active-high Extended Interrupt with its GSI; COM1; \_S5_.
            let aml = &dsdt[36..];
            assert_eq!(find(aml, b"LNRO0005\0").len(), 2);
            for (i, d) in devs.iter().enumerate() {
                let mut mem32 = vec![0x86, 9, 0, 1];
                mem32.extend_from_slice(&(d.base as u32).to_le_bytes());
                mem32.extend_from_slice(&0x1000u32.to_le_bytes());
                let at = find(aml, &mem32);
                assert_eq!(at.len(), 1, "Memory32Fixed of device {i}");
                let mut irq = vec![0x89, 6, 0, 0b0011, 1];
                irq.extend_from_slice(&d.gsi.to_le_bytes());
                assert_eq!(
                    &aml[at[0] + 12..at[0] + 21],
                    &irq[..],
                    "interrupt of device {i}"
                );
                // The device's name and _UID precede its _CRS.
                let name = format!("VR{i:02X}");
                let dev_at = find(aml, name.as_bytes());
                assert_eq!(dev_at.len(), 1);
                assert!(dev_at[0] < at[0]);
            }
            assert_eq!(find(aml, b"_SB_").len(), 1);
            assert_eq!(find(aml, b"COM1").len(), 1);
            assert_eq!(find(aml, b"_S5_").len(), 1);
            // EISA id of PNP0501 (compressed): 0x41D00501.
            assert_eq!(find(aml, &[0x0c, 0x41, 0xd0, 0x05, 0x01]).len(), 1);
        }
    }

    #[test]
    fn sixteen_devices_and_max_vcpus_fit() {
        let blob = build(crate::arch::MAX_VCPUS, &devices(16)).unwrap();
        assert!(ACPI_START + blob.len() as u64 <= ACPI_END);
        let dsdt_at = u64_at(&blob, FADT_OFFSET as usize + 140);
        let dsdt = table(&blob, dsdt_at, b"DSDT");
        assert_eq!(find(dsdt, b"LNRO0005\0").len(), 16);
        assert!(find(dsdt, b"VR0F").len() == 1);
        // Without devices the DSDT still has COM1 and \_S5_.
        let blob = build(1, &[]).unwrap();
        let dsdt = table(&blob, u64_at(&blob, FADT_OFFSET as usize + 140), b"DSDT");
        assert!(find(dsdt, b"LNRO0005").is_empty());
        assert_eq!(find(dsdt, b"_S5_").len(), 1);
    }

    #[test]
    fn window_above_4g_is_rejected() {
        let d = MmioDevice {
            base: 1 << 32,
            size: 0x1000,
            gsi: 5,
        };
        assert!(build(1, &[d]).is_err());
    }
}
