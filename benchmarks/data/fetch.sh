#!/usr/bin/env bash
# Fetch the real-text corpora of the examples with the system's package tools (Debian/Ubuntu), no pip, no scraping:
#   GCIDE (package dict-gcide, GPL-2+) and WordNet 3.0 (package wordnet-base, WordNet licence).
# Usage: benchmarks/data/fetch.sh [DATA_DIR]   (default: benchmarks/data/corpora; run `apt-get update` once first)
# Result: DATA_DIR/gcide.dict.dz and DATA_DIR/wordnet/ (data.noun, data.verb, data.adj, data.adv, ...), plus the
# packages' copyright files under DATA_DIR/licences/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$(mkdir -p "${1:-$here/corpora}" && cd "${1:-$here/corpora}" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download dict-gcide wordnet-base
for deb in ./*.deb; do dpkg-deb -x "$deb" root; done
cp root/usr/share/dictd/gcide.dict.dz "$dest/"
mkdir -p "$dest/wordnet" "$dest/licences"
cp root/usr/share/wordnet/* "$dest/wordnet/"
cp root/usr/share/doc/dict-gcide/copyright "$dest/licences/dict-gcide.copyright"
cp root/usr/share/doc/wordnet-base/copyright "$dest/licences/wordnet-base.copyright"
echo "GCIDE:   $dest/gcide.dict.dz"
echo "WordNet: $dest/wordnet"
