#!/usr/bin/env bash
# Benchmark (not a timed test): issue 9's multi-arch build. One app (testdata/apps/multiarch-app)
# with an exec-heavy build step (testdata/buildpacks/exec-heavy: EXECS runs of /bin/echo,
# 2000 unless set), built
# - by lathe for linux/amd64, and for linux/amd64,linux/arm64 with --cross-strategy auto (the
#   default), onto the fixture run image (an index) on a local docker-registry on 127.0.0.1
#   with its storage on /dev/shm; each build into a registry emptied and given the run image
#   again, so the counts are the blobs that build uploaded and their bytes;
# - by buildah 1.28 from the equivalent Containerfile (FROM the fixture run image, COPY the
#   app, one RUN of the same loop): `buildah bud --platform ... --manifest`, then `buildah
#   manifest push --all` to an oci-archive, arm64 under qemu-aarch64-static. Rootless: in a
#   user and mount namespace of its own (ids 0-65535: root's own ids when run as root, as
#   lathe's sandbox maps them; else the caller as root and its /etc/subuid and /etc/subgid
#   range, as `unshare --map-auto --map-root-user`, rootless buildah's usual map), where it
#   mounts a binfmt_misc of its own and registers qemu there with flags PF (nothing is
#   registered on the host); vfs storage and chroot isolation, so no OCI runtime, fuse or
#   cgroup is needed. buildah reads the run image straight from the OCI layout (`FROM
#   oci:DIR:run`, the index: it picks each platform's child), which works rootless and needs
#   no copy into containers-storage first.
# Median wall time over RUNS rounds (3 unless set); in each round the four builds run in turn,
# so changes in the machine's load fall on both tools alike. Both start warm, as on a CI
# runner that keeps them: one build of each before the rounds puts the build image in lathe's
# store and the base images in buildah's storage.
# Targets: lathe two platforms / one platform <= 1.3; buildah / lathe for two platforms >= 10.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
execs=${EXECS:-2000}
cargo build --release --locked --quiet --bin lathe --example mkimage
lathe=$PWD/target/release/lathe
qemu=$(command -v qemu-aarch64-static) ||
  { echo "needs qemu-aarch64-static (bash .ci/install)" >&2; exit 1; }
command -v buildah >/dev/null || { echo "needs buildah (bash .ci/install)" >&2; exit 1; }
# Lower case: buildah names the image it reads from oci:DIR after DIR, and names must be.
work=$(mktemp -u -p /dev/shm lathe-multiarchbench.XXXXXX)
work=${work,,}
mkdir -m 700 "$work"
source benches/registry-lib.sh

# in_userns CMD...: CMD as root of a new user and mount namespace mapping ids 0-65535 (see
# the top). Root gets the identity map from a parent that writes it (util-linux's unshare
# maps more than one id only through newuidmap, which wants /etc/subuid ranges root lacks).
if [ "$(id -u)" = 0 ]; then
  in_userns() {
    python3 -c '
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
unshared_r, unshared_w = os.pipe()
mapped_r, mapped_w = os.pipe()
pid = os.fork()
if pid == 0:
    if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
        sys.exit("unshare: " + os.strerror(ctypes.get_errno()))
    os.write(unshared_w, b"u")
    if os.read(mapped_r, 1) != b"m":
        sys.exit("the id maps were not written")
    os.execvp(sys.argv[1], sys.argv[1:])
if os.read(unshared_r, 1) == b"u":
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write("0 0 65536\n")
    os.write(mapped_w, b"m")
os.close(mapped_w)
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
' "$@"
  }
else
  in_userns() { unshare --user --map-auto --map-root-user --mount "$@"; }
fi
# buildah's storage belongs to ids of the namespace: only its root can remove it.
trap 'stop_registry; [ -d "$work/buildah" ] && in_userns rm -rf "$work/buildah"; rm -rf "$work"' EXIT

MKIMAGE=$PWD/target/release/examples/mkimage bash testdata/make-base-images.sh "$work/images" >/dev/null
images=$work/images
app=testdata/apps/multiarch-app

# buildah's side: the Containerfile (the RUN loop is exec-heavy's bin/build's), its storage
# and temporary files under $work, and the script that runs in the namespace.
mkdir -p "$work/context" "$work/buildah/tmp"
cp -a "$app" "$work/context/app"
# buildah names an image it reads from oci:DIR after DIR alone, so the two platforms of one
# index would take each other's name in its storage and be imported again on every build:
# each platform's run image gets a layout of its own (a copy: the same blobs and digests).
for arch in amd64 arm64; do
  "$lathe" copy --quiet "oci:$images:run-linux-$arch" "oci:$work/run-$arch:run"
done
cat > "$work/context/Containerfile" <<EOF
ARG TARGETARCH
FROM oci:$work/run-\$TARGETARCH:run
ARG EXECS=2000
COPY --chown=1001:1000 app /workspace
RUN i=0; while [ "\$i" -lt "\$EXECS" ]; do /bin/echo "line \$i"; i=\$((i + 1)); done > /workspace/echoes.txt
EOF
cat > "$work/buildah/storage.conf" <<EOF
[storage]
driver = "vfs"
runroot = "$work/buildah/run"
graphroot = "$work/buildah/graph"
EOF
cat > "$work/buildah/build.sh" <<EOF
set -eu
mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:$qemu:PF' \
  > /proc/sys/fs/binfmt_misc/register
