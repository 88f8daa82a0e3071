#!/usr/bin/env bash
# The one GPU command (issue 26): up to four phases in one call of at most CALL_LIMIT seconds (345) on a fresh
# machine, data trees included; each phase writes JSON and a short summary under the call's folder.
#
#   benchmarks/gpu_run.sh [--phases 1,2,3,4] RESULTS_DIR [throughput.py flags]           # on the GPU machine
#   benchmarks/gpu_run.sh --smoke [--phases 1,2,3,4] RESULTS_DIR [throughput.py flags]   # anywhere: tiny, CPU
#
#   1  CUDA smoke matrix (plan: at most 180 s): the CUDA cases of tests/test_amp.py and tests/test_gpu_data.py,
#      then benchmarks/cuda_matrix.py: every setting of both scripts trained, saved, resumed and evaluated
#   2  GPU decoding against Pillow's (plan: at most 120 s, its JPEG tree included): benchmarks/decode_check.py
#   3  peak memory with and without --grad-checkpointing (plan: at most 60 s): benchmarks/memory_flags.py
#   4  the bars: benchmarks/throughput.py's rows and benchmarks/bars.py, in the time the call has left
# Phases run in this order, each only when chosen and when the call has time left for it; a phase that ends
# early leaves its time to the next. All four do not fit in one call: --phases 1,2,3, then --phases 4. Each
# call writes a new RESULTS_DIR/<UTC time>/ (env.txt, summary.txt, phase1/ .. phase4/; RESULTS_DIR/latest points
# at it) and leaves earlier ones alone. The data trees are written once under DATA_DIR (default:
# /tmp/throughput-data, or throughput.py's --data-dir) and reused.
# Exit status: 0 when every chosen phase ran and passed, 3 when one could not start in the time left, else the
# first phase's failing status.
set -u -o pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
smoke=0
phases=1,2,3,4
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --smoke) smoke=1; shift ;;
        --phases) phases=${2:-}; shift 2 || shift ;;
        --phases=*) phases=${1#--phases=}; shift ;;
        *) break ;;
    esac
done
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    usage
    echo "error: give the folder for the results first, e.g. benchmarks/gpu_run.sh --phases 1,2 /tmp/results" >&2
    exit 2
fi
chosen=" "
for phase in ${phases//,/ }; do
    case "$phase" in
        1|2|3|4) chosen="$chosen$phase " ;;
        *) echo "error: --phases takes phases 1 to 4, comma-separated (e.g. --phases 1,2), not '$phases'" >&2
           exit 2 ;;
    esac
done
results=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
data_dir=${DATA_DIR:-${TMPDIR:-/tmp}/throughput-data}
previous=""
for arg in "$@"; do  # throughput.py's --data-dir, when given, is the trees' folder of every phase
    case "$arg" in --data-dir=*) data_dir=${arg#--data-dir=} ;; esac
    if [ "$previous" = "--data-dir" ]; then data_dir=$arg; fi
    previous=$arg
done
run_dir=$results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$run_dir" || exit 2
ln -sfn "$(basename "$run_dir")" "$results/latest" 2>/dev/null || true

call_start=$(date +%s)
call_limit=${CALL_LIMIT:-345}
left() { echo $(( call_limit - ($(date +%s) - call_start) )); }
status=0
note_status() { if [ "$status" = 0 ] && [ "$1" != 0 ]; then status=$1; fi; }

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "phases: ${chosen# }(smoke: $smoke, call limit: $([ "$smoke" = 1 ] && echo none || echo "${call_limit} s"))"
    echo "cpus online: $(getconf _NPROCESSORS_ONLN)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    "$python" -c 'import importlib.metadata as m, os, torch, torchvision
print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none", "| cpus for this process",
      len(os.sched_getaffinity(0)))
for name in ("tensorboard", "pytest", "numpy", "pillow"):  # the scripts need tensorboard for --output-dir
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "NOT INSTALLED")' 2>&1
} | tee "$run_dir/env.txt"
cp "$run_dir/env.txt" "$run_dir/summary.txt"

# start_phase N PLANNED MINIMUM: the seconds phase N may take (its plan, or what the call has left; 0 for no
# limit in a smoke run); fails when N was not chosen, or when fewer than MINIMUM seconds are left (noted in the
# summary, and in the exit status at the end).
start_phase() {
    local n=$1 planned=$2 minimum=$3 have
    case "$chosen" in *" $n "*) ;; *) return 1 ;; esac
    if [ "$smoke" = 1 ]; then echo 0; return 0; fi
    have=$(( $(left) - 5 ))
    if [ "$have" -lt "$minimum" ]; then
        echo "# phase $n: not started, the call has ${have} s left and it needs ${minimum}" \
            | tee -a "$run_dir/summary.txt" >&2
        return 1
    fi
    echo $(( have < planned ? have : planned ))
}
smoke_flag=()
if [ "$smoke" = 1 ]; then smoke_flag=(--smoke); fi

# run_limited SECONDS COMMAND...: the command, ended at SECONDS (none when 0); its output on the console.
run_limited() {
    local seconds=$1; shift
    if [ "$seconds" -gt 0 ]; then
        timeout --kill-after=10 "$seconds" "$@"
    else
        "$@"
    fi
}

