#!/usr/bin/env bash
# The one command for a GPU box: turns however many minutes the box is at hand into evidence.
#
#   device-check.sh OUT [--minutes M] [--seconds S] [--bindir DIR] [--dry-run] [--list-steps]
#
# Runs, in triage order, each step in its own process under `timeout`: `info`; `headroom
# check` per family, simple kernels first; compute-sanitizer's memcheck, racecheck and
# synccheck on one small case per kernel; the quick benchmark profile per family (merged into
# one report as it goes); the PyTorch peer under `--max-seconds`, dumping a memory snapshot
# of each training case; `headroom replay` of those snapshots; a `headroom compare` of the
# two reports. A step that fails or hangs is recorded and the next one runs; a step that no longer
# fits the time left is listed as not run. Every step's output goes to OUT/logs/ as it
# happens, and OUT/summary.md (rewritten after every step, so a killed run still leaves it)
# ends with each step's status, time and headline figures.
#
#   --minutes M    the time budget (default 8; decimals allowed); --seconds S sets it exactly
#   --bindir DIR   where `headroom` and `headroom-bench` are (default: bin/ beside this
#                  script, else dist/bin of the checkout); scripts/package.sh makes them
#   --dry-run      the CPU backend instead of CUDA, labelled as a dry run everywhere: proves
#                  the script on a machine without a GPU; never the default
#   --list-steps   print the steps (name, limit as a share of the budget, arguments) and exit
#
# HEADROOM_BACKEND=cuda is exported for every step (cpu only with --dry-run): on a GPU box a
# silent fallback to the CPU would be a failure, not a pass. HEADROOM_SEED, HEADROOM_PROFILE
# (default quick) and HEADROOM_BUDGET pass through; HEADROOM_TORCH_MAX_SECONDS (default 5) is
# the PyTorch peer's time per case. Test-only: HEADROOM_DEVICE_CHECK_HANG=<step>[,<step>…]
# makes those steps sleep far beyond their limit, to prove that a hang costs one step.
#
# Needs bash, coreutils' `timeout` and no Rust toolchain; python3 merges the per-family
# reports (without it they stay apart, one folder per family). Exits 0 when every step that
# ran passed, 1 when one failed or hung, 2 on bad arguments.
set -uo pipefail

self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
here="$(dirname "$self")"

usage() {
    echo "usage: device-check.sh OUT [--minutes M] [--seconds S] [--bindir DIR] [--dry-run] [--list-steps]"
}
die() {
    echo "device-check.sh: $*" >&2
    exit 2
}

# ---------------------------------------------------------------------------------------
# The steps: name, share of the budget that is its time limit (percent), fewest seconds
# worth starting it with, and what it runs. Filters are substrings of case ids
# (`headroom check` runs the cases whose id contains any of them; the bench takes one);
# tests/device_check.rs holds every one of them to a real CUDA case id, and the check
# filters together to every check case.

# Limits never drop below this many seconds (a step must at least be able to start).
FLOOR_S=5
# Seconds kept back at the end for the summary and the last report merge.
RESERVE_S=3

