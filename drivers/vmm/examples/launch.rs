//! Launch benchmark: runs the tiny guest ("hello" mode) and reports, per run, the
//! time from `Vm::new` to the first and last serial byte and to VM exit.
//!
//! Usage: `launch [--runs N] [--pvh] [--echo] [--print-pvh-path]`
//! - `--pvh`: boot the PVH ELF build of the guest instead of the flat image;
//! - `--echo`: copy guest serial output to stdout (for process-level timing);
//! - `--print-pvh-path`: print the PVH guest's path and exit (for the QEMU comparison).
//!
//! Peak RSS and process wall time are measured by `bench/launch.sh`.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stead_vmm::{TINY_GUEST_IMAGE, TINY_GUEST_PVH_IMAGE, Vm, VmConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--print-pvh-path") {
        println!("{TINY_GUEST_PVH_IMAGE}");
        return;
    }
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let pvh = args.iter().any(|a| a == "--pvh");
    let echo = args.iter().any(|a| a == "--echo");
    let image = if pvh {
        TINY_GUEST_PVH_IMAGE
    } else {
        TINY_GUEST_IMAGE
    };
    let mut firsts = Vec::new();
    let mut exits = Vec::new();
    for i in 0..runs {
        let start = Instant::now();
        let mut cfg = VmConfig::new(image);
        cfg.mem_bytes = 32 << 20;
        cfg.cmdline = "mode=hello".into();
        let vm = match Vm::new(cfg) {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("launch: {e}");
                std::process::exit(1);
            }
        };
        let first: Arc<Mutex<Option<Duration>>> = Arc::new(Mutex::new(None));
        let last: Arc<Mutex<Option<Duration>>> = Arc::new(Mutex::new(None));
        let (first2, last2) = (first.clone(), last.clone());
        vm.set_serial_callback(Arc::new(move |b: &[u8]| {
            let now = start.elapsed();
            if echo {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(b);
                let _ = out.flush();
            }
            if let Ok(mut s) = first2.lock()
                && s.is_none()
            {
                *s = Some(now);
            }
            if let Ok(mut l) = last2.lock() {
                *l = Some(now);
            }
        }));
        let reason = vm.run();
        let total = start.elapsed();
        let f = first.lock().ok().and_then(|s| *s).unwrap_or(total);
        let l = last.lock().ok().and_then(|s| *s).unwrap_or(total);
        if !echo {
            println!(
                "run {i}: first serial byte {:.2} ms, last {:.2} ms, exit {:.2} ms ({reason:?})",
                f.as_secs_f64() * 1e3,
                l.as_secs_f64() * 1e3,
                total.as_secs_f64() * 1e3
            );
        }
        firsts.push(f);
        exits.push(total);
    }
    if !echo {
        let med = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() / 2].as_secs_f64() * 1e3
        };
        println!(
            "median over {runs} runs ({}): first serial byte {:.2} ms, exit {:.2} ms",
            if pvh { "PVH ELF" } else { "flat image" },
            med(&mut firsts),
            med(&mut exits)
        );
    }
}
