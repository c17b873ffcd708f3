#!/usr/bin/env bash
# One short GPU session turned into finished work on the 200-epoch CIFAR-10 table.
#
#   OUT=/tmp/keep REVISION=<short hash> bash tools/gpu_window.sh; tar -C /tmp/keep -czf window.tgz .
#
# (then only window.tgz need come back: where few files and shallow folders come back from a
# machine, OUT itself, with its nested table, would not)
#
# For sessions of a few minutes on a fresh machine each time, of which only small files are kept:
# a ~90 MB checkpoint cannot be carried to the next session, so a row is either finished within
# one session or not started. Each session does what earlier ones left undone, in this order,
# each stage only while time is left (BUDGET seconds in all):
#   1. unpacks CIFAR-10 as JPEG files (ARCHIVE, made beforehand with
#      `tar -C <folder that holds cifar10/> -czf .data/cifar10.tgz cifar10`) into DATA;
#   2. runs the GPU tests (TESTS), once per table;
#   3. speed tests: every method SPEED_EPOCHS epochs with --data-on-device in bf16, eager with
#      SIDE_BY_SIDE methods at a time and compiled with COMPILE_SIDE_BY_SIDE, resumed by method;
#   4. table rows, BYOL first: tools/gpu_schedule.py --time-budget starts a method only if its
#      estimate (from the speed tests) fits in what is left, so that no row is left half-trained.
#      The table's flags, eager or compiled, are those whose speed test fits the more rows in a
#      session (tools/gpu_schedule.py --choose); its first call fixes them (its results.json).
# Everything it keeps goes to OUT: OUT/results/cifar10-200ep holds the table's results.json,
# results.md, curves.png, records/ (each run's log.jsonl and args.json), logs/, the speed tests
# and the tests' log; the run folders stay in SCRATCH. Copy OUT/results/ over the repository's
# results/ and commit it: the next session starts from there. Every setting below can be changed
# from the environment.
set -uo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
BUDGET=${BUDGET:-570}                  # seconds for the whole command (600 allowed)
OUT=${OUT:-gpu-window}
TABLE=${TABLE:-results/cifar10-200ep}  # the table as the repository holds it
DATA=${DATA:-/tmp/cifar10}
ARCHIVE=${ARCHIVE:-.data/cifar10.tgz}
SCRATCH=${SCRATCH:-/tmp/cleanssl-window}
METHODS=${METHODS:-byol,simclr,moco,simsiam,swav,barlow,vicreg,mocov3,dino}
EPOCHS=${EPOCHS:-200}
SETTINGS=${SETTINGS:---arch resnet18 --batch-size 512 --linear cached}
# A row ends within its session, or is stopped by a signal, which saves: a checkpoint after every
# epoch would be writing time for nothing (BYOL's ResNet-18: 235 MB and a 43 MB backbone.pt,
# 0.29 s with fsync on a CPU machine's disk, against a goal of 2 s per epoch).
SCRIPT_FLAGS=${SCRIPT_FLAGS:---data-on-device --precision bf16 --checkpoint-every 50}
SPEED_EPOCHS=${SPEED_EPOCHS:-3}        # 3: one epoch-to-epoch interval without the kNN monitor
SIDE_BY_SIDE=${SIDE_BY_SIDE:-1,2}
COMPILE_SIDE_BY_SIDE=${COMPILE_SIDE_BY_SIDE-2}             # empty: no compiled speed test
TESTS=${TESTS-tests/test_cuda.py tests/test_gpu_aug.py}    # empty: no tests
PY=${PYTHON:-$(command -v python || command -v python3)}