STEPS=(
    # name                      share min  kind       arguments
    "info                       5     5    info"
    "check-copy                 4     5    check      copy/"
    "check-matmul-simt          5     5    check      matmul/simt/"
    "check-matmul-mma           5     5    check      matmul/mma/"
    # NN first: an id names its transposition with a suffix, so NN alone is reachable only
    # through the NN extras (odd size with each epilogue, alpha/accumulate, broadcast batch).
    "check-matmul-wgmma-nn      5     5    check      matmul/wgmma/bf16/m129-n200-k72-b matmul/wgmma/bf16/m129-n200-k72-alpha"
    # Every wgmma case: NT, TN, TT, and the m = 1064 / n = 1064 shapes whose last tile skips
    # a TMA box (with NN again, which costs little).
    "check-matmul-wgmma         6     5    check      matmul/wgmma/"
    # The same kernel in bands of 8 tile rows (m2056-n1064: three bands, two tiles per SM).
    "check-matmul-wgmma-banded  5     5    check      matmul/wgmma-banded/"
    # 128x256 tiles with setmaxnreg (n = 1064, 1128, 1184, 1000 skip 3, 2, 1, 0 of B's boxes).
    "check-matmul-wgmma-wide    5     5    check      matmul/wgmma-wide/"
    # The wide form in 2x1 clusters with B multicast (odd tile-row counts leave the last
    # pair's second block past m; small sizes leave clusters idle).
    "check-matmul-wgmma-cluster 5     5    check      matmul/wgmma-cluster/"
    # The wide form with C through shared memory and TMA stores (bf16 and fp32 C; n = 257,
    # 33 and 1 store from registers).
    "check-matmul-tma-store     5     5    check      matmul/wgmma-tma-store/"
    "check-matmul-cublas        5     5    check      matmul/cublas/"
    "check-attention-f32        12    5    check      attention/naive/f32/ attention/flash/f32/"
    "check-attention-bf16       12    5    check      attention/naive/bf16/ attention/flash/bf16/"
    # The Hopper forward (TMA, wgmma, setmaxnreg) at every edge of its 128-row tiles.
    "check-attention-wgmma      5     5    check      attention/flash-wgmma/"
    # The 128-row mma.sync forward (single-buffered K/V) and the ping-pong Hopper forward.
    "check-attention-m128       5     5    check      attention/flash-m128/"
    "check-attention-wgmma-pp   5     5    check      attention/flash-wgmma-pp/"
    # The ping-pong forward on a persistent grid (b2-h32-n1000: several tiles per block).
    "check-attention-persistent 5     5    check      attention/flash-wgmma-persistent/"
    # The Hopper backward (TMA rings, wgmma with P and dS in registers) on the same shapes,
    # every gradient, after the standard forward.
    "check-attention-wgmma-bwd  5     5    check      attention/flash-wgmma-bwd/"
    "check-layers               4     5    check      layers/"
    "check-loss                 4     5    check      loss/"
    "check-train                8     5    check      train/"
    # NCCL's all-reduce alone, then sharded steps over NCCL, one GPU per rank: world 1
    # everywhere (NCCL's collectives on one rank), 2 where the box has the GPUs (skipped
    # with the reason otherwise).
    "check-collective           4     5    check      collective/"
    # The share is for the dry run, whose 60 simulated-rank cases take about 50 s on two
    # host cores; a GPU box's 30 take seconds.
    "check-shard                20    5    check      shard/"
    "check-alloc                4     5    check      alloc/"
    # One small case per kernel, odd sizes: vector copy with a tail; each matmul kernel in
    # every form, and the fused epilogue; flash attention (f32 and bf16, d = 64 and 128,
    # causal or not: every instantiation), the naive path's softmax and the delta kernel,
    # at N = 65 (one past a tile); every layer op. cuBLAS is left out (not our code).
    "sanitizer-memcheck         10    15   sanitize   memcheck copy/vec16/f32/n1000003 matmul/simt/f32/m127-n257-k131 matmul/mma/bf16/m127-n257-k131 matmul/wgmma/bf16/m127-n257-k131 m129-n200-k72-bias-gelu -n65-d64 -n65-d128 /t33-c128 layers/adamw/ /t33-c72-v515 flash-wgmma/bf16/fwd/b2-h3-n129- flash-m128/bf16/fwd/b2-h3-n129-"
    # The kernels whose barriers span warpgroups or blocks (named-barrier ping-pong, cluster
    # multicast) in a step of their own: a hang there costs only this step.
    "sanitizer-memcheck-cross   6     15   sanitize   memcheck flash-wgmma-pp/bf16/fwd/b2-h3-n129- flash-wgmma-persistent/bf16/fwd/b2-h32-n1000-d64-causal matmul/wgmma-cluster/bf16/m127-n257-k131 wgmma-tma-store/bf16/m129-n200-k72-bias-gelu-res flash-wgmma-bwd/bf16/fwd+bwd/b2-h3-n129-"
    "sanitizer-racecheck        10    15   sanitize   racecheck copy/vec16/f32/n1000003 matmul/simt/f32/m127-n257-k131 matmul/mma/bf16/m127-n257-k131 matmul/wgmma/bf16/m127-n257-k131 m129-n200-k72-bias-gelu -n65-d64 -n65-d128 /t33-c128 layers/adamw/ /t33-c72-v515 flash-m128/bf16/fwd/b2-h3-n129-"
    "sanitizer-synccheck        8     15   sanitize   synccheck copy/vec16/f32/n1000003 matmul/simt/f32/m127-n257-k131 matmul/mma/bf16/m127-n257-k131 matmul/wgmma/bf16/m127-n257-k131 m129-n200-k72-bias-gelu -n65-d64 -n65-d128 /t33-c128 layers/adamw/ /t33-c72-v515 flash-m128/bf16/fwd/b2-h3-n129-"
    # The quick profile, one family per process, each into its own report folder (the bench
    # rewrites its report after every case), merged into OUT/report after every step.
    # Copy and cuBLAS first: they are the ceilings every other rate is a fraction of.
    "bench-copy                 5     10   bench      copy/"
    "bench-matmul-cublas        8     10   bench      matmul/cublas/"
    "bench-matmul-simt          8     10   bench      matmul/simt/"
    "bench-matmul-mma           8     10   bench      matmul/mma/"
    "bench-matmul-wgmma         8     10   bench      matmul/wgmma/"
    "bench-matmul-wgmma-banded  8     10   bench      matmul/wgmma-banded/"
    "bench-matmul-wgmma-wide    8     10   bench      matmul/wgmma-wide/"
    "bench-matmul-wgmma-cluster 8     10   bench      matmul/wgmma-cluster/"
    "bench-matmul-tma-store     8     10   bench      matmul/wgmma-tma-store/"
    "bench-attention-flash      12    10   bench      attention/flash/"
    "bench-attention-wgmma      8     10   bench      attention/flash-wgmma/"
    "bench-attention-m128       8     10   bench      attention/flash-m128/"
    "bench-attention-wgmma-pp   8     10   bench      attention/flash-wgmma-pp/"
    "bench-attention-persistent 8     10   bench      attention/flash-wgmma-persistent/"
    "bench-attention-wgmma-bwd  8     10   bench      attention/flash-wgmma-bwd/"
    "bench-headline             8     10   bench      headline"
    "bench-attention-naive      10    10   bench      attention/naive/"
    "bench-loss                 6     10   bench      loss/"
    "bench-train                12    10   bench      train/"
    "bench-collective           5     10   bench      collective/"
    "bench-shard                12    10   bench      shard/"
    # 25 simulated-allocator cases: about 35 s on two host cores in the dry run.
    "bench-alloc                10    10   bench      alloc/"
    # Whatever is left (less the compare's share), each case capped at --max-seconds.
    "torch-peer                 100   30   torch"
    # The peer's memory snapshots of its training cases through every allocator.
    "replay-snapshots           3     5    replay"
    "compare                    3     5    compare"
)

