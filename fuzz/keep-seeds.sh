#!/bin/sh
# Folds what fuzzing found into the committed seeds: the inputs of fuzz/corpus/<target>/
# of at most MAX_BYTES (default 2048) that raise coverage over fuzz/seeds/<target>/ are
# added to it (libFuzzer's -set_cover_merge=1, like `cargo fuzz cmin` but keeping the seeds
# and only small files, so that the repository's corpus stays small).
#
#   fuzz/keep-seeds.sh [MAX_BYTES] [TARGET...]
set -eu

here=$(cd "$(dirname "$0")" && pwd)
max=${1:-2048}
[ $# -gt 0 ] && shift
if [ $# -gt 0 ]; then
    targets=$*
else
    targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$here/Cargo.toml" | grep -v '^imgconv-fuzz$')
fi
bin="$here/target/x86_64-unknown-linux-gnu/release"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

for t in $targets; do
    [ -d "$here/corpus/$t" ] || continue
    mkdir -p "$tmp/$t" "$here/seeds/$t"
    find "$here/corpus/$t" -type f -size -"$((max + 1))"c -exec cp {} "$tmp/$t/" \;
    before=$(ls "$here/seeds/$t" | wc -l)
    "$bin/$t" -set_cover_merge=1 -rss_limit_mb=512 -timeout=10 "$here/seeds/$t" "$tmp/$t" \
        >"$tmp/$t.log" 2>&1 || true
    after=$(ls "$here/seeds/$t" | wc -l)
    echo "$t: $before -> $after seeds, $(du -sk "$here/seeds/$t" | cut -f1) KiB"
done
