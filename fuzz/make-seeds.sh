#!/bin/sh
# Generates the seed corpora of the fuzz targets from small images made with
# qemu-img/qemu-io (the test oracle; imgconv itself never runs them), the repository's
# testdata/ and, when $IMGCONV_CORPUS is set, the small files of the shared corpus.
#
#   fuzz/make-seeds.sh [SEEDS-DIR [CORPUS-DIR]]
#
# Seeds of at most 16 KiB go to SEEDS-DIR/<target>/ (default fuzz/seeds, committed);
# larger ones (up to 128 KiB: sparse VMDKs with 64 KiB grains, extended-L2 qcow2) go to
# CORPUS-DIR/<target>/ (default fuzz/corpus, the working corpus run-all.sh also reads),
# so that the repository's corpus stays small. libFuzzer mutates small inputs far
# faster anyway.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/seeds}
big=${2:-$here/corpus}
corpus=${IMGCONV_CORPUS:-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

for t in qcow2 qcow2_header qcow2_check vmdk vmdk_descriptor vmdk_stream vdi vpc vhdx open_any compressed roundtrip; do
    mkdir -p "$out/$t" "$big/$t"
done

# put TARGET NAME FILE: copies FILE as a seed (small) or into the working corpus.
put() {
    [ -f "$3" ] || return 0
    n=$(wc -c <"$3")
    if [ "$n" -le 16384 ]; then
        cp "$3" "$out/$1/$2"
    elif [ "$n" -le 131072 ]; then
        cp "$3" "$big/$1/$2"
    fi
}

img() { qemu-img "$@" >/dev/null; }
io() { qemu-io "$@" >/dev/null; }

# A little content: data, a zeroed range, data in a later cluster.
fill() {
    io -f "$1" -c 'write -P 0x11 0 1k' -c 'write -z 4k 1k' -c 'write -P 0x22 64k 512' \
        -c 'write -P 0x33 200k 4k' "$2"
}

# --- qcow2 ---------------------------------------------------------------------------
q() { # q NAME OPTIONS
    img create -q -f qcow2 -o "$2" "$tmp/$1.qcow2" 1M
    fill qcow2 "$tmp/$1.qcow2"
    put qcow2 "$1.qcow2" "$tmp/$1.qcow2"
    put open_any "$1.qcow2" "$tmp/$1.qcow2"
    # The header target gets the first cluster (header and extensions).
    head -c 4096 "$tmp/$1.qcow2" >"$out/qcow2_header/$1.hdr"
}
q v3-512 cluster_size=512
q v2-512 cluster_size=512,compat=0.10
q refcount1 cluster_size=512,refcount_bits=1
q refcount64 cluster_size=1024,refcount_bits=64
q lazy cluster_size=512,lazy_refcounts=on
q extl2 cluster_size=16k,extended_l2=on
q zstd cluster_size=512,compression_type=zstd

# A backing file reference (refused when untrusted, so the header paths still run).
img create -q -f qcow2 -u -o cluster_size=512 -b base.qcow2 -F qcow2 "$tmp/overlay.qcow2" 1M
put qcow2 overlay.qcow2 "$tmp/overlay.qcow2"
[ -f "$tmp/overlay.qcow2" ] && head -c 4096 "$tmp/overlay.qcow2" >"$out/qcow2_header/overlay.hdr"

# Compressed clusters, deflate and zstd.
io -f raw -c 'write -P 0x41 0 8k' -c 'write -P 0x42 32k 4k' \
    "$(img create -q -f raw "$tmp/pat.raw" 64k && echo "$tmp/pat.raw")"
img convert -c -f raw -O qcow2 -o cluster_size=4096 "$tmp/pat.raw" "$tmp/comp.qcow2"
img convert -c -f raw -O qcow2 -o cluster_size=4096,compression_type=zstd \
    "$tmp/pat.raw" "$tmp/compzstd.qcow2"
for f in comp compzstd; do
    put qcow2 "$f.qcow2" "$tmp/$f.qcow2"
    put open_any "$f.qcow2" "$tmp/$f.qcow2"
done

# An internal snapshot and a persistent bitmap.
cp "$tmp/v3-512.qcow2" "$tmp/snap.qcow2" 2>/dev/null || true
if [ -f "$tmp/snap.qcow2" ]; then
    img snapshot -c snap1 "$tmp/snap.qcow2"
    io -f qcow2 -c 'write -P 0x55 0 512' "$tmp/snap.qcow2"
    put qcow2 snap.qcow2 "$tmp/snap.qcow2"
    head -c 4096 "$tmp/snap.qcow2" >"$out/qcow2_header/snap.hdr"
fi
img create -q -f qcow2 -o cluster_size=512 "$tmp/bitmap.qcow2" 1M
img bitmap --add "$tmp/bitmap.qcow2" b0 2>/dev/null && put qcow2 bitmap.qcow2 "$tmp/bitmap.qcow2"
head -c 4096 "$tmp/bitmap.qcow2" >"$out/qcow2_header/bitmap.hdr"

# An external data file (its name is a reference; the metadata alone is the seed).
img create -q -f qcow2 -o cluster_size=512,data_file="$tmp/data.bin" "$tmp/datafile.qcow2" 1M
put qcow2 datafile.qcow2 "$tmp/datafile.qcow2"
head -c 4096 "$tmp/datafile.qcow2" >"$out/qcow2_header/datafile.hdr"

# --- VMDK ----------------------------------------------------------------------------
for s in monolithicSparse streamOptimized monolithicFlat twoGbMaxExtentSparse; do
    mkdir -p "$tmp/$s"
    img create -q -f vmdk -o subformat=$s "$tmp/$s/d.vmdk" 1M
    case $s in
    monolithicSparse) put vmdk sparse-empty.vmdk "$tmp/$s/d.vmdk" ;;
    streamOptimized) put vmdk_stream stream-empty.vmdk "$tmp/$s/d.vmdk" ;;
    *)
        put vmdk "$s.desc" "$tmp/$s/d.vmdk"
        put vmdk_descriptor "$s.desc" "$tmp/$s/d.vmdk"
        put open_any "$s.desc" "$tmp/$s/d.vmdk"
        ;;
    esac