finish_phase() {  # finish_phase N DIR STATUS STARTED: the phase's summary and time into the call's summary
    local n=$1 dir=$2 code=$3 started=$4
    if [ "$code" = 124 ] || [ "$code" = 137 ]; then
        echo "# phase $n: stopped at its time limit; what it wrote is kept in $dir" | tee -a "$dir/summary.txt"
    fi
    {
        echo
        echo "# phase $n: $(( $(date +%s) - started )) s, exit status $code"
        cat "$dir/summary.txt" 2>/dev/null || echo "# phase $n wrote no summary: see its logs in $dir"
    } >> "$run_dir/summary.txt"
    note_status "$code"
}

if budget=$(start_phase 1 180 60); then
    dir=$run_dir/phase1 started=$(date +%s)
    mkdir -p "$dir"
    limits=()
    if [ "$smoke" = 0 ]; then
        # The CUDA cases of the tests first (the CPU ones run in CI): --amp's skipped steps with every optimizer,
        # the float32 crops.
        (cd "$root" && timeout 60 "$python" -m pytest -q -p no:cacheprovider -k cuda tests/test_amp.py \
            tests/test_gpu_data.py --junitxml="$dir/pytest.xml") > "$dir/pytest.log" 2>&1
        code=$?
        tail -n 15 "$dir/pytest.log"
        note_status "$code"
        # No row or check starts in the last 45 s of the phase (one takes 10-40 s), and every process still
        # running 12 s before its end is killed, so that the matrix's JSON and summary are written in time.
        budget=$(( budget - ($(date +%s) - started) ))
        budget=$(( budget > 40 ? budget : 40 ))
        limits=(--stop-after $(( budget - 45 > 5 ? budget - 45 : 5 )) --deadline $(( budget - 12 )))
    fi
    run_limited "$budget" "$python" -u "$root/benchmarks/cuda_matrix.py" --out "$dir" --work "$data_dir/cuda-matrix" \
        ${limits[@]+"${limits[@]}"} ${smoke_flag[@]+"${smoke_flag[@]}"} 2>&1 | tee "$dir/matrix.log"
    code=$?
    if [ -f "$dir/pytest.log" ]; then
        { echo "# the tests' CUDA cases: $(tail -n 1 "$dir/pytest.log")"; cat "$dir/summary.txt" 2>/dev/null; } \
            > "$dir/summary.tmp" && mv "$dir/summary.tmp" "$dir/summary.txt"
    fi
    finish_phase 1 "$dir" "$code" "$started"
fi

if budget=$(start_phase 2 120 80); then
    dir=$run_dir/phase2 started=$(date +%s)
    mkdir -p "$dir"
    if [ "$smoke" = 1 ]; then flags=(--smoke); else flags=(--stop-after $(( budget - 45 ))); fi
    run_limited "$budget" "$python" -u "$root/benchmarks/decode_check.py" --out "$dir" --data-dir "$data_dir" \
        "${flags[@]}" 2>&1 | tee "$dir/decode.log"
    finish_phase 2 "$dir" $? "$started"
fi

if budget=$(start_phase 3 60 25); then  # a part of it (ResNet-50 first) is worth more than none
    dir=$run_dir/phase3 started=$(date +%s)
    mkdir -p "$dir"
    run_limited "$budget" "$python" -u "$root/benchmarks/memory_flags.py" --out "$dir" \
        ${smoke_flag[@]+"${smoke_flag[@]}"} 2>&1 | tee "$dir/memory.log"
    finish_phase 3 "$dir" $? "$started"
fi

if budget=$(start_phase 4 600 120); then
    dir=$run_dir/phase4 started=$(date +%s)
    mkdir -p "$dir"
    # No setting or row starts after STOP_AFTER seconds, and HARD_STOP ends the process, leaving the JSON of the
    # rows done: the trees (about a minute when not yet written), one ResNet-50 compilation with 6 rows, the
    # uncompiled DeepLabV3+ rows that answer the segmentation bar, then what time is left.
    if [ "$smoke" = 1 ]; then
        flags=(--device cpu --smoke) hard_stop=0
    else
        hard_stop=${HARD_STOP:-$(( budget - 5 ))}
        flags=(--stop-after "${STOP_AFTER:-$(( hard_stop - 75 ))}")
    fi
    run_limited "$hard_stop" "$python" -u "$root/benchmarks/throughput.py" --out "$dir/throughput.json" \
        --data-dir "$data_dir" "${flags[@]}" "$@" 2>&1 | tee "$dir/throughput.log"
    code=$?
    if [ -f "$dir/throughput.json" ]; then
        "$python" "$root/benchmarks/bars.py" "$dir/throughput.json" > "$dir/summary.txt" 2>&1
    else
        echo "# no results: throughput.py stopped before its first write, see $dir/throughput.log" > "$dir/summary.txt"
    fi
    finish_phase 4 "$dir" "$code" "$started"
fi

if grep -q '^# phase [0-9]: not started' "$run_dir/summary.txt"; then note_status 3; fi
echo
cat "$run_dir/summary.txt"
echo "# $(( $(date +%s) - call_start )) s in all; results in $run_dir"
exit "$status"
