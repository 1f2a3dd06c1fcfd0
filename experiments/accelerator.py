"""The seed CNN recipe (experiments/base.py) for GPUs and TPUs: keep every chip busy.

Run (any number of devices; multi-host as in the README):
  python launch.py --config experiments/accelerator.py \
    --config.data.path=../shared/data/fer2013.csv.gz --workdir gs://BUCKET/runs/accelerator

What changes from the CPU recipe, and why:
- 128 images per device (`per_device_batch_size`; global batch = 128 x devices): batch 32 on
  8 chips would be 4 per chip, far too little work per step to hide the step's fixed costs.
- learning rate 2e-3 at batch 32 scaled by the square-root rule (adamw): lr = 2e-3 x
  sqrt(B / 32), e.g. 1.13e-2 at B = 1024 (fer_jax/scaling.py).
- warmup in steps (300), not epochs: at B = 1024 an FER2013 epoch is 28 steps.
- bfloat16 compute, float32 parameters, optimizer state and loss (the model casts its logits
  to float32; `model.dtype` only sets the compute dtype).
- XLA's convolution (`lowering='auto'` resolves to 'xla' off CPU), no gradient chunks.
- the uint8 training split on the devices (data.on_device='auto' turns it on off CPU), each
  step shipping only its int32 indices, and 4 steps per dispatch (a lax.scan): the host issues
  one call per 4 steps.
- evaluation + checkpoint every 2 epochs or 10 minutes, whichever comes first; at this batch an
  epoch is well under a second of accelerator time, so evaluating every epoch would dominate.
On one H200 (benchmarks/accelerator_check.sh, benchmarks/README.md): 256 k training images/s
in the loop, 4 steps per dispatch, measured when base.py flipped only (before its whole-pixel
shifts).
"""

import ml_collections

from experiments import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.model.dtype = 'bfloat16'
  c.model.lowering = 'auto'
  t = c.train
  t.per_device_batch_size = 128
  t.lr_scaling = 'sqrt'
  t.lr_base_batch = 32
  t.learning_rate = 2e-3  # at lr_base_batch; scaled to the global batch at start
  t.epochs = 60
  t.time_budget_min = 0.0
  t.warmup_steps = 300
  t.microbatch_size = 0
  t.eval_batch_size = 2048
  t.log_every_steps = 100
  t.steps_per_dispatch = 4  # falls back to 1 with a notice where the split is not on the devices
  t.eval_every_epochs = 2
  t.eval_every_minutes = 10.0
  return c
