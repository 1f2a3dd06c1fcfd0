"""The best FER2013 accuracy within 60 minutes on a 2-core CPU, whole process.

Run: python launch.py --config experiments/cpu_budget.py \
       --config.data.path=../shared/data/fer2013.csv.gz --workdir runs/cpu_budget
Expected: about 58 minutes; on a 2-core Zen 4 EPYC (AVX512-BF16) 44-55 epochs, as fast as the
shared host is that day; at 54-55 epochs 67.7-68.4 % best PublicTest and 68.1-68.9 % PrivateTest
single view in two seeds (README.md).

A compact VGG (`vgg_fer` at width 0.375: two 3x3 conv + BatchNorm + ReLU per block, 24/48/96/192
channels, 2x2 pools, one Dense-96 head (256 x 0.375); 0.74 M parameters, 0.095 GFLOPs per 44x44
image forward) on 44x44 crops of the 48x48 faces, on the C++ conv kernels with bfloat16 products
where the CPU has AVX512-BF16 (1.41x the images/s there; float32 products elsewhere). Recipe:
random 44-px crops and flips; adamw 1e-3, one epoch of warmup, cosine decay at batch 64 over as
many epochs as the hour holds on the machine it runs on (`train.time_budget_min`, up to 80; the
run logs and records the number); a moving average of the weights (decay 0.999), which is
evaluated, and which teaches the network: progressive self-distillation (`train.self_distill`,
the teacher's weight in the targets ramped from 0 to 0.8 over the run). Selected on PublicTest;
PrivateTest reported single view (the headline) and with ten-crop TTA. The variants tried in
the hour (widths, shapes, optimizers, augmentations, mixup, SAM, a narrow ResNet-18, ...) and
their figures: benchmarks/README.md.
"""

import ml_collections

from experiments import vgg_fer2013


def get_config() -> ml_collections.ConfigDict:
  c = vgg_fer2013.get_config()
  c.model.width, c.model.dense, c.model.dropout = 0.375, (256,), 0.25
  c.model.image_size = 44
  c.model.conv_precision = 'bfloat16'  # where the CPU has AVX512-BF16; float32 elsewhere
  a = c.augment
  a.crop_fraction = 44 / 48
  a.crop_scale = (1.0, 1.0)  # random 44-px crops at any position, no scale jitter
  a.shift, a.rotation_deg, a.erase_prob = 0.0, 0.0, 0.0
  t = c.train
  # As many epochs as the hour holds on this machine (up to 80), timed when the run starts:
  # 2-core hosts differ up to 2.6x in speed (README). --config.train.epochs=N
  # --config.train.time_budget_min=0 repeats a run's epochs exactly.
  t.epochs = 80
  t.time_budget_min = 60.0
  t.batch_size = 64  # as fast per image as 128 here, twice the updates per epoch
  t.optimizer = 'adamw'
  t.learning_rate = 1e-3
  t.weight_decay = 1e-4
  t.schedule = 'cosine'
  t.warmup_epochs = 1.0
  t.ema_decay = 0.999  # evaluated and checkpointed; the teacher below
  t.self_distill = 0.8
  return c
