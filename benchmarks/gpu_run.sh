#!/usr/bin/env bash
# Issue 11's one GPU command: the environment's facts, the data trees, every throughput.py row the time allows
# (the rows the bars read first) and each bar's verdict, in under 8 minutes on a fresh machine, hard stop included.
#
#   benchmarks/gpu_run.sh RESULTS_DIR [throughput.py flags]            # on the GPU machine
#   benchmarks/gpu_run.sh --smoke RESULTS_DIR [throughput.py flags]    # anywhere: tiny sizes on the CPU, no stop
#
# Each call writes a new RESULTS_DIR/<UTC time>/ (env.txt; throughput.json, rewritten after every row;
# throughput.log; summary.txt) and leaves earlier ones alone, so it is safe to rerun and a run cut short keeps
# its rows. The data trees are written once under throughput.py's --data-dir and reused.
set -u -o pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    usage
    echo "error: give the folder for the results first, e.g. benchmarks/gpu_run.sh /tmp/results" >&2
    exit 2
fi
results=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
run_dir=$results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$run_dir" || exit 2
ln -sfn "$(basename "$run_dir")" "$results/latest" 2>/dev/null || true

# Seconds from the start of throughput.py: no setting or row starts after STOP_AFTER, and HARD_STOP ends the
# process, leaving the JSON of the rows done. Trees (about a minute, first run only), one ResNet-50 compilation
# with 6 rows, the uncompiled DeepLabV3+ rows that answer the segmentation bar, then what time is left.
stop_after=${STOP_AFTER:-330}
hard_stop=${HARD_STOP:-440}
flags=(--out "$run_dir/throughput.json" --stop-after "$stop_after")
if [ "$smoke" = 1 ]; then
    flags=(--out "$run_dir/throughput.json" --device cpu --smoke)
    hard_stop=0
fi

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "cpus online: $(getconf _NPROCESSORS_ONLN)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    "$python" -c 'import os, torch, torchvision
print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none", "| cpus for this process",
      len(os.sched_getaffinity(0)))' 2>&1
} | tee "$run_dir/env.txt"

start=$(date +%s)
# Correctness first, about 10 s: --amp's skipped steps with every optimizer and the float32 crops, on CUDA (the
# tests' cuda cases; the CPU ones run in CI).
if [ "$smoke" = 0 ]; then
    (cd "$root" && timeout 120 "$python" -m pytest -q -p no:cacheprovider -k cuda tests/test_amp.py \
        tests/test_gpu_data.py --junitxml="$run_dir/cuda_checks.xml") 2>&1 | tail -n 15 | tee "$run_dir/cuda_checks.log"
fi
if [ "$hard_stop" -gt 0 ]; then
    timeout --kill-after=15 "$hard_stop" "$python" -u "$root/benchmarks/throughput.py" "${flags[@]}" "$@" 2>&1 \
        | tee "$run_dir/throughput.log"
else
    "$python" -u "$root/benchmarks/throughput.py" "${flags[@]}" "$@" 2>&1 | tee "$run_dir/throughput.log"
fi
status=$?
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    echo "# hard stop after ${hard_stop} s: the rows done are kept in $run_dir/throughput.json"
fi

echo "# summary ($(( $(date +%s) - start )) s; throughput.py exit status $status)" | tee "$run_dir/summary.txt"
if [ -f "$run_dir/throughput.json" ]; then
    "$python" "$root/benchmarks/bars.py" "$run_dir/throughput.json" 2>&1 | tee -a "$run_dir/summary.txt"
else
    echo "# no results: throughput.py stopped before its first write, see $run_dir/throughput.log" \
        | tee -a "$run_dir/summary.txt"
fi
echo "# results in $run_dir"
exit "$status"
