#!/usr/bin/env bash
# The paper's Table 1 at full scale on one lent GPU (the device tool): the fused-training speed table,
# then the `paper` profile's grid, seed 0 first (its --output written when it ends), then seeds 1-2
# until the time is up. One command, within one call's 10 minutes:
#
#   run(command="bash benchmarks/gpu_table1.sh", carry=[".whl", "data"], timeout_s=590)
#
# Prepared here first (see the device tool's README for the wheel recipe, Python 3.12):
#   echo /.whl/ >> .git/info/exclude   (/data/ is ignored already)
#   the wheels of mlflow and of its needs that the device lacks (its image has torch, click, pluggy, timm,
#   safetensors, tqdm, matplotlib, pandas: ../.library/device/KINDS.md lists them), with the README's
#   `pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl NAME==VERSION`
#   mkdir -p data && cp ../shared/data/cifar10-jpeg.tar.xz ../shared/data/gtsrb-32px-jpeg.tar.xz data/
# The results come back as $OUT/gpu-table1.tar.gz: unpack it into benchmarks/results/ and render Table 1 with
#   python benchmarks/table1.py --profile paper --render-only --tag fused-seed0 --include fused-refool
set -uo pipefail
OUT=${OUT:-/tmp/gpu-table1-out}   # the device tool's $OUT: one archive comes back (at most 8 files may)
RES=/tmp/gpu-table1; mkdir -p "$RES" "$OUT"
SPEED_S=${SPEED_S:-100}    # the speed table
SEED0_S=${SEED0_S:-330}    # CIFAR-10's five attacks and GTSRB's Refool, seed 0, side by side
SEEDS_S=${SEEDS_S:-120}    # seeds 1-2, stopped (SIGTERM: bench run writes what finished) when this runs out
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
export NADBENCH_DATA_ROOT=${NADBENCH_DATA_ROOT:-$PWD/data} NADBENCH_CACHE=/tmp/nadbench PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$RES/gpu.txt"

timeout "$SPEED_S" python3 benchmarks/fused_speed.py --device cuda --models 1,2,4,7,14 --precision float32,bf16 \
  --steps 100 --reps 2 --out "$RES" > "$RES/speed.log" 2>&1

grid() {  # seconds, tag, seeds, extra `bench run` arguments: one fused grid of the paper profile
  local seconds=$1 tag=$2 seeds=$3; shift 3
  timeout -s TERM "$seconds" python3 -m nadbench.commands.cli run --profile paper --fused --seeds "$seeds" \
    --defenses finetune,fine-pruning,mcr,nad --tracking-uri "sqlite:////tmp/$tag.db" --no-progress \
    --output "$RES/table1-paper-$tag.json" "$@" > "$RES/$tag.log" 2>&1
}
start=$(date +%s)
# GTSRB's Refool model cannot fuse with CIFAR-10's (43 classes): its grid runs beside, in its own process.
grid "$SEED0_S" fused-seed0 0 --datasets cifar10 --attacks badnets,trojan,blend,cl,sig &
grid "$SEED0_S" fused-refool 0 --datasets gtsrb --attacks refool &
wait
echo "seed 0: $(( $(date +%s) - start )) s wall" >> "$RES/fused-seed0.log"
grid "$SEEDS_S" fused-seeds12 1,2 --datasets cifar10 --attacks badnets,trojan,blend,cl,sig
tar -C "$RES" -czf "$OUT/gpu-table1.tar.gz" .
tail -n 25 "$RES"/speed.log "$RES"/fused-seed0.log "$RES"/fused-refool.log
