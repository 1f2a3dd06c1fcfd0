"""VGG on FER+ (eight classes, trained on the ten annotators' vote distribution), for a GPU or TPU.

Run: python launch.py --config experiments/vgg_ferplus.py \
       --config.data.path=../shared/data/fer2013.csv.gz --workdir runs/vgg_ferplus

Needs fer2013new.csv beside the FER2013 CSV (or --config.data.ferplus_path). Barsoum et al.
(2016) trained a VGG13 on 64x64 upsampled faces to about 84-85 % majority-vote test accuracy;
here the FER2013 VGG recipe (40x40 crops of the 48x48 faces, SGD-Nesterov, reduce-on-plateau)
with the soft-label cross-entropy. Selected on PublicTest (FER+ validation), PrivateTest (FER+
test) reported against the majority labels, single view and ten-crop. 150 epochs.
Measured on one H200 at vgg_fer2013.py's GPU settings (README.md): 87.1 % FER+ test single
view, 87.7 % ten-crop, in 2 min 52 s.
"""

import ml_collections

from experiments import vgg_fer2013


def get_config() -> ml_collections.ConfigDict:
  c = vgg_fer2013.get_config()
  c.data.labels = 'ferplus'
  c.data.ferplus_mode = 'probability'
  c.data.ferplus_classes = 8
  c.train.epochs = 150
  return c
