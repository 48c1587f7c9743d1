#!/usr/bin/env bash
# Copies the .debs dependencies.sha256 lists from DEBS (default: testdata/debs, next to
# this buildpack in the repository) into vendor/, checked against their sha256. Run it
# before building with this buildpack; the tests run it on their copy.
# Usage: vendor.sh [DEBS]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
debs=${1:-$here/../../debs}
mkdir -p "$here/vendor"
while read -r sum file; do
  cp "$debs/$file" "$here/vendor/$file"
  echo "$sum  $here/vendor/$file" | sha256sum --quiet --strict -c
done < "$here/dependencies.sha256"
