#!/usr/bin/env bash
# torch-cuda fp16 (torch.compile with CUDA graphs) next to diffusers' eager fp16 pipeline, in one
# `coreml-sd bench` run on one CUDA GPU, full-size SD 1.5 architecture with random weights.
# Writes benchmarks/results/$NAME.{json,md,png} and prints the step ratio against the target
# (torch-cuda step <= 0.5 x diffusers eager fp16 step, same run).
#
#   bash benchmarks/cuda_run.sh                      # reduce-overhead: inductor + CUDA graphs (~1-2 min to compile)
#   MODE=max-autotune bash benchmarks/cuda_run.sh    # also autotunes GEMM/conv kernels (several minutes to compile)
#
# Needs: this repository installed (`pip install -e .[bench]`), torch with CUDA, a C compiler and
# Triton for inductor. Nothing is downloaded: the model is built from SD 1.5's config.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${MODE:-reduce-overhead}"
NAME="${NAME:-cuda_sd15}"
STEPS="${STEPS:-30}"

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
python -m coreml_sd bench \
    --backends torch-cuda:fp16,diffusers \
    --torch-compile "$MODE" --warmup 3 --steps "$STEPS" --runs 5 --e2e-steps 20 \
    -o benchmarks/results --name "$NAME" "$@"

python - "benchmarks/results/$NAME.json" <<'PY'
import json, sys
runs = {r["label"]: r for r in json.load(open(sys.argv[1]))["runs"]}
ours, base = runs["torch-cuda:fp16"], runs["diffusers"]
if ours["status"] != "ok" or base["status"] != "ok":
    sys.exit(f"not measured: torch-cuda {ours['status']} ({ours['reason']}), diffusers {base['status']} ({base['reason']})")
a, b = ours["unet_step"]["median_s"], base["unet_step"]["median_s"]
print(f"UNet step: torch-cuda fp16 compiled {a * 1e3:.2f} ms, diffusers eager {b * 1e3:.2f} ms ({base['precision']}): "
      f"ratio {a / b:.3f} (target <= 0.5: {'met' if a / b <= 0.5 else 'NOT met'})")
PY
