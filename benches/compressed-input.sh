#!/bin/sh
# Issue 6 benchmark: converting X.raw.{gz,bz2,xz,zst} to qcow2 against the decoder alone.
#
# Target: imgconv's wall time <= the decode-only time of the reference tool + 10 %, and
# imgconv's peak RSS < 256 MiB. The input is a 1 GiB sparse ext4 file system holding a
# real tree (default: /usr/share/locale and /usr/share/doc, about 280 MiB), compressed by
# the real tools. Every row prints the median wall and user+sys CPU seconds of N runs
# (decoder and imgconv alternating) and the largest peak RSS.
#
# Usage: benches/compressed-input.sh [WORKDIR]   (default: $TMPDIR/imgconv-bench-ci)
# Environment:
#   IMGCONV       binary to measure (default: `cargo build --release`, then target/release/imgconv)
#   BENCH_TREE    directories copied into the file system (default: locale and doc)
#   BENCH_ONLY    extended regex of the suffixes to run, e.g. 'gz|bz2'
#   BENCH_EXTRA   extra `imgconv convert` arguments (e.g. '--tmpdir /var/tmp')
#   N             runs of each command, alternating (default 3); medians are printed
# Needs: mkfs.ext4 (e2fsprogs), gzip, bzip2, xz-utils, zstd, GNU time (package time),
# GNU split or pbzip2 for the multi-stream bzip2 row.
set -eu

W=${1:-${TMPDIR:-/tmp}/imgconv-bench-ci}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${IMGCONV:-}" ]; then
    (cd "$ROOT" && cargo build --release --quiet --bin imgconv)
    I=$ROOT/target/release/imgconv
else
    I=$IMGCONV
fi
TREE=${BENCH_TREE:-/usr/share/locale /usr/share/doc}
ONLY=${BENCH_ONLY:-.*}
EXTRA=${BENCH_EXTRA:-}
N=${N:-3}
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

# measure COMMAND...: one run; appends "wall cpu rss_kib" to $W/runs.
measure() {
    /usr/bin/time -f "%e %U %S %M" -o "$W/time.out" "$@" >/dev/null < "${STDIN:-/dev/null}" ||
        { echo "failed: $*" >&2; exit 1; }
    read -r wall user sys rss < "$W/time.out"
    awk -v w="$wall" -v u="$user" -v s="$sys" -v r="$rss" 'BEGIN { print w, u + s, r }' >> "$W/runs"
}
# summary LABEL FILE: median wall, median CPU and the largest peak RSS of the runs in FILE.
summary() {
    printf '%-34s median wall %6.2f s' "$1" "$(median 1 "$2")"
    printf '  CPU %6.2f s' "$(median 2 "$2")"
    printf '  peak %5d MiB\n' "$(sort -n -k3 "$2" | tail -n 1 | awk '{ print int($3 / 1024) }')"
}
# median COLUMN FILE
median() { sort -n -k"$1" "$2" | awk -v c="$1" '{ v[NR] = $c } END { print v[int((NR + 1) / 2)] }'; }

echo "input: $(du -mL "$W/disk.raw" | cut -f1) MiB of data in a 1 GiB raw; imgconv: $I; $N runs each, alternating"
for row in "gz:gzip -dc" "bz2:bzip2 -dc" "xz:xz -dc -T0" "zst:zstd -dc -q" "pbz2:bzip2 -dc"; do
    s=${row%%:*}; dec=${row#*:}
    echo "$s" | grep -Eq "^($ONLY)$" || continue
    [ -f "$W/disk.raw.$s" ] || continue
    rm -f "$W/dec.runs" "$W/mine.runs"
    i=0
    while [ "$i" -lt "$N" ]; do
        rm -f "$W/runs"
        # shellcheck disable=SC2086
        STDIN=$W/disk.raw.$s measure $dec
        cat "$W/runs" >> "$W/dec.runs"
        rm -f "$W/runs" "$W/out.qcow2"
        # shellcheck disable=SC2086
        measure "$I" convert $EXTRA -O qcow2 "$W/disk.raw.$s" "$W/out.qcow2"
        cat "$W/runs" >> "$W/mine.runs"
        i=$((i + 1))
    done
    summary "decode only: $dec" "$W/dec.runs"
    summary "imgconv convert .$s -O qcow2" "$W/mine.runs"
    awk -v a="$(median 1 "$W/mine.runs")" -v b="$(median 1 "$W/dec.runs")" \
        'BEGIN { printf "  ratio of medians %.2f (target <= 1.10)\n", (b > 0 ? a / b : 0) }'
    rm -f "$W/out.qcow2"
done
