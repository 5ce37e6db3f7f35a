#!/usr/bin/env bash
# Compares imgconv with qemu-img on a realistic disk image and prints a Markdown table.
#
# The input is an ext4 filesystem holding BENCH_DATA_MB MiB of real files (taken from /usr)
# inside a BENCH_DISK_GB GiB sparse raw disk. The other inputs are made from it with
# qemu-img (and xz / gzip / bzip2 / zstd for the compressed-input rows) and kept in
# BENCH_DIR between runs. For every row, imgconv and the baseline run alternately on the
# same input: one warm-up each, then N measured runs each; the table shows median wall
# times, the ratio imgconv / baseline, the ratio imgconv / `cp --sparse=always` (the floor
# for a copy of the data), median CPU time (user + system: steadier than wall time on a
# shared machine), allocated output sizes and peak resident memory.
#
# imgconv's output of every row is checked once with `qemu-img compare` against the
# source. A row whose format imgconv does not implement yet is reported, not fatal.
#
# Environment:
#   N              measured runs per tool and row (default 3)
#   BENCH_DIR      scratch folder (default /tmp/imgconv-bench)
#   BENCH_DATA_MB  MiB of files in the filesystem (default 400)
#   BENCH_DISK_GB  GiB of virtual disk (default 4)
#   BENCH_ROWS     only rows whose label matches this extended regex (default: all),
#                  e.g. 'raw→raw|qcow2→'
#   BENCH_SKIP     skip rows whose label matches this extended regex, e.g. '\.(xz|bz2)' 
#   BENCH_TARGETS  "fresh existing" (default): every row is timed writing a new output
#                  file, then replacing the output of the previous run (", existing
#                  target" rows: the rename-over-an-existing-file path); or one of them
#   IMGCONV        imgconv binary to test (default: `cargo build --release`, then
#                  target/release/imgconv)
#   KEEP_OUTPUTS=1 keep the last outputs of each row in BENCH_DIR/out
set -u -o pipefail

N=${N:-3}
BENCH_DIR=${BENCH_DIR:-/tmp/imgconv-bench}
DATA_MB=${BENCH_DATA_MB:-400}
DISK_GB=${BENCH_DISK_GB:-4}
ROWS_FILTER=${BENCH_ROWS:-}
ROWS_SKIP=${BENCH_SKIP:-}
TARGETS=${BENCH_TARGETS:-fresh existing}
HERE=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "compare-qemu-img: $*" >&2; exit 1; }

for tool in qemu-img mkfs.ext4 xz gzip bzip2 zstd; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
if [ ! -x /usr/bin/time ]; then
    echo "installing GNU time for peak-memory measurements" >&2
    apt-get install -y time >/dev/null 2>&1 || die "/usr/bin/time is missing (apt-get install time)"
fi

if [ -z "${IMGCONV:-}" ]; then
    echo "building imgconv (release)…" >&2
    (cd "$HERE" && cargo build --release --quiet --bin imgconv) || die "release build failed"
    IMGCONV=$HERE/target/release/imgconv
fi
[ -x "$IMGCONV" ] || die "$IMGCONV is not executable"

mkdir -p "$BENCH_DIR/in" "$BENCH_DIR/out"
IN=$BENCH_DIR/in
OUT=$BENCH_DIR/out
STAMP="data=${DATA_MB}M disk=${DISK_GB}G v1"

