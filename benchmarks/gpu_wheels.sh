#!/usr/bin/env bash
# The wheels `make gpu-check` needs on a GPU machine whose Python already has torch, torchvision, numpy, pandas,
# scipy, matplotlib, pyyaml, tqdm, pillow, pyarrow, pytest and hypothesis, but not snakemake, zarr or pycocotools
# (CALIBRATION.md, "The GPU machine"). Each package at its constraints.txt pin, for that machine's Python, into .whl/.
#   benchmarks/gpu_wheels.sh [python version, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-3.12}
# eigpipe's dependencies (and theirs) that the GPU machine's image lacks, and pandas at our pin
NEEDED="annotated-types argparse-dataclass conda-inject configargparse connection-pool docutils donfig dpath
fastjsonschema gitdb gitpython google-crc32c greenlet humanfriendly immutables jsonschema jsonschema-specifications
jupyter-core nbformat numcodecs pandas platformdirs pulp pycocotools pydantic pydantic-core referencing rpds-py
smart-open smmap snakemake snakemake-interface-common snakemake-interface-executor-plugins
snakemake-interface-logger-plugins snakemake-interface-report-plugins snakemake-interface-scheduler-plugins
snakemake-interface-storage-plugins sqlalchemy sqlmodel tenacity throttler traitlets typing-extensions
typing-inspection tzdata yte zarr"
PLATFORMS=""
for n in 1 2014 _2_17 _2_24 _2_27 _2_28 _2_31 _2_34 _2_35; do
  PLATFORMS="$PLATFORMS --platform manylinux${n}_x86_64"
done
mkdir -p .whl
for name in $NEEDED; do
  # the pin from constraints.txt (names compared case- and separator-insensitively)
  pin=$(grep -i -E "^${name//-/[-_.]}==" constraints.txt | head -1)
  [ -n "$pin" ] || { echo "gpu_wheels.sh: $name has no pin in constraints.txt" >&2; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    $PLATFORMS -d .whl "$pin" 2>/dev/null \
  || python3 -m pip wheel -q --no-deps -w .whl "$pin"  # a pure-Python package published only as an sdist
done
echo "gpu_wheels.sh: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1), in .whl/"
