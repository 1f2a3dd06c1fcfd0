"""Safety net: checks against references the code under test does not compute itself (the
gradient of a loss written here, schedule values from their formula, a model that must learn),
and the run-level promises (retention, re-runs, dataset statistics) on tiny synthetic runs."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import base
from fer_jax import augment, checkpointing, evaluate, train, trained_model
from fer_jax.data.datasets import load_dataset, pixel_stats
from fer_jax.train import make_step_context
from fer_jax.train_step import (
  create_train_state,
  learning_rate_schedule,
  make_optimizer,
  train_step,
)
from tests.conftest import synthetic_config


def test_a_short_synthetic_run_beats_chance_by_a_wide_margin(tmp_path):
  # 7 classes: chance is 14 %, always answering the commonest class about 21 % (macro-F1 near
  # 0.05). 150 steps at 24x24 (a quarter of the work of 48x48), no augmentation.
  c = synthetic_config(
    train_examples=960,
    test_examples=100,
    batch_size=64,
    eval_batch_size=100,
    epochs=10,
    schedule='constant',
    learning_rate=1e-3,
    warmup_epochs=0.0,
    log_every_steps=15,
  )
  c.model.image_size = 24
  c.augment.enabled = False
  results = train.train_and_evaluate(c, str(tmp_path))
  for split in ('PublicTest', 'PrivateTest'):
    figures = results['splits'][split]
    assert figures['accuracy'] >= 0.5 and figures['macro_f1'] >= 0.4, (split, figures)


def _equations(jaxpr) -> int:
  """The equations of a jaxpr and of every jaxpr inside it (scans, jit calls, custom rules)."""
  n = 0
  for eqn in jaxpr.eqns:
    n += 1
    for value in eqn.params.values():
      for v in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(v, jax.extend.core.ClosedJaxpr):
          n += _equations(v.jaxpr)
        elif isinstance(v, jax.extend.core.Jaxpr):
          n += _equations(v)
  return n


def test_sharpness_aware_steps_run_the_teacher_once():
  """SAM's second pass reuses the first pass's inputs and targets: self-distillation adds the
  same computation (one teacher forward pass and the targets) with SAM as without it."""
  size = {}
  for sam_rho in (0.0, 0.05):
    for self_distill in (0.0, 0.5):
      c = base.get_config()
      c.train.update(sam_rho=sam_rho, self_distill=self_distill, ema_decay=0.9, microbatch_size=0)
      ctx = make_step_context(
        c, num_classes=7, weights=np.ones(7, np.float32), mean=0.5, std=0.25, steps_per_epoch=10
      )
      state = create_train_state(ctx, make_optimizer(c.train, steps_per_epoch=10))
      batch = {
        'image': jnp.zeros((8, 48, 48, 1), jnp.uint8),
        'label': jnp.zeros((8,), jnp.int32),
      }
      jaxpr = jax.make_jaxpr(lambda s, b, ctx=ctx: train_step(s, b, ctx))(state, batch)
      size[sam_rho, self_distill] = _equations(jaxpr.jaxpr)
  teacher = size[0.0, 0.5] - size[0.0, 0.0]
  assert teacher > 10  # a forward pass of the network, at least
  assert size[0.05, 0.5] - size[0.05, 0.0] == teacher


@pytest.mark.parametrize(
  'sam_rho,self_distill,flip',
  [(0.0, 0.0, False), (0.05, 0.0, False), (0.0, 0.6, False), (0.05, 0.6, False), (0.0, 0.6, True)],
)
def test_the_applied_update_is_the_gradient_of_the_reported_loss(sam_rho, self_distill, flip):
  """Plain SGD at lr 1 moves the weights by minus the loss's gradient; with sharpness-aware
  minimisation, by minus its gradient at w + rho g / |g| (g the gradient at w), while the
  reported loss stays the one at w; with self-distillation, the cross-entropy is against the
  labels mixed with the moving average's softmax at the weight the ramp has reached (in both of
  sharpness-aware minimisation's passes when the two are combined); with `self_distill_flip`,
  the teacher's softmax is the mean over the image and its mirror."""
  c = base.get_config()
  c.model.dropout = (0.0, 0.0, 0.0)
  c.augment.enabled = False
  c.train.update(
    optimizer='sgd',
    momentum=0.0,
    weight_decay=0.0,
    schedule='constant',
    learning_rate=1.0,
    l2=0.01,
    label_smoothing=0.0,
    microbatch_size=0,
    sam_rho=sam_rho,
    self_distill=self_distill,
    self_distill_flip=flip,
    ema_decay=0.9 if self_distill else 0.0,
    epochs=2,
  )
  weights = np.array([1, 4, 1, 0.5, 1, 2, 1], np.float32)
  ctx = make_step_context(c, num_classes=7, weights=weights, mean=0.5, std=0.25, steps_per_epoch=10)
  state = create_train_state(ctx, make_optimizer(c.train, steps_per_epoch=10))
  # A teacher that is not the network itself, a quarter of the way through the 20 steps.
  teacher = ctx.model.init(jax.random.key(1), jnp.zeros((1, 48, 48, 1)), train=False)
  state = state.replace(step=jnp.int32(5), ema=teacher if self_distill else None)
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.integers(0, 256, (8, 48, 48, 1), dtype=np.uint8),
    'label': np.array([0, 1, 2, 3, 4, 5, 6, 1], np.int32),
  }
  x = augment.preprocess_batch(
    batch['image'], None, c.augment, out_size=48, train=False, mean=0.5, std=0.25
  )

  labels = jax.nn.one_hot(batch['label'], 7)
  if self_distill:
    soft = jax.nn.softmax(ctx.model.apply(teacher, x, train=False))
    if flip:
      mirrored = jax.nn.softmax(ctx.model.apply(teacher, x[:, :, ::-1], train=False))
      assert float(jnp.max(jnp.abs(mirrored - soft))) > 1e-3  # the mirror's view differs
      soft = 0.5 * (soft + mirrored)
    labels = (1 - self_distill * 5 / 20) * labels + self_distill * 5 / 20 * soft

  def loss(params):  # Keras: sum of w_i * CE_i over the batch size, plus l2 * |W_dense1|^2
    logits = ctx.model.apply({'params': params}, x, train=False)
    ce = -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)
    return jnp.sum(weights[batch['label']] * ce) / 8 + 0.01 * jnp.sum(
      jnp.square(params['dense1']['kernel'])
    )

  expected_loss, grads = jax.jit(jax.value_and_grad(loss))(state.params)
  if sam_rho:
    scale = sam_rho / jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    plain = grads
    grads = jax.jit(jax.grad(loss))(jax.tree.map(lambda p, g: p + scale * g, state.params, grads))
    # ... which is not the plain gradient step.
    assert (
      max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain), strict=True)
      )
      > 1e-4
    )
  new, metrics = jax.jit(lambda s, b: train_step(s, b, ctx))(state, batch)
  assert float(metrics['loss']) == pytest.approx(float(expected_loss), rel=1e-5)
  for before, after, g in zip(
    jax.tree.leaves(state.params), jax.tree.leaves(new.params), jax.tree.leaves(grads), strict=True
  ):
    np.testing.assert_allclose(
      np.asarray(before) - np.asarray(after), np.asarray(g), rtol=1e-4, atol=1e-6
    )  # SGD, lr 1: the update is -gradient


