#!/usr/bin/env bash
# Fuzz smoke run for the default test suite: replays the checked-in inputs
# (corpus and regressions) on stable `cargo test`, then runs each libFuzzer
# target for FUZZ_SECONDS (default 20) from its corpus. Exits non-zero on a
# crash; the crashing input is left in fuzz/artifacts/<target>/.
#
# Stable toolchain only: cargo-fuzz with --sanitizer none needs no nightly
# flags (the coverage instrumentation is -Cpasses=sancov-module and
# -Cllvm-args, both stable). Installs cargo-fuzz when absent, and a C++
# compiler for libFuzzer itself.
set -euo pipefail

cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-20}"
targets=(packet transfer receive endpoint)

if ! command -v c++ >/dev/null 2>&1; then
    apt-get install -y g++ >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y g++ >/dev/null; }
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --version 0.13.2 --locked
fi

echo "fuzz smoke: replaying corpus and regressions"
cargo test --quiet --target-dir target/stable --test replay

flags=(--sanitizer none --release --debug-assertions)
cargo fuzz build "${flags[@]}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
    mkdir -p "$scratch/$target" "regressions/$target"
    echo "fuzz smoke: $target for ${seconds}s"
    # New finds go to the scratch corpus (first directory), not the
    # checked-in one.
    if ! cargo fuzz run "${flags[@]}" "$target" "$scratch/$target" "corpus/$target" "regressions/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$scratch/$target.log" 2>&1; then
        tail -n 60 "$scratch/$target.log"
        echo "fuzz smoke: $target FAILED (input in fuzz/artifacts/$target/)" >&2
        exit 1
    fi
    grep -E '^stat::number_of_executed_units|DONE' "$scratch/$target.log" | tr '\n' ' '
    echo
done
echo "fuzz smoke: ${#targets[@]} passed, 0 failed"