# ---------------------------------------------------------------------------------------
# Steps, run as their own process: `device-check.sh --run-step KIND ARGS…` with the
# settings in DC_* variables. Each writes its log on stdout/stderr.

find_tool() {
    local name="$1" d
    if command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
        return 0
    fi
    for d in /usr/local/cuda/bin "/usr/local/cuda/$name" /opt/nvidia/bin; do
        if [ -x "$d/$name" ]; then
            echo "$d/$name"
            return 0
        fi
    done
    return 1
}

step_info() {
    echo "== headroom info (HEADROOM_BACKEND=$HEADROOM_BACKEND)"
    "$DC_BINDIR/headroom" info
    local rc=$?
    echo
    echo "== nvidia-smi"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit,mig.mode.current --format=csv 2>&1
        nvidia-smi 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    echo
    echo "== toolkit"
    local nvcc
    if nvcc=$(find_tool nvcc); then "$nvcc" --version 2>&1 | tail -n 2; else echo "nvcc: not found (the kernels' toolkit is in headroom info's 'built by nvcc' line)"; fi
    echo
    echo "== cuBLAS and NCCL libraries the loader knows (headroom info above names the cuBLAS it loaded)"
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    ldconfig -p 2>/dev/null | grep -E 'libcublas(Lt)?\.so' || echo "ldconfig knows no libcublas"
    # NCCL (the sharded steps' collectives) is loaded at run time as libnccl.so.2.
    ldconfig -p 2>/dev/null | grep -E 'libnccl\.so' || echo "ldconfig knows no libnccl"
    local d
    for d in ${LD_LIBRARY_PATH//:/ }; do
        [ -e "$d/libnccl.so.2" ] && echo "libnccl.so.2 in $d"
    done
    echo
    echo "== SASS"
    local cuobjdump hgmma
    if cuobjdump=$(find_tool cuobjdump); then
        hgmma=$("$cuobjdump" -sass -arch sm_90a "$DC_BINDIR/headroom" 2>/dev/null | grep -c HGMMA)
        echo "HGMMA instructions in the sm_90a SASS of headroom: ${hgmma:-0}"
    else
        echo "HGMMA instructions: not counted (cuobjdump not found)"
    fi
    echo
    echo "== compute-sanitizer"
    local cs
    if cs=$(find_tool compute-sanitizer); then "$cs" --version 2>&1 | tail -n 1; else echo "compute-sanitizer: not found"; fi
    echo
    echo "== python and PyTorch"
    "$DC_PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "sees a GPU:", torch.cuda.is_available())' 2>&1 | tail -n 1
    return $rc
}

step_check() {
    # `--`: a filter may begin with a dash (-n65-d64).
    "$DC_BINDIR/headroom" check -- "$@"
}

step_sanitize() {
    local tool="$1"
    shift
    local cs
    if [ "$DC_DRY" = 1 ]; then
        echo "dry run: the cases without compute-sanitizer (the CPU backend runs no CUDA kernels)"
        "$DC_BINDIR/headroom" check -- "$@"
        return
    fi
    cs=$(find_tool compute-sanitizer) || return 1
    # --error-exitcode: a hazard or an error fails the step even when every check passed.
    "$cs" --tool "$tool" --error-exitcode 86 --print-limit 20 "$DC_BINDIR/headroom" check -- "$@"
}

step_bench() {
    local filter="$1" dir="$2"
    mkdir -p "$dir"
    cd "$dir" || return 1
    # `--bench` puts criterion in benchmark mode, as `cargo bench` does; criterion keeps its
    # own files under CRITERION_HOME.
    HEADROOM_REPORT_DIR="$dir" CRITERION_HOME="$DC_OUT/criterion" \
        "$DC_BINDIR/headroom-bench" --bench "$filter"
}

step_torch() {
    local peer="" p
    for p in "$here/peers/torch/headroom_torch.py" "$here/../peers/torch/headroom_torch.py"; do
        [ -f "$p" ] && peer="$p" && break
    done
    [ -n "$peer" ] || {
        echo "peers/torch/headroom_torch.py is not beside this script"
        return 1
    }
    mkdir -p "$DC_OUT/torch"
    "$DC_BINDIR/headroom" cases --format json >"$DC_OUT/torch/cases.json" || return 1
    local device=cuda
    [ "$DC_DRY" = 1 ] && device=cpu
    # The report is rewritten after every case: a timeout keeps what was measured.
    "$DC_PYTHON" "$peer" --cases "$DC_OUT/torch/cases.json" --out "$DC_OUT/torch" \
        --device "$device" --max-seconds "${HEADROOM_TORCH_MAX_SECONDS:-5}" \
        --snapshots "$DC_OUT/torch/snapshots"
}

# Each memory snapshot the peer dumped, replayed through every allocator into its own
# report folder under OUT/replay.
step_replay() {
    local f stem status=0
    for f in "$DC_OUT"/torch/snapshots/*.pickle; do
        [ -f "$f" ] || continue
        stem=$(basename "$f" .pickle)
        echo "== $stem"
        "$DC_BINDIR/headroom" replay "$f" --out "$DC_OUT/replay/$stem" || status=1
    done
    return $status
}

step_compare() {
    "$DC_BINDIR/headroom" compare "$1" "$2"
}

# Merges the per-family reports into OUT/report/<device>.json, then lets `headroom report`
# recompute the run's ceilings and every case's fraction of them and draw the plots.
merge_reports() {
    local files
    files=$(ls "$DC_OUT"/bench/*/*.json 2>/dev/null | grep -v -e '-torch\.json$')
    [ -n "$files" ] || return 0
    command -v "$DC_PYTHON" >/dev/null 2>&1 || {
        echo "$DC_PYTHON not found: the reports stay one per family under bench/"
        return 1
    }
    mkdir -p "$DC_OUT/report"
    local merged
    # shellcheck disable=SC2086 # one path per word, none with spaces (OUT is checked)
    merged=$("$DC_PYTHON" - "$DC_OUT/report" $files <<'PY'
import json, os, sys
out_dir, paths = sys.argv[1], sys.argv[2:]
base, seen = None, set()
for p in paths:  # step order: the folders are numbered
    with open(p) as f:
        r = json.load(f)
    if base is None:
        base = dict(r, cases=[], headline=[], warnings=[])
    base["created_unix"] = max(base.get("created_unix", 0), r.get("created_unix", 0))
    for c in r.get("cases", []):
        if c["id"] not in seen:
            seen.add(c["id"])
            base["cases"].append(c)
    base["headline"] += r.get("headline", [])
    for w in r.get("warnings", []):
        if w not in base["warnings"]:
            base["warnings"].append(w)
for key in ("headline", "warnings"):
    if not base[key]:
        del base[key]
name = os.path.basename(paths[0])
tmp = os.path.join(out_dir, name + ".tmp")
with open(tmp, "w") as f:
    json.dump(base, f, indent=2)
os.replace(tmp, os.path.join(out_dir, name))
print(os.path.join(out_dir, name))
PY
    ) || return 1
    "$DC_BINDIR/headroom" report "$merged"
}

