#!/bin/sh
# Issue 6 benchmark: converting X.raw.{gz,bz2,xz,zst} to qcow2 against the decoder alone.
#
# Target: imgconv's wall time <= the decode-only time of the reference tool + 10 %, and
# imgconv's peak RSS < 256 MiB. The input is a 1 GiB sparse ext4 file system holding a
# real tree (default: /usr/share/locale and /usr/share/doc, about 280 MiB), compressed by
# the real tools. Every row prints wall seconds, user+sys CPU seconds and peak RSS.
#
# Usage: benches/compressed-input.sh [WORKDIR]   (default: $TMPDIR/imgconv-bench-ci)
# Environment:
#   IMGCONV       binary to measure (default: target/debug/imgconv, built if missing)
#   BENCH_TREE    directories copied into the file system (default: locale and doc)
#   BENCH_ONLY    extended regex of the suffixes to run, e.g. 'gz|bz2'
#   BENCH_EXTRA   extra `imgconv convert` arguments (e.g. '--tmpdir /var/tmp')
# Needs: mkfs.ext4 (e2fsprogs), gzip, bzip2, xz-utils, zstd, GNU time (package time),
# GNU split or pbzip2 for the multi-stream bzip2 row.
set -eu

W=${1:-${TMPDIR:-/tmp}/imgconv-bench-ci}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
I=${IMGCONV:-$ROOT/target/debug/imgconv}
[ -x "$I" ] || (cd "$ROOT" && cargo build --quiet)
TREE=${BENCH_TREE:-/usr/share/locale /usr/share/doc}
ONLY=${BENCH_ONLY:-.*}
EXTRA=${BENCH_EXTRA:-}
for tool in mkfs.ext4 gzip bzip2 xz zstd /usr/bin/time; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done
mkdir -p "$W"

if [ ! -f "$W/disk.raw" ]; then
    rm -rf "$W/tree" && mkdir -p "$W/tree"
    # shellcheck disable=SC2086
    cp -a $TREE "$W/tree/"
    truncate -s 1G "$W/disk.raw.tmp"
    mkfs.ext4 -q -F -d "$W/tree" "$W/disk.raw.tmp"
    mv "$W/disk.raw.tmp" "$W/disk.raw"
    rm -rf "$W/tree"
fi
make() { # make SUFFIX COMMAND...: the compressed input, made once
    f=$W/disk.raw.$1; shift
    [ -f "$f" ] || { "$@" < "$W/disk.raw" > "$f.tmp" && mv "$f.tmp" "$f"; }
}
make gz gzip -c
make bz2 bzip2 -c
make xz xz -T0 -3 -c
make zst zstd -q -T0 -3 -c
# Multi-stream bzip2 as pbzip2 writes it (one stream per 900 kB), with or without pbzip2.
if command -v pbzip2 >/dev/null; then make pbz2 pbzip2 -c
else make pbz2 split -b 900k --filter='bzip2 -c'; fi

# measure LABEL COMMAND...: one run; prints wall, user+sys CPU and peak RSS.
measure() {
    label=$1; shift
    /usr/bin/time -f "%e %U %S %M" -o "$W/time.out" "$@" >/dev/null < "${STDIN:-/dev/null}" ||
        { echo "$label: failed" >&2; exit 1; }
    read -r wall user sys rss < "$W/time.out"
    printf '%-34s wall %7.2f s  user %7.2f s  sys %6.2f s  peak %5d MiB\n' \
        "$label" "$wall" "$user" "$sys" $((rss / 1024))
    echo "$wall" > "$W/last.wall"
}

echo "input: $(du -mL "$W/disk.raw" | cut -f1) MiB of data in a 1 GiB raw; imgconv: $I"
for row in "gz:gzip -dc" "bz2:bzip2 -dc" "xz:xz -dc -T0" "zst:zstd -dc -q" "pbz2:bzip2 -dc"; do
    s=${row%%:*}; dec=${row#*:}
    echo "$s" | grep -Eq "^($ONLY)$" || continue
    [ -f "$W/disk.raw.$s" ] || continue
    # shellcheck disable=SC2086
    STDIN=$W/disk.raw.$s measure "decode only: $dec" $dec
    base=$(cat "$W/last.wall")
    rm -f "$W/out.qcow2"
    # shellcheck disable=SC2086
    measure "imgconv convert .$s -O qcow2" "$I" convert $EXTRA -O qcow2 "$W/disk.raw.$s" "$W/out.qcow2"
    mine=$(cat "$W/last.wall")
    awk -v a="$mine" -v b="$base" 'BEGIN { printf "  ratio %.2f (target <= 1.10)\n", (b > 0 ? a / b : 0) }'
    rm -f "$W/out.qcow2"
done
