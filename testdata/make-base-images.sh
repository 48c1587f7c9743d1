#!/usr/bin/env bash
# Build the multi-platform (linux/amd64, linux/arm64) CNB fixture base images
# from the vendored .debs in testdata/debs into the OCI layout OUTDIR, with
# refs "build" and "run" (image indexes) plus per-platform child refs.
#
# Usage: testdata/make-base-images.sh OUTDIR
# Env:   MKIMAGE  command used to run mkimage (default: the cargo example)
set -euo pipefail
umask 022
export LC_ALL=C

[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
debs=$here/debs
mkdir -p "$1"
out=$(cd "$1" && pwd)

# Inputs are pinned: refuse to run on anything but the vendored debs.
(cd "$debs" && sha256sum --quiet --strict -c SHA256SUMS)

if [ -d /dev/shm ] && [ -w /dev/shm ]; then tmp=$(mktemp -d -p /dev/shm); else tmp=$(mktemp -d); fi
trap 'rm -rf "$tmp"' EXIT

deb() { # deb PACKAGE ARCH -> path of the one vendored .deb
  local f=("$debs/$1"_*_"$2".deb)
  [ ${#f[@]} -eq 1 ] && [ -f "${f[0]}" ] || { echo "missing or ambiguous deb: $1 $2" >&2; exit 1; }
  echo "${f[0]}"
}

applets=(sh ls cat echo env mkdir rmdir rm cp mv ln chmod chown uname id whoami
  grep sed awk find xargs sort uniq head tail wc tr cut tee sha256sum tar gzip
  gunzip sleep true false test '[' printf basename dirname readlink realpath
  touch date mktemp ps kill hostname seq expr which pwd stat)

# Deterministic modes, mtimes and no docs, whatever the caller's umask was.
normalize() {
  rm -rf "$1"/usr/share/doc "$1"/usr/share/man "$1"/usr/share/lintian \
    "$1"/usr/share/initramfs-tools "$1"/var/lib/dpkg
  find "$1" -type d -exec chmod 0755 {} +
  find "$1" -type f -perm /111 -exec chmod 0755 {} +
  find "$1" -type f ! -perm /111 -exec chmod 0644 {} +
  [ ! -d "$1/tmp" ] || chmod 1777 "$1/tmp"
  [ ! -d "$1/root" ] || chmod 0700 "$1/root"
  find "$1" -exec touch -h -d @315532801 {} +
}

make_base() { # make_base ARCH DIR
  local d=$2
  mkdir -p "$d"
  dpkg-deb -x "$(deb busybox-static "$1")" "$d"
  dpkg-deb -x "$(deb ca-certificates all)" "$d"
  [ -f "$d/bin/busybox" ] || { echo "busybox-static: no /bin/busybox" >&2; exit 1; }
  for a in "${applets[@]}"; do ln -s busybox "$d/bin/$a"; done
  mkdir -p "$d/usr/bin" "$d/etc/ssl/certs" "$d/tmp" "$d/root" "$d/home/cnb" "$d/home/cnb-run"
  ln -s ../../bin/busybox "$d/usr/bin/env"
  find "$d/usr/share/ca-certificates" -type f -name '*.crt' -print0 | sort -z \
    | xargs -0 cat > "$d/etc/ssl/certs/ca-certificates.crt"
  cat > "$d/etc/os-release" <<'EOF'
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
SUPPORT_URL="https://www.debian.org/support"
BUG_REPORT_URL="https://bugs.debian.org/"
EOF
  cat > "$d/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
cnb:x:1000:1000:cnb:/home/cnb:/bin/sh
cnb-run:x:1001:1000:cnb-run:/home/cnb-run:/bin/sh
EOF
  printf 'root:x:0:\ncnb:x:1000:\n' > "$d/etc/group"
  normalize "$d"
}

make_build() { # make_build ARCH DIR
  local d=$2
  mkdir -p "$d"
  dpkg-deb -x "$(deb bash-static "$1")" "$d"
  [ -f "$d/bin/bash-static" ] || { echo "bash-static: no /bin/bash-static" >&2; exit 1; }
  ln -s bash-static "$d/bin/bash"
  mkdir -p "$d/workspace" "$d/layers" "$d/platform" "$d/cnb/buildpacks"
  normalize "$d"
}

labels='"io.buildpacks.base.distro.name":"debian","io.buildpacks.base.distro.version":"12","io.buildpacks.base.id":"io.lathe.testdata","io.buildpacks.stack.id":"io.lathe.testdata","io.buildpacks.base.maintainer":"lathe","io.buildpacks.stack.mixins":"[]"'
path='"PATH=/usr/local/bin:/usr/bin:/bin"'
printf '{"User":"1000:1000","Env":[%s,"CNB_USER_ID=1000","CNB_GROUP_ID=1000","CNB_STACK_ID=io.lathe.testdata"],"Labels":{%s},"WorkingDir":"/"}\n' \
  "$path" "$labels" > "$tmp/build.json"
printf '{"User":"1001:1000","Env":[%s],"Labels":{%s,"io.buildpacks.rebasable":"true"},"WorkingDir":"/"}\n' \
  "$path" "$labels" > "$tmp/run.json"

build_args=() run_args=()
for arch in amd64 arm64; do
  make_base "$arch" "$tmp/$arch/base"
  make_build "$arch" "$tmp/$arch/build"
  build_args+=(--image "linux/$arch" --config "$tmp/build.json" --layer "$tmp/$arch/base" --layer "$tmp/$arch/build")
  run_args+=(--image "linux/$arch" --config "$tmp/run.json" --layer "$tmp/$arch/base")
done

chowns=(--chown /home/cnb=1000:1000 --chown /home/cnb-run=1001:1000
  --chown /workspace=1000:1000 --chown /layers=1000:1000)
read -r -a mkimage <<< "${MKIMAGE:-cargo run --quiet --release --example mkimage --}"
cd "$here/.."
"${mkimage[@]}" --output "oci:$out:build" "${chowns[@]}" "${build_args[@]}"
"${mkimage[@]}" --output "oci:$out:run" "${chowns[@]}" "${run_args[@]}"

# Keep the staging trees for inspection when asked to (tests/debugging).
if [ -n "${KEEP_STAGING:-}" ]; then rm -rf "$KEEP_STAGING"; cp -a "$tmp" "$KEEP_STAGING"; fi
