//! x86_64 guest setup: memory layout, kernel loading, page tables, GDT, registers,
//! CPUID and MSRs for a 64-bit long-mode entry.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs,
    kvm_segment, kvm_sregs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    XEN_HVM_START_MAGIC_VALUE, hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::VmmError;

/// Start of the 32-bit MMIO hole; RAM above this goes above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Base of the virtio-mmio device windows (one 4 KiB window per device).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI used by virtio devices (device i gets `VIRTIO_GSI_BASE + i`).
pub const VIRTIO_GSI_BASE: u32 = 5;

const GDT_ADDR: u64 = 0x500;
const IDT_ADDR: u64 = 0x520;
const PVH_INFO: u64 = 0x6000;
const PVH_MODLIST: u64 = 0x6040;
const PVH_MEMMAP: u64 = 0x6080;
const ZERO_PAGE: u64 = 0x7000;
const BOOT_STACK: u64 = 0x8ff0;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000; // four pages: 0xb000..0xf000, identity map of 4 GiB
/// Guest address of the NUL-terminated kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line accepted (including the NUL).
pub const CMDLINE_MAX: usize = 0x10000;
const TINY_STACKS_TOP: u64 = 0x80000;
const TINY_STACK_SIZE: u64 = 0x1000;
/// Most vCPUs a VM may have (tiny-guest stacks live in 0x60000..0x80000).
pub const MAX_VCPUS: u8 = 32;
/// Load (and entry) address of flat tiny-guest images.
pub const TINY_LOAD_ADDR: u64 = 0x10_0000;
const EBDA_START: u64 = 0x9fc00;
const HIMEM_START: u64 = 0x10_0000;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// How the vCPUs enter the guest.
#[derive(Debug, Clone, Copy)]
pub enum BootEntry {
    /// Linux 64-bit boot protocol: `rip` = entry, `rsi` = boot_params.
    Linux {
        /// Kernel entry point.
        entry: u64,
    },
    /// PVH: 32-bit protected mode, paging off, `ebx` = hvm_start_info (BSP only; the
    /// other vCPUs wait for INIT/SIPI).
    Pvh {
        /// 32-bit entry point from the XEN_ELFNOTE_PHYS32_ENTRY note.
        entry: u64,
    },
    /// Tiny guest: every vCPU at `entry`; rdi = cpu id, rsi = vcpus, rdx = cmdline.
    Tiny {
        /// Entry point.
        entry: u64,
    },
}

/// RAM regions for a guest of `mem_bytes`, split around the 32-bit MMIO hole.
pub fn ram_regions(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (
                GuestAddress(MMIO_GAP_END),
                (mem_bytes - MMIO_GAP_START) as usize,
            ),
        ]
    }
}

fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

