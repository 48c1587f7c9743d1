#!/usr/bin/env bash
# Benchmark (not a timed test): lathe vs skopeo against a local docker-registry on 127.0.0.1
# with its storage on /dev/shm, on the synthetic image. Push to an empty registry (restarted
# with wiped storage before every run), re-push of the unchanged image, and pull into an OCI
# layout; lathe and skopeo run in alternation (so load changes fall on both alike), median
# of RUNS wall times each, printed side by side as ratios, with the HTTP requests
# each side made (counted in the registry's log). SIZE_MB=20 SMALL_FILES=2000 gives the
# reduced size CI uses.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
cargo build --release --locked --quiet --bin lathe --example mkimage
lathe=$PWD/target/release/lathe
work=$(mktemp -d -p /dev/shm lathe-regbench.XXXXXX)
trap 'stop_registry; rm -rf "$work"' EXIT
MKIMAGE=$PWD/target/release/examples/mkimage bash testdata/make-synthetic-image.sh "$work/img"
img=$work/img

source benches/registry-lib.sh

# run_once NAME CMD: one timed run, its wall seconds appended to $work/NAME.times and its HTTP
# requests kept in $work/NAME.requests.
run_once() {
  local name=$1 cmd=$2 before after
  before=$(requests)
  /usr/bin/time -f '%e' -o "$work/t" bash -c "$cmd" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
  after=$(requests)
  cat "$work/t" >> "$work/$name.times"
  echo "$((after - before))" > "$work/$name.requests"
}
# summarize NAME: the median over its runs, and the HTTP requests of the last run.
summarize() {
  local name=$1 median requests
  median=$(sort -n "$work/$name.times" | sed -n "$(( (runs + 1) / 2 ))p")
  requests=$(cat "$work/$name.requests")
  printf '%s %s %s\n' "$name" "$median" "$requests" >> "$work/results"
  printf '  %-22s %8.2f s  %6d HTTP requests\n' "$name" "$median" "$requests"
}
# compare A B PREP CMD_A CMD_B: $runs rounds of A then B, PREP (untimed) before each run, so
# that changes in the machine's load fall on both tools alike; then both medians.
compare() {
  local a=$1 b=$2 prep=$3 cmd_a=$4 cmd_b=$5
  rm -f "$work/$a.times" "$work/$b.times"
  for _ in $(seq "$runs"); do
    eval "$prep"
    run_once "$a" "$cmd_a"
    eval "$prep"
    run_once "$b" "$cmd_b"
  done
  summarize "$a"
  summarize "$b"
}
field() { grep "^$1 " "$work/results" | cut -d' ' -f"$2"; }
ratio() { awk -v a="$(field "$1" 2)" -v b="$(field "$2" 2)" 'BEGIN { printf "%.2f", a / b }'; }

size=$(du -sm "$img/blobs" | cut -f1)
echo "Synthetic image: $size MB of blobs; $runs runs each; registry on $reg, storage on /dev/shm"
echo "Push to an empty registry:"
compare lathe-push skopeo-push "start_registry wipe" \
  "$lathe copy --quiet oci:$img:synthetic docker://$reg/bench/lathe:v1" \
  "skopeo copy --all --dest-tls-verify=false oci:$img:synthetic docker://$reg/bench/skopeo:v1"
echo "  lathe/skopeo = $(ratio lathe-push skopeo-push) (target <= 0.8)"

echo "Re-push of the unchanged image:"
start_registry wipe
"$lathe" copy --quiet "oci:$img:synthetic" "docker://$reg/bench/lathe:v1"
skopeo copy --quiet --all --dest-tls-verify=false "oci:$img:synthetic" "docker://$reg/bench/skopeo:v1"
compare lathe-repush skopeo-repush "" \
  "$lathe copy --quiet oci:$img:synthetic docker://$reg/bench/lathe:v1" \
  "skopeo copy --all --dest-tls-verify=false oci:$img:synthetic docker://$reg/bench/skopeo:v1"
echo "  lathe re-push / lathe push = $(ratio lathe-repush lathe-push) (target <= 0.05); lathe/skopeo = $(ratio lathe-repush skopeo-repush)"

echo "Pull into an OCI layout:"
compare lathe-pull skopeo-pull "rm -rf $work/out" \
  "$lathe copy --quiet docker://$reg/bench/lathe:v1 oci:$work/out:x" \
  "skopeo copy --all --src-tls-verify=false docker://$reg/bench/lathe:v1 oci:$work/out:x"
echo "  lathe/skopeo = $(ratio lathe-pull skopeo-pull) (target <= 0.8)"