if [ "${1:-}" = "--run-step" ]; then
    kind="$2"
    shift 2
    case "$kind" in
    info) step_info ;;
    check) step_check "$@" ;;
    sanitize) step_sanitize "$@" ;;
    bench) step_bench "$@" ;;
    torch) step_torch ;;
    replay) step_replay ;;
    compare) step_compare "$@" ;;
    merge) merge_reports ;;
    *)
        echo "unknown step kind $kind"
        exit 2
        ;;
    esac
    exit $?
fi

# ---------------------------------------------------------------------------------------
# Arguments

out=""
budget_s=""
minutes=8
bindir=""
dry=0
list_only=0
while [ $# -gt 0 ]; do
    case "$1" in
    --minutes) [ $# -ge 2 ] || die "--minutes needs a number"; minutes="$2"; shift 2 ;;
    --minutes=*) minutes="${1#*=}"; shift ;;
    --seconds) [ $# -ge 2 ] || die "--seconds needs a number"; budget_s="$2"; shift 2 ;;
    --seconds=*) budget_s="${1#*=}"; shift ;;
    --bindir) [ $# -ge 2 ] || die "--bindir needs a folder"; bindir="$2"; shift 2 ;;
    --bindir=*) bindir="${1#*=}"; shift ;;
    --dry-run) dry=1; shift ;;
    --list-steps) list_only=1; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option $1" ;;
    *)
        [ -z "$out" ] || { usage >&2; die "one OUT folder, not '$out' and '$1'"; }
        out="$1"
        shift
        ;;
    esac