/// Loads the kernel (ELF vmlinux, bzImage, or a flat tiny-guest image) and, for
/// Linux, the initrd, command line and boot_params (with e820 map). `rsdp` (the ACPI
/// RSDP address, if tables were written) goes into `boot_params.acpi_rsdp_addr` or
/// `hvm_start_info.rsdp_paddr`.
pub fn load_guest(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: Option<u64>,
) -> Result<BootEntry, VmmError> {
    let open = |p: &Path| {
        File::open(p).map_err(|e| VmmError::Io {
            what: format!("open {}", p.display()),
            source: e,
        })
    };
    let mut f = open(kernel)?;
    let mut head = [0u8; 0x210];
    let n = read_full(&mut f, &mut head).map_err(|e| VmmError::Io {
        what: format!("read {}", kernel.display()),
        source: e,
    })?;
    f.seek(SeekFrom::Start(0)).map_err(|e| VmmError::Io {
        what: format!("seek {}", kernel.display()),
        source: e,
    })?;
    write_cmdline(mem, cmdline)?;
    let is_elf = n >= 4 && head[..4] == [0x7f, b'E', b'L', b'F'];
    let is_bzimage = n >= 0x206 && &head[0x202..0x206] == b"HdrS";
    if !is_elf && !is_bzimage {
        // Flat tiny-guest image.
        let mut image = Vec::new();
        f.read_to_end(&mut image).map_err(|e| VmmError::Io {
            what: format!("read {}", kernel.display()),
            source: e,
        })?;
        if TINY_LOAD_ADDR + image.len() as u64 > low_ram_end(mem_bytes) {
            return Err(VmmError::Config(
                "tiny guest image does not fit in guest memory".into(),
            ));
        }
        mem.write_slice(&image, GuestAddress(TINY_LOAD_ADDR))
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        return Ok(BootEntry::Tiny {
            entry: TINY_LOAD_ADDR,
        });
    }

    let mut pvh_entry = None;
    let (entry, kernel_end, setup_header) = if is_elf {
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| VmmError::Loader(e.to_string()))?;
        if let PvhBootCapability::PvhEntryPresent(a) = r.pvh_boot_cap {
            pvh_entry = Some(a.raw_value());
        }
        (r.kernel_load.raw_value(), r.kernel_end, r.setup_header)
    } else {
        let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| VmmError::Loader(e.to_string()))?;
        // The 64-bit entry point of a bzImage is 0x200 past its protected-mode load address.
        (
            r.kernel_load.raw_value() + 0x200,
            r.kernel_end,
            r.setup_header,
        )
    };

    let initrd_range = match initrd {
        Some(initrd) => Some(load_initrd(mem, mem_bytes, kernel_end, initrd)?),
        None => None,
    };
    let mut e820 = vec![
        (0u64, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        (HIMEM_START, low_ram_end(mem_bytes) - HIMEM_START, E820_RAM),
    ];
    if mem_bytes > MMIO_GAP_START {
        e820.push((MMIO_GAP_END, mem_bytes - MMIO_GAP_START, E820_RAM));
    }
    let merr = |e: vm_memory::GuestMemoryError| VmmError::Memory(e.to_string());

    if let Some(entry) = pvh_entry {
        let mut info = hvm_start_info {
            magic: XEN_HVM_START_MAGIC_VALUE,
            version: 1,
            cmdline_paddr: CMDLINE_ADDR,
            memmap_paddr: PVH_MEMMAP,
            memmap_entries: e820.len() as u32,
            rsdp_paddr: rsdp.unwrap_or(0),
            ..Default::default()
        };
        if let Some((addr, size)) = initrd_range {
            let m = hvm_modlist_entry {
                paddr: addr,
                size,
                ..Default::default()
            };
            mem.write_obj(m, GuestAddress(PVH_MODLIST)).map_err(merr)?;
            info.nr_modules = 1;
            info.modlist_paddr = PVH_MODLIST;
        }
        for (i, (addr, size, kind)) in e820.iter().enumerate() {
            let e = hvm_memmap_table_entry {
                addr: *addr,
                size: *size,
                type_: *kind,
                reserved: 0,
            };
            mem.write_obj(e, GuestAddress(PVH_MEMMAP + 24 * i as u64))
                .map_err(merr)?;
        }
        mem.write_obj(info, GuestAddress(PVH_INFO)).map_err(merr)?;
        return Ok(BootEntry::Pvh { entry });
    }

    let mut params = boot_params::default();
    if let Some(h) = setup_header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.kernel_alignment = 0x0100_0000;
    params.acpi_rsdp_addr = rsdp.unwrap_or(0);
    if let Some((addr, size)) = initrd_range {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, (addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(|e| VmmError::Memory(e.to_string()))?;
    Ok(BootEntry::Linux { entry })
}

/// Whether `kernel` is an ELF vmlinux or a bzImage (as opposed to a flat tiny-guest image).
pub fn is_linux_image(kernel: &Path) -> Result<bool, VmmError> {
    let mut f = File::open(kernel).map_err(|e| VmmError::Io {
        what: format!("open {}", kernel.display()),
        source: e,
    })?;
    let mut head = [0u8; 0x210];
    let n = read_full(&mut f, &mut head).map_err(|e| VmmError::Io {
        what: format!("read {}", kernel.display()),
        source: e,
    })?;
    Ok((n >= 4 && head[..4] == [0x7f, b'E', b'L', b'F'])
        || (n >= 0x206 && &head[0x202..0x206] == b"HdrS"))
}

/// Places the initrd page-aligned at the top of low RAM; returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel_end: u64,
    initrd: &Path,
) -> Result<(u64, u64), VmmError> {
    let mut data = Vec::new();
    File::open(initrd)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| VmmError::Io {
            what: format!("read {}", initrd.display()),
            source: e,
        })?;
    let addr = low_ram_end(mem_bytes)
        .checked_sub(data.len() as u64)
        .map(|a| a & !0xfff)
        .filter(|a| *a > kernel_end)
        .ok_or_else(|| VmmError::Config("initrd does not fit in guest memory".into()))?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| VmmError::Memory(e.to_string()))?;
    Ok((addr, data.len() as u64))
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), VmmError> {
    if cmdline.len() + 1 > CMDLINE_MAX || cmdline.as_bytes().contains(&0) {
        return Err(VmmError::Config(
            "command line too long or contains NUL".into(),
        ));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| VmmError::Memory(e.to_string()))
}

