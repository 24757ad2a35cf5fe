#!/usr/bin/env bash
# Builds self-contained binaries for a GPU box that has a driver but no Rust toolchain, and
# puts them with the device check in one folder:
#
#   scripts/package.sh [DIR]        (default: dist/)
#   -> DIR/bin/headroom, DIR/bin/headroom-bench, DIR/device-check.sh, DIR/peers/torch/
#
# Copy DIR to the GPU box and run `DIR/device-check.sh OUT`. The kernels are embedded; the
# CUDA runtime is linked statically; libcuda and libcublas are loaded at run time.
# HEADROOM_CUDA_ARCHS picks the architectures (default 80;86;89;90a; 90a alone builds fastest
# for an H100/H200).
set -euo pipefail
cd "$(dirname "$0")/.."
dist="${1:-dist}"
command -v nvcc >/dev/null || { echo "package.sh: nvcc is not on PATH; the binaries would carry no kernels" >&2; exit 1; }

cargo build --release --locked --bins
# The bench target's executable, as cargo names it.
bench=$(cargo bench --locked --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["kind"] == ["bench"] and m.get("executable"):
        print(m["executable"])')
[ -n "$bench" ] || { echo "package.sh: the bench executable was not found" >&2; exit 1; }

mkdir -p "$dist/bin"
cp "${CARGO_TARGET_DIR:-target}/release/headroom" "$dist/bin/headroom"
cp "$bench" "$dist/bin/headroom-bench"
cp scripts/device-check.sh "$dist/device-check.sh"
mkdir -p "$dist/peers/torch"
cp peers/torch/headroom_torch.py peers/torch/README.md "$dist/peers/torch/"
"$dist/bin/headroom" info | sed -n '/^kernels:/p'
echo "package.sh: $dist is ready; on the GPU box run: $dist/device-check.sh OUT"