done

if [ "$list_only" = 1 ]; then
    for s in "${STEPS[@]}"; do
        read -r name share min kind args <<<"$s"
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$share" "$min" "$kind" "${args:-}"
    done
    exit 0
fi

[ -n "$out" ] || { usage >&2; exit 2; }
command -v timeout >/dev/null 2>&1 || die "needs coreutils' timeout, which is not on PATH"
case "$out" in *[[:space:]]*) die "OUT must not contain spaces: '$out'" ;; esac
if [ -z "$budget_s" ]; then
    budget_s=$(awk -v m="$minutes" 'BEGIN { if (m + 0 > 0 && m ~ /^[0-9.]+$/) printf "%d", m * 60; else print "bad" }')
    [ "$budget_s" != bad ] || die "--minutes takes a positive number, not '$minutes'"
fi
case "$budget_s" in '' | *[!0-9]*) die "--seconds takes a whole positive number, not '$budget_s'" ;; esac
[ "$budget_s" -ge 10 ] || die "a budget under 10 seconds leaves no step time to run"

if [ -z "$bindir" ]; then
    for d in "$here/bin" "$here/../dist/bin"; do
        [ -x "$d/headroom" ] && bindir="$d" && break
    done
fi
[ -n "$bindir" ] && [ -x "$bindir/headroom" ] ||
    die "no headroom binary found (give --bindir, or run scripts/package.sh on a build machine first)"
bindir="$(cd "$bindir" && pwd)"
mkdir -p "$out/logs" || die "cannot create $out"
out="$(cd "$out" && pwd)"

# ---------------------------------------------------------------------------------------
# The environment every step shares

backend=cuda
[ "$dry" = 1 ] && backend=cpu
export HEADROOM_BACKEND="$backend"
export HEADROOM_PROFILE="${HEADROOM_PROFILE:-quick}"
# One seed for every process, so the merged report names the inputs it measured.
export HEADROOM_SEED="${HEADROOM_SEED:-$(( (RANDOM << 30) ^ (RANDOM << 15) ^ RANDOM ))}"
export DC_BINDIR="$bindir" DC_OUT="$out" DC_DRY="$dry"
export DC_PYTHON="${HEADROOM_PYTHON:-python3}"

# cuBLAS (the matmul baseline) is loaded at run time: offer the toolkit's and PyTorch's copies.
extra=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && extra="$extra:$d"
done
torch_libs=$("$DC_PYTHON" - 2>/dev/null <<'PY'
import glob, os
try:
    import nvidia
    for p in nvidia.__path__:
        for d in glob.glob(os.path.join(p, "*", "lib")):
            print(d)
except Exception:
    pass
PY
)
for d in $torch_libs; do extra="$extra:$d"; done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}${extra}"

# ---------------------------------------------------------------------------------------
# Bookkeeping: time, results, the summary

now_ms() { date +%s%3N; }
start_ms=$(now_ms)
deadline_ms=$((start_ms + budget_s * 1000))
started_at=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
hang="${HEADROOM_DEVICE_CHECK_HANG:-}"