export CONTAINERS_STORAGE_CONF=$work/buildah/storage.conf TMPDIR=$work/buildah/tmp
# A manifest list of an earlier round would be added to, not replaced. Its name is qualified:
# buildah run by a user other than root did not find the short name "bench" again.
buildah manifest rm localhost/bench >/dev/null 2>&1 || true
[ "\$1" = prepare ] && exit
# --pull=false: the base images the warm-up imported, as lathe's store keeps its build image.
buildah bud --isolation chroot --pull=false --platform "\$1" --build-arg EXECS=$execs \
  --manifest localhost/bench -f "$work/context/Containerfile" "$work/context"
buildah manifest push --all localhost/bench "oci-archive:$work/buildah/out.tar"
EOF

run=docker://$reg/bench/run:1
prepare_registry() {
  start_registry wipe
  "$lathe" copy --quiet "oci:$images:run" "$run"
}
lathe_build() {
  "$lathe" build "$app" --build-image "oci:$images:build" --run-image "$run" \
    --buildpack testdata/buildpacks/exec-heavy --env "EXECS=$execs" \
    --platform "$1" --cross-strategy auto --output "docker://$reg/bench/app:1" \
    --store "$work/store" --json --quiet > "$work/lathe.json"
}
buildah_build() { in_userns sh "$work/buildah/build.sh" "$1"; }

# step NAME PREP CMD: PREP untimed, then CMD timed (its output in $work/NAME.log, shown when
# it fails); appends "seconds blobs bytes" to $work/NAME: for lathe the blob uploads the
# registry completed and their bytes, for buildah the blobs in its oci-archive and its size.
step() {
  local name=$1 mark start end counts
  eval "$2" > "$work/prep.log" 2>&1 || { cat "$work/prep.log" >&2; exit 1; }
  mark=$(log_mark)
  rm -f "$work/buildah/out.tar"
  start=$(date +%s%N)
  eval "$3" > "$work/$name.log" 2>&1 || { cat "$work/$name.log" >&2; exit 1; }
  end=$(date +%s%N)
  if [ -f "$work/buildah/out.tar" ]; then
    counts="$(tar -tf "$work/buildah/out.tar" | grep -c '^blobs/sha256/.')"
    counts+=" $(stat -c %s "$work/buildah/out.tar")"
  else
    counts=$(pushed_since "$mark")
  fi
  echo "$(awk -v n=$((end - start)) 'BEGIN { printf "%.2f", n / 1e9 }') $counts" >> "$work/$name"
}
median() { cut -d' ' -f"$2" "$work/$1" | sort -n | sed -n "$(((runs + 1) / 2))p"; }

two=linux/amd64,linux/arm64
# Warm-up: lathe's store gets the build image, buildah's storage the base images.
step warmup-lathe prepare_registry "lathe_build $two"
step warmup-buildah "buildah_build prepare" "buildah_build $two"
rm -f "$work"/warmup-*
for _ in $(seq "$runs"); do
  step lathe-one prepare_registry "lathe_build linux/amd64"
  step lathe-two prepare_registry "lathe_build $two"
  step buildah-one "buildah_build prepare" "buildah_build linux/amd64"
  step buildah-two "buildah_build prepare" "buildah_build $two"
done
# What lathe's last two-platform build did: the platforms of its index and how each got its
# layers (auto must have chosen reuse: the buildpack's output holds no ELF program).
jq -r '"  lathe two platforms: cross strategy \(.cross_strategy.strategy); " +
  ([.platforms[] | "\(.platform) \(.layers_from)"] | join(", "))' "$work/lathe.json"
"$lathe" inspect --json "oci-archive:$work/buildah/out.tar" |
  jq -r '"  buildah two platforms: " + ([.images[].platform] | join(", "))'

echo "App: $app, a build step of $execs execs; median of $runs rounds; registry on $reg;"
echo "everything on /dev/shm; lathe's store and buildah's storage warm"
printf '  %-34s %8s %8s %10s\n' "" seconds blobs bytes
for name in lathe-one lathe-two buildah-one buildah-two; do
  case $name in
    *-one) platforms=linux/amd64 ;;
    *) platforms=$two ;;
  esac
  printf '  %-34s %8.2f %8d %10d\n' "${name%-*} $platforms" \
    "$(median "$name" 1)" "$(median "$name" 2)" "$(median "$name" 3)"
done
echo "  (lathe: the blobs it uploaded to the registry, which has the run image, and their bytes;"
echo "  buildah: the blobs in its oci-archive, base layers included, and the archive's size)"
awk -v a="$(median lathe-two 1)" -v b="$(median lathe-one 1)" \
  'BEGIN { printf "  lathe two platforms / one = %.2f (target <= 1.3)\n", a / b }'
awk -v a="$(median buildah-two 1)" -v b="$(median lathe-two 1)" \
  'BEGIN { printf "  buildah / lathe, two platforms = %.1f (target >= 10)\n", a / b }'
awk -v a="$(median buildah-two 1)" -v b="$(median buildah-one 1)" \
  'BEGIN { printf "  buildah two platforms / one = %.2f\n", a / b }'
