#!/usr/bin/env bash
# Does scale put the embedded benchmark in CLIP's regime? The regime properties of
# bench/benchmark_properties.py (parts zs, experts, merge) at three scales of the base, 3 seeds each,
# all 9 runs at once on one GPU (under CUDA MPS when it starts):
#
#   default      the committed recipe: chronoclip-tiny (width 64, depth 2), pool 20,000, 3,000 steps x 128
#   scaled       width 256, depth 4, pretrained on 8x the samples (pool 100,000, 6,000 steps x 512) at lr 1e-3
#   scaled-thin  the same with the pool's long tail (the adaptation tasks' concepts and domains) at 5%
#                instead of 30%: on 2 cores the tiny base pretrained on 8x the samples learnt the adaptation
#                tasks from the 30% tail (zero-shot A_KA 84) and left its experts 7 points to gain
#
# Fine-tuning is the default recipe at every scale.
#
#   bash bench/regime_at_scale.sh OUT_DIR [SECONDS [ARGS...]]
#
# Appends one JSON line per run to OUT_DIR/regime-at-scale.jsonl (fields: benchmark_properties.py's docstring,
# plus "scale") and every run's progress, prefixed with its scale and seed, to OUT_DIR/regime-at-scale.log.
# Each run stops after SECONDS (default 3,000); a stopped run leaves its progress lines, not a result.
# ARGS go to every run after its scale's levers (a later option wins). A quick check of the script, zero-shot
# only from bases pretrained for 3 steps on a 2,000-image pool (on 2 cores the width-256 runs reach their
# zero-shot evaluation but not its end in 240 s):
#   bash bench/regime_at_scale.sh /tmp/check 240 --parts zs --set pretrain.steps=3 --set pretrain.batch_size=8 --pool 2000
set -u
out=${1:?usage: bash bench/regime_at_scale.sh OUT_DIR [SECONDS [ARGS...]]}
limit=${2:-3000}
shift $(($# < 2 ? $# : 2))
mkdir -p "$out"
work=$(mktemp -d)
bench=$(dirname "$0")
if nvidia-cuda-mps-control -d 2>/dev/null && timeout 60 python3 -c "import torch; torch.zeros(1).cuda()"; then
    echo "CUDA MPS on" >>"$out/regime-at-scale.log"
else
    echo quit | nvidia-cuda-mps-control 2>/dev/null
fi
scaled="--pool 100000 --set pretrain.steps=6000 --set pretrain.batch_size=512 --set pretrain.lr=0.001 --width 256 --layers 4"
declare -A levers=(
    [default]=""
    [scaled]="$scaled"
    [scaled-thin]="$scaled --tail-share 0.05"
)
for scale in scaled scaled-thin default; do
    for seed in 0 1 2; do
        # shellcheck disable=SC2086  # the levers are words
        (timeout "$limit" python3 "$bench/benchmark_properties.py" --seed "$seed" --parts zs,experts,merge \
            --data "$work/data-$scale-$seed" --store "$work/store-$scale-$seed" ${levers[$scale]} "$@" --verbose \
            --out "$work/$scale-$seed.jsonl" 2>&1 >/dev/null | sed -u "s/^/[$scale $seed] /" >>"$out/regime-at-scale.log"
         sed "s/^{/{\"scale\": \"$scale\", /" "$work/$scale-$seed.jsonl" >>"$out/regime-at-scale.jsonl" 2>/dev/null) &
    done
done
wait
echo quit | nvidia-cuda-mps-control 2>/dev/null
rm -rf "$work"