# ---------------------------------------------------------------- inputs
make_inputs() {
    if [ -f "$IN/stamp" ] && [ "$(cat "$IN/stamp")" = "$STAMP" ]; then
        echo "reusing inputs in $IN ($STAMP)" >&2
        return
    fi
    rm -rf "${IN:?}"/*
    echo "building a ${DISK_GB} GiB ext4 disk with ${DATA_MB} MiB of files from /usr…" >&2
    local staging=$IN/staging
    mkdir -p "$staging"
    # Regular, readable files of /usr in a stable order, up to DATA_MB MiB.
    (cd /usr && find lib share bin sbin include -xdev -type f -readable -size -64M 2>/dev/null \
        | LC_ALL=C sort \
        | while IFS= read -r f; do printf '%s\t%s\n' "$(stat -c %s "$f")" "$f"; done \
        | awk -F'\t' -v lim=$((DATA_MB * 1048576)) '{ s += $1; if (s > lim) exit; print $2 }' \
        > "$IN/files.txt")
    (cd /usr && tar -cf - -T "$IN/files.txt") | tar -xf - -C "$staging" \
        || die "copying files from /usr failed"
    truncate -s "${DISK_GB}G" "$IN/disk.raw"
    mkfs.ext4 -q -F -d "$staging" -L bench "$IN/disk.raw" || die "mkfs.ext4 failed"
    rm -rf "$staging"
    sync

    echo "$STAMP" > "$IN/stamp"
}

# need FILE…: makes the derived inputs (from disk.raw) that a row uses, once.
need() {
    local f q="qemu-img convert -f raw"
    for f in "$@"; do
        [ -e "$IN/$f" ] && continue
        echo "making $f…" >&2
        case $f in
            disk.qcow2) $q -O qcow2 "$IN/disk.raw" "$IN/$f.tmp" ;;
            disk-zlib.qcow2) $q -O qcow2 -c "$IN/disk.raw" "$IN/$f.tmp" ;;
            disk-zstd.qcow2) $q -O qcow2 -c -o compression_type=zstd "$IN/disk.raw" "$IN/$f.tmp" ;;
            disk-stream.vmdk) $q -O vmdk -o subformat=streamOptimized "$IN/disk.raw" "$IN/$f.tmp" ;;
            disk.vdi) $q -O vdi "$IN/disk.raw" "$IN/$f.tmp" ;;
            disk.vhd) $q -O vpc "$IN/disk.raw" "$IN/$f.tmp" ;;
            disk.vhdx) $q -O vhdx "$IN/disk.raw" "$IN/$f.tmp" ;;
            empty-1t.qcow2) qemu-img create -q -f qcow2 "$IN/$f.tmp" 1T ;;
            sparse-1t.raw)
                # 1 TiB with 1 MiB of data at its start and 1 MiB in its middle.
                truncate -s 1T "$IN/$f.tmp" &&
                    dd if="$IN/disk.raw" of="$IN/$f.tmp" bs=1M count=1 conv=notrunc status=none &&
                    dd if="$IN/disk.raw" of="$IN/$f.tmp" bs=1M count=1 seek=$((512 * 1024)) \
                        conv=notrunc status=none ;;
            overlay.qcow2)
                # A qcow2 overlay on disk.qcow2 (absolute name, so that copies of it
                # find it) with 128 MiB of its own data.
                qemu-img create -q -f qcow2 -b "$IN/disk.qcow2" -F qcow2 "$IN/$f.tmp" &&
                    qemu-io -c 'write -P 7 0 64M' -c 'write -P 9 1G 64M' "$IN/$f.tmp" \
                        >/dev/null ;;
            disk.raw.xz) xz -T0 -3 -c "$IN/disk.raw" > "$IN/$f.tmp" ;;
            disk.raw.gz) gzip -c "$IN/disk.raw" > "$IN/$f.tmp" ;;
            disk.raw.bz2) bzip2 -c "$IN/disk.raw" > "$IN/$f.tmp" ;;
            disk.raw.zst) zstd -q -T0 -3 -c "$IN/disk.raw" > "$IN/$f.tmp" ;;
            *) die "unknown input $f" ;;
        esac || die "making $f failed"
        mv "$IN/$f.tmp" "$IN/$f"
    done
}

# ---------------------------------------------------------------- measuring
# Waits (at most 2 minutes) until no `imgconv-release` process is running: the one
# imgconv starts after replacing a big output frees the old file's blocks once imgconv
# has returned. Every run starts after it, so that it slows no timed run. (A zombie
# waiting for PID 1 to reap it has done its work.)
release_running() {
    local f name state
    for f in /proc/[0-9]*/comm; do
        read -r name <"$f" 2>/dev/null || continue
        [ "$name" = imgconv-release ] || continue
        read -r _ _ state _ <"${f%comm}stat" 2>/dev/null || continue
        [ "$state" != Z ] && return 0
    done
    return 1
}
wait_release() {
    local k
    for ((k = 0; k < 2400; k++)); do
        release_running || return 0
        sleep 0.05
    done
}

