"""SeedCNN and the model registry."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fer_jax import models, native
from fer_jax.errors import ConfigError
from fer_jax.models import layers


def _cfg(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(
    dict(
      name='seed_cnn', image_size=48, dtype='float32', dropout=(0.25, 0.25, 0.5), lowering='auto'
    )
  )
  c.update(overrides)
  return c


@jax.jit(static_argnums=(0, 1))
def _init(model: nn.Module, size: int):
  return model.init(jax.random.key(0), jnp.zeros((1, size, size, 1)), train=False)


def _assert_close(actual, expected, rel=1e-5):
  """Elementwise match up to `rel` of the reference's largest magnitude."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  scale = max(float(np.abs(expected).max()), 1e-12)
  np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize(
  'size, expected',
  [
    # conv1 3*3*1*32+32 = 320; conv2 3*3*32*64+64 = 18,496;
    # 48 -> conv 46 -> pool 23 -> conv 21 -> pool 10: flatten 10*10*64 = 6,400,
    # dense1 6,400*128+128 = 819,328; logits 128*7+7 = 903.
    (48, 320 + 18_496 + 819_328 + 903),  # = 839,047
    # 150 -> conv 148 -> pool 74 -> conv 72 -> pool 36: flatten 36*36*64 = 82,944,
    # dense1 82,944*128+128 = 10,616,960.
    (150, 320 + 18_496 + 10_616_960 + 903),  # = 10,636,679
  ],
)
def test_param_count_matches_keras(size, expected):
  variables = jax.eval_shape(_init, models.get_model(_cfg(image_size=size), 7), size)
  assert models.count_params(variables['params']) == expected
  assert expected == {48: 839_047, 150: 10_636_679}[size]


def test_param_tree_names_and_l2_path():
  model = models.get_model(_cfg(), 7)
  params = _init(model, 48)['params']
  assert set(params) == {'conv1', 'conv2', 'dense1', 'logits'}
  (kernel,) = models.l2_kernels(model, params)  # what the loss penalises
  assert kernel is params['dense1']['kernel'] and kernel.shape == (6400, 128)


@pytest.mark.parametrize(
  'shape', [(2, 46, 46, 3), (2, 21, 21, 5), (1, 23, 22, 2), (3, 7, 9, 1), (1, 148, 148, 4)]
)
def test_pool_lowerings_agree_on_odd_sizes(shape):
  x = jax.random.normal(jax.random.key(1), shape)
  ct = jax.random.normal(jax.random.key(2), (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))

  @jax.jit(static_argnums=1)
  def loss(x, lowering):
    return jnp.sum(layers.max_pool_2x2(x, lowering) * ct)

  pool = jax.jit(layers.max_pool_2x2, static_argnums=1)
  out_x, out_r = pool(x, 'xla'), pool(x, 'dot')
  assert out_r.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3])  # Keras floor(n/2).
  np.testing.assert_array_equal(out_r, out_x)
  np.testing.assert_array_equal(jax.grad(loss)(x, 'dot'), jax.grad(loss)(x, 'xla'))
  # Brute force for the first window: max of the top-left 2x2 block.
  np.testing.assert_array_equal(out_r[:, 0, 0], np.asarray(x)[:, :2, :2].max(axis=(1, 2)))


def test_auto_lowering_follows_backend():
  expected = 'xla'
  if jax.default_backend() == 'cpu':
    expected = 'native' if native.available() else 'dot'
  assert layers.resolve_lowering('auto') == expected
  with pytest.raises(ValueError):
    layers.resolve_lowering('cudnn')