/// Writes the identity-mapped page tables (4 GiB with 2 MiB pages) and the GDT/IDT.
pub fn write_tables(mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| VmmError::Memory(e.to_string()))
    };
    w(PDPT_ADDR | 0x3, PML4_ADDR)?;
    for i in 0..4u64 {
        w((PD_ADDR + i * 0x1000) | 0x3, PDPT_ADDR + i * 8)?;
    }
    for i in 0..(4 * 512u64) {
        // present | writable | 2 MiB page
        w((i << 21) | 0x83, PD_ADDR + i * 8)?;
    }
    for (i, e) in GDT.iter().enumerate() {
        w(*e, GDT_ADDR + i as u64 * 8)?;
    }
    w(0, IDT_ADDR)
}

/// GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18), 32-bit code (0x20, PVH).
const GDT: [u64; 5] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
    gdt_entry(0xc09b, 0, 0xfffff),
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        ((limit_raw << 12) | 0xfff) as u32
    } else {
        limit_raw as u32
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Builds the CPUID table for vCPU `id` of `count`.
///
/// Filtering (starting from KVM_GET_SUPPORTED_CPUID):
/// - leaf 0x1: initial APIC id = `id`, logical processor count = `count`, HTT set
///   when `count > 1`, hypervisor bit set;
/// - leaf 0x4: cores per package = `count`;
/// - leaf 0x6 (thermal/power) and 0xa (PMU): zeroed, not emulated;
/// - leaves 0xb and 0x1f: x2APIC id = `id`.
pub fn cpuid_for(kvm: &Kvm, id: u8, count: u8) -> Result<CpuId, VmmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmmError::Kvm {
            what: "KVM_GET_SUPPORTED_CPUID",
            source: e,
        })?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((count as u32) << 16);
                e.ecx |= 1 << 31;
                if count > 1 {
                    e.edx |= 1 << 28;
                }
            }
            4 => {
                e.eax = (e.eax & 0x03ff_ffff) | (((count as u32).saturating_sub(1) & 0x3f) << 26);
            }
            6 | 0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                e.edx = id as u32;
            }
            _ => {}
        }
    }
    Ok(cpuid)
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// Sets up one vCPU: CPUID, MSRs, FPU, segment registers, page tables, general
/// registers and local APIC LINT pins.
pub fn setup_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    id: u8,
    count: u8,
    boot: BootEntry,
) -> Result<(), VmmError> {
    let kerr = |what: &'static str| move |e| VmmError::Kvm { what, source: e };
    vcpu.set_cpuid2(&cpuid_for(kvm, id, count)?)
        .map_err(kerr("KVM_SET_CPUID2"))?;
    // Not every MSR is accepted by every KVM flavour (e.g. PVM); a short count is fine.
    vcpu.set_msrs(&boot_msrs()?).map_err(kerr("KVM_SET_MSRS"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kerr("KVM_SET_FPU"))?;
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kerr("KVM_GET_SREGS"))?;
    set_boot_segments(&mut sregs, boot);
    vcpu.set_sregs(&sregs).map_err(kerr("KVM_SET_SREGS"))?;
    vcpu.set_regs(&boot_regs(boot, id, count))
        .map_err(kerr("KVM_SET_REGS"))?;
    // LINT0 = ExtINT, LINT1 = NMI, as a BIOS would leave them.
    let mut lapic: kvm_lapic_state = vcpu.get_lapic().map_err(kerr("KVM_GET_LAPIC"))?;
    set_lvt(&mut lapic, 0x350, 7);
    set_lvt(&mut lapic, 0x360, 4);
    vcpu.set_lapic(&lapic).map_err(kerr("KVM_SET_LAPIC"))?;
    Ok(())
}

/// The MSRs a vCPU starts with (syscall MSRs and TSC zero, fast strings on, MTRRs
/// enabled with write-back as the default type).
fn boot_msrs() -> Result<Msrs, VmmError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .iter()
    .map(|(index, data)| kvm_msr_entry {
        index: *index,
        data: *data,
        ..Default::default()
    })
    .collect();
    Msrs::from_entries(&entries).map_err(|e| VmmError::Config(e.to_string()))
}

