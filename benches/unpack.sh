#!/usr/bin/env bash
# Benchmark (not a timed test): lathe unpack vs umoci unpack --rootless vs tar -xzf on the
# synthetic image, and lathe's gzip/zstd layer writing vs the same compressors on the command
# line; median of RUNS wall times and peak RSS, printed side by side as ratios. Runs on tmpfs.
# SIZE_MB=20 SMALL_FILES=2000 gives the reduced size CI uses.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
cargo build --release --locked --quiet --bin lathe --example mkimage
lathe=$PWD/target/release/lathe
work=$(mktemp -d -p /dev/shm lathe-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
MKIMAGE=$PWD/target/release/examples/mkimage bash testdata/make-synthetic-image.sh "$work/img"
img=$work/img
layers=$(jq -r '.layers[].digest | sub("sha256:"; "")' "$img/blobs/sha256/$(jq -r '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"]=="synthetic-linux-amd64") | .digest | sub("sha256:"; "")' "$img/index.json")")

# measure NAME CMD...: median wall seconds and max peak RSS (MB) over $runs runs; each run
# starts from an empty $work/out.
measure() {
  local name=$1; shift
  local times=() rss=0
  for _ in $(seq "$runs"); do
    rm -rf "$work/out"; mkdir -p "$work/out"
    /usr/bin/time -f '%e %M' -o "$work/t" bash -c "$*" >/dev/null 2>&1
    read -r t m < "$work/t"; times+=("$t"); [ "$m" -gt "$rss" ] && rss=$m
  done
  local median
  median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (runs + 1) / 2 ))p")
  printf '%s %s %s\n' "$name" "$median" "$((rss / 1024))" >> "$work/results"
  printf '  %-28s %8.2f s  %6d MB peak RSS\n' "$name" "$median" "$((rss / 1024))"
}
ratio() { awk -v a="$(grep "^$1 " "$work/results" | cut -d' ' -f2)" -v b="$(grep "^$2 " "$work/results" | cut -d' ' -f2)" 'BEGIN { printf "%.2f", a / b }'; }

size=$(du -sm "$img" | cut -f1)
echo "Synthetic image: $size MB in the layout; $runs runs each, on /dev/shm"
echo "Unpack:"
measure lathe-unpack "$lathe unpack oci:$img:synthetic $work/out/root"
measure umoci-rootless "umoci unpack --rootless --image $img:synthetic-linux-amd64 $work/out/b"
tar_cmd=""; for l in $layers; do tar_cmd+="tar -xzf $img/blobs/sha256/$l -C $work/out; "; done
measure tar-xzf "$tar_cmd"
echo "  lathe/umoci = $(ratio lathe-unpack umoci-rootless) (target <= 0.5), lathe/tar = $(ratio lathe-unpack tar-xzf) (target <= 1.2)"

echo "Layer writing (the whole unpacked image as one layer):"
rm -rf "$work/tree"; mkdir -p "$work/tree"; "$lathe" unpack "oci:$img:synthetic" "$work/tree/root" >/dev/null 2>&1
measure lathe-gzip6 "$PWD/target/release/examples/mkimage --output oci:$work/out/l:x --image linux/amd64 --layer $work/tree/root"
measure tar-gzip6 "tar -C $work/tree/root --sort=name -cf - . | gzip -6 | sha256sum"
echo "  lathe/gzip = $(ratio lathe-gzip6 tar-gzip6) (target <= 1.1)"
measure lathe-zstd3 "$PWD/target/release/examples/mkimage --compression zstd:3 --output oci:$work/out/l:x --image linux/amd64 --layer $work/tree/root"
measure tar-zstd3 "tar -C $work/tree/root --sort=name -cf - . | zstd -q -3 -T0 | sha256sum"
echo "  lathe/zstd = $(ratio lathe-zstd3 tar-zstd3) (target <= 1.1)"
echo "Peak RSS targets: unpack and write under 64 MB."
