#!/usr/bin/env bash
# The one command for a GPU box: prints `headroom info`, validates every kernel
# (`headroom check`, then a few cases under compute-sanitizer where it is installed), runs the
# quick benchmark profile, then the PyTorch peer on the same cases where PyTorch is
# installed, and copies the reports and the logs into OUT.
#
#   device-check.sh OUT [BINDIR]
#
# BINDIR holds `headroom` and `headroom-bench` (scripts/package.sh makes it; default: the
# bin/ folder beside this script, else dist/bin of the checkout). Needs no Rust toolchain.
# Exits non-zero if a check failed or the bench could not write its report.
set -uo pipefail
out="${1:?usage: device-check.sh OUT [BINDIR]}"
here="$(cd "$(dirname "$0")" && pwd)"
bindir="${2:-}"
if [ -z "$bindir" ]; then
    for d in "$here/bin" "$here/../dist/bin"; do
        [ -x "$d/headroom" ] && bindir="$d" && break
    done
fi
[ -n "$bindir" ] && [ -x "$bindir/headroom" ] && [ -x "$bindir/headroom-bench" ] || {
    echo "device-check.sh: no headroom binaries found (run scripts/package.sh on a build machine first)" >&2
    exit 2
}
mkdir -p "$out"
out="$(cd "$out" && pwd)"
status=0

# cuBLAS (the matmul baseline) is loaded at run time: offer the toolkit's and PyTorch's copies.
extra=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && extra="$extra:$d"
done
torch_libs=$(python3 - 2>/dev/null <<'PY'
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

export HEADROOM_REPORT_DIR="$out"
export HEADROOM_PROFILE="${HEADROOM_PROFILE:-quick}"

{
    echo "== headroom info"
    "$bindir/headroom" info
    if command -v cuobjdump >/dev/null; then
        echo "== SASS: HGMMA instructions in the sm_90a code"
        cuobjdump -sass -arch sm_90a "$bindir/headroom" 2>/dev/null | grep -c HGMMA || true
    else
        echo "== SASS not inspected: cuobjdump is not installed"
    fi
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>/dev/null || true
} 2>&1 | tee "$out/info.log"

echo "== headroom check"
"$bindir/headroom" check 2>&1 | tee "$out/check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer on odd sizes"
    for f in copy/vec16/f32/n1000003 matmul/simt/f32/m127-n257-k131-nt matmul/mma/bf16/m127-n257-k131-tn \
        matmul/wgmma/bf16/m1000-n1064-k520 attention/flash/bf16/fwd+bwd/b2-h3-n77-d128-causal \
        attention/flash/f32/fwd+bwd/b2-h3-n77-d64 attention/naive/bf16/fwd+bwd/b2-h3-n77-d64-causal; do
        timeout 300 compute-sanitizer --tool memcheck --error-exitcode 3 "$bindir/headroom" check "$f" >>"$out/sanitizer.log" 2>&1 || {
            echo "compute-sanitizer found a problem in $f (see sanitizer.log)"
            status=1
        }
    done
    tail -n 3 "$out/sanitizer.log"
else
    echo "== compute-sanitizer not run: it is not installed"
fi

echo "== quick benchmark profile"
# `--bench` puts criterion in benchmark mode, as `cargo bench` does.
"$bindir/headroom-bench" --bench 2>&1 | tee "$out/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
ls "$out"/*.json >/dev/null 2>&1 || { echo "device-check.sh: no report was written" >&2; status=1; }
# The PyTorch peer: the same cases measured the way PyTorch users would, beside headroom's.
peer=""
for p in "$here/peers/torch/headroom_torch.py" "$here/../peers/torch/headroom_torch.py"; do
    [ -f "$p" ] && peer="$p" && break
done
if [ -n "$peer" ] && python3 -c 'import torch' >/dev/null 2>&1; then
    echo "== PyTorch peer"
    mkdir -p "$out/torch"
    if HEADROOM_BACKEND=cuda "$bindir/headroom" cases --format json >"$out/torch/cases.json"; then
        timeout "${HEADROOM_TORCH_TIMEOUT:-1200}" python3 "$peer" --cases "$out/torch/cases.json" \
            --out "$out" --device cuda --max-seconds "${HEADROOM_TORCH_MAX_SECONDS:-30}" 2>&1 |
            tee "$out/torch/torch.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "device-check.sh: the PyTorch peer failed (see torch/torch.log)"; status=1; }
        torch_json=$(ls -t "$out"/*-torch.json 2>/dev/null | head -n 1)
        own_json=$(ls -t "$out"/*.json 2>/dev/null | grep -v -e '-torch\.json$' | head -n 1)
        if [ -n "$torch_json" ] && [ -n "$own_json" ]; then
            "$bindir/headroom" compare "$own_json" "$torch_json" 2>&1 | tee "$out/torch/compare.txt"
        fi
    else
        echo "device-check.sh: headroom cases failed; the PyTorch peer did not run"; status=1
    fi
else
    echo "== PyTorch peer: skipped (python3 cannot import torch, or peers/torch is not beside this script)"
fi
echo "device-check.sh: report and logs in $out (status $status)"
exit $status
