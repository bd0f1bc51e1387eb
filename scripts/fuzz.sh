#!/usr/bin/env bash
# Mutation-fuzz every file parser (examples/fuzz_parsers.rs) for MINUTES each (default 10), under a 4 GB address-
# space limit so a huge length field cannot take the machine. A process that dies (an abort, e.g. an allocation the
# limit refuses) is a finding too: its input is kept and the target restarts for the rest of its time.
#
#   scripts/fuzz.sh [MINUTES] [CRASH_DIR]       # CRASH_DIR default: ${CARGO_TARGET_DIR:-target}/fuzz-crashes
#   TARGETS="gguf config" scripts/fuzz.sh 1     # some targets only
set -uo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}
target_dir=${CARGO_TARGET_DIR:-target}
crashes=${2:-$target_dir/fuzz-crashes}
export DEJAVU_SHARED=${DEJAVU_SHARED:-$(cd .. && pwd)/shared}
cargo build --release --example fuzz_parsers >&2 || exit 1
bin=$target_dir/release/examples/fuzz_parsers
mkdir -p "$crashes"
# The task-file parser is one target in four kinds of file (multiple choice, schema, language modelling, and the
# TOML definition of an unknown task).
targets=${TARGETS:-safetensors gguf config tokenizer tasks recipe}
status=0
for t in $targets; do
  if [ "$t" = tasks ]; then
    subs="tasks-copa tasks-winogrande tasks-lambada_openai tasks-taskdef"; secs=$(( minutes * 60 / 4 ))
  else
    subs=$t; secs=$(( minutes * 60 ))
  fi
  for s in $subs; do
    end=$(( $(date +%s) + secs )); deaths=0
    while :; do
      left=$(( end - $(date +%s) )); [ "$left" -le 0 ] && break
      ( ulimit -v 4000000; "$bin" "$s" "$left" "$crashes" ); rc=$?
      [ $rc -eq 0 ] && break
      [ $rc -eq 1 ] && { status=1; break; }   # panics found: reported by the harness above
      deaths=$(( deaths + 1 )); status=1
      keep="$crashes/$s-died-$deaths"
      cp -r "$crashes/current-$s" "$keep"
      echo "$s: process died (exit $rc); input kept in $keep" >&2
    done
  done
done
exit $status
