#!/usr/bin/env bash
# Does scale put the embedded benchmark in CLIP's regime? The regime properties of
# bench/benchmark_properties.py (by default its parts zs and merge: zero-shot, and the first 8 experts
# trained from θ0, merged) at two scales of the base, 3 seeds each, all 6 runs at once on one GPU
# (under CUDA MPS when it starts):
#
#   default  the committed recipe: chronoclip-tiny (width 64, depth 2), pool 20,000, 3,000 steps x 128;
#            a control, to be compared with the README's CPU figures of the same seeds
#   scaled   width 256, depth 4, pretrained on 4x the samples (pool 100,000, 3,000 steps x 512, lr 1e-3)
#            with the pool's long tail (the adaptation tasks' concepts and domains) at 5% instead of 30%:
#            on 2 cores the tiny base pretrained on 8x the samples with the 30% tail learnt the adaptation
#            tasks (zero-shot A_KA 84) and left its experts 7 points to gain
#
# Fine-tuning is the default recipe at both scales.
#
#   bash bench/regime_at_scale.sh OUT_DIR [SECONDS [ARGS...]]
#
# SECONDS (default 300) bounds the whole check: every run starts at once and is stopped SECONDS after the
# start, so the command returns within it. A finished run appends one JSON line to OUT_DIR/regime-at-scale.jsonl
# (fields: benchmark_properties.py's docstring, plus "scale"); every run's progress (its base, zero-shot
# scores, each expert's gain, the merges' keep figures), prefixed with its scale and seed, goes to
# OUT_DIR/regime-at-scale.log as it comes, so a stopped run still says how far it got.
# ARGS go to every run after its scale's levers (a later option wins), e.g. --parts zs,experts,merge.
#
# Sized for a lent GPU's 15 minutes, all tries together (one start of 1-2 minutes, this command, and time
# to rerun it): the scaled base is 0.86 TFLOP a step at batch 512 (torch.utils.flop_counter), 2.6 PFLOP
# for its 3,000 steps and 7.8 PFLOP for the three seeds, about 2.6 minutes at 50 TFLOP/s; the default
# base is 0.027 TFLOP a step. On a machine whose Python has torch but not chronomerge's other packages,
# carry the wheels of `bash scripts/gpu_wheels.sh` (.whl) and run, in one call:
#   python3 -m pip install -q --no-deps --no-index .whl/*.whl && python3 -m pip install -q --no-deps \
#     --no-build-isolation -e . && bash bench/regime_at_scale.sh "$OUT" 300
# A quick check of the script (zero-shot only, 3-step bases on a 2,000-image pool; the six runs ended in
# 3 min 43 s on 2 cores that another job shared):
#   bash bench/regime_at_scale.sh /tmp/check 280 --parts zs --set pretrain.steps=3 --set pretrain.batch_size=8 --pool 2000
set -u
out=${1:?usage: bash bench/regime_at_scale.sh OUT_DIR [SECONDS [ARGS...]]}
limit=${2:-300}
shift $(($# < 2 ? $# : 2))
mkdir -p "$out"
work=$(mktemp -d)
bench=$(dirname "$0")
if nvidia-cuda-mps-control -d 2>/dev/null && timeout 60 python3 -c "import torch; torch.zeros(1).cuda()"; then
    echo "CUDA MPS on" >>"$out/regime-at-scale.log"
else
    echo quit | nvidia-cuda-mps-control 2>/dev/null
fi
declare -A levers=(
    [default]=""
    [scaled]="--pool 100000 --tail-share 0.05 --set pretrain.steps=3000 --set pretrain.batch_size=512 --set pretrain.lr=0.001 --width 256 --layers 4"
)
for scale in scaled default; do
    for seed in 0 1 2; do
        # shellcheck disable=SC2086  # the levers are words
        (timeout "$limit" python3 "$bench/benchmark_properties.py" --seed "$seed" --parts zs,merge \
            --data "$work/data-$scale-$seed" --store "$work/store-$scale-$seed" ${levers[$scale]} "$@" --verbose \
            --out "$work/$scale-$seed.jsonl" 2>&1 >/dev/null | sed -u "s/^/[$scale $seed] /" >>"$out/regime-at-scale.log"
         sed "s/^{/{\"scale\": \"$scale\", /" "$work/$scale-$seed.jsonl" >>"$out/regime-at-scale.jsonl" 2>/dev/null) &
    done
done
wait
echo quit | nvidia-cuda-mps-control 2>/dev/null
rm -rf "$work"
