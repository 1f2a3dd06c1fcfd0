"""SeedCNN on the built-in synthetic faces: the README's first command (about 2 minutes on 2
cores)."""

import ml_collections

from experiments import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.data.source = 'synthetic'
  c.data.path = ''
  c.train.epochs = 6
  c.train.time_budget_min = 0.0  # the same 6 epochs on every machine
  c.train.log_every_steps = 25
  return c
