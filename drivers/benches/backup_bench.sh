#!/usr/bin/env bash
# Backup / restore throughput on 1 GiB of mixed data (random + text-like + zeros), next to
# `zstd -T0` and `tar | zstd -T0` on the same data in the same run. Prints MB/s (10^6 B/s).
#
#   drivers/benches/backup_bench.sh [SIZE_MIB] [WORKDIR]
#
# Builds the standalone backup CLI (drivers/examples/backup_cli.rs) in release mode.
set -euo pipefail
SIZE_MIB=${1:-1024}
WORK=${2:-$(mktemp -d /var/tmp/stead-backup-bench.XXXXXX)}
cd "$(dirname "$0")/../.."
cargo build --release -q -p stead-drivers --example backup_cli
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
BIN="$TARGET_DIR/release/examples/backup_cli"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK"
DATA="$WORK/data.raw"

# Mixed data in 4 MiB blocks: 1/3 random, 1/3 text-like (skewed alphabet), 1/3 zeros.
python3 - "$DATA" "$SIZE_MIB" <<'PY'
import os, sys, random
path, mib = sys.argv[1], int(sys.argv[2])
random.seed(42)
alphabet = (b"e" * 12 + b"t" * 9 + b"a" * 8 + b"o" * 8 + b"i" * 7 + b"n" * 7 + b" " * 18
            + b"s" * 6 + b"h" * 6 + b"r" * 6 + b"d" * 4 + b"l" * 4 + b"\n" * 3 + b"cumwfgypb,.")
table = bytes(alphabet[i % len(alphabet)] for i in range(256))
blk = 4 << 20
with open(path, "wb") as f:
    for i in range(mib // 4):
        k = random.randrange(3)
        if k == 0:
            f.write(os.urandom(blk))
        elif k == 1:
            f.write(os.urandom(blk).translate(table))
        else:
            f.write(bytes(blk))
PY
BYTES=$(stat -c %s "$DATA")
cat "$DATA" > /dev/null   # same (warm) page cache for everyone

now() { date +%s.%N; }
rate() { python3 -c "import sys; b,t=float(sys.argv[1]),float(sys.argv[2]); print(f'{b/t/1e6:8.1f} MB/s  ({t:6.2f} s)')" "$1" "$2"; }
timeit() { local s e; s=$(now); "$@" > /dev/null; e=$(now); python3 -c "print($e-$s)"; }

printf '%-44s %s\n' "data" "$BYTES bytes ($SIZE_MIB MiB: random/text/zeros)"
T=$(timeit sh -c "zstd -q -T0 -c '$DATA' > '$WORK/data.zst'"); printf '%-44s %s\n' "zstd -T0 (level 3) -> file" "$(rate $BYTES $T)"
T=$(timeit sh -c "zstd -q -1 -T0 -c '$DATA' > '$WORK/data1.zst'"); printf '%-44s %s\n' "zstd -1 -T0 -> file" "$(rate $BYTES $T)"
T=$(timeit sh -c "tar -C '$WORK' -cf - data.raw | zstd -q -T0 > '$WORK/data.tar.zst'"); printf '%-44s %s\n' "tar | zstd -T0 -> file" "$(rate $BYTES $T)"
T=$(timeit sh -c "zstd -q -d -T0 -c '$WORK/data.zst' > '$WORK/unzstd.raw'"); printf '%-44s %s\n' "zstd -d (restore reference) -> file" "$(rate $BYTES $T)"
rm -f "$WORK/unzstd.raw" "$WORK/data1.zst"

T=$(timeit "$BIN" run --path "disk=$DATA" --name Volume/bench -s "$WORK/pool"); printf '%-44s %s\n' "stead backup (first, zstd -1, chunks+fsync)" "$(rate $BYTES $T)"
T=$(timeit "$BIN" run --path "disk=$DATA" --name Volume/bench -s "$WORK/pool"); printf '%-44s %s\n' "stead backup (second, unchanged: not read)" "$(rate $BYTES $T)"
T=$(timeit "$BIN" run --path "disk=$DATA" --name Volume/bench -s "$WORK/pool" --reread); printf '%-44s %s\n' "stead backup (second, unchanged, --reread)" "$(rate $BYTES $T)"
# One 4 KiB write in the middle: the file is read again, one chunk is new.
python3 -c "import os,sys; f=os.open(sys.argv[1], os.O_WRONLY); os.pwrite(f, os.urandom(4096), (int(sys.argv[2])//2) & ~4095); os.close(f)" "$DATA" "$BYTES"
sleep 2.1   # past the racy window, as a scheduled backup would be
T=$(timeit "$BIN" run --path "disk=$DATA" --name Volume/bench -s "$WORK/pool"); printf '%-44s %s\n' "stead backup (after a 4 KiB change)" "$(rate $BYTES $T)"
T=$(timeit "$BIN" verify Volume/bench -s "$WORK/pool"); printf '%-44s %s\n' "stead verify" "$(rate $BYTES $T)"
T=$(timeit "$BIN" restore Volume/bench --to "$WORK/restore" -s "$WORK/pool"); printf '%-44s %s\n' "stead restore (checked, sparse)" "$(rate $BYTES $T)"
cmp "$DATA" "$WORK/restore/disk" && echo "restore: bit-identical"
printf '%-44s %s\n' "sizes: zstd -T0 / tar|zstd / stead store" \
  "$(stat -c %s "$WORK/data.zst") / $(stat -c %s "$WORK/data.tar.zst") / $(du -sb "$WORK/pool/backups/.chunks" | cut -f1)"