R_NAME=() R_STATUS=() R_TIME=() R_LIMIT=() R_HEAD=()
n_steps=${#STEPS[@]}
state="running"
merge_note=""
current=""

secs() { awk -v ms="$1" 'BEGIN { printf "%.1f s", ms / 1000 }'; }

# Markdown table cells hold no pipes or newlines.
cell() { tr '\n|' ' /' <<<"$1" | sed 's/ *$//'; }

write_summary() {
    local tmp="$out/summary.md.tmp" i ok=0 failed=0 hung=0 notrun=0 elapsed
    elapsed=$(($(now_ms) - start_ms))
    for ((i = 0; i < ${#R_NAME[@]}; i++)); do
        case "${R_STATUS[$i]}" in
        ok*) ok=$((ok + 1)) ;;
        hung*) hung=$((hung + 1)) ;;
        not\ run*) notrun=$((notrun + 1)) ;;
        *) failed=$((failed + 1)) ;;
        esac
    done
    {
        if [ "$dry" = 1 ]; then
            echo "# headroom device check: DRY RUN on the CPU backend"
            echo
            echo "**Dry run** (\`--dry-run\`): every step ran on the CPU backend (HEADROOM_BACKEND=cpu);"
            echo "nothing here was measured on a GPU."
        else
            echo "# headroom device check"
        fi
        echo
        echo "- started $started_at on $(hostname 2>/dev/null || echo '?'); budget $budget_s s; backend \`$backend\`; profile \`$HEADROOM_PROFILE\`; seed $HEADROOM_SEED"
        echo "- binaries: \`$bindir\` ($("$bindir/headroom" --version 2>/dev/null || echo 'version unknown'))"
        if [ -n "$hang" ]; then
            echo "- HEADROOM_DEVICE_CHECK_HANG=$hang: those steps were made to hang (a test of the time limits)"
        fi
        case "$state" in
        running) echo "- **still running** (step $((${#R_NAME[@]} + 1)) of $n_steps: $current) after $(secs "$elapsed")" ;;
        interrupted) echo "- **interrupted** during $current after $(secs "$elapsed")" ;;
        *) echo "- finished in $(secs "$elapsed"): $ok ok, $failed failed, $hung hung, $notrun not run" ;;
        esac
        echo
        echo "| # | step | status | time | limit | headline |"
        echo "| --- | --- | --- | --- | --- | --- |"
        for ((i = 0; i < ${#R_NAME[@]}; i++)); do
            echo "| $((i + 1)) | ${R_NAME[$i]} | $(cell "${R_STATUS[$i]}") | ${R_TIME[$i]} | ${R_LIMIT[$i]} | $(cell "${R_HEAD[$i]}") |"
        done
        if [ -f "$out/report/.merged" ]; then
            echo
            echo "## Report"
            echo
            cat "$out/report/.merged"
        fi
        [ -z "$merge_note" ] || { echo; echo "$merge_note"; }
        echo
        echo "Each step's output: \`logs/<nn>-<step>.log\`. Per-family reports: \`bench/<nn>-<step>/\`;"
        echo "merged: \`report/\`; the PyTorch peer: \`torch/\`."
    } >"$tmp" && mv -f "$tmp" "$out/summary.md"
}

on_signal() {
    state="interrupted"
    write_summary
    echo "device-check.sh: interrupted; partial summary in $out/summary.md" >&2
    exit 130
}
trap on_signal INT TERM

# The figures worth reading first, from a step's log.
headline_of() {
    local kind="$1" log="$2" s=""
    case "$kind" in
    info)
        s=$(grep -m1 '^backend:' "$log")
        s="$s; $(grep -m1 '^device:' "$log" | sed 's/^device: //')"
        local v
        v=$(grep -m1 'driver supports CUDA' "$log" | sed 's/^ *//') && s="$s; $v"
        v=$(grep -m1 '^kernels: built by' "$log" | sed 's/^kernels: built by nvcc //; s/Cuda compilation tools, //') && s="$s; toolkit $v"
        v=$(awk -F', ' '/^name, driver_version/ { getline; print "driver " $2; exit }' "$log")
        [ -z "$v" ] || s="$s; $v"
        v=$(grep -m1 'libcublas.so:' "$log" | sed 's/^ *//') && s="$s; $v"
        v=$(grep -m1 'wgmma matmul:' "$log" | sed 's/^ *//') && s="$s; $v"
        v=$(grep -m1 '^HGMMA instructions' "$log") && s="$s; $v"
        ;;
    check | sanitize)
        s=$(grep -E '^check: [0-9]+ passed' "$log" | tail -n 1)
        local first
        first=$(grep -m1 '^FAIL' "$log" | awk '{print $3}')
        [ -z "$first" ] || s="$s; first failure $first"
        first=$(grep -m1 -o 'device fault in [^ )]*' "$log")
        [ -z "$first" ] || s="$s; $first"
        # compute-sanitizer's closing lines: "ERROR SUMMARY: 0 errors",
        # "RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)".
        first=$(grep -E '(ERROR|RACECHECK) SUMMARY' "$log" | tail -n 1 | sed 's/^========= //')
        [ -z "$first" ] || s="$s; $first"
        [ -n "$s" ] || s=$(grep -v '^\s*$' "$log" | tail -n 1)
        ;;
    bench)
        # One line per case: "<status> <id>  <ms>  <rate>…"; the best rate, the statuses, and
        # the `headline:` lines the bench prints.
        s=$(awk '
            $1 ~ /^(ok|oom|invalid|skipped|error)$/ && $2 ~ /\// {
                n[$1]++
                for (i = 3; i < NF; i++) if ($(i + 1) == "TFLOP/s" || $(i + 1) == "GB/s") {
                    v = $i + 0; u = $(i + 1)
                    if (!(u in best) || v > best[u]) { best[u] = v; at[u] = $2 }
                }
            }
            END {
                out = ""
                for (k in n) out = out (out ? ", " : "") n[k] " " k
                for (u in best) out = out "; best " best[u] " " u " (" at[u] ")"
                print out
            }' "$log")
        local h
        h=$(grep '^headline:' "$log" | sed 's/^headline: //' | paste -sd ';' -)
        [ -z "$h" ] || s="${s:+$s; }$h"
        [ -n "$s" ] || s=$(grep -v '^\s*$' "$log" | tail -n 1)
        ;;
    torch)
        s=$(awk '$1 ~ /^(ok|oom|invalid|skipped|error)$/ { n[$1]++ } END { for (k in n) printf "%s%d %s", (c++ ? ", " : ""), n[k], k }' "$log")
        [ -n "$s" ] || s=$(grep -v '^\s*$' "$log" | tail -n 1)
        ;;
    *) s=$(grep -v '^\s*$' "$log" | tail -n 1) ;;
    esac
    echo "$s" | cut -c1-400
}

