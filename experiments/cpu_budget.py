"""The best FER2013 accuracy within 60 minutes on a 2-core CPU, whole process.

Run: python launch.py --config experiments/cpu_budget.py \
       --config.data.path=../shared/data/fer2013.csv.gz --workdir runs/cpu_budget

A three-block VGG (`vgg_fer` with blocks (64, 128, 256) at width 0.5: two 3x3 conv + BatchNorm +
ReLU per block, 32/64/128 channels, 2x2 pools, one Dense-256 head; about 1.1 M parameters, the
size of a typical Keras FER VGG) on 40x40 crops of the 48x48 faces, on the C++ conv kernels.
Dropping the fourth block (256 channels at 5x5) makes a step about 1.3x faster than the
four-block net, so 25 epochs fit in the hour instead of 15. Recipe: random 40-px crops and flips,
label smoothing 0.1, dropout 0.4, adamw 1e-3 with one epoch of warmup and cosine decay over
25 epochs at batch 128, and an EMA of the weights (0.999) that is evaluated, selected and
reported. Selected on PublicTest; PrivateTest reported single view (the headline) and with
ten-crop TTA. Measured time and accuracy: README.md.
"""

import ml_collections

from experiments import vgg_fer2013


def get_config() -> ml_collections.ConfigDict:
  c = vgg_fer2013.get_config()
  c.model.blocks = (64, 128, 256)
  c.model.width, c.model.dense, c.model.dropout = 0.5, (512,), 0.4
  a = c.augment
  a.crop_scale = (1.0, 1.0)  # random 40-px crops at any position, no scale jitter
  a.shift, a.rotation_deg, a.erase_prob = 0.0, 0.0, 0.0
  t = c.train
  t.epochs = 25
  t.batch_size = 128
  t.optimizer = 'adamw'
  t.learning_rate = 1e-3
  t.weight_decay = 1e-4
  t.schedule = 'cosine'
  t.warmup_epochs = 1.0
  t.label_smoothing = 0.1
  t.ema_decay = 0.999
  return c
