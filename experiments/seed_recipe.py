"""The seed notebook's exact recipe, for comparison (it does not learn on FER2013: ~23 %).

Adam 1e-3 (no decay, constant), batch 64, max/count class weights (~16 for Disgust),
rotation 20 deg, zoom 0.2, shift 0.2, horizontal flip, pixels rescaled to [0, 1],
L2 0.01 (Keras' default `l2()`) on the Dense-128 kernel.
"""

import ml_collections

from experiments import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.data.class_weights = 'max_over_count'
  c.model.dropout = (0.25, 0.25, 0.5)
  c.train.batch_size = 64
  c.train.learning_rate = 1e-3
  c.augment.flip = True
  c.augment.rotation_deg = 20.0
  c.augment.zoom = 0.2
  c.augment.shift = 0.2
  c.augment.whole_pixels = False  # Keras' shifts are sub-pixel
  c.augment.standardize = 'none'
  c.train.schedule = 'constant'
  c.train.warmup_epochs = 0.0
  c.train.weight_decay = 0.0
  c.train.l2 = 0.01
  c.train.epochs = 30
  c.train.time_budget_min = 0.0  # the notebook's 30 epochs
  return c
