//! Builds the tiny test guest (guests/*.S, guests/*.c) into a flat binary with the
//! system assembler, C compiler, linker and objcopy. The result is exported to the
//! crate as the `STEAD_TINY_GUEST` compile-time environment variable.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command, what: &str) {
    let shown = format!("{cmd:?}");
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("stead-vmm build: {what} failed ({s}): {shown}"),
        Err(e) => panic!(
            "stead-vmm build: cannot run {what} ({e}); the tiny test guest needs `as`, `gcc`, \
             `ld` and `objcopy` (Debian: apt-get install binutils gcc): {shown}"
        ),
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let guests = manifest.join("guests");
    for f in ["entry.S", "pvh.S", "tiny.c", "link.ld", "link-pvh.ld"] {
        println!("cargo:rerun-if-changed={}", guests.join(f).display());
    }
    let p = |name: &str| -> PathBuf { out.join(name) };
    let s = |path: &Path| -> String { path.display().to_string() };

    run(
        Command::new("as")
            .args(["--64", "-o"])
            .arg(p("entry.o"))
            .arg(guests.join("entry.S")),
        "as",
    );
    run(
        Command::new("gcc")
            .args([
                "-c",
                "-O2",
                "-m64",
                "-ffreestanding",
                "-nostdlib",
                "-fno-builtin",
                "-fno-tree-loop-distribute-patterns",
                "-fno-pic",
                "-fno-pie",
                "-fno-stack-protector",
                "-fno-asynchronous-unwind-tables",
                "-fcf-protection=none",
                "-mno-red-zone",
                "-mno-sse",
                "-mno-mmx",
                "-mgeneral-regs-only",
                "-mcmodel=small",
                "-o",
            ])
            .arg(p("tiny.o"))
            .arg(guests.join("tiny.c")),
        "gcc",
    );
    run(
        Command::new("ld")
            .args(["-nostdlib", "-static", "-z", "noexecstack", "-T"])
            .arg(guests.join("link.ld"))
            .arg("-o")
            .arg(p("tiny.elf"))
            .arg(p("entry.o"))
            .arg(p("tiny.o")),
        "ld",
    );
    run(
        Command::new("objcopy").args(["-O", "binary", &s(&p("tiny.elf")), &s(&p("tiny.bin"))]),
        "objcopy",
    );
    // The same guest behind a PVH entry stub, as an ELF with a XEN_ELFNOTE_PHYS32_ENTRY
    // note (for stead's ELF/PVH path and for QEMU).
    run(
        Command::new("as")
            .args(["--64", "-o"])
            .arg(p("pvh.o"))
            .arg(guests.join("pvh.S")),
        "as",
    );
    run(
        Command::new("ld")
            .args([
                "-nostdlib",
                "-static",
                "-z",
                "noexecstack",
                "-z",
                "max-page-size=4096",
                "-T",
            ])
            .arg(guests.join("link-pvh.ld"))
            .arg("-o")
            .arg(p("tiny-pvh.elf"))
            .arg(p("pvh.o"))
            .arg(p("tiny.o")),
        "ld",
    );
    println!("cargo:rustc-env=STEAD_TINY_GUEST={}", s(&p("tiny.bin")));
    println!(
        "cargo:rustc-env=STEAD_TINY_GUEST_PVH={}",
        s(&p("tiny-pvh.elf"))
    );
}
