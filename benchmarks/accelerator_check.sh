#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: one JSON line per model (seed CNN and the zoo) with the full
# loop's and the bare step's img/s, the epoch time and the first epochs' PublicTest accuracy.
#
#   bash benchmarks/accelerator_check.sh [FER2013_CSV] [EPOCHS]
#
# Environment: PYTHON (default python, else python3), MODELS (default "seed_cnn vgg_fer resnet18"),
# ROW_TIMEOUT (seconds per training and per step benchmark; 0 = none; a training stopped by it
# saves a preemption checkpoint), LOGDIR and RUNS (keep the logs and the workdirs there),
# EXTRA_FLAGS (more launch.py flags, e.g. --config.train.max_steps=20), STEP_FLAGS
# (train_throughput.py's timing flags; default: 5 windows of 50 steps), CPU_OK=1 (run without a
# GPU: a smoke test of this script).
# Installs jax[cuda12] into the active environment if JAX sees no GPU. Each model trains for
# EPOCHS (default 3) epochs of FER2013 with experiments/accelerator.py's settings (128 images
# per device, bfloat16 compute; the zoo recipes with that batch) into a temporary workdir; the
# bare step comes from benchmarks/train_throughput.py at the same global batch.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/fer2013.csv.gz}"
EPOCHS="${2:-3}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
MODELS="${MODELS:-seed_cnn vgg_fer resnet18}"
ROW_TIMEOUT="${ROW_TIMEOUT:-0}"

if [ "${CPU_OK:-0}" != 1 ] && ! "$PY" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)' 2>/dev/null; then
  echo "no GPU backend in JAX: installing jax[cuda12]" >&2
  "$PY" -m pip install -q -U "jax[cuda12]"
  "$PY" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)' \
    || { echo "error: JAX still sees no GPU" >&2; exit 1; }
fi
[ -f "$DATA" ] || { echo "error: $DATA not found (give the FER2013 CSV as the first argument)" >&2; exit 1; }
DEVICES=$("$PY" -c 'import jax; print(jax.device_count())')
BATCH=$((128 * DEVICES))
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOGDIR="${LOGDIR:-$WORK}"
RUNS="${RUNS:-$WORK}"
mkdir -p "$LOGDIR" "$RUNS"

# name | config | throughput.py --size. The zoo recipes run as given except for the batch:
# 128 per device, their learning rate scaled from their own batch by the square-root rule.
ROWS=(
  "seed_cnn|experiments/accelerator.py|48"
  "vgg_fer|experiments/vgg_fer2013.py|40"
  "resnet18|experiments/resnet18_fer2013.py|40"
)
for row in "${ROWS[@]}"; do
  IFS='|' read -r name config size <<< "$row"
  [[ " $MODELS " == *" $name "* ]] || continue
  own_batch=$("$PY" -c "import importlib.util as u; s=u.spec_from_file_location('c', '$config'); m=u.module_from_spec(s); s.loader.exec_module(m); print(m.get_config().train.batch_size)")
  timeout -s TERM "$ROW_TIMEOUT" "$PY" launch.py --config "$config" --config.data.path="$DATA" \
    --config.train.per_device_batch_size=128 --config.train.lr_base_batch="$own_batch" \
    --config.model.dtype=bfloat16 --config.train.microbatch_size=0 \
    --config.train.epochs="$EPOCHS" --config.train.eval_every_epochs=1 --config.train.final_tta='()' \
    ${EXTRA_FLAGS:-} --workdir "$RUNS/$name" > "$LOGDIR/$name.log" 2>&1 \
    || [ $? = 124 ] || { echo "{\"model\": \"$name\", \"error\": \"training failed or timed out (log: $LOGDIR/$name.log)\"}"; tail -5 "$LOGDIR/$name.log" >&2; continue; }
  step_json=$(timeout -s TERM "$ROW_TIMEOUT" "$PY" benchmarks/train_throughput.py --config "$config" \
    --batch "$BATCH" --size "$size" --dtype bfloat16 --microbatch 0 ${STEP_FLAGS:---steps-per-window 50} \
    2>"$LOGDIR/$name.step.log" | tail -1 || echo '{}')
  NAME="$name" STEP_JSON="$step_json" RUN="$RUNS/$name" "$PY" - <<'EOF'
import json, os
run = os.environ['RUN']
records = [json.loads(l) for l in open(os.path.join(run, 'metrics.jsonl'))]
public = [round(r['accuracy'], 4) for r in records if r['split'] == 'PublicTest']
try:
  step = json.loads(os.environ['STEP_JSON'].strip().splitlines()[-1])
except (IndexError, ValueError):
  step = {}
row = {'model': os.environ['NAME'], 'devices': step.get('devices'),
       'step_images_per_s': step.get('images_per_s'), 'public_test_by_epoch': public}
results_path = os.path.join(run, 'results.json')
if os.path.exists(results_path):
  results = json.load(open(results_path))
  row.update({
    'global_batch': results['config']['train']['batch_size'],
    'loop_images_per_s': results['train_images_per_s'],
    'epoch_s': round(results['wall_s'] / max(results['epochs'], 1), 2),
    'private_test_best': round(results['splits']['PrivateTest']['accuracy'], 4)})
else:  # stopped by ROW_TIMEOUT (a preemption checkpoint, no final evaluation)
  steps = [r for r in records if r['split'] == 'train_steps']
  row.update({'stopped_at_step': steps[-1]['step'] if steps else 0,
              'loop_images_per_s_last_window': steps[-1].get('images_per_s') if steps else None})
print(json.dumps(row))
EOF
done