HERE=$OUT/${TABLE#/}                   # the table as this session writes it
mkdir -p "$HERE" "$SCRATCH"
exec > >(tee -a "$OUT/window.log") 2>&1
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
say() { echo "[gpu_window $(( $(date +%s) - START )) s] $*"; }
REV=()
if [ -n "${REVISION:-}" ]; then REV=(--revision "$REVISION"); fi
# the table's scheduling: tools/benchmark.py's flags and its own (--speed-test, --time-budget, ...)
schedule() {
    "$PY" tools/gpu_schedule.py --data "$DATA" --methods "$METHODS" ${REV[@]+"${REV[@]}"} "$@"
}

# what earlier sessions left (the committed small files)
if [ -d "$TABLE" ] && [ "$(realpath "$TABLE")" != "$(realpath "$HERE")" ]; then
    cp -a "$TABLE"/. "$HERE"/
fi

monitor=
if command -v nvidia-smi > /dev/null; then
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    # the GPU's use through the session: whether methods side by side fill it
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,memory.total --format=csv \
        -l 1 > "$OUT/gpu-usage.csv" 2>/dev/null &
    monitor=$!
fi
finish() {
    if [ -n "$monitor" ]; then kill "$monitor" 2>/dev/null; fi
    say "done; kept in $HERE"
}
trap finish EXIT

# 1. the data
if [[ "$DATA" == */* ]] && [ ! -d "$DATA/train" ]; then
    if [ ! -f "$ARCHIVE" ]; then
        say "error: $DATA/train is missing and there is no $ARCHIVE to unpack"
        exit 2
    fi
    mkdir -p "$(dirname "$DATA")"
    tar -C "$(dirname "$DATA")" -xzf "$ARCHIVE" || exit 2
    say "unpacked $ARCHIVE into $(dirname "$DATA")"
fi

# 2. the GPU tests, once per table: until their log ends with pytest's summary line
summary() {
    grep -E '^(=+ )?[0-9]+ (passed|failed|errors?|skipped)' "$HERE/gpu-tests.log" 2>/dev/null \
        | tail -1
}
tests_ok=1
if [ -n "$TESTS" ]; then
    if [ -z "$(summary)" ] && [ "$(left)" -gt 180 ]; then
        say "tests: $TESTS"
        # shellcheck disable=SC2086
        timeout $(( $(left) - 120 )) "$PY" -m pytest $TESTS -q -p no:cacheprovider \
            > "$HERE/gpu-tests.log" 2>&1
    fi
    say "tests: $(summary)"
    if [ -z "$(summary)" ] || summary | grep -qE "failed|error"; then
        tests_ok=0
        say "the GPU tests have not all passed ($HERE/gpu-tests.log): no rows"
    fi
fi

# 3. speed tests, resumed by method, each bounded by what is left
speed() {  # speed FOLDER SIDE_BY_SIDE FLAGS...
    local folder=$1 ks=$2
    shift 2
    [ "$(left)" -gt 60 ] || return 0
    say "speed test $folder: $ks side by side, $*"
    # shellcheck disable=SC2086
    schedule $SETTINGS --epochs "$SPEED_EPOCHS" --speed-test "$ks" --out "$HERE/$folder" \
        --runs-dir "$SCRATCH/$folder" --time-budget $(( $(left) - 35 )) -- "$@" \
        > "$OUT/$folder.log" 2>&1
    grep -E "^[a-z]+: train (done|FAILED|stopped)" "$OUT/$folder.log"
}
# shellcheck disable=SC2086
speed speed "$SIDE_BY_SIDE" $SCRIPT_FLAGS
if [ -n "$COMPILE_SIDE_BY_SIDE" ]; then
    # shellcheck disable=SC2086
    speed speed-compile "$COMPILE_SIDE_BY_SIDE" $SCRIPT_FLAGS --compile
fi

# 4. rows, with the flags of the table (fixed by its first call), or else those of the speed
# test that fits the most rows in a session: what tools/gpu_schedule.py --choose prints
if [ "$tests_ok" = 1 ] && [ "$(left)" -gt 60 ]; then
    # shellcheck disable=SC2086
    IFS=$'\t' read -r folder flags < <(schedule $SETTINGS --epochs "$EPOCHS" --out "$HERE" \
        --time-budget "$BUDGET" --choose "$HERE/speed" "$HERE/speed-compile")
    if [ -z "$folder" ]; then
        say "rows: no finished speed test has a row that fits in $BUDGET s: none started"
    else
        most=$(echo "$SIDE_BY_SIDE,$COMPILE_SIDE_BY_SIDE" | tr ',' '\n' | sort -n | tail -1)
        say "rows with: $flags (estimates from $folder, up to $most side by side)"
        # shellcheck disable=SC2086
        schedule $SETTINGS --epochs "$EPOCHS" --parallel "$most" --out "$HERE" \
            --runs-dir "$SCRATCH/table" --time-budget $(( $(left) - 35 )) \
            --estimate-from "$folder" -- $flags > "$OUT/table.log" 2>&1
        grep -vE "^\||^$" "$OUT/table.log" | head -40
    fi
fi
exit 0
