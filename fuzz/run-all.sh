#!/bin/sh
# Runs every fuzz target for SECONDS each (default 60), one after another in one process,
# and prints the executions, coverage and crashes per target.
#
#   fuzz/run-all.sh SECONDS [TARGET...]
#
# New coverage-raising inputs go to fuzz/corpus/<target>/ (not committed; the committed
# seeds stay in fuzz/seeds/<target>/), crashes to fuzz/artifacts/<target>/, logs to
# fuzz/logs/<target>.log. Needs cargo-fuzz; RUSTC_BOOTSTRAP lets it build on stable.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
secs=${1:-60}
[ $# -gt 0 ] && shift
if [ $# -gt 0 ]; then
    targets=$*
else
    targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$here/Cargo.toml" | grep -v '^imgconv-fuzz$')
fi

cd "$here/.."
export RUSTC_BOOTSTRAP=1
# cargo-fuzz builds with AddressSanitizer, whose quarantine of freed memory (256 MiB by
# default) would count against the 512 MiB limit: readers free megabytes per input.
# A smaller quarantine keeps the limit about the memory a reader really holds.
export ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=16}
cargo fuzz build -O >/dev/null 2>&1 || cargo fuzz build -O
mkdir -p "$here/logs"

printf '%-18s %12s %8s %8s %s\n' target executions exec/s cov crashes
for t in $targets; do
    mkdir -p "$here/corpus/$t" "$here/seeds/$t" "$here/artifacts/$t"
    log="$here/logs/$t.log"
    # A crash ends the run early; the script goes on with the next target.
    cargo fuzz run -O "$t" "$here/corpus/$t" "$here/seeds/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=512 -timeout=10 \
        -print_final_stats=1 >"$log" 2>&1 || true
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    crashes=$(ls "$here/artifacts/$t" | wc -l)
    printf '%-18s %12s %8s %8s %s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$crashes"
done
