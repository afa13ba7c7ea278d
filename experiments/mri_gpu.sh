#!/usr/bin/env bash
# The MRI experiment on one GPU, from pretraining to the results tables:
#   1. three backbones (nirvana, nirvana-notrigger, transformer; the small-scale size: d_model 512, 8 layers,
#      window 512, context 1024, 16k vocabulary) pretrained side by side on the real-text corpus, the same
#      TOKENS each, seed 0; meanwhile the phantom and real-anatomy data sets are generated on the CPU;
#   2. the MRI runs side by side, every method and stage with the same STEPS optimizer steps: phantoms and
#      real anatomy with the default recipe (stage 0, then the paper's stages 1 and 2); MRI_RUNS can add
#      phantoms-paper-stages, the phantoms with the paper's two stages alone (--encoder-pretrain-steps 0).
# Results (results.md, recon_grid_<acc>x.png, reports.md, ...) go to RESULTS/<run>; backbones, data sets and
# logs to WORK. A re-run keeps finished steps: a trained backbone, a generated data set, a finished MRI run. While
# an MRI run goes on, its results.md holds the methods finished so far (marked PARTIAL), to copy off a machine
# whose time runs out.
#
# Needs the corpus (python experiments/real_text.py --out data/real_text; its tokens/ folder travels to a GPU
# machine), nibabel and the Colin27 image of mricron-data (ANATOMY), as mri.py --anatomy does.
# Time on one H100 (the published run): pretraining 405-416 s (three backbones side by side, 170-200k tokens/s
# each), the data sets 90 s meanwhile, two MRI runs of 300 steps side by side 513 s, of which about 390 s is
# training and the rest scoring and --diagnose.
#   STEPS=300 MRI_RUNS="phantoms anatomy" bash experiments/mri_gpu.sh   # the published run (15.5 minutes)
#   STEPS=90 MRI_RUNS=phantoms-paper-stages bash experiments/mri_gpu.sh # the published paper-stages run
#   TOKENS=200000000 TRAIN_SECONDS=3600 STEPS=1000 bash experiments/mri_gpu.sh   # longer, both stages
#   MRI_EXTRA=--data-consistency STEPS=200 MRI_RUNS=phantoms bash experiments/mri_gpu.sh   # + an mri.py option
#   BACKBONES=nirvana MRI_EXTRA=--data-consistency RESULTS=experiments/results/mri-data-consistency \
#       bash experiments/mri_gpu.sh   # the published data-consistency run (one H100, 9 minutes)
#   BACKBONES=nirvana MRI_EXTRA=--image-skip RESULTS=experiments/results/mri-image-skip \
#       bash experiments/mri_gpu.sh   # the published skip run (one H100, 10.5 minutes)
#   MRI_EXTRA=--queries-see-kspace RESULTS=out/mri_queries bash experiments/mri_gpu.sh   # another option, apart
#   BACKBONES=nirvana MRI_EXTRA=--queries-see-kspace bash experiments/mri_gpu.sh          # one backbone only
#   PER_BACKBONE=1 MRI_EXTRA="--image-skip --stage1-steps 1000" RESULTS=experiments/results/mri-long-stage1 \
#       bash experiments/mri_gpu.sh   # the published long stage-1 run: six mri.py processes side by side (two
#                                     # sets x three backbones; one H100, 19.3 minutes)
#   BACKBONES=nirvana PER_BACKBONE=1 MRI_RUNS=anatomy RESULTS=experiments/results/mri-stage1-backbone/frozen \
#       MRI_EXTRA="--image-skip --stage1-steps 1000 --backbone-autocast" bash experiments/mri_gpu.sh
#   BACKBONES=nirvana PER_BACKBONE=1 RESULTS=experiments/results/mri-stage1-backbone/trained \
#       MRI_EXTRA="--image-skip --stage1-steps 1000 --backbone-autocast --stage1-backbone train" \
#       bash experiments/mri_gpu.sh   # the published stage-1-backbone runs (one H100; one after the other, the
#                                     # second reuses WORK's backbone and data sets)
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-data/real_text/tokens}
ANATOMY=${ANATOMY:-/usr/share/mricron/templates/ch2.nii.gz}
WORK=${WORK:-out/mri_gpu}
RESULTS=${RESULTS:-experiments/results/mri}
TOKENS=${TOKENS:-39321600}              # pretraining tokens per backbone (300 steps of 131,072)
TRAIN_SECONDS=${TRAIN_SECONDS:-600}     # pretraining stops here if TOKENS take longer (last checkpoint kept)
VOLUMES=${VOLUMES:-120}
STEPS=${STEPS:-300}                     # optimizer steps of every MRI method and stage
SEED=${SEED:-0}
# shellcheck disable=SC2206
BACKBONES=(${BACKBONES:-nirvana nirvana-notrigger transformer})  # BACKBONES=nirvana: one backbone, a shorter run
# Same data, masks, widths and steps for every method. Trainable parameters: E2E-VarNet (8 cascades of width
# 12) 533k, U-Net (32 channels) 465k, the pipeline around each backbone 685k; 6x is trained as well as scored
# (the paper's Table 11 is at 6x).
MRI_ARGS=(--train-acc 4,6,8 --eval-acc 4,6,8 --vit-stride 8 --chans 12 --varnet-cascades 8 --unet-chans 32
    --batch-size 16 --diagnose --seed "$SEED" --device cuda)
