#!/usr/bin/env bash
# Peak RSS of streaming an f16 safetensors checkpoint of at least 1 GB through the raw-bytes path
# (`dejavu inspect --read`: borrow from the mmap, checksum, release), against the file size.
# Acceptance (issue 10): max RSS < file size + 10%.
#   scripts/raw_rss.sh [DIR]   (DIR defaults to $TMPDIR/dejavu-synthetic-f16; written once, then reused)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-${TMPDIR:-/tmp}/dejavu-synthetic-f16}
bin=${CARGO_TARGET_DIR:-target}/release

cargo build --release --bin dejavu --example write_synthetic
if [ ! -f "$dir/model.safetensors" ]; then
    /usr/bin/time -f "writer: %e s, max RSS %M KB" "$bin/examples/write_synthetic" "$dir"
fi
size=$(stat -c %s "$dir/model.safetensors")

log=$(mktemp)
out=$(mktemp)
trap 'rm -f "$log" "$out"' EXIT
/usr/bin/time -v "$bin/dejavu" inspect --model "$dir" --read >"$out" 2>"$log"
grep -E '^(family|layers|params|dtypes)' "$out"
grep -E '^read ' "$out"
grep -E 'Maximum resident set size|Elapsed \(wall clock\)|Major .*page faults|Minor .*page faults' "$log" | sed 's/^\s*/time -v: /'

rss_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$log")
awk -v size="$size" -v rss_kb="$rss_kb" 'BEGIN {
    rss = rss_kb * 1024
    printf "file size %.3f GB, max RSS %.3f GB, ratio %.3f (bound 1.10): %s\n",
        size / 1e9, rss / 1e9, rss / size, (rss < 1.10 * size ? "PASS" : "FAIL")
    exit (rss < 1.10 * size ? 0 : 1)
}'
