"""The model contract and the zoo: parameter counts, lowerings, BatchNorm state, optimizers,
schedules, reduce-on-plateau and mixup in the train step (unit level, no data files)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax import lax

from experiments import base, cpu_budget, resnet18_fer2013, vgg_fer2013
from fer_jax import augment, evaluation, models, native, train
from fer_jax.config_checks import validate_config
from fer_jax.errors import ConfigError
from fer_jax.models import layers
from fer_jax.models.vgg_fer import VGGFer
from fer_jax.train import make_step_context
from fer_jax.train_step import (
  create_train_state,
  example_keys,
  learning_rate_schedule,
  make_optimizer,
  make_plateau,
  model_variables,
  resolve_microbatch,
  train_step,
  update_plateau,
)


def _shapes(model_cfg: dict, num_classes: int = 7):
  model = models.get_model(ml_collections.ConfigDict(model_cfg), num_classes)
  size = model_cfg['image_size']
  return jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 1)), train=False)
  )


@pytest.mark.parametrize(
  'cfg,expected',
  [
    (dict(name='vgg_fer', image_size=40), 29_890_759),  # Khaireddin & Chen's VGG, counted by hand
    (dict(name='resnet18', image_size=40), 11_171_271),  # CIFAR-style ResNet-18, 1 channel
    (dict(name='resnet18', image_size=48), 11_171_271),  # global pooling: any input size
    (dict(name='seed_cnn', image_size=48), 839_047),  # unchanged
  ],
)
def test_parameter_counts(cfg, expected):
  assert models.count_params(_shapes(cfg)['params']) == expected


def test_experiment_models_and_batch_stats():
  for module in (vgg_fer2013, resnet18_fer2013, cpu_budget):
    shapes = _shapes(module.get_config().model.to_dict())
    assert set(shapes) == {'params', 'batch_stats'}
  # cpu_budget's width 0.375 (conv 3x3 + bias, BatchNorm scale + bias): 288 + 5,256 + 10,512 +
  # 20,880 + 41,760 + 83,232 + 166,464 + 332,352 = 660,744 in the convs, then Dense 2*2*192 -> 96
  # (73,824) and the 7 logits (679).
  assert models.count_params(_shapes(cpu_budget.get_config().model.to_dict())['params']) == 735_247
  # The three-block variant tried for cpu_budget (blocks 32/64/128; conv 3x3 + bias, BatchNorm
  # scale + bias): 384 + 9,312 + 18,624 + 37,056 + 74,112 + 147,840 = 287,328 in the convs, then
  # Dense 5*5*128 -> 256 (819,456) and the 7 logits (1,799).
  three = dict(name='vgg_fer', image_size=40, blocks=(64, 128, 256), width=0.5, dense=(512,))
  assert models.count_params(_shapes(three)['params']) == 1_108_583


def test_builders_validate_their_own_options():
  with pytest.raises(ConfigError, match=r'config.model.name=.nope. is unknown'):
    models.get_model({'name': 'nope'}, 7)
  with pytest.raises(ConfigError, match=r'config.model.dropout=.*seed_cnn expects 3 rates'):
    models.get_model({'name': 'seed_cnn', 'dropout': 0.5}, 7)
  with pytest.raises(ConfigError, match=r'config.model.dropout=1.5'):
    models.get_model({'name': 'vgg_fer', 'dropout': 1.5}, 7)
  with pytest.raises(ConfigError, match=r'config.model.width=0.0'):
    models.get_model({'name': 'vgg_fer', 'width': 0.0}, 7)
  with pytest.raises(ConfigError, match=r'config.model.image_size=12: vgg_fer'):
    models.get_model({'name': 'vgg_fer', 'image_size': 12}, 7)
  with pytest.raises(ConfigError, match=r'config.model.blocks=\(64, 0\)'):
    models.get_model({'name': 'vgg_fer', 'blocks': (64, 0)}, 7)
  with pytest.raises(ConfigError, match=r'config.model.blocks=\(\)'):
    models.get_model({'name': 'vgg_fer', 'blocks': ()}, 7)
  with pytest.raises(ConfigError, match=r"config.model.conv_precision='float16'"):
    models.get_model({'name': 'resnet18', 'conv_precision': 'float16'}, 7)
  # Fewer blocks, fewer pools: 12 px is enough for three.
  models.get_model({'name': 'vgg_fer', 'blocks': (8, 8, 8), 'image_size': 12}, 7)
  # A zoo config with a single dropout rate passes the cross-cutting checks.
  validate_config(vgg_fer2013.get_config())
  c = vgg_fer2013.get_config()
  c.train.final_tta = ('fivecrop',)
  with pytest.raises(ConfigError, match='final_tta'):
    validate_config(c)


def _rand(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


_needs_native = pytest.mark.skipif(not native.available(), reason='no C++ compiler')


@pytest.mark.parametrize('lowering', [pytest.param('native', marks=_needs_native), 'dot'])
@pytest.mark.parametrize(
  'k,stride,padding,size,cin,cout',
  [
    (3, 1, 'SAME', (7, 9), 3, 16),
    (3, 1, 'VALID', (8, 6), 5, 8),
    (3, 1, 'SAME', (10, 10), 1, 32),
    (1, 2, 'SAME', (9, 8), 6, 12),
    (1, 1, 'SAME', (5, 5), 4, 4),
    (3, 2, 'SAME', (8, 8), 4, 8),
    (5, 1, 'SAME', (6, 7), 2, 4),
  ],
)
def test_conv_lowerings_match_lax_conv(lowering, k, stride, padding, size, cin, cout):
  x = _rand((3, *size, cin), 0)
  conv = layers.Conv(cout, k, stride, padding, lowering=lowering)
  params = conv.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * _rand(p.shape, 2), params)  # a non-zero bias

  def ref(p, x):
    y = lax.conv_general_dilated(
      x,
      p['params']['kernel'],
      (stride, stride),
      padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=lax.Precision.HIGHEST,
    )
    return y + p['params']['bias']

  out, expected = conv.apply(params, x), ref(params, x)
  assert out.shape == expected.shape
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  dy = _rand(out.shape, 3)
  grads = jax.grad(lambda p, x: jnp.sum(conv.apply(p, x) * dy), argnums=(0, 1))(params, x)
  expected_grads = jax.grad(lambda p, x: jnp.sum(ref(p, x) * dy), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_fast_max_pool_matches_nn_max_pool_with_ties_and_odd_sizes():
  x = jnp.round(_rand((2, 7, 9, 3), 0) * 2) / 2  # many exact ties
  dy = _rand((2, 3, 4, 3), 1)
  ref = lambda v: nn.max_pool(v, (2, 2), (2, 2), 'VALID')
  np.testing.assert_array_equal(layers.max_pool_2x2_fast(x), ref(x))
  got = jax.grad(lambda v: jnp.sum(layers.max_pool_2x2_fast(v) * dy))(x)
  want = jax.grad(lambda v: jnp.sum(ref(v) * dy))(x)
  np.testing.assert_array_equal(got, want)  # the gradient goes to each window's first maximum


def test_jitted_vgg_gradient_matches_the_xla_lowering():
  """The whole network's gradient under jit, where XLA fuses each ConvBNReLU into the pool.

  A pool gradient that found its winners by comparing values again in the backward pass lost
  most windows here (36-42 % error in each conv kernel's gradient of this network at batch 32,
  31-56 % in cpu_budget.py's train step), although each layer alone was exact: XLA
  recomputed the fused BatchNorm + ReLU with other rounding. ('native' and 'dot' share the
  pool.)"""
  lowering = 'native' if native.available() else 'dot'
  x = _rand((16, 40, 40, 1), 0)
  labels = jnp.arange(16) % 7
  grads = {}
  for name in (lowering, 'xla'):
    model = VGGFer(blocks=(8, 8, 8, 128), dense=(16,), dropout=0.0, lowering=name)
    variables = model.init(jax.random.key(2), x, train=False)

    def loss(params, model=model, variables=variables):
      logits, _ = model.apply(
        {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
      )
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), labels])

    grads[name] = jax.jit(jax.grad(loss))(variables['params'])
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(grads[lowering]), jax.tree.leaves(grads['xla'])
  ):
    if path[-1].key == 'kernel':  # (a conv bias before BatchNorm has a zero gradient: noise)
      error = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
      assert error < 0.02, (jax.tree_util.keystr(path), error)  # float32 near-ties flip: < 1 %


def _bf16(a):
  return jnp.asarray(a, jnp.bfloat16).astype(jnp.float32)


@_needs_native
def test_bf16_conv_precision_rounds_the_operands_of_all_three_convs():
  """A 'SAME' conv layer with conv_precision='bfloat16': the output, the kernel gradient and
  the input gradient are float32 sums of products of bfloat16-rounded operands (x, kernel, dy)
  where the CPU has the bfloat16 products, the float32 ones elsewhere."""
  x = _rand((2, 9, 10, 6), 0)
  conv = layers.Conv(24, 3, lowering='native', conv_precision='bfloat16')
  params = conv.init(jax.random.key(1), x)
  dy = _rand((2, 9, 10, 24), 3)
  rnd = _bf16 if native.bf16_products() else (lambda a: a)

  def ref(p, x):
    y = lax.conv_general_dilated(
      x,
      p['params']['kernel'],
      (1, 1),
      'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=lax.Precision.HIGHEST,
    )
    return y + p['params']['bias']

  rounded = jax.tree.map(rnd, params)
  np.testing.assert_allclose(conv.apply(params, x), ref(rounded, rnd(x)), rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda p, x: jnp.sum(conv.apply(p, x) * dy), argnums=(0, 1))(params, x)
  # The gradients of the rounded operands, with dy rounded too (the bias's: plain dy).
  want = jax.grad(lambda p, x: jnp.sum(ref(p, x) * rnd(dy)), argnums=(0, 1))(rounded, rnd(x))
  for a, b in ((grads[0]['params']['kernel'], want[0]['params']['kernel']), (grads[1], want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
  np.testing.assert_allclose(grads[0]['params']['bias'], dy.sum((0, 1, 2)), rtol=1e-5)


@_needs_native
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_bf16_conv_precision_keeps_the_network_close_to_float32(dtype):
  """conv_precision='bfloat16' (and a bfloat16 model, whose convs now run on the C++ kernels
  too): the same parameters, logits within bfloat16 rounding of float32's, and conv kernel
  gradients pointing the same way (at initialisation BatchNorm leaves the early layers'
  gradients small differences of large terms, so their relative error reaches ~25 %)."""
  x = _rand((16, 40, 40, 1), 0)
  labels = jnp.arange(16) % 7
  grads, logits = {}, {}
  for precision in ('float32', 'bfloat16'):
    model = models.get_model(
      {
        'name': 'vgg_fer',
        'image_size': 40,
        'blocks': (8, 16, 16, 32),
        'dense': (16,),
        'dropout': 0.0,
        'lowering': 'native',
        'dtype': dtype if precision == 'bfloat16' else 'float32',
        'conv_precision': precision,
      },
      7,
    )
    variables = model.init(jax.random.key(2), x, train=False)
    logits[precision] = model.apply(variables, x, train=False)

    def loss(params, model=model, variables=variables):
      out, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
      return -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(16), labels])

    grads[precision] = jax.jit(jax.grad(loss))(variables['params'])
  scale = float(jnp.abs(logits['float32']).max())
  np.testing.assert_allclose(logits['bfloat16'], logits['float32'], atol=0.03 * scale)
  assert jax.tree.structure(grads['float32']) == jax.tree.structure(grads['bfloat16'])
  differ = False
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(grads['bfloat16']), jax.tree.leaves(grads['float32'])
  ):
    assert a.dtype == jnp.float32
    if path[-1].key == 'kernel':
      cosine = float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
      assert cosine > 0.9, (jax.tree_util.keystr(path), cosine)
      differ |= cosine < 1 - 1e-6
  assert differ == (native.bf16_products() or dtype == 'bfloat16')


def test_bf16_conv_precision_says_where_it_cannot_take_effect(caplog):
  layers._NOTICED.clear()
  models.get_model({'name': 'vgg_fer', 'lowering': 'xla', 'conv_precision': 'bfloat16'}, 7)
  assert "the 'xla' lowering has no bfloat16 conv kernels" in caplog.text


def test_evaluation_pads_small_batches_in_the_dense_head_without_changing_the_logits():
  """Under a CPU lowering, evaluation runs the head on 16 rows for batches of 2-15 (a slow
  XLA:CPU fusion, see vgg_fer.HEAD_ROWS): each example's logits are those of a batch of 1."""
  lowering = 'native' if native.available() else 'dot'
  model = VGGFer(blocks=(8, 8, 8, 16), dense=(32, 32), dropout=0.5, lowering=lowering)
  x = _rand((5, 40, 40, 1), 0)
  variables = model.init(jax.random.key(2), x, train=False)
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  batch = apply(x)
  assert batch.shape == (5, 7)
  one_by_one = jnp.concatenate([apply(x[i : i + 1]) for i in range(5)])
  np.testing.assert_allclose(batch, one_by_one, rtol=1e-5, atol=1e-5)
  # The lowered program's head runs 16 rows under the CPU lowering, the batch's 5 under 'xla'.
  for name, rows in ((lowering, 16), ('xla', 5)):
    m = model.clone(lowering=name)
    text = jax.jit(lambda x, m=m: m.apply(variables, x, train=False)).lower(x).as_text()
    assert f'tensor<{rows}x32xf32>' in text, name


@pytest.mark.parametrize('position', [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_fast_max_pool_propagates_a_nan_anywhere_in_the_window(position):
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  x[0, 2 + position[0], 2 + position[1], 0] = np.nan
  out = np.asarray(layers.max_pool_2x2_fast(jnp.asarray(x)))
  assert np.isnan(out[0, 1, 1, 0]) and np.isfinite(out).sum() == 3
  grad = np.asarray(jax.grad(lambda v: jnp.sum(layers.max_pool_2x2_fast(v)))(jnp.asarray(x)))
  assert grad[0, 2 + position[0], 2 + position[1], 0] == 1 and grad.sum() == 4


def _vgg_ctx(**train):
  c = vgg_fer2013.get_config()
  c.model.width, c.model.dense = 0.125, (32,)
  c.train.schedule = 'constant'
  for k, v in train.items():
    c.train[k] = v
  return c, make_step_context(c, num_classes=7, weights=np.ones(7, np.float32), mean=0.5, std=0.25)


def _batch(n, seed=0):
  rng = np.random.default_rng(seed)
  return {
    'image': rng.integers(0, 256, (n, 48, 48, 1), dtype=np.uint8),
    'label': rng.integers(0, 7, n).astype(np.int32),
  }


def test_batch_norm_statistics_update_in_training_and_serve_evaluation():
  c, ctx = _vgg_ctx()
  state = create_train_state(ctx, make_optimizer(c.train, 10))
  stats0 = state.model_state['batch_stats']
  assert float(jnp.sum(jnp.abs(stats0['conv1a']['bn']['mean']))) == 0
  batch = _batch(8)
  new, metrics = jax.jit(lambda s, b: train_step(s, b, ctx))(state, batch)
  stats1 = new.model_state['batch_stats']
  for a, b in zip(jax.tree.leaves(stats0), jax.tree.leaves(stats1)):
    assert not np.allclose(a, b)  # every running mean and variance moved
  assert np.isfinite(float(metrics['loss']))
  # Evaluation uses the running averages: an example's logits do not depend on its batch ...
  x = augment.preprocess_batch(
    batch['image'], None, c.augment, out_size=40, train=False, mean=0.5, std=0.25
  )
  apply = lambda v, x: ctx.model.apply(v, x, train=False)
  np.testing.assert_allclose(
    apply(model_variables(new), x)[:1], apply(model_variables(new), x[:1]), rtol=1e-5, atol=1e-5
  )
  # ... but they do depend on the statistics, which eval_step reads from the variables.
  batch['mask'] = np.ones(8, np.float32)
  sums = lambda v: evaluation.eval_step(v, batch, train.eval_spec(ctx))['loss_sum']
  assert float(sums(model_variables(new))) != pytest.approx(float(sums(model_variables(state))))


def test_models_with_batch_statistics_are_not_chunked():
  assert resolve_microbatch(-1, 64, 'cpu', batch_statistics=True) == 0
  assert resolve_microbatch(0, 64, 'cpu', batch_statistics=True) == 0
  with pytest.raises(ConfigError, match='batch statistics'):
    resolve_microbatch(16, 64, 'cpu', batch_statistics=True)
  _, ctx = _vgg_ctx(microbatch_size=-1)
  assert ctx.microbatch == 0


def test_sgd_nesterov_weight_decay_on_kernels_only():
  c = base.get_config()
  c.train.optimizer, c.train.schedule, c.train.learning_rate = 'sgd', 'constant', 0.1
  c.train.weight_decay = 0.5
  tx = make_optimizer(c.train, 10)
  params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # Nesterov SGD, decay added to the gradient: the first update is -lr * (1 + m) * wd * w.
  np.testing.assert_allclose(updates['dense']['kernel'], -0.1 * 1.9 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(updates['dense']['bias'], 0)
  c.train.optimizer = 'lamb'
  with pytest.raises(ConfigError, match='config.train.optimizer'):
    make_optimizer(c.train, 10)


def test_schedules():
  c = base.get_config()
  c.train.learning_rate, c.train.epochs = 1.0, 10
  c.train.schedule, c.train.decay_epochs, c.train.decay_factor = 'step', (4, 8), 0.1
  c.train.warmup_epochs, c.train.warmup_steps = 1.0, 5  # steps win over epochs
  lr = learning_rate_schedule(c.train, steps_per_epoch=10)
  assert float(lr(0)) == 0 and float(lr(5)) == pytest.approx(1.0)
  assert float(lr(39)) == pytest.approx(1.0) and float(lr(40)) == pytest.approx(0.1)
  assert float(lr(80)) == pytest.approx(0.01)
  c.train.warmup_steps = 0
  c.train.schedule = 'plateau'
  lr = learning_rate_schedule(c.train, steps_per_epoch=10)
  assert float(lr(5)) == pytest.approx(0.5) and float(lr(99)) == pytest.approx(1.0)
  c.train.schedule, c.train.decay_epochs = 'step', ()
  with pytest.raises(ConfigError, match='decay_epochs'):
    learning_rate_schedule(c.train, steps_per_epoch=10)


def test_reduce_on_plateau_counts_epochs_without_a_new_best_and_scales_the_update():
  c = base.get_config()
  c.train.schedule, c.train.plateau_factor, c.train.plateau_patience = 'plateau', 0.5, 2
  plateau = make_plateau(c.train)
  state = plateau.init({})
  scales = []
  for acc in (0.50, 0.55, 0.55, 0.54, 0.60, 0.59, 0.58, 0.58, 0.57):
    state = update_plateau(plateau, state, acc)
    scales.append(float(state.scale))
  assert scales == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.125]
  c.train.schedule = 'cosine'
  assert make_plateau(c.train) is None
  # In the step the scale multiplies the optimizer's update (plain SGD, lr 1: the gradient).
  cfg, ctx = _vgg_ctx(schedule='plateau')
  batch = _batch(8)
  results = []
  for scale in (1.0, 0.25):
    s = create_train_state(ctx, optax.sgd(1.0), make_plateau(cfg.train))
    s = s.replace(plateau=s.plateau._replace(scale=jnp.float32(scale)))
    new, _ = jax.jit(lambda s, b: train_step(s, b, ctx))(s, batch)
    results.append(jax.tree.map(jnp.subtract, new.params, s.params))
  for full, quarter in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(quarter, 0.25 * full, rtol=1e-4, atol=1e-7)


def test_mixup_loss_is_the_class_weighted_mix_of_both_labels():
  c, _ = _vgg_ctx()
  c.augment.mixup_alpha, c.augment.mix_prob = 0.4, 1.0
  weights = np.linspace(0.5, 2.0, 7).astype(np.float32)
  ctx = make_step_context(c, num_classes=7, weights=weights, mean=0.5, std=0.25)
  state = create_train_state(ctx, optax.sgd(0.0))
  batch = _batch(8, seed=3)
  _, metrics = jax.jit(lambda s, b: train_step(s, b, ctx))(state, batch)
  # The reference: the same per-example keys, then lam * w_i * CE(y_i) + (1 - lam) * w_j * CE(y_j).
  aug_keys, dropout_key, ids = example_keys(ctx, state.step, 8, None)
  x = augment.preprocess_batch(
    batch['image'], aug_keys, c.augment, out_size=40, train=True, mean=0.5, std=0.25
  )
  onehot = jax.nn.one_hot(batch['label'], 7)
  mixed, targets = augment.mix_pairs(x, onehot, aug_keys, c.augment)
  lam = targets[np.arange(8), batch['label']]  # labels differ within pairs here
  assert np.all(batch['label'][0::2] != batch['label'][1::2]) and np.any(lam < 0.999)
  logits, _ = ctx.model.apply(
    model_variables(state),
    mixed,
    train=True,
    mutable=['batch_stats'],
    rngs={'dropout': dropout_key},
    example_ids=ids,
  )
  ce = -jax.nn.log_softmax(logits)
  partner = batch['label'].reshape(4, 2)[:, ::-1].reshape(8)
  expected = (
    lam * weights[batch['label']] * ce[np.arange(8), batch['label']]
    + (1 - lam) * weights[partner] * ce[np.arange(8), partner]
  )
  assert float(metrics['data_loss']) == pytest.approx(float(jnp.mean(expected)), rel=1e-4)


def test_l2_scope_all_penalises_every_kernel():
  from fer_jax.train_step import l2_penalty

  model = models.get_model({'name': 'seed_cnn'}, 7)
  params = {
    'conv1': {'kernel': jnp.full((2,), 2.0), 'bias': jnp.ones(3)},
    'dense1': {'kernel': jnp.ones((2, 2))},
  }
  assert float(l2_penalty(model, params, 'model')) == 4.0  # SeedCNN names its Dense-128 only
  assert float(l2_penalty(model, params, 'all')) == 12.0
  with pytest.raises(ConfigError, match='l2_scope'):
    l2_penalty(model, params, 'some')
