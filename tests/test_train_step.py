"""The train step's maths: Keras class_weight semantics, the L2 term, and config checks."""

import jax
import numpy as np
import optax
import pytest

from experiments import base
from fer_jax import augment
from fer_jax.config_checks import check_workdir_writable, validate_config
from fer_jax.errors import ConfigError, FerJaxError
from fer_jax.train import make_step_context
from fer_jax.train_step import create_train_state, make_optimizer, train_step


def _ctx(l2, weights):
  c = base.get_config()
  c.model.dropout = (0.0, 0.0, 0.0)
  c.augment.enabled = False
  c.train.l2 = l2
  return make_step_context(c, num_classes=7, weights=weights, mean=0.5, std=0.25), c


def test_loss_is_keras_weighted_mean_plus_l2():
  weights = np.array([1, 16, 1, 0.5, 1, 2, 1], np.float32)
  ctx, c = _ctx(l2=0.01, weights=weights)
  state = create_train_state(ctx, make_optimizer(c.train, steps_per_epoch=10))
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.integers(0, 256, (8, 48, 48, 1), dtype=np.uint8),
    'label': np.array([0, 1, 2, 3, 4, 5, 6, 1], np.int32),
  }
  _, metrics = train_step(state, batch, ctx)

  x = augment.preprocess_batch(
    batch['image'], None, c.augment, out_size=48, train=False, mean=0.5, std=0.25
  )
  logits = ctx.model.apply({'params': state.params}, x, train=False)
  ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']))
  data_loss = np.sum(weights[batch['label']] * ce) / 8  # sum over batch / batch size, as Keras
  l2 = 0.01 * np.sum(np.square(np.asarray(state.params['dense1']['kernel'])))
  assert float(metrics['data_loss']) == pytest.approx(data_loss, rel=1e-5)
  assert float(metrics['loss']) == pytest.approx(data_loss + l2, rel=1e-5)


def test_step_updates_params_and_counts_steps():
  ctx, c = _ctx(l2=0.0, weights=np.ones(7, np.float32))
  c.train.schedule = 'constant'  # the warmup schedule's first learning rate is 0
  state = create_train_state(ctx, make_optimizer(c.train, steps_per_epoch=10))
  batch = {'image': np.full((4, 48, 48, 1), 128, np.uint8), 'label': np.arange(4, dtype=np.int32)}
  before = np.asarray(state.params['logits']['bias']).copy()
  new, _ = jax.jit(lambda s, b: train_step(s, b, ctx))(state, batch)
  assert int(new.step) == 1
  assert not np.allclose(before, np.asarray(new.params['logits']['bias']))


@pytest.mark.parametrize(
  'key,value,match',
  [
    ('train.epochs', -1, 'epochs'),
    ('train.batch_size', 0, 'batch_size'),
    ('model.dtype', 'float16', 'dtype'),
    ('parallel', 'threads', 'parallel'),
    ('data.class_weights', 'inverse', 'class_weights'),
    ('train.learning_rate', -0.1, 'learning_rate'),
    # Checked by the owners (make_optimizer, augment.check_config) before any data is read.
    ('train.schedule', 'linear', 'schedule'),
    ('train.optimizer', 'lamb', 'optimizer'),
    ('augment.standardize', 'zscore', 'standardize'),
    ('train.ema_decay', 1.0, 'ema_decay'),
    ('train.sam_rho', -0.05, 'sam_rho'),
    ('train.self_distill', 1.0, 'self_distill'),
    ('train.self_distill', 0.5, 'ema_decay'),  # the teacher is the moving average
    ('train.self_distill_flip', True, 'self_distill_flip'),  # with no teacher to mirror
  ],
)
def test_validate_config_names_the_bad_key(key, value, match):
  c = base.get_config()
  section, _, name = key.rpartition('.')
  (c[section] if section else c)[name] = value
  with pytest.raises(ConfigError, match=match):
    validate_config(c)


def test_unwritable_workdir_is_reported_up_front(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  with pytest.raises(FerJaxError, match='not writable'):
    check_workdir_writable(str(blocker / 'sub'))
