#!/usr/bin/env bash
# Makes the synthetic benchmark image into the OCI layout OUTDIR under ref "synthetic": three
# layers with ~20k small files, a few large ones, symlinks, hardlinks and whiteouts of files from lower
# layers. SIZE_MB (default 200) scales the large files; the data is pseudo-random but fixed
# (seeded), so the image is the same on every run.
#
# Usage: testdata/make-synthetic-image.sh OUTDIR
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
size_mb=${SIZE_MB:-200}
small=${SMALL_FILES:-20000}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1"; out=$(cd "$1" && pwd)
if [ -d /dev/shm ] && [ -w /dev/shm ]; then tmp=$(mktemp -d -p /dev/shm); else tmp=$(mktemp -d); fi
trap 'rm -rf "$tmp"' EXIT

python3 - "$tmp" "$size_mb" "$small" <<'PY'
import os, random, sys
root, size_mb, small = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(20261121)
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz ") for _ in range(rng.randint(3, 12))) for _ in range(4096)]
def text(n):  # compressible, like source code and configs
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])
l1, l2, l3 = (os.path.join(root, f"layer{i}") for i in (1, 2, 3))
for i in range(small):
    d = os.path.join(l1, "app", f"pkg{i // 200:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"file{i:05d}.txt"), "wb") as f:
        f.write(text(rng.randint(200, 6000)))
big = os.path.join(l2, "data")
os.makedirs(big)
n_big = 4
for i in range(n_big):  # half random (incompressible), half text
    with open(os.path.join(big, f"blob{i}.bin"), "wb") as f:
        per = size_mb * 1024 * 1024 // n_big
        f.write(rng.randbytes(per // 2) + text(per // 2))
for i in range(200):
    os.symlink(f"../app/pkg{i % 100:03d}/file{i * 7:05d}.txt", os.path.join(big, f"link{i:03d}"))
for j in range(1, 1000, 20):  # hardlinks within a layer: small files, and one large one
    d = os.path.join(l1, "app", f"pkg{j // 200:03d}")
    os.link(os.path.join(d, f"file{j:05d}.txt"), os.path.join(d, f"same{j:05d}.txt"))
os.link(os.path.join(big, "blob1.bin"), os.path.join(big, "blob1-again.bin"))
for i in range(0, 2000, 10):  # whiteouts of lower-layer files, and one opaque dir
    d = os.path.join(l3, "app", f"pkg{i // 200:03d}")
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, f".wh.file{i:05d}.txt"), "wb").close()
os.makedirs(os.path.join(l3, "app", "pkg050"), exist_ok=True)
open(os.path.join(l3, "app", "pkg050", ".wh..wh..opq"), "wb").close()
with open(os.path.join(l3, "app", "pkg050", "replaced.txt"), "wb") as f:
    f.write(text(1000))
PY
read -r -a mkimage <<< "${MKIMAGE:-cargo run --quiet --release --example mkimage --}"
cd "$here/.."
"${mkimage[@]}" --output "oci:$out:synthetic" --image linux/amd64 \
  --layer "$tmp/layer1" --layer "$tmp/layer2" --layer "$tmp/layer3" >/dev/null