# run_timed CMD: runs CMD through bash under GNU time; sets T (seconds), C (CPU seconds,
# user + system), M (peak KiB), RC (exit status), ERR (first line of stderr) and R
# (seconds from the command's exit until the old output's blocks were freed in the
# background).
run_timed() {
    local tf=$OUT/.time errf=$OUT/.err t0 t1 t2 cu cs
    wait_release
    t0=$(date +%s%N)
    /usr/bin/time -f '%U %S %M' -o "$tf" bash -c "$1" >/dev/null 2>"$errf"
    RC=$?
    t1=$(date +%s%N)
    wait_release
    t2=$(date +%s%N)
    T=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
    R=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
    read -r cu cs M < <(tail -n 1 "$tf" 2>/dev/null)
    case $M in '' | *[!0-9]*) M=0 ;; esac
    C=$(awk -v u="${cu:-0}" -v s="${cs:-0}" 'BEGIN { printf "%.2f", u + s }')
    ERR=$(grep -v '^Command exited' "$errf" | head -n 1)
}

median() { # numbers as arguments
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2];
        else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

alloc_mib() { # allocated size of a file or of every file of a multi-file image
    local total=0 f
    for f in "$@"; do
        [ -e "$f" ] && total=$((total + $(stat -c '%b * %B' "$f")))
    done
    awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0 && a != "nan" && b != "nan") printf "%.2f", a / b; else print "–" }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }

ROWS=()
declare -A CP_MEDIAN=([fresh]=nan [existing]=nan)

# row LABEL NEEDS REF IMGCONV_CMD BASELINE_CMD
#   NEEDS: the derived inputs the row reads ("" = only disk.raw), made on first use;
#   REF: the image imgconv's output must equal (checked once), or "" to skip the check.
#   The commands write $OUT/i.out and $OUT/b.out (plus .out-* extent files for VMDK).
row() {
    local label=$1 needs=$2 ref=$3 icmd=$4 bcmd=$5
    if [ -n "$ROWS_FILTER" ] && ! [[ $label =~ $ROWS_FILTER ]]; then
        return
    fi
    if [ -n "$ROWS_SKIP" ] && [[ $label =~ $ROWS_SKIP ]]; then
        return
    fi
    # shellcheck disable=SC2086 # a list of names
    need $needs
    echo "row: $label" >&2
    local note="" it=() bt=() ic=() bc=() ir=() im=0 bm=0 k isz bsz
    rm -f "$OUT"/i.out* "$OUT"/b.out*
    run_timed "$icmd"
    if [ "$RC" -ne 0 ]; then
        if grep -qiE 'unsupported|not implemented|not supported' <<<"$ERR"; then
            note="not implemented in imgconv yet: ${ERR#imgconv: }"
        else
            note="imgconv failed ($RC): ${ERR#imgconv: }"
        fi
    elif [ -n "$ref" ]; then
        local cmp
        cmp=$(qemu-img compare "$ref" "$OUT/i.out" 2>&1)
        case $? in
            0) ;;
            1) note="WRONG OUTPUT (qemu-img compare: ${cmp%%$'\n'*})" ;;
            *) note="qemu-img cannot read imgconv's output: ${cmp%%$'\n'*}" ;;
        esac
    fi
    run_timed "$bcmd" # warm-up of the baseline
    [ "$RC" -ne 0 ] && note="${note:+$note; }baseline failed ($RC): $ERR"
    if [ -z "$note" ]; then
        local mode shown imed bmed rmed rnote
        # fresh: no output file before each run; existing: the previous run's output is
        # still there and gets replaced (the warm-up runs left one for the first run).
        for mode in $TARGETS; do
            it=() bt=() ic=() bc=() ir=() im=0 bm=0
            for ((k = 0; k < N; k++)); do
                [ "$mode" = fresh ] && rm -f "$OUT"/i.out*
                run_timed "$icmd"
                it+=("$T")
                ir+=("$R")
                ic+=("$C")
                [ "$M" -gt "$im" ] && im=$M
                [ "$mode" = fresh ] && rm -f "$OUT"/b.out*
                run_timed "$bcmd"
                bt+=("$T")
                bc+=("$C")
                [ "$M" -gt "$bm" ] && bm=$M
            done
            imed=$(median "${it[@]}")
            bmed=$(median "${bt[@]}")
            isz=$(alloc_mib "$OUT"/i.out*)
            bsz=$(alloc_mib "$OUT"/b.out*)
            [ "$label" = "raw→raw vs cp --sparse=always (floor)" ] && CP_MEDIAN[$mode]=$bmed
            shown=$label
            [ "$mode" = existing ] && shown="$label, existing target"
            rmed=$(median "${ir[@]}")
            rnote=""
            awk -v r="$rmed" 'BEGIN { exit !(r >= 0.1) }' \
                && rnote="old output freed in the background, $rmed s after imgconv returned"
            ROWS+=("| $shown | $imed | $bmed | $(ratio "$imed" "$bmed") | $(ratio "$imed" "${CP_MEDIAN[$mode]}") | $(median "${ic[@]}") | $(median "${bc[@]}") | $isz | $bsz | $(mib "$im") | $(mib "$bm") | $rnote |")
        done
    else
        ROWS+=("| $label | – | – | – | – | – | – | – | – | – | – | ${note//|/\\|} |")
    fi
    if [ "${KEEP_OUTPUTS:-0}" = 1 ]; then
        mkdir -p "$OUT/keep"
        for k in "$OUT"/i.out* "$OUT"/b.out*; do
            [ -e "$k" ] && mv -f "$k" "$OUT/keep/${label//[^A-Za-z0-9]/_}.${k##*/}"
        done
    fi
    rm -f "$OUT"/i.out* "$OUT"/b.out*
}

