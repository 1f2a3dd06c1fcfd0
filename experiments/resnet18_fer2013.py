"""ResNet-18 (CIFAR-style stem) on FER2013: SGD-Nesterov + cosine, label smoothing + mixup,
40x40 crops, ten-crop TTA reported beside the single view. For a GPU or TPU.

Run: python launch.py --config experiments/resnet18_fer2013.py \
       --config.data.path=../shared/data/fer2013.csv.gz --workdir runs/resnet18_fer2013

Selected on PublicTest, PrivateTest
reported once. 200 epochs of 450 steps: on one modern GPU about an hour.
"""

import ml_collections

from experiments import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.model = ml_collections.ConfigDict(dict(
      name='resnet18', image_size=40, width=64, dropout=0.0, dtype='float32', lowering='auto'))
  a = c.augment
  a.flip = True
  a.crop_fraction = 40 / 48
  a.crop_scale = (0.8, 1.2)
  a.rotation_deg = 10.0
  a.erase_prob = 0.25
  a.mixup_alpha = 0.2
  a.mix_prob = 0.5
  a.standardize = 'dataset'
  t = c.train
  t.epochs = 200
  t.batch_size = 64
  t.optimizer = 'sgd'
  t.momentum = 0.9
  t.nesterov = True
  t.learning_rate = 0.05
  t.weight_decay = 5e-4
  t.l2 = 0.0
  t.label_smoothing = 0.1
  t.schedule = 'cosine'
  t.warmup_epochs = 2.0
  t.keep_latest = 1
  t.final_tta = ('tencrop',)
  return c
