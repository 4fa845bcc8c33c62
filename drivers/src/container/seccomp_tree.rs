//! A seccomp allow list compiled as a binary search over syscall numbers.
//!
//! `seccompiler` compiles a filter as one comparison per listed syscall, tried in order:
//! with the container's ~290 allowed syscalls (x86_64) that is a program of ~1,500
//! instructions, and a syscall late in the list runs ~600 of them on every call. The
//! kernel also translates and JIT-compiles the whole program at every container start.
//!
//! Here the syscall numbers are split into runs that share one outcome (allowed, refused,
//! or allowed when its argument rules match), and the program finds the run of a number
//! by binary search: about 200 instructions in all, at most a dozen run per call. A
//! syscall with argument rules gets the rules `seccompiler` builds for it (its own
//! [`SeccompRule`] → BPF), at its leaf. The result is the same decision for every
//! number, architecture and argument as `seccompiler`'s program for the same rules (a
//! unit test runs both through a BPF interpreter).

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompRule, sock_filter};
use stead_reconciler::driver::DriverError;

// Classic BPF opcodes (linux/bpf_common.h).
/// `BPF_LD | BPF_W | BPF_ABS` (0x00 | 0x00 | 0x20).
const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JA`.
const BPF_JA: u16 = 0x05;
/// `BPF_JMP | BPF_JGE | BPF_K`.
const BPF_JGE_K: u16 = 0x05 | 0x30;
/// `BPF_JMP | BPF_JEQ | BPF_K`.
const BPF_JEQ_K: u16 = 0x05 | 0x10;
/// `BPF_RET | BPF_K`.
const BPF_RET_K: u16 = 0x06;
/// The kernel's limit on a filter's length (`BPF_MAXINSNS`).
const MAX_LEN: usize = 4096;
/// Offsets in `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;

/// The audit architecture of this build's target (`AUDIT_ARCH_*` of linux/audit.h).
fn audit_arch() -> Result<u32, DriverError> {
    const LE64: u32 = 0x8000_0000 | 0x4000_0000;
    match std::env::consts::ARCH {
        "x86_64" => Ok(62 | LE64),
        "aarch64" => Ok(183 | LE64),
        "riscv64" => Ok(243 | LE64),
        other => Err(DriverError::Unsupported(format!(
            "seccomp on {other}: no audit architecture"
        ))),
    }
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// What a run of syscall numbers leads to.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Matched,
    Mismatched,
    /// The syscall's argument rules (any matching rule: matched; none: mismatched).
    Rules(Vec<SeccompRule>),
}

/// A run of syscall numbers `[lo, next run's lo)` with one outcome.
#[derive(Debug)]
struct Run {
    lo: u32,
    outcome: Outcome,
}