make_inputs

I=$IMGCONV
Q="qemu-img convert"
D=$IN/disk.raw
IO=$OUT/i.out
BO=$OUT/b.out

row "raw→raw vs cp --sparse=always (floor)" "" "$D" \
    "$I convert -f raw -O raw $D $IO" "cp --sparse=always $D $BO"
row "raw→raw" "" "$D" "$I convert -f raw -O raw $D $IO" "$Q -f raw -O raw $D $BO"
row "raw→qcow2" "" "$D" "$I convert -f raw -O qcow2 $D $IO" "$Q -f raw -O qcow2 $D $BO"
row "raw→vmdk" "" "$D" "$I convert -f raw -O vmdk $D $IO" "$Q -f raw -O vmdk $D $BO"
row "raw→vdi" "" "$D" "$I convert -f raw -O vdi $D $IO" "$Q -f raw -O vdi $D $BO"
row "raw→vpc (dynamic)" "" "$D" "$I convert -f raw -O vpc $D $IO" "$Q -f raw -O vpc $D $BO"
# (qemu-img compare would probe the fixed VHD as raw, footer included: not checked here;
# tests/vpc.rs checks fixed outputs.)
row "raw→vpc (fixed)" "" "" "$I convert -f raw -O vpc -o subformat=fixed $D $IO" \
    "$Q -f raw -O vpc -o subformat=fixed $D $BO"
row "raw→vhdx" "" "$D" "$I convert -f raw -O vhdx $D $IO" "$Q -f raw -O vhdx $D $BO"
row "raw→vhdx (fixed)" "" "$D" "$I convert -f raw -O vhdx -o subformat=fixed $D $IO" \
    "$Q -f raw -O vhdx -o subformat=fixed $D $BO"
row "qcow2→raw" disk.qcow2 "$D" "$I convert -f qcow2 -O raw $IN/disk.qcow2 $IO" \
    "$Q -f qcow2 -O raw $IN/disk.qcow2 $BO"
row "qcow2 (zlib)→raw" disk-zlib.qcow2 "$D" \
    "$I convert -f qcow2 -O raw $IN/disk-zlib.qcow2 $IO" \
    "$Q -f qcow2 -O raw $IN/disk-zlib.qcow2 $BO"
row "qcow2 (zstd)→raw" disk-zstd.qcow2 "$D" \
    "$I convert -f qcow2 -O raw $IN/disk-zstd.qcow2 $IO" \
    "$Q -f qcow2 -O raw $IN/disk-zstd.qcow2 $BO"
row "vmdk (streamOptimized)→raw" disk-stream.vmdk "$D" \
    "$I convert -f vmdk -O raw $IN/disk-stream.vmdk $IO" \
    "$Q -f vmdk -O raw $IN/disk-stream.vmdk $BO"
row "vdi→raw" disk.vdi "$D" "$I convert -f vdi -O raw $IN/disk.vdi $IO" \
    "$Q -f vdi -O raw $IN/disk.vdi $BO"
row "vpc→raw" disk.vhd "$D" "$I convert -f vpc -O raw $IN/disk.vhd $IO" \
    "$Q -f vpc -O raw $IN/disk.vhd $BO"
