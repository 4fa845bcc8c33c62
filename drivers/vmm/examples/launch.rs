//! Launch benchmark: builds and runs the tiny guest ("hello" mode) and reports the
//! time to the first serial marker and to VM exit.
//!
//! Usage: `launch [RUNS]` (default 1). Prints one line per run and a summary; the
//! caller measures peak RSS (see `bench/launch.sh`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stead_vmm::{TINY_GUEST_IMAGE, Vm, VmConfig};

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut marker = Vec::new();
    let mut exit = Vec::new();
    for i in 0..runs {
        let start = Instant::now();
        let mut cfg = VmConfig::new(TINY_GUEST_IMAGE);
        cfg.mem_bytes = 32 << 20;
        cfg.cmdline = "mode=hello".into();
        let vm = match Vm::new(cfg) {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("launch: {e}");
                std::process::exit(1);
            }
        };
        let seen: Arc<Mutex<Option<Duration>>> = Arc::new(Mutex::new(None));
        let last: Arc<Mutex<Option<Duration>>> = Arc::new(Mutex::new(None));
        let (seen2, last2) = (seen.clone(), last.clone());
        vm.set_serial_callback(Arc::new(move |_: &[u8]| {
            let now = start.elapsed();
            if let Ok(mut s) = seen2.lock()
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
        let first = seen.lock().ok().and_then(|s| *s).unwrap_or(total);
        let end = last.lock().ok().and_then(|s| *s).unwrap_or(total);
        println!(
            "run {i}: first serial byte {:.2} ms, last serial byte {:.2} ms, exit {:.2} ms ({reason:?})",
            first.as_secs_f64() * 1e3,
            end.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3
        );
        marker.push(first);
        exit.push(total);
    }
    let med = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    println!(
        "median over {runs} runs: first serial byte {:.2} ms, exit {:.2} ms",
        med(&mut marker),
        med(&mut exit)
    );
}