/// Splits all numbers `0..=u32::MAX` into runs: listed numbers with empty rules are
/// matched, with rules get their rules (one number per run), unlisted are mismatched;
/// neighbouring runs with the same plain outcome are merged.
fn runs(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<Vec<Run>, DriverError> {
    let mut out: Vec<Run> = Vec::new();
    let mut push = |lo: u32, outcome: Outcome| {
        let merge = matches!(outcome, Outcome::Matched | Outcome::Mismatched)
            && out.last().is_some_and(|r| r.outcome == outcome);
        if !merge {
            out.push(Run { lo, outcome });
        }
    };
    let mut next: u64 = 0;
    for (nr, chain) in rules {
        let nr = u32::try_from(nr)
            .map_err(|_| DriverError::Other(format!("seccomp: syscall number {nr}")))?;
        if u64::from(nr) > next {
            push(next as u32, Outcome::Mismatched);
        }
        let outcome = if chain.is_empty() {
            Outcome::Matched
        } else {
            Outcome::Rules(chain)
        };
        push(nr, outcome);
        next = u64::from(nr) + 1;
    }
    if next <= u64::from(u32::MAX) {
        push(next as u32, Outcome::Mismatched);
    }
    Ok(out)
}

fn leaf(outcome: &Outcome, matched: u32, mismatched: u32) -> BpfProgram {
    match outcome {
        Outcome::Matched => vec![stmt(BPF_RET_K, matched)],
        Outcome::Mismatched => vec![stmt(BPF_RET_K, mismatched)],
        Outcome::Rules(chain) => {
            // As seccompiler lays out a syscall's chain: each rule is followed by the
            // matched return, and a rule that does not match jumps past it to the next
            // rule; after the last, the mismatched return.
            let mut p = Vec::new();
            for rule in chain {
                p.extend(BpfProgram::from(rule.clone()));
                p.push(stmt(BPF_RET_K, matched));
            }
            p.push(stmt(BPF_RET_K, mismatched));
            p
        }
    }
}

/// The search over `runs` (sorted, non-empty; the accumulator holds the number): a
/// single run is its leaf; otherwise numbers at or above the middle run's start go
/// right. Every jump is relative, so a subtree is placed anywhere as is.
fn tree(runs: &[Run], matched: u32, mismatched: u32) -> BpfProgram {
    let [first] = runs else {
        let mid = runs.len() / 2;
        let left = tree(&runs[..mid], matched, mismatched);
        let right = tree(&runs[mid..], matched, mismatched);
        let k = runs[mid].lo;
        let mut p = Vec::with_capacity(left.len() + right.len() + 2);
        match u8::try_from(left.len()) {
            Ok(n) => p.push(jump(BPF_JGE_K, k, n, 0)),
            Err(_) => {
                // A conditional jump reaches 255 instructions: jump over the left subtree
                // with an unconditional one instead.
                p.push(jump(BPF_JGE_K, k, 0, 1));
                p.push(stmt(BPF_JA, left.len() as u32));
            }
        }
        p.extend(left);
        p.extend(right);
        return p;
    };
    leaf(&first.outcome, matched, mismatched)
}

/// Compiles `rules` (syscall number → argument rules; empty = any arguments) into a
/// filter for this build's architecture: another architecture kills the process (as
/// seccompiler's filters do), a listed syscall whose rules match (or that has none)
/// returns `matched`, anything else `mismatched`.
pub(crate) fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatched: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, DriverError> {
    let (matched, mismatched) = (u32::from(matched), u32::from(mismatched));
    let mut p = vec![
        stmt(BPF_LD_W_ABS, DATA_ARCH),
        jump(BPF_JEQ_K, audit_arch()?, 1, 0),
        stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, DATA_NR),
    ];
    p.extend(tree(&runs(rules)?, matched, mismatched));
    if p.len() >= MAX_LEN {
        return Err(DriverError::Other(format!(
            "seccomp filter of {} instructions (the kernel takes {MAX_LEN})",
            p.len()
        )));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use seccompiler::{SeccompCmpOp, SeccompFilter};

    /// Runs a classic BPF seccomp program on `data` (`struct seccomp_data`: nr, arch,
    /// instruction pointer, six arguments); returns its return value and how many
    /// instructions ran. Panics on an instruction seccomp filters here do not use.
    fn run(prog: &[sock_filter], data: &[u8; 64]) -> (u32, usize) {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        let mut steps = 0;
        loop {
            let i = &prog[pc];
            steps += 1;
            pc += 1;
            let k = i.k;
            match i.code {
                0x20 => {
                    let o = k as usize;
                    a = u32::from_ne_bytes(data[o..o + 4].try_into().expect("4 bytes"));
                }
                0x54 => a &= k,
                0x05 => pc += k as usize,
                0x06 => return (k, steps),
                c if c & 0x07 == 0x05 => {
                    let taken = match c & 0xf0 {
                        0x10 => a == k,
                        0x20 => a > k,
                        0x30 => a >= k,
                        0x40 => a & k != 0,
                        op => panic!("jump op {op:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    fn data(arch: u32, nr: u32, args: [u64; 6]) -> [u8; 64] {
        let mut d = [0u8; 64];
        d[0..4].copy_from_slice(&nr.to_ne_bytes());
        d[4..8].copy_from_slice(&arch.to_ne_bytes());
        for (i, a) in args.iter().enumerate() {
            d[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        d
    }

    fn cond(arg: u8, op: SeccompCmpOp, v: u64) -> SeccompRule {
        crate::container::security::cond(arg, op, v).expect("rule")
    }

    /// A rule set shaped like the container's: a small hand-made one with every kind of
    /// run and rule, then the container's own.
    fn rule_sets() -> Vec<BTreeMap<i64, Vec<SeccompRule>>> {
        let small = BTreeMap::from([
            (0, vec![]),
            (1, vec![]),
            (3, vec![cond(0, SeccompCmpOp::MaskedEq(0xff00), 0)]),
            (4, vec![]),
            (
                9,
                vec![cond(1, SeccompCmpOp::Eq, 7), cond(0, SeccompCmpOp::Ne, 40)],
            ),
            (300, vec![]),
        ]);
        let container = crate::container::security::main_filter_rules().expect("rules");
        // Every other number up to 1,000: subtrees longer than a conditional jump reaches.
        let mut sparse: BTreeMap<i64, Vec<SeccompRule>> =
            (0..1000).step_by(2).map(|n| (n, vec![])).collect();
        sparse.insert(501, vec![cond(0, SeccompCmpOp::Eq, 7)]);
        vec![small, container, sparse]
    }

    /// Argument values that tell the container's rules apart.
    fn arg_values() -> Vec<u64> {
        let mut v = vec![0, 1, 2, 7, 17, 40, 0xff00, 0x11, u64::MAX, 0xffff_ffff];
        let ns = crate::container::security::NAMESPACE_FLAGS;
        v.extend(
            (0..64)
                .map(|b| 1u64 << b)
                .filter(|f| ns & f != 0)
                .map(|f| f | 0x11),
        );
        v.extend(crate::container::security::PERSONALITIES);
        v
    }

    /// For every syscall number (and the x32 and out-of-range ones), both
    /// architectures, and arguments that hit every rule, the tree returns what
    /// seccompiler's linear program returns, and a number is found in a dozen or so
    /// instructions where the linear program runs hundreds (592 for the container's
    /// list on x86_64).
    #[test]
    fn the_tree_decides_like_the_linear_program() {
        let arch = audit_arch().expect("arch");
        let other_arch = 3 | 0x4000_0000; // AUDIT_ARCH_I386
        let eperm = SeccompAction::Errno(libc::EPERM as u32);
        for rules in rule_sets() {
            let linear: BpfProgram = SeccompFilter::new(
                rules.clone(),
                eperm.clone(),
                SeccompAction::Allow,
                std::env::consts::ARCH.try_into().expect("target arch"),
            )
            .expect("filter")
            .try_into()
            .expect("compile");
            let tree = compile(rules.clone(), eperm.clone(), SeccompAction::Allow).expect("tree");
            let mut numbers: Vec<u32> = (0..1100).collect();
            numbers.extend([
                0x4000_0000,
                0x4000_0001,
                0x4000_0101,
                0x7fff_ffff,
                0x8000_0000,
            ]);
            numbers.push(u32::MAX);
            let mut worst = (0, 0);
            for &a in &[arch, other_arch] {
                for &nr in &numbers {
                    let with_rules = rules.get(&i64::from(nr)).is_some_and(|r| !r.is_empty());
                    let args: Vec<u64> = if with_rules { arg_values() } else { vec![0] };
                    for &x in &args {
                        for &y in &[0u64, 7] {
                            let d = data(a, nr, [x, y, 0, 0, 0, 0]);
                            let (want, lsteps) = run(&linear, &d);
                            let (got, tsteps) = run(&tree, &d);
                            assert_eq!(got, want, "arch {a:#x} nr {nr} args {x:#x} {y:#x}");
                            if !with_rules && a == arch {
                                worst = (worst.0.max(lsteps), worst.1.max(tsteps));
                            }
                        }
                    }
                }
            }
            assert!(tree.len() < MAX_LEN);
            if rules.len() > 400 {
                assert!(
                    tree.iter().any(|i| i.code == BPF_JA),
                    "the long-jump form is exercised"
                );
            }
            eprintln!(
                "{} syscalls: linear {} instructions, tree {}",
                rules.len(),
                linear.len(),
                tree.len()
            );
            eprintln!(
                "instructions run at most: linear {}, tree {}",
                worst.0, worst.1
            );
            if rules.len() > 100 {
                assert!(
                    worst.1 <= 32 && worst.0 > 10 * worst.1,
                    "instructions run at most: linear {}, tree {}",
                    worst.0,
                    worst.1
                );
                // The container's list has long runs of allowed numbers; the sparse one
                // has none to merge.
                assert!(
                    rules.len() > 400 || tree.len() * 2 < linear.len(),
                    "{} vs {}",
                    tree.len(),
                    linear.len()
                );
            }
        }
    }

    /// Runs and merging: gaps refuse, neighbours with the same plain outcome merge, a
    /// syscall with rules is a run of its own, and the last run reaches `u32::MAX`.
    #[test]
    fn runs_cover_every_number_once() {
        let r = runs(BTreeMap::from([
            (0, vec![]),
            (1, vec![]),
            (3, vec![cond(0, SeccompCmpOp::Eq, 1)]),
            (4, vec![]),
        ]))
        .expect("runs");
        let got: Vec<(u32, &str)> = r
            .iter()
            .map(|r| {
                let o = match r.outcome {
                    Outcome::Matched => "allow",
                    Outcome::Mismatched => "deny",
                    Outcome::Rules(_) => "rules",
                };
                (r.lo, o)
            })
            .collect();
        assert_eq!(
            got,
            [
                (0, "allow"),
                (2, "deny"),
                (3, "rules"),
                (4, "allow"),
                (5, "deny")
            ]
        );
        assert!(runs(BTreeMap::from([(-1, vec![])])).is_err());
    }
}