row "vhdx→raw" disk.vhdx "$D" "$I convert -f vhdx -O raw $IN/disk.vhdx $IO" \
    "$Q -f vhdx -O raw $IN/disk.vhdx $BO"
row "qcow2→vmdk" disk.qcow2 "$D" "$I convert -f qcow2 -O vmdk $IN/disk.qcow2 $IO" \
    "$Q -f qcow2 -O vmdk $IN/disk.qcow2 $BO"
row "qcow2→vdi" disk.qcow2 "$D" "$I convert -f qcow2 -O vdi $IN/disk.qcow2 $IO" \
    "$Q -f qcow2 -O vdi $IN/disk.qcow2 $BO"
# qemu-img's command-line options that change how the copy is done.
row "qcow2→raw -p (progress lines on stdout)" disk.qcow2 "$D" \
    "$I convert -p -f qcow2 -O raw $IN/disk.qcow2 $IO" "$Q -p -f qcow2 -O raw $IN/disk.qcow2 $BO"
row "raw→raw -C (copy offloading)" "" "$D" "$I convert -C -f raw -O raw $D $IO" \
    "$Q -C -f raw -O raw $D $BO"
row "qcow2→raw -S 0 (fully allocated)" disk.qcow2 "$D" \
    "$I convert -S 0 -f qcow2 -O raw $IN/disk.qcow2 $IO" "$Q -S 0 -f qcow2 -O raw $IN/disk.qcow2 $BO"
row "map --output=json of the qcow2" disk.qcow2 "" \
    "$I map --output=json $IN/disk.qcow2" "qemu-img map --output=json $IN/disk.qcow2"
row "raw→qcow2 -c (zlib)" "" "$D" "$I convert -f raw -O qcow2 -c $D $IO" \
    "$Q -f raw -O qcow2 -c $D $BO"
row "raw→qcow2 -c (zstd)" "" "$D" \
    "$I convert -f raw -O qcow2 -c -o compression_type=zstd $D $IO" \
    "$Q -f raw -O qcow2 -c -o compression_type=zstd $D $BO"
row "raw→vmdk (streamOptimized)" "" "$D" \
    "$I convert -f raw -O vmdk -o subformat=streamOptimized $D $IO" \
    "$Q -f raw -O vmdk -o subformat=streamOptimized $D $BO"
row "empty 1 TiB qcow2→raw" empty-1t.qcow2 "$IN/empty-1t.qcow2" \
    "$I convert -f qcow2 -O raw $IN/empty-1t.qcow2 $IO" \
    "$Q -f qcow2 -O raw $IN/empty-1t.qcow2 $BO"
row "sparse 1 TiB raw→qcow2" sparse-1t.raw "$IN/sparse-1t.raw" \
    "$I convert -f raw -O qcow2 $IN/sparse-1t.raw $IO" \
    "$Q -f raw -O qcow2 $IN/sparse-1t.raw $BO"
# Changing an image in place: each run works on a fresh copy of the overlay (the copy,
# the same for both tools, is part of the time).
row "rebase -b '' (flatten a 128 MiB overlay on the qcow2 disk)" "disk.qcow2 overlay.qcow2" \
    "$IN/overlay.qcow2" \
    "cp $IN/overlay.qcow2 $IO && $I rebase -b '' $IO" \
    "cp $IN/overlay.qcow2 $BO && qemu-img rebase -b '' $BO"
row "rebase -c -b '' (flatten, compressed)" "disk.qcow2 overlay.qcow2" "$IN/overlay.qcow2" \
    "cp $IN/overlay.qcow2 $IO && $I rebase -c -b '' $IO" \
    "cp $IN/overlay.qcow2 $BO && qemu-img rebase -c -b '' $BO"
row "snapshot -c (copy of the qcow2 disk)" disk.qcow2 "$IN/disk.qcow2" \
    "cp $IN/disk.qcow2 $IO && $I snapshot -c s $IO" \
    "cp $IN/disk.qcow2 $BO && qemu-img snapshot -c s $BO"