@pytest.mark.parametrize('lowering', ['dot', 'native'])
@pytest.mark.parametrize('size', [48, 150])
def test_cpu_lowerings_match_xla(size, lowering):
  if lowering == 'native' and not native.available():
    pytest.skip(f'native kernels unavailable: {native.unavailable_reason()}')
  m_xla = models.get_model(_cfg(lowering='xla'), 7)
  m_rs = models.get_model(_cfg(lowering=lowering), 7)
  variables = _init(m_xla, size)
  # Same param tree: a checkpoint from one lowering loads into the other.
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(_init(m_rs, size))
  # Nonzero biases: the dot lowering adds them after the pool.
  variables = jax.tree_util.tree_map_with_path(
    lambda path, v: (
      v + 0.1 * jax.random.normal(jax.random.key(v.size), v.shape) if path[-1].key == 'bias' else v
    ),
    variables,
  )
  x = jax.random.normal(jax.random.key(3), (2, size, size, 1))
  w = jax.random.normal(jax.random.key(4), (2, 7))

  def loss(variables, x, model):
    logits = model.apply(variables, x, train=False)
    return jnp.sum(logits * w), logits

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
  ((l_x, out_x), (gp_x, gx_x)) = grad_fn(variables, x, m_xla)
  ((l_r, out_r), (gp_r, gx_r)) = grad_fn(variables, x, m_rs)
  _assert_close(out_r, out_x)
  _assert_close(l_r, l_x)
  _assert_close(gx_r, gx_x)
  assert float(jnp.abs(gx_x).max()) > 0
  for a, b in zip(jax.tree_util.tree_leaves(gp_r), jax.tree_util.tree_leaves(gp_x)):
    assert float(jnp.abs(b).max()) > 0
    _assert_close(a, b)


def test_bfloat16_compute_float32_params_and_logits():
  model = models.get_model(_cfg(dtype='bfloat16'), 7)
  variables = _init(model, 48)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  x = jax.random.normal(jax.random.key(5), (3, 48, 48, 1))
  logits = jax.jit(model.apply, static_argnames='train')(variables, x, train=False)
  assert logits.dtype == jnp.float32 and logits.shape == (3, 7)
  assert bool(jnp.all(jnp.isfinite(logits)))
  ref = models.get_model(_cfg(), 7).apply(variables, x, train=False)
  # Same weights, lower precision: close to float32 but not bit-identical.
  np.testing.assert_allclose(logits, ref, atol=0.05 * float(jnp.abs(ref).max()))
  assert not np.array_equal(np.asarray(logits), np.asarray(ref))
  grads = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, x, train=False))))(variables)
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))


def test_dropout_per_example_under_vmap():
  model = models.get_model(_cfg(), 7)
  variables = _init(model, 48)
  x = jax.random.normal(jax.random.key(6), (4, 1, 48, 48, 1))  # (B, 1, S, S, 1)

  @jax.jit(static_argnums=2)
  def per_example(keys, x, train):
    fn = lambda k, xi: model.apply(variables, xi, train=train, rngs={'dropout': k})
    return jax.vmap(fn)(keys, x)

  keys_a = jax.random.split(jax.random.key(7), 4)
  keys_b = jax.random.split(jax.random.key(8), 4)
  out_a = per_example(keys_a, x, True)
  assert out_a.shape == (4, 1, 7)
  np.testing.assert_array_equal(out_a, per_example(keys_a, x, True))  # same key: same output
  assert not np.allclose(out_a, per_example(keys_b, x, True))  # other key: differs
  # One example's result depends only on its own key and input, not on the batch.
  single = model.apply(variables, x[2], train=True, rngs={'dropout': keys_a[2]})
  _assert_close(out_a[2], single)
  # train=False ignores the rngs and equals the plain batched apply.
  eval_a, eval_b = per_example(keys_a, x, False), per_example(keys_b, x, False)
  np.testing.assert_array_equal(eval_a, eval_b)
  plain = model.apply(variables, x[:, 0], train=False)
  np.testing.assert_allclose(eval_a[:, 0], plain, rtol=1e-5, atol=1e-6)
  assert not np.allclose(out_a[:, 0], plain)


def test_train_false_needs_no_rng():
  model = models.get_model(_cfg(), 7)
  variables = _init(model, 48)
  x = jax.random.normal(jax.random.key(9), (2, 48, 48, 1))
  out1 = model.apply(variables, x, train=False)
  out2 = model.apply(variables, x, train=False, rngs={'dropout': jax.random.key(1)})
  np.testing.assert_array_equal(out1, out2)