/// Points `sregs` at the boot GDT and IDT and sets the mode `boot` enters in: flat 32-bit
/// protected mode without paging for PVH, 64-bit long mode on the boot page tables
/// otherwise.
fn set_boot_segments(sregs: &mut kvm_sregs, boot: BootEntry) {
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let code = segment(GDT[1], 1);
    let data = segment(GDT[2], 2);
    let tss = segment(GDT[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    if let BootEntry::Pvh { .. } = boot {
        // PVH: flat 32-bit protected mode, paging off.
        sregs.cs = segment(GDT[4], 4);
        sregs.cr0 = (sregs.cr0 & !0xe000_0000) | 0x1 | 0x10;
        sregs.cr4 = 0;
        sregs.efer = 0;
    } else {
        // Protected mode + paging, caching enabled (clear CD/NW), ET set.
        sregs.cr0 = (sregs.cr0 & !0x6000_0000) | 0x1 | 0x10 | 0x8000_0000;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 |= 0x20; // PAE
        sregs.efer |= 0x500; // LME | LMA
    }
}

/// The general registers vCPU `id` (of `count`) starts with for `boot`: the entry point
/// and what each boot protocol passes (Linux: the zero page in rsi; PVH: the start info
/// in rbx; tiny guests: id, count and command line in rdi, rsi, rdx and a stack each).
fn boot_regs(boot: BootEntry, id: u8, count: u8) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match boot {
        BootEntry::Linux { entry } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
            regs.rsi = ZERO_PAGE;
        }
        BootEntry::Pvh { entry } => {
            regs.rip = entry;
            regs.rbx = PVH_INFO;
        }
        BootEntry::Tiny { entry } => {
            regs.rip = entry;
            regs.rsp = TINY_STACKS_TOP - id as u64 * TINY_STACK_SIZE;
            regs.rdi = id as u64;
            regs.rsi = count as u64;
            regs.rdx = CMDLINE_ADDR;
        }
    }
    regs
}

fn set_lvt(lapic: &mut kvm_lapic_state, offset: usize, delivery_mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = lapic.regs[offset + i] as u8;
    }
    let v = u32::from_le_bytes(b);
    let v = (v & !0x700) | (delivery_mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *x as _;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let cs = segment(GDT[1], 1);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.present, 1);
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.selector, 8);
        let ds = segment(GDT[2], 2);
        assert_eq!(ds.db, 1);
        assert_eq!(ds.limit, 0xffff_ffff);
    }

    #[test]
    fn regions_split_around_gap() {
        assert_eq!(ram_regions(1 << 30).len(), 1);
        let r = ram_regions(4 << 30);
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    #[test]
    fn boot_registers_follow_each_protocol() {
        let linux = boot_regs(BootEntry::Linux { entry: 0x100_0000 }, 0, 2);
        assert_eq!(
            (linux.rip, linux.rsi, linux.rsp, linux.rflags),
            (0x100_0000, ZERO_PAGE, BOOT_STACK, 0x2)
        );
        let pvh = boot_regs(BootEntry::Pvh { entry: 0x20_0000 }, 0, 1);
        assert_eq!((pvh.rip, pvh.rbx), (0x20_0000, PVH_INFO));
        let tiny = |id| boot_regs(BootEntry::Tiny { entry: 0x10_0000 }, id, 3);
        assert_eq!(
            (tiny(2).rdi, tiny(2).rsi, tiny(2).rdx),
            (2, 3, CMDLINE_ADDR)
        );
        assert_eq!(tiny(0).rsp - tiny(1).rsp, TINY_STACK_SIZE);
    }

    #[test]
    fn boot_segments_enter_long_mode_except_pvh() {
        let mut long = kvm_sregs::default();
        set_boot_segments(&mut long, BootEntry::Linux { entry: 0 });
        assert_eq!(long.efer & 0x500, 0x500);
        assert_eq!(long.cr3, PML4_ADDR);
        assert_ne!(long.cr0 & 0x8000_0000, 0, "paging on");
        let mut pvh = kvm_sregs::default();
        set_boot_segments(&mut pvh, BootEntry::Pvh { entry: 0 });
        assert_eq!((pvh.efer, pvh.cr4, pvh.cr0 & 0x8000_0001), (0, 0, 1));
        assert_eq!(pvh.gdt.base, GDT_ADDR);
    }
}
