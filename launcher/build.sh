#!/usr/bin/env bash
# Builds lathe's CNB launcher for linux/amd64 and linux/arm64: static (no interpreter, no
# shared libraries), stripped, and reproducible (the same bytes from the same source wherever
# the repository sits), into OUTDIR (default: launcher/bin next to this script) as
# launcher-amd64 and launcher-arm64.
#
# Usage: launcher/build.sh [OUTDIR]
#
# It needs Debian 12's rustc 1.63 (/usr/bin/rustc) with libstd-rust-dev:arm64,
# gcc-aarch64-linux-gnu and libc6-dev-arm64-cross (.ci/install installs them): rustup's
# toolchain here has only the x86_64 std, Debian's rustc cross-compiles to aarch64.
#
# Why the binaries are committed: lathe embeds them (src/launcher.rs, include_bytes!) so that
# every builder and app image it makes has a launcher for its platform, and a user's `cargo
# build` cannot be expected to have Debian's cross toolchain. layout-tests/launcher.rs runs
# this script into a temporary directory and requires the same bytes as launcher/bin, so the
# committed binaries are provably this source's. After changing launcher/src, run it and
# commit launcher/bin with the change.
#
# The bytes also depend on the toolchain and on the static C library linked in. The committed
# ones come from Debian 12 packages rustc 1.63.0+dfsg1-2, libc6-dev 2.36-9+deb12u14,
# libc6-dev-arm64-cross 2.36-8cross1, gcc-12 12.2.0-14+deb12u1 (cross: 12.2.0-14cross1) and
# binutils 2.40-2: when a Debian update changes one of them, rebuild and commit.
set -euo pipefail
export LC_ALL=C
umask 022

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-$here/bin}
rustc=${RUSTC_163:-/usr/bin/rustc}

[ -x "$rustc" ] || { echo "$rustc is missing: run .ci/install (Debian's rustc 1.63)" >&2; exit 1; }
version=$("$rustc" --version)
case "$version" in
  "rustc 1.63."*) ;;
  *) echo "$rustc is $version; the committed launchers are built with rustc 1.63" >&2; exit 1 ;;
esac

mkdir -p "$out"
out=$(cd "$out" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

build() { # build ARCH TARGET LINKER
  local arch=$1 target=$2 linker=$3
  command -v "$linker" >/dev/null || { echo "$linker is missing: run .ci/install" >&2; exit 1; }
  # Relative source paths and the source directory remapped: panic locations and any other
  # path rustc records read "lathe-launcher/...", wherever the clone is.
  (cd "$here" && "$rustc" src/main.rs \
    --edition 2021 --crate-name launcher --crate-type bin \
    --target "$target" -C linker="$linker" \
    -C opt-level=z -C codegen-units=1 -C lto=fat -C panic=abort -C debuginfo=0 \
    -C target-feature=+crt-static -C relocation-model=static \
    -C strip=symbols -C link-arg=-Wl,--build-id=none \
    --remap-path-prefix "$here=lathe-launcher" \
    -o "$tmp/launcher-$arch")
  mv -f "$tmp/launcher-$arch" "$out/launcher-$arch"
}

build amd64 x86_64-unknown-linux-gnu x86_64-linux-gnu-gcc
build arm64 aarch64-unknown-linux-gnu aarch64-linux-gnu-gcc
(cd "$out" && sha256sum launcher-amd64 launcher-arm64)