def test_zero_dropout_train_equals_eval():
  model = models.get_model(_cfg(dropout=(0.0, 0.0, 0.0)), 7)
  variables = _init(model, 48)
  x = jax.random.normal(jax.random.key(10), (2, 48, 48, 1))
  np.testing.assert_allclose(
    model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(0)}),
    model.apply(variables, x, train=False),
    rtol=1e-6,
  )


def test_get_model_reads_config():
  model = models.get_model(_cfg(dropout=[0.1, 0.2, 0.3], dtype='bfloat16', lowering='xla'), 5)
  assert isinstance(model, models.SeedCNN)
  assert model.num_classes == 5 and model.dropout == (0.1, 0.2, 0.3)
  assert model.dtype == jnp.bfloat16 and model.lowering == 'xla'
  assert models.get_model({'name': 'seed_cnn'}, 7).dropout == (0.25, 0.25, 0.5)


@pytest.mark.parametrize(
  'overrides, match',
  [
    (dict(name='resnet9000'), 'seed_cnn'),
    (dict(dtype='float16'), 'bfloat16'),
    (dict(lowering='cudnn'), 'dot'),
    (dict(dropout=(0.25, 0.5)), 'dropout'),
    (dict(dropout=(0.25, 0.5, 1.0)), 'dropout'),
  ],
)
def test_bad_config_raises_config_error(overrides, match):
  with pytest.raises(ConfigError, match=match):
    models.get_model(_cfg(**overrides), 7)


@pytest.mark.parametrize('rate', [0.1, 0.25, 0.5])
def test_hash_dropout_rate_scale_and_independence(rate):
  x = jnp.ones((64, 23, 23, 32))
  layer = layers.Dropout(rate)
  keys = jax.random.split(jax.random.key(11), 64)
  out = jax.jit(jax.vmap(lambda k, xi: layer.apply({}, xi, rngs={'dropout': k})))(keys, x)
  out = np.asarray(out)
  kept = out != 0
  n = kept.size
  # Keep rate within 5 standard errors, kept values rescaled by 1 / (1 - rate).
  assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
  np.testing.assert_allclose(out[kept], 1 / (1 - rate), rtol=1e-6)
  # Masks differ between examples and are uncorrelated with each other and with position.
  flat = kept.reshape(64, -1).astype(np.float64)
  assert not np.array_equal(flat[0], flat[1])
  corr = np.corrcoef(flat)[np.triu_indices(64, 1)]
  assert np.abs(corr).max() < 0.05
  per_position = flat.mean(axis=0)  # over 64 examples: binomial(64, 1 - rate) / 64
  assert abs(per_position.std() - np.sqrt(rate * (1 - rate) / 64)) < 0.01
  # Same key, same mask; a different key, a different mask.
  again = layer.apply({}, x[0], rngs={'dropout': keys[0]})
  np.testing.assert_array_equal(np.asarray(again), out[0])
  np.testing.assert_array_equal(layers.Dropout(rate, deterministic=True).apply({}, x[0]), x[0])


def test_dropout_example_ids_make_masks_independent_of_batch_layout():
  """With example_ids an example's mask depends on its id, not on which slice of the batch
  (device shard, gradient chunk) the call sees."""
  model = models.get_model(_cfg(dropout=(0.5, 0.5, 0.5)), 7)
  variables = _init(model, 48)
  x = jax.random.normal(jax.random.key(12), (6, 48, 48, 1))
  ids = jnp.arange(10, 16)
  rngs = {'dropout': jax.random.key(13)}
  whole = model.apply(variables, x, train=True, rngs=rngs, example_ids=ids)
  part = model.apply(variables, x[3:], train=True, rngs=rngs, example_ids=ids[3:])
  _assert_close(whole[3:], part)
  # Another id is another mask; so is another key.
  moved = model.apply(variables, x[3:], train=True, rngs=rngs, example_ids=ids[:3])
  assert not np.allclose(whole[3:], moved)
  other = model.apply(
    variables, x, train=True, rngs={'dropout': jax.random.key(14)}, example_ids=ids
  )
  assert not np.allclose(whole, other)
  # Identical inputs with different ids get different masks.
  same = jnp.broadcast_to(x[:1], x.shape)
  out = model.apply(variables, same, train=True, rngs=rngs, example_ids=ids)
  assert not np.allclose(out[0], out[1])
