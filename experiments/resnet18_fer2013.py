"""ResNet-18 (CIFAR-style stem) on FER2013: SGD-Nesterov + cosine, label smoothing + mixup,
40x40 crops, ten-crop TTA reported beside the single view. For a GPU or TPU.

Run: python launch.py --config experiments/resnet18_fer2013.py \
       --config.data.path=../shared/data/fer2013.csv.gz --workdir runs/resnet18_fer2013

11.2 M parameters, 1.55 GFLOPs per 40x40 image forward (XLA's count). Selected on PublicTest,
PrivateTest reported once. 200 epochs are 89,800 steps of batch 64. Not yet run to the end on
an accelerator: on one H200 (128 per device, bf16) the loop trained 28 k images/s, so 200 epochs
would take about 3.5 minutes (benchmarks/README.md).
"""

import ml_collections

from experiments import vgg_fer2013


def get_config() -> ml_collections.ConfigDict:
  c = vgg_fer2013.get_config()
  c.model = ml_collections.ConfigDict(
    dict(
      name='resnet18',
      image_size=40,
      width=64,
      dropout=0.0,
      dtype='float32',
      lowering='auto',
      conv_precision='float32',
    )
  )
  a = c.augment
  a.shift = 0.0
  a.erase_prob = 0.25
  a.mixup_alpha = 0.2
  a.mix_prob = 0.5
  t = c.train
  t.epochs = 200
  t.learning_rate = 0.05
  t.weight_decay = 5e-4
  t.label_smoothing = 0.1
  t.schedule = 'cosine'
  t.warmup_epochs = 2.0
  return c
