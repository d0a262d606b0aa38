#!/usr/bin/env bash
# Download the upstream tarball of Dungeon Crawl Stone Soup 0.28.0 from Debian's source package `crawl`
# and unpack only what the sprite build needs. Uses private apt state so the system's apt is untouched;
# the archive host comes from the system's own apt sources (no URL is written here).
#
# Usage: bash data/download_crawl.sh [WORKDIR]      (default WORKDIR: data/_crawl, git-ignored)
set -euo pipefail

VERSION="2:0.28.0-1.1"
TARBALL="crawl_0.28.0.orig.tar.xz"
SHA256="5a6be168f8888b84bdb199184ca20bd8636f77ba7e9e0124ebee8850092f2f47"
TOP="stone_soup-0.28.0"

here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-$here/_crawl}"
mkdir -p "$work/apt/sources" "$work/apt/lists/partial" "$work/apt/cache/archives/partial"
cd "$work"

if [ ! -f "$TARBALL" ]; then
  src=/etc/apt/sources.list.d/debian.sources
  if [ ! -f "$src" ]; then
    echo "error: $src not found; this script expects a Debian system with deb822 apt sources." >&2
    exit 1
  fi
  sed 's/^Types: deb$/Types: deb-src/' "$src" > apt/sources/debian-src.sources
  opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/apt/sources"
        -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache")
  apt-get "${opts[@]}" update -qq
  # --tar-only: the Debian packaging tarball is not needed (and the archive has answered 404 for it).
  apt-get "${opts[@]}" source --download-only --tar-only "crawl=$VERSION"
fi

echo "$SHA256  $TARBALL" | sha256sum -c -
tar -xJf "$TARBALL" "$TOP/source/rltiles" "$TOP/LICENSE" "$TOP/CREDITS.txt" "$TOP/docs/license/cc0.txt"
echo "unpacked to $work/$TOP"