# shellcheck disable=SC2206
MRI_ARGS+=(${MRI_EXTRA:-})  # more mri.py options, e.g. MRI_EXTRA=--data-consistency (its two extra rows)
mkdir -p "$WORK" "$RESULTS"
export PYTHONUNBUFFERED=1
log() { echo "[mri_gpu $(date +%H:%M:%S) +${SECONDS}s] $*"; }
# The small-scale reproduction's model size and training settings (SIZES["small"] of experiments/small_scale.py):
# its preset size, then train.py options. Only the length (TOKENS), the micro-batch (three runs share the GPU)
# and the checkpoint interval are this script's own.
small=$(python -c 'import sys; sys.path.insert(0, "experiments"); from small_scale import SIZES
s = SIZES["small"]
print(s.preset_size, "--backend", s.backend, "--seq-len", s.context, "--global-batch-tokens", s.global_batch_tokens,
      "--warmup-tokens", s.warmup_tokens, "--lr", s.lr, "--eval-every", s.eval_every, "--eval-tokens", s.eval_tokens,
      *[f"--set {field}={value}" for field, value in s.overrides.items()])')
read -r -a SMALL <<< "$small"

# ---- 1. backbones and data sets, side by side
for variant in "${BACKBONES[@]}"; do
    run="$WORK/$variant"
    if [ -f "$run/done" ]; then continue; fi
    resume=()
    if [ -f "$run/ckpt.pt" ]; then resume=(--resume); fi
    log "pretraining $variant (${TOKENS} tokens, at most ${TRAIN_SECONDS}s)"
    (
        timeout "$TRAIN_SECONDS" python train.py --preset "$variant-${SMALL[0]}" "${SMALL[@]:1}" --data "$CORPUS" \
            --out "$run" "${resume[@]}" --seed "$SEED" --micro-batch 16 --max-tokens "$TOKENS" \
            --save-every 25 --log-every 25 && touch "$run/done"
    ) > "$WORK/pretrain-$variant.log" 2>&1 &
done
for set in phantoms anatomy; do
    if [ -f "$WORK/$set/preview.png" ]; then continue; fi
    anatomy=()
    if [ "$set" = anatomy ]; then anatomy=(--anatomy "$ANATOMY"); fi
    log "generating $set: $VOLUMES volumes x 16 slices, 64x64, 8 coils"
    python mri.py --generate "$WORK/$set" "${anatomy[@]}" --volumes "$VOLUMES" --slices 16 --size 64 \
        --coils 8 --seed "$SEED" --device cpu > "$WORK/generate-$set.log" 2>&1 &
done
wait
for variant in "${BACKBONES[@]}"; do
    test -f "$WORK/$variant/ckpt.pt" || { log "no checkpoint for $variant: see $WORK/pretrain-$variant.log"; exit 1; }
    log "$variant: $(grep -E '^step +[0-9]+/' "$WORK/pretrain-$variant.log" | tail -1)"
done
backbones=()
for variant in "${BACKBONES[@]}"; do backbones+=(--backbone "$WORK/$variant/ckpt.pt"); done

# the MRI runs: name, data set, extra options
# shellcheck disable=SC2206
RUNS=(${MRI_RUNS:-phantoms anatomy})  # MRI_RUNS="phantoms anatomy phantoms-paper-stages": all three
data_of() { case $1 in anatomy) echo "$WORK/anatomy" ;; *) echo "$WORK/phantoms" ;; esac; }
extra_of() { case $1 in phantoms-paper-stages) echo "--encoder-pretrain-steps 0" ;; *) echo "" ;; esac; }

