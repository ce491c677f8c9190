#!/bin/bash
# Where a GPU job's time goes before its work, on a GPU machine's own Python (benchmarks/results/gpu-startup.log,
# 2026-12-04, H200): a fresh `import torch`, the device's initialisation, and a cProfile of one smoke training job
# and one evaluation (the config of config/smoke.yaml with runtime.device cuda); then plain inference of a
# standard-width ResNet-50 FPN at 800 px in TF32 and IEEE float32, with cuDNN's benchmark mode off and on.
#   make gpu-wheels here; there: bash benchmarks/gpu_startup.sh [cuda|cpu]
set -u
R=$(cd "$(dirname "$0")/.." && pwd); DEV=${1:-cuda}; export PYTHONUNBUFFERED=1
python3 -c "import snakemake" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --target "$R/.gpu-site" "$R"/.whl/*.whl
export PYTHONPATH=$R/.gpu-site:$R
W=$(mktemp -d); cd "$W"
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
t=$(date +%s%N); python3 -c "import torch"; echo "import torch: $(ms "$t") ms"
t=$(date +%s%N); python3 -c "import torch; torch.zeros(1).to('$DEV')"; echo "import + cuda init: $(ms "$t") ms"
CFG=$(python3 - "$R" "$DEV" <<'PY'
import json, sys, yaml
from eigpipe import config
study = config.load(f"{sys.argv[1]}/config/smoke.yaml")
study["runtime"]["device"] = sys.argv[2]
print(json.dumps(study))
PY
)
python3 -m eigpipe.cli synth-data --config-json "$CFG" --out data > synth.log 2>&1; tail -1 synth.log
profile() {  # name, timeout, eigpipe arguments...
  local name=$1 limit=$2; shift 2
  t=$(date +%s%N); timeout -s INT "$limit" python3 -m cProfile -o "$name.prof" -m eigpipe.cli "$@" > "$name.log" 2>&1
  echo "$name: $(ms "$t") ms"; tail -2 "$name.log"
  python3 -c "import pstats; pstats.Stats('$name.prof').sort_stats('cumulative').print_stats(25)" 2>&1 | tail -34 | cut -c1-170
}
profile train 45 train --model faster_rcnn --init scratch --config-json "$CFG" --data data/detection/instances_train.json \
  --image-dir data/detection/train --out train --threads 1
profile evaluate 40 evaluate --config-json "$CFG" --checkpoint train/final.pt --data data/detection/instances_val.json \
  --image-dir data/detection/val --out eval.json --threads 1
cd "$R"; rm -rf "$W"
[ "$DEV" = cuda ] && timeout 60 python3 - <<'PY'
import sys, time
sys.path[:0] = ["benchmarks", "."]
import torch
import covariance as bench
from eigpipe import config
from eigpipe.spectral.layers import select_layers
model_cfg = {"width_multiplier": 1.0, "norm": "bn", "fpn_channels": 256, "zero_init_residual": False}
model_cfg = config.validate(model_cfg, "startup", config.schema()["properties"]["model"])
case = {"model": {**model_cfg, "min_size": 800, "max_size": 800}, "size": 800, "batch": 2}
device = torch.device("cuda")
model, meta = bench.build(case, device)
layers, data = select_layers(model, ["default"]), bench.batches(case, 8)
for benchmark in (False, True):
    torch.backends.cudnn.benchmark = benchmark
    for precision in ("tf32", "ieee"):
        torch.backends.cudnn.conv.fp32_precision = precision
        bench.plain(model, meta, layers, data[:1], device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        bench.plain(model, meta, layers, data, device)
        torch.cuda.synchronize()
        print(f"benchmark={benchmark} {precision}: {8 / (time.perf_counter() - start):.1f} img/s", flush=True)
PY