done
img convert -f raw -O vmdk -o subformat=streamOptimized "$tmp/pat.raw" "$tmp/stream.vmdk"
put vmdk_stream stream.vmdk "$tmp/stream.vmdk"
put vmdk stream.vmdk "$tmp/stream.vmdk"
put open_any stream.vmdk "$tmp/stream.vmdk"
img convert -f raw -O vmdk -o subformat=monolithicSparse "$tmp/pat.raw" "$tmp/sparse.vmdk"
put vmdk sparse.vmdk "$tmp/sparse.vmdk"
put open_any sparse.vmdk "$tmp/sparse.vmdk"
# The embedded descriptor of a sparse extent (sector 1 on).
dd if="$tmp/sparse.vmdk" of="$tmp/embedded.desc" bs=512 skip=1 count=2 2>/dev/null
tr -d '\000' <"$tmp/embedded.desc" >"$out/vmdk_descriptor/embedded.desc"
# A hand-written descriptor with several extent kinds and odd spacing.
cat >"$out/vmdk_descriptor/kinds.desc" <<'EOF'
# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=fffffffe
parentCID=ffffffff
createType="custom"
parentFileNameHint="parent.vmdk"

# Extent description
RW 2048 SPARSE "a.vmdk"
RDONLY 100 FLAT "b.raw" 7
NOACCESS 8 ZERO
RW 16 VMFS "c-flat.vmdk"
RW 4 SESPARSE "d.vmdk"

# The Disk Data Base
#DDB
ddb.virtualHWVersion = "4"
ddb.geometry.cylinders = "2"
ddb.geometry.heads = "16"
ddb.geometry.sectors = "63"
ddb.adapterType = "ide"
EOF
cp "$out/vmdk_descriptor/kinds.desc" "$out/vmdk/kinds.desc"