# A step that did not run gets a row too, so the summary lists every step.
record() {
    R_NAME+=("$1")
    R_STATUS+=("$2")
    R_TIME+=("$3")
    R_LIMIT+=("$4")
    R_HEAD+=("$5")
    write_summary
}

merge_after_bench() {
    local left_ms limit
    left_ms=$((deadline_ms - $(now_ms)))
    limit=$((left_ms / 1000 < 30 ? left_ms / 1000 : 30))
    if [ "$limit" -lt 1 ]; then
        merge_note="The last reports were not merged (no time left); see bench/."
        return
    fi
    if timeout -k 2 "$limit" "$self" --run-step merge >>"$out/logs/merge.log" 2>&1; then
        merge_note=""
        "$DC_PYTHON" - "$out/report" >"$out/report/.merged.tmp" 2>/dev/null <<'PY' && mv -f "$out/report/.merged.tmp" "$out/report/.merged"
import glob, json, os, sys
d = sys.argv[1]
path = [p for p in glob.glob(os.path.join(d, "*.json")) if not p.endswith("-torch.json")][0]
r = json.load(open(path))
c = r.get("ceilings", {})
fmt = lambda v, scale, unit: "-" if v is None else f"{v / scale:.1f} {unit}"
counts = {}
for case in r["cases"]:
    s = case["status"] if isinstance(case["status"], str) else next(iter(case["status"]))
    counts[s] = counts.get(s, 0) + 1
print(f"- merged report: `report/{os.path.basename(path)}` (+ `.md` and plots), "
      f"{len(r['cases'])} cases: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
print(f"- ceilings: copy {fmt(c.get('copy_bytes_per_s'), 1e9, 'GB/s')}, "
      f"cuBLAS fp32 {fmt(c.get('cublas_f32_flops_per_s'), 1e12, 'TFLOP/s')}, "
      f"cuBLAS bf16 {fmt(c.get('cublas_bf16_flops_per_s'), 1e12, 'TFLOP/s')}")
best = {}
for case in r["cases"]:
    x = case.get("speed_vs_baseline")
    if x is not None and case["technique"] != "cublas":
        k = (case["technique"], case["dtype"])
        if k not in best or x > best[k][0]:
            best[k] = (x, case["id"])
for (t, dt), (x, i) in sorted(best.items()):
    print(f"- best {t} {dt}: {x:.2f}x cuBLAS ({i})")
for h in r.get("headline", []):
    b = h["budget_bytes"]
    size = f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"
    print(f"- headline: under {size} the longest {h['variant']} bf16 "
          f"forward+backward sequence is {h['longest_seq']}")
PY
    else
        merge_note="The per-family reports could not be merged: see logs/merge.log (they stay in bench/)."
    fi
}

# ---------------------------------------------------------------------------------------
# The run

label=""
[ "$dry" = 1 ] && label=" (DRY RUN on the CPU backend)"
echo "device-check.sh: $n_steps steps in $budget_s s on $backend$label; logs in $out"
write_summary

own_report=""
torch_report=""
i=0
for s in "${STEPS[@]}"; do
    i=$((i + 1))
    read -r name share min kind args <<<"$s"
    current="$name"
    nn=$(printf '%02d' "$i")
    log="$out/logs/$nn-$name.log"
    left_s=$(((deadline_ms - $(now_ms)) / 1000 - RESERVE_S))
    # The peer leaves the snapshot replay and the compare their shares.
    [ "$kind" = torch ] && left_s=$((left_s - 2 * (budget_s * 3 / 100 + FLOOR_S)))
    limit=$((budget_s * share / 100))
    [ "$limit" -ge "$FLOOR_S" ] || limit=$FLOOR_S
    [ "$limit" -le "$left_s" ] || limit=$left_s
    if [ "$left_s" -lt "$min" ]; then
        record "$name" "not run (no time left)" "-" "-" ""
        printf '[%2d/%d] %-24s not run (no time left)\n' "$i" "$n_steps" "$name"
        continue
    fi
    # shellcheck disable=SC2206 # the arguments are words without spaces
    argv=($args)
    cmd=("$self" --run-step "$kind" "${argv[@]}")
    case "$kind" in
    bench)
        if [ ! -x "$bindir/headroom-bench" ]; then
            record "$name" "failed: no headroom-bench in --bindir" "-" "-" "scripts/package.sh builds it"
            printf '[%2d/%d] %-24s failed: no headroom-bench\n' "$i" "$n_steps" "$name"
            continue
        fi
        cmd+=("$out/bench/$nn-$name")
        ;;
    sanitize)
        if [ "$dry" = 0 ] && ! find_tool compute-sanitizer >/dev/null; then
            record "$name" "not run (compute-sanitizer not found)" "-" "-" ""
            printf '[%2d/%d] %-24s not run (compute-sanitizer not found)\n' "$i" "$n_steps" "$name"
            continue
        fi
        ;;
    torch)
        if ! "$DC_PYTHON" -c 'import torch' >/dev/null 2>&1; then
            record "$name" "not run ($DC_PYTHON cannot import torch)" "-" "-" ""
            printf '[%2d/%d] %-24s not run (%s cannot import torch)\n' "$i" "$n_steps" "$name" "$DC_PYTHON"
            continue
        fi
        ;;
    replay)
        if ! ls "$out"/torch/snapshots/*.pickle >/dev/null 2>&1; then
            record "$name" "not run (the PyTorch peer wrote no memory snapshots)" "-" "-" ""
            printf '[%2d/%d] %-24s not run (no snapshots)\n' "$i" "$n_steps" "$name"
            continue
        fi
        ;;
    compare)
        own_report=$(ls "$out"/report/*.json 2>/dev/null | grep -v -e '-torch\.json$' | head -n 1)
        torch_report=$(ls "$out"/torch/*-torch.json 2>/dev/null | head -n 1)
        if [ -z "$own_report" ] || [ -z "$torch_report" ]; then
            record "$name" "not run (needs the merged report and the PyTorch peer's)" "-" "-" ""
            printf '[%2d/%d] %-24s not run (needs both reports)\n' "$i" "$n_steps" "$name"
            continue
        fi
        cmd+=("$own_report" "$torch_report")
        ;;
    esac
    if [[ ",$hang," == *",$name,"* ]]; then
        # Test-only: this step hangs, far beyond any limit it could get.
        cmd=(sleep $((limit * 20 + 600)))
        echo "HEADROOM_DEVICE_CHECK_HANG=$hang: this step sleeps instead of running" >"$log"
    else
        : >"$log"
    fi
    printf '[%2d/%d] %-24s limit %3d s ... ' "$i" "$n_steps" "$name" "$limit"
    write_summary
    t0=$(now_ms)
    # Own process group, TERM at the limit, KILL 5 s later if TERM is ignored.
    timeout -k 5 "$limit" "${cmd[@]}" >>"$log" 2>&1 </dev/null
    rc=$?
    took=$(($(now_ms) - t0))
    if { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ "$took" -ge $(((limit - 1) * 1000)) ]; then
        status="hung (timeout after ${limit}s)"
        echo "device-check.sh: no result within ${limit} s; stopped" >>"$log"
    elif [ "$rc" -eq 0 ]; then
        status="ok"
        [ "$kind" = sanitize ] && [ "$dry" = 1 ] && status="ok (dry run: without compute-sanitizer)"
    elif [ "$rc" -eq 86 ]; then
        status="failed (compute-sanitizer found errors)"
    else
        status="failed ($rc)"
    fi
    record "$name" "$status" "$(secs "$took")" "${limit} s" "$(headline_of "$kind" "$log")"
    echo "$status ($(secs "$took"))"
    # A bench step's cases, whatever its status, join the merged report at once.
    if [ "$kind" = bench ] && [ -d "$out/bench/$nn-$name" ]; then
        merge_after_bench
        write_summary
    fi
done

state="finished"
current=""
write_summary
echo "device-check.sh: summary in $out/summary.md"
grep -q -E '^\| [0-9]+ \| [^|]+ \| (failed|hung)' "$out/summary.md" && exit 1
exit 0