# ---- 2. the MRI runs, side by side
# PER_BACKBONE=1: one mri.py process per run and backbone, all side by side (the GPU is far from busy with one
# backbone at a time; each process also trains and scores the baselines, which take about 30 s), written to
# RESULTS/<run>/<variant>, and experiments/mri_compare.py then writes RESULTS/<run>/compare.md and compare.png (one
# table, paired by test volume). Default: one process per run, every backbone in one results.md.
PER_BACKBONE=${PER_BACKBONE:-0}
jobs=()  # "<run> <out folder> <index of the backbone, or all>"
for name in "${RUNS[@]}"; do
    if [ "$PER_BACKBONE" = 1 ]; then
        for i in "${!BACKBONES[@]}"; do jobs+=("$name $name/${BACKBONES[$i]} $i"); done
    else
        jobs+=("$name $name all")
    fi
done
log "MRI runs with $STEPS steps per method and stage: ${RUNS[*]} (${#jobs[@]} processes)"
pids=()
finished() { [ -f "$RESULTS/$1/results.md" ] && ! grep -q "^PARTIAL:" "$RESULTS/$1/results.md"; }
for job in "${jobs[@]}"; do
    read -r name out which <<< "$job"
    if finished "$out"; then continue; fi
    rm -rf "${RESULTS:?}/$out"  # a run stopped part way left the results of the methods it had finished
    chosen=("${backbones[@]}")
    if [ "$which" != all ]; then chosen=(--backbone "$WORK/${BACKBONES[$which]}/ckpt.pt"); fi
    # shellcheck disable=SC2046
    python mri.py --data "$(data_of "$name")" $(extra_of "$name") "${MRI_ARGS[@]}" "${chosen[@]}" \
        --steps "$STEPS" --out "$RESULTS/$out" > "$WORK/mri-${out//\//-}-$STEPS.log" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || true; done  # a failed run is named below
for job in "${jobs[@]}"; do
    read -r name out which <<< "$job"
    finished "$out" || { log "$out failed: see $WORK/mri-${out//\//-}-$STEPS.log"; exit 1; }
done
if [ "$PER_BACKBONE" = 1 ]; then  # one table per run, the backbones paired by test volume
    for name in "${RUNS[@]}"; do
        python experiments/mri_compare.py "$RESULTS/$name"/*/ --out "$RESULTS/$name" > /dev/null
    done
fi
cp "$WORK"/pretrain-*.log "$RESULTS/"
cp "$WORK/phantoms/preview.png" "$RESULTS/phantoms-preview.png"
cp "$WORK/anatomy/preview.png" "$RESULTS/anatomy-preview.png"
log "all done: $RESULTS"