def test_warmup_cosine_values_follow_the_formula():
  c = base.get_config().train
  c.update(schedule='cosine', learning_rate=0.1, warmup_epochs=1.0, epochs=4)
  schedule = learning_rate_schedule(c, steps_per_epoch=10)  # warmup 10 steps, 40 in all
  for step in (0, 3, 5, 10, 17, 25, 33, 40):
    if step <= 10:
      expected = 0.1 * step / 10
    else:
      expected = 0.1 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 30))
    assert float(schedule(step)) == pytest.approx(expected, abs=1e-7), step


@pytest.mark.parametrize('optimizer', ['sgd', 'adamw'])
def test_weight_decay_reaches_kernels_only(optimizer):
  c = base.get_config()
  c.train.update(
    optimizer=optimizer, momentum=0.0, weight_decay=0.5, schedule='constant', learning_rate=1.0
  )
  ctx = make_step_context(c, num_classes=7, weights=np.ones(7, np.float32), mean=0.5, std=0.25)
  params = create_train_state(ctx, make_optimizer(c.train, 10)).params
  tx = make_optimizer(c.train, steps_per_epoch=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    p = params
    for key in path:
      p = p[key.key]
    if path[-1].key == 'kernel':  # zero gradient: the update is the decay alone, -lr * wd * w
      np.testing.assert_allclose(np.asarray(u), -0.5 * np.asarray(p), rtol=1e-6, atol=1e-8)
    else:
      assert not np.any(np.asarray(u)), path


def _tiny(**train_overrides):
  """4 steps an epoch, a constant learning rate; evaluation batches of 32."""
  return synthetic_config(
    train_examples=64,
    test_examples=32,
    **{
      'batch_size': 16,
      'eval_batch_size': 32,
      'epochs': 4,
      'schedule': 'constant',
      'warmup_epochs': 0.0,
      'log_every_steps': 4,
      **train_overrides,
    },
  )


def _kept_steps(workdir):
  manager = checkpointing.make_manager(str(workdir), keep_latest=1, keep_best=1, read_only=True)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def test_retention_keeps_an_older_best_and_evaluates_it(tmp_path, monkeypatch):
  # PublicTest accuracy falls after the first epoch, so the best is the oldest checkpoint.
  real, calls = train.evaluate, []

  def falling_accuracy(*args, **kwargs):
    result = real(*args, **kwargs)
    calls.append(1)
    if len(calls) <= 4:  # the four per-epoch evaluations; the final ones are real
      result['accuracy'] = 0.9 - 0.1 * len(calls)
    return result

  monkeypatch.setattr(train, 'evaluate', falling_accuracy)
  results = train.train_and_evaluate(_tiny(keep_latest=2, keep_best=1), str(tmp_path))
  assert _kept_steps(tmp_path) == [4, 12, 16]  # latest 2 + the best, an older one
  assert results['best_step'] == 4
  best = trained_model.load(str(tmp_path), 'best')
  assert best.step == 4
  report, _, _ = evaluate.evaluate(best, split='PrivateTest')
  assert report['confusion_matrix'] == results['splits']['PrivateTest']['confusion_matrix']
  assert report['loss'] == results['splits']['PrivateTest']['loss']


def test_dataset_statistics_reach_evaluation_and_a_rerun_only_reevaluates(tmp_path):
  c = _tiny(epochs=1)
  c.augment.standardize = 'dataset'
  first = train.train_and_evaluate(c, str(tmp_path))
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  trained = trained_model.load(str(tmp_path), 'best')
  mean, std = pixel_stats(load_dataset(c.data, image_size=48)['Training'].images)
  assert (trained.pixel_mean, trained.pixel_std) == (pytest.approx(mean), pytest.approx(std))
  assert abs(mean) > 0.1 and std > 0.01  # not the identity: the statistics matter
  report, _, _ = evaluate.evaluate(trained, split='PrivateTest')
  expected = first['splits']['PrivateTest']
  assert (report['loss'], report['confusion_matrix']) == (
    expected['loss'],
    expected['confusion_matrix'],
  )
  # Re-running the finished workdir trains nothing: no new step records or checkpoints.
  again = train.train_and_evaluate(c, str(tmp_path))
  assert again['steps'] == first['steps'] and again['train_images_per_s'] is None
  assert again['splits'] == first['splits']
  new = (tmp_path / 'metrics.jsonl').read_text().splitlines()[len(lines) :]
  assert not [l for l in new if json.loads(l)['split'] in ('train', 'train_steps')]
  assert _kept_steps(tmp_path) == _kept_steps(tmp_path)