# Compressed input: imgconv reads the compressed file directly; the baseline is what a
# user does without it: decompress to a sparse raw file (then qemu-img convert).
for c in "xz:xz -dc -T0" "gz:gzip -dc" "bz2:bzip2 -dc" "zst:zstd -dc -T0 -q"; do
    ext=${c%%:*}
    dec=${c#*:}
    row "raw.$ext→qcow2 (vs ${dec%% -q} + qemu-img)" disk.raw.$ext "$D" \
        "$I convert -O qcow2 $IN/disk.raw.$ext $IO" \
        "$dec $IN/disk.raw.$ext | cp --sparse=always /dev/stdin $OUT/b.tmp && $Q -f raw -O qcow2 $OUT/b.tmp $BO; rc=\$?; rm -f $OUT/b.tmp; exit \$rc"
    row "raw.$ext→raw (vs ${dec%% -q})" disk.raw.$ext "$D" \
        "$I convert -O raw $IN/disk.raw.$ext $IO" \
        "$dec $IN/disk.raw.$ext | cp --sparse=always /dev/stdin $BO"
done

# Over HTTP (issue 16): nginx on 127.0.0.1 serves the inputs folder. imgconv reads a
# compressed download as a stream and a qcow2 with range requests; the baselines are
# what a user does without it (curl | decompress | qemu-img) and qemu-img's own curl
# driver (Debian: qemu-block-extra holds it; without it those rows report the baseline's
# failure).
if command -v nginx >/dev/null && command -v curl >/dev/null \
    && { [ -z "$ROWS_SKIP" ] || ! [[ "over HTTP" =~ $ROWS_SKIP ]]; }; then
    NG=$BENCH_DIR/nginx
    mkdir -p "$NG/logs" "$NG/tmp"
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    cat >"$NG/nginx.conf" <<NGINX
worker_processes 1;
master_process off;
daemon off;
pid $NG/nginx.pid;
error_log $NG/logs/error.log;
events { worker_connections 256; }
http {
  access_log off;
  # qemu's curl driver stalled (no timeout) when nginx closed a connection after its
  # default 1000 requests; one connection per run is what a real server gives too.
  keepalive_requests 1000000;
  client_body_temp_path $NG/tmp;
  types { }
  default_type application/octet-stream;
  server { listen 127.0.0.1:$PORT; root $IN; }
}
NGINX
    # nginx workers may run as nobody: the inputs must be readable.
    chmod a+rx "$BENCH_DIR" "$IN"
    nginx -c "$NG/nginx.conf" -p "$NG" &
    NGINX_PID=$!
    trap 'kill $NGINX_PID 2>/dev/null' EXIT
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.05; done
    U=http://127.0.0.1:$PORT
    need disk.raw.xz disk.qcow2
    chmod a+r "$IN"/*
    row "raw.xz over HTTP→qcow2 (vs curl | xz -dc -T0 + qemu-img)" disk.raw.xz "$D" \
        "$I convert -O qcow2 $U/disk.raw.xz $IO" \
        "curl -s $U/disk.raw.xz | xz -dc -T0 | cp --sparse=always /dev/stdin $OUT/b.tmp && $Q -f raw -O qcow2 $OUT/b.tmp $BO; rc=\$?; rm -f $OUT/b.tmp; exit \$rc"
    row "qcow2 over HTTP→raw (vs qemu-img's curl driver)" disk.qcow2 "$D" \
        "$I convert -O raw $U/disk.qcow2 $IO" \
        "timeout 600 $Q -f qcow2 -O raw $U/disk.qcow2 $BO"
    row "qcow2 over HTTP→qcow2 (vs qemu-img's curl driver)" disk.qcow2 "$D" \
        "$I convert -O qcow2 $U/disk.qcow2 $IO" \
        "timeout 600 $Q -f qcow2 -O qcow2 $U/disk.qcow2 $BO"
fi

# ---------------------------------------------------------------- report
cpu=$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)
echo
echo "Machine: $(nproc) CPUs ($cpu), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM," \
    "Linux $(uname -r), $(df -T "$BENCH_DIR" | awk 'NR == 2 { print $2 }') scratch;" \
    "$(qemu-img --version | head -n 1); load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
echo "Input: ext4 with $DATA_MB MiB of files from /usr in a $DISK_GB GiB sparse raw disk;" \
    "median of $N runs after a warm-up, imgconv and baseline alternating."
echo
echo "| conversion | imgconv (s) | baseline (s) | imgconv / baseline | imgconv / cp | imgconv CPU (s) | baseline CPU (s) | imgconv out (MiB) | baseline out (MiB) | imgconv peak RSS (MiB) | baseline peak RSS (MiB) | note |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
printf '%s\n' "${ROWS[@]}"
