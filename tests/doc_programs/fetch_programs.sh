#!/usr/bin/env bash
# Writes Ray's documentation programs listed in programs.tsv into ray/ (or $2), each
# the exact version that was measured, taken from a clone of ray-project/ray:
#
#     git clone https://github.com/ray-project/ray /somewhere/ray    # full history
#     tests/doc_programs/fetch_programs.sh /somewhere/ray
#
# Each file gets one header line naming its source and licence; the rest is Ray's
# program byte for byte (its SHA-256 is checked against programs.tsv).
set -euo pipefail
ray_checkout=${1:?usage: fetch_programs.sh RAY_CHECKOUT [DEST]}
here=$(cd "$(dirname "$0")" && pwd)
dest=${2:-$here/ray}
mkdir -p "$dest"
grep -v '^#' "$here/programs.tsv" | while IFS=$'\t' read -r name path commit sha; do
    body=$(mktemp)
    git -C "$ray_checkout" show "$commit:$path" > "$body"
    got=$(sha256sum "$body" | cut -d' ' -f1)
    if [ "$got" != "$sha" ]; then
        echo "$name: $path at $commit has SHA-256 $got, expected $sha" >&2
        rm -f "$body"
        exit 1
    fi
    { echo "# Source: ray-project/ray $path at $commit; Apache License 2.0."; cat "$body"; } \
        > "$dest/$name"
    rm -f "$body"
done
echo "wrote $(grep -vc '^#' "$here/programs.tsv") programs to $dest"