# --- VDI -----------------------------------------------------------------------------
img create -q -f vdi "$tmp/empty.vdi" 4M
put vdi empty.vdi "$tmp/empty.vdi"
put open_any empty.vdi "$tmp/empty.vdi"
img create -q -f vdi -o static=on "$tmp/static.vdi" 64k 2>/dev/null &&
    put vdi static.vdi "$tmp/static.vdi"

# --- VHD (vpc) -----------------------------------------------------------------------
img create -q -f vpc "$tmp/empty.vhd" 4M
put vpc empty.vhd "$tmp/empty.vhd"
put open_any empty.vhd "$tmp/empty.vhd"
img create -q -f vpc -o subformat=fixed,force_size=on "$tmp/fixed.vhd" 8k
io -f vpc -c 'write -P 0x44 1k 2k' "$tmp/fixed.vhd"
put vpc fixed.vhd "$tmp/fixed.vhd"
put open_any fixed.vhd "$tmp/fixed.vhd"
# qemu writes 2 MiB blocks only: dynamic and differencing images with small blocks,
# partial sector bitmaps and parent locators are made here.
python3 - "$out/vpc" <<'EOF'
import struct, sys, uuid
def csum(b, at):
    return ~(sum(b[:at]) + sum(b[at + 4:])) & 0xffffffff
