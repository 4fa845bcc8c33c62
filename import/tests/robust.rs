//! Malformed input never panics: every prefix of every fixture guest config, and
//! pseudo-random byte edits of them, go through the reader and the mappers, which
//! answer with errors or a report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use stead_import::network::NetInfo;
use stead_import::qemu::{Ctx, GuestFile, import_vm};
use stead_import::storage::Pool;
use stead_import::{lxc, reader};
use stead_schema::{Content, PoolType};

fn configs() -> Vec<(bool, PathBuf, Vec<u8>)> {
    let node = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pve1/etc/pve/nodes/pve1");
    let mut out = Vec::new();
    for (sub, is_vm) in [("qemu-server", true), ("lxc", false)] {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(node.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        for p in paths {
            let bytes = std::fs::read(&p).unwrap();
            out.push((is_vm, p, bytes));
        }
    }
    out
}

fn run(is_vm: bool, path: &Path, bytes: &[u8], ctx: &Ctx) {
    let Ok(text) = reader::decode(path, bytes) else {
        return;
    };
    let Ok(conf) = reader::parse_guest(path, &text) else {
        return;
    };
    let g = GuestFile {
        vmid: 100,
        node: "pve1".into(),
        path: path.to_path_buf(),
        conf,
    };
    let _ = if is_vm {
        import_vm(&g, "g", ctx)
    } else {
        lxc::import_ct(&g, "g", ctx)
    };
}

fn with_ctx(f: impl FnOnce(&Ctx)) {
    let mut pools = BTreeMap::new();
    for (id, t) in [
        ("local", PoolType::Dir),
        ("local-lvm", PoolType::Lvmthin),
        ("vmstore", PoolType::Dir),
        ("tank", PoolType::Zfs),
    ] {
        let content = vec![Content::Images, Content::Rootdir, Content::Iso];
        pools.insert(
            id.to_string(),
            Pool {
                id: id.into(),
                name: id.into(),
                pool_type: t,
                path: "/srv/x".into(),
                content,
            },
        );
    }
    let mut networks = BTreeMap::new();
    networks.insert(
        "vmbr0".to_string(),
        NetInfo {
            name: "vmbr0".into(),
            vlan_aware: true,
            addresses: vec![],
        },
    );
    let names = BTreeMap::new();
    let ctx = Ctx {
        pools: &pools,
        networks: &networks,
        volume_names: &names,
        root: Path::new("/nonexistent"),
    };
    f(&ctx);
}

#[test]
fn every_prefix_is_handled() {
    with_ctx(|ctx| {
        for (is_vm, path, bytes) in configs() {
            for n in 0..=bytes.len() {
                run(is_vm, &path, &bytes[..n], ctx);
            }
        }
    });
}

#[test]
fn random_edits_are_handled() {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    const BYTES: &[u8] = b":,=[]# \n\t%/.-0123456789abcz\x00\xff";
    with_ctx(|ctx| {
        for (is_vm, path, bytes) in configs() {
            for _ in 0..300 {
                let mut b = bytes.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % b.len().max(1);
                    let with = BYTES[(next() as usize) % BYTES.len()];
                    match next() % 3 {
                        0 if !b.is_empty() => b[at] = with,
                        1 => b.insert(at.min(b.len()), with),
                        _ if !b.is_empty() => {
                            b.remove(at);
                        }
                        _ => {}
                    }
                }
                run(is_vm, &path, &b, ctx);
            }
        }
    });
}
