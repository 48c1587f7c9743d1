#!/usr/bin/env bash
# Benchmark (not a timed test): the export issue's builds of one app, to a local docker-registry
# on 127.0.0.1 with its storage on /dev/shm: the first build (empty registry, no previous image,
# no cache), the rebuild of the unchanged app, the rebuild after a one-file change, and the
# rebase onto a new run image. For each: the median wall time over RUNS rounds, the bytes lathe
# wrote (`--json`'s image.bytes_written) and the blob uploads the registry answered. The store
# is warm (the build image unpacked once, before the rounds), as on a CI runner that keeps it.
# Targets: unchanged rebuild <= 25% of the first build and 0 new layer bytes; rebase 0 layer
# bytes (its one upload is the new config; the new run image's layer is mounted). SIZE_MB sets the app's size (CI uses a reduced one).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
size_mb=${SIZE_MB:-64}
cargo build --release --locked --quiet --bin lathe --example mkimage
lathe=$PWD/target/release/lathe
work=$(mktemp -d -p /dev/shm lathe-exportbench.XXXXXX)
source benches/registry-lib.sh
trap 'stop_registry; rm -rf "$work"' EXIT
MKIMAGE=$PWD/target/release/examples/mkimage bash testdata/make-base-images.sh "$work/images" >/dev/null
images=$work/images

# The run image is on the registry, as in production; its tag moves to a new run image (one
# more layer, made with umoci) before each rebase and back after it.
"$lathe" copy --quiet "oci:$images:run-linux-amd64" "oci:$work/run:new"
echo 2 > "$work/run-version"
umoci insert --rootless --image "$work/run:new" "$work/run-version" /etc/run-version >/dev/null
run=docker://$reg/bench/run:1
push_run() { "$lathe" copy --quiet "$1" "$run"; }

# The app: the static site with SIZE_MB of incompressible files in public/, 256 KiB each.
cp -a testdata/apps/site "$work/app"
mkdir -p "$work/app/public/assets"
for i in $(seq $((size_mb * 4))); do
  head -c 262144 /dev/urandom > "$work/app/public/assets/file-$i.bin"
done
image=docker://$reg/bench/app:1
build() {
  "$lathe" build "$work/app" --build-image "oci:$images:build" --run-image "$run" \
    --buildpack testdata/buildpacks/static-site --output "$image" --store "$work/store" \
    --json --quiet > "$work/out.json" 2> "$work/err" || { cat "$work/err" >&2; exit 1; }
}
# Blob uploads the registry answered (cross-repository mounts are not uploads).
uploads() { grep 'response completed' "$work/registry.log" | grep 'method=POST' | grep 'blobs/uploads' | grep -vc 'mount=' || true; }

# step NAME CMD: runs CMD timed; appends "seconds bytes uploads" to $work/NAME.
step() {
  local name=$1 before after bytes
  before=$(uploads)
  /usr/bin/time -f '%e' -o "$work/t" bash -c "$2"
  after=$(uploads)
  bytes=$(python3 -c 'import json,sys; d = json.load(open(sys.argv[1])); print(d.get("image", d)["bytes_written"])' "$work/out.json" 2>/dev/null || echo 0)
  echo "$(cat "$work/t") $bytes $((after - before))" >> "$work/$name"
}
median() { cut -d' ' -f"$2" "$work/$1" | sort -n | sed -n "$(( (runs + 1) / 2 ))p"; }

rebase() {
  "$lathe" rebase "$image" --json --quiet > "$work/out.json" 2> "$work/err" || { cat "$work/err" >&2; exit 1; }
}
start_registry wipe
push_run "oci:$images:run-linux-amd64"
build # warms the store: the build image is unpacked once
export -f build rebase
export lathe work images image run
for _ in $(seq "$runs"); do
  start_registry wipe
  push_run "oci:$images:run-linux-amd64"
  rm -f "$work/app/public/assets/changed.txt"
  step first build
  step unchanged build
  date +%s%N > "$work/app/public/assets/changed.txt"
  step one-file build
  push_run "oci:$work/run:new"
  step rebase rebase
done

echo "App: $size_mb MB in $(( size_mb * 4 + 2 )) files; $runs rounds; registry on $reg, storage on /dev/shm; warm store"
printf '  %-18s %8s %14s %14s\n' step seconds "bytes written" "blob uploads"
for name in first unchanged one-file rebase; do
  printf '  %-18s %8.2f %14d %14d\n' "$name" "$(median "$name" 1)" "$(median "$name" 2)" "$(median "$name" 3)"
done
awk -v a="$(median unchanged 1)" -v b="$(median first 1)" \
  'BEGIN { printf "  unchanged rebuild / first build = %.2f (target <= 0.25)\n", a / b }'
echo "  unchanged rebuild layer bytes written: $(median unchanged 2) (target 0)"
echo "  rebase bytes written: $(median rebase 2), blob uploads: $(median rebase 3) (target: no layer bytes; the new config is the one upload)"