def vhd(kind, size, bs, blocks, locators=(), parent=b"\0" * 16):
    entries = -(-size // bs)
    out = bytearray(1536)
    locs = b""
    for code, path in locators:
        data = path.encode("utf-16-le")
        locs += struct.pack(">4sIIIQ", code, 512, len(data), 0, len(out))
        out += data + bytes(512 - len(data) % 512)
    bat_at = len(out)
    out += b"\xff" * (-(-entries * 4 // 512) * 512)
    bm = max(512, -(-(bs // 512 // 8) // 512) * 512)
    for i, bits, byte in blocks:
        struct.pack_into(">I", out, bat_at + 4 * i, len(out) // 512)
        out += bits + bytes(bm - len(bits)) + bytes([byte]) * bs
    name = "parent.vhd".encode("utf-16-be").ljust(512, b"\0") if locators else bytes(512)
    h = bytearray(struct.pack(">8sQQIIII16sII", b"cxsparse", 2**64 - 1, bat_at, 0x10000,
                              entries, bs, 0, parent, 0, 0) + name + locs.ljust(192, b"\0") + bytes(256))
    struct.pack_into(">I", h, 36, csum(h, 36))
    out[512:1536] = h
    c = size // 512
    f = bytearray(struct.pack(">8sIIQI4sI4sQQHBBII16sB", b"conectix", 2, 0x10000, 512, 0, b"win ",
                              0xa0000, b"Wi2k", size, size, min(c // 68, 65535), 4, 17, kind, 0,
                              uuid.uuid4().bytes, 0).ljust(512, b"\0"))
    struct.pack_into(">I", f, 64, csum(f, 64))
    out[:512] = f
    return bytes(out + f)
d = sys.argv[1]
open(d + "/dynamic-4k.vhd", "wb").write(vhd(3, 16384, 4096, [(0, b"\xff", 0x11), (2, b"\xa5", 0x22)]))
open(d + "/dynamic-512.vhd", "wb").write(vhd(3, 4096, 512, [(1, b"\x80", 0x33), (7, b"\x00", 0x44)]))
open(d + "/differencing.vhd", "wb").write(vhd(4, 8192, 4096, [(1, b"\x0f", 0x55)],
    [(b"W2ru", ".\\parent.vhd"), (b"W2ku", "C:\\parent.vhd")]))
EOF

# --- shared corpus and testdata --------------------------------------------------------
if [ -n "$corpus" ] && [ -d "$corpus" ]; then
    x() { # x TARGET NAME COMPRESSED-FILE: decompressed into TARGET's seeds if small
        case $3 in
        *.xz) xz -dc "$3" >"$tmp/c" ;;
        *.bz2) bzip2 -dc "$3" >"$tmp/c" ;;
        *.gz) gzip -dc "$3" >"$tmp/c" ;;
        esac
        put "$1" "$2" "$tmp/c"
    }
    x vdi vbox3.vdi "$corpus/virtualbox/TestHD-vbox3.vdi.xz"
    x vdi vbox4.vdi "$corpus/virtualbox/TestHD-vbox4.0.8.vdi.xz"
    x open_any vbox4.vdi "$corpus/virtualbox/TestHD-vbox4.0.8.vdi.xz"
    x qcow2 afl5.img "$corpus/qemu-iotests/afl5.img.bz2"
    x qcow2 large-size.img "$corpus/cdi-malicious/invalid-qcow-large-size.img.xz"
    x qcow2 large-json.img "$corpus/cdi-malicious/invalid-qcow-large-json.img.xz"
    x vmdk_stream vbox-stream.vmdk "$corpus/vagrant-mutate/virtualbox-box-disk1.vmdk.xz"
    x open_any afl5.img "$corpus/qemu-iotests/afl5.img.bz2"
    x vpc afl5.img "$corpus/qemu-iotests/afl5.img.bz2"
    # The compressed wrappers themselves.
    for f in "$corpus"/virtualbox/*.xz "$corpus"/qemu-iotests/afl5.img.bz2 \
        "$corpus"/qemu-iotests/empty.bochs.bz2 "$corpus"/vagrant-mutate/*.xz; do
        [ -f "$f" ] && put compressed "$(basename "$f")" "$f"
    done
fi
for f in "$here"/../testdata/*; do
    [ -f "$f" ] && put qcow2 "testdata-$(basename "$f")" "$f" && put open_any "testdata-$(basename "$f")" "$f"
done

# The check walks the same images as the reader.
cp "$out"/qcow2/* "$out/qcow2_check/"

# --- compressed wrappers ----------------------------------------------------------------
cp "$tmp/v3-512.qcow2" "$tmp/w.qcow2"
gzip -9 -c "$tmp/w.qcow2" >"$out/compressed/qcow2.gz"
bzip2 -9 -c "$tmp/w.qcow2" >"$out/compressed/qcow2.bz2"
xz -c "$tmp/w.qcow2" >"$out/compressed/qcow2.xz"
zstd -q -c "$tmp/w.qcow2" >"$out/compressed/qcow2.zst"
head -c 4096 "$tmp/pat.raw" | gzip -c >"$out/compressed/raw.gz"
(cd "$tmp" && tar --format=ustar -cf "$out/compressed/one.tar" w.qcow2)
(cd "$tmp" && tar --format=pax -cf - w.qcow2 | gzip -c >"$out/compressed/one.tar.gz")
cp "$out/compressed/qcow2.gz" "$out/open_any/qcow2.gz"
cp "$out/compressed/qcow2.zst" "$out/open_any/qcow2.zst"

# --- vhdx --------------------------------------------------------------------------------
# The target reads a sparse file described by sector records (imgconv::fuzzing::vhdx):
# tests/vhdx.rs makes qemu-img's and imgconv's images, a dirty log, a differencing image
# and (with the corpus) QEMU's dirty log, and encodes them.
(cd "$here/.." && VHDX_SEED_DIR="$out/vhdx" cargo test -q --test vhdx make_fuzz_seeds \
    -- --ignored >/dev/null)

# --- round trip --------------------------------------------------------------------------
# Config byte, size (2 bytes), then (offset: 3 bytes, length byte) pieces.
i=0
while [ $i -lt 16 ]; do
    printf "$(printf '\\%03o' $i)\377\177\001\002\003\040\200\000\000\010\377\377\377\001" \
        >"$out/roundtrip/config-$i"
    i=$((i + 1))
done

echo "seeds in $out (larger ones in $big):"
for t in "$out"/*/; do
    echo "  $(basename "$t"): $(ls "$t" | wc -l) files, $(du -sk "$t" | cut -f1) KiB"
done
