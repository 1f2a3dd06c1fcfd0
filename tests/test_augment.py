"""Tests for fer_jax.augment: exact geometry, determinism, ranges and resizing."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fer_jax import augment
from fer_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """An augment config (hashable, so it can be a static jit argument)."""
  enabled: bool = True
  flip: bool = False
  rotation_deg: float = 0.0
  zoom: float = 0.0
  shift: float = 0.0
  shear_deg: float = 0.0
  brightness: float = 0.0
  contrast: float = 0.0
  standardize: str = 'none'


def _cfg(**overrides) -> _Cfg:
  """Every component off unless overridden."""
  return _Cfg(**overrides)


def _image(size=48, channels=1, seed=0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, 256, (size, size, channels)).astype(np.uint8)


def _float(x: np.ndarray) -> np.ndarray:
  """The host-side twin of augment.rescale (bit-identical by construction)."""
  return x.astype(np.float32) * np.float32(1 / 255)


def _warp(img_u8: np.ndarray, *params, out_size=None) -> np.ndarray:
  size = out_size or img_u8.shape[0]
  m = augment.affine_matrix(*params, size)
  return np.asarray(augment.warp(jnp.asarray(_float(img_u8)), m, size))


_jit_preprocess = jax.jit(augment.preprocess_batch, static_argnums=(2,),
                          static_argnames=('out_size', 'train', 'mean', 'std'))


def _pre(batch, keys, cfg, **kwargs) -> np.ndarray:
  """preprocess_batch under jit, as in the train step (and much faster than eager)."""
  return np.asarray(_jit_preprocess(jnp.asarray(batch), keys, cfg, **kwargs))


def _keys(n: int, seed: int = 0) -> jax.Array:
  return jax.random.split(jax.random.key(seed), n)


def test_rescale_matches_host_reference_exactly():
  x = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(np.asarray(jax.jit(augment.rescale)(x)), _float(x))


def test_flip_is_exact_mirror():
  x = _image(channels=3)
  out = _warp(x, True, 0.0, 1.0, 0.0, 0.0, 0.0)
  np.testing.assert_array_equal(out, _float(x)[:, ::-1])


def test_sampled_flip_is_exact_mirror_or_identity_and_both_occur():
  x = _image()
  batch = jnp.asarray(np.repeat(x[None], 16, axis=0))
  out = _pre(batch, _keys(16), _cfg(flip=True), out_size=48, train=True)
  mirrored = [np.array_equal(o, _float(x)[:, ::-1]) for o in out]
  same = [np.array_equal(o, _float(x)) for o in out]
  assert all(m or s for m, s in zip(mirrored, same))
  assert any(mirrored) and any(same)


def test_identity_params_return_input_exactly():
  x = _image(channels=3)
  np.testing.assert_array_equal(_warp(x, False, 0.0, 1.0, 0.0, 0.0, 0.0), _float(x))


def test_all_switches_off_give_identity_matrix_and_exact_batch():
  m = augment.sample_affine(jax.random.key(3), _cfg(), 48)
  np.testing.assert_array_equal(np.asarray(m), np.eye(3, dtype=np.float32))
  batch = np.stack([_image(seed=s) for s in range(4)])
  for cfg in (_cfg(), _cfg(enabled=False, flip=True, rotation_deg=30.0, brightness=0.5)):
    out = augment.preprocess_batch(jnp.asarray(batch), _keys(4), cfg, out_size=48, train=True)
    np.testing.assert_array_equal(np.asarray(out), _float(batch))


def test_integer_shift_moves_content_exactly():
  x = _image()
  out = _warp(x, False, 0.0, 1.0, 5.0, -3.0, 0.0)
  # tx=+5 moves content right, ty=-3 moves it up; uncovered pixels repeat the edge.
  np.testing.assert_array_equal(out[:-3, 5:], _float(x)[3:, :-5])
  np.testing.assert_array_equal(out[:-3, :5], np.repeat(_float(x)[3:, :1], 5, axis=1))


@pytest.mark.parametrize('angle,k', [(90.0, 1), (-90.0, -1), (180.0, 2)])
def test_rotation_matches_rot90(angle, k):
  x = _image(size=32)
  out = _warp(x, False, angle, 1.0, 0.0, 0.0, 0.0)
  np.testing.assert_allclose(out, np.rot90(_float(x), k=k), atol=1e-5)


def test_zoom_scales_about_centre():
  # A linear ramp in x: zooming by s about the centre multiplies the slope by 1/s.
  ramp = np.tile(np.arange(48, dtype=np.float32)[None, :, None] * 5, (48, 1, 1))
  out = _warp(ramp.astype(np.uint8), False, 0.0, 2.0, 0.0, 0.0, 0.0)
  interior = out[:, 12:36, 0]
  np.testing.assert_allclose(np.diff(interior, axis=1), 2.5 / 255, atol=1e-5)
  # Centre stays put: the mean of the two central columns is unchanged.
  np.testing.assert_allclose(out[:, 23:25].mean(), _float(ramp)[:, 23:25].mean(), atol=1e-5)


def test_sampled_parameters_respect_ranges():
  keys = _keys(256)
  cfg = _cfg(rotation_deg=20.0, zoom=0.2, shift=0.1)
  ms = np.asarray(jax.jit(jax.vmap(lambda k: augment.sample_affine(k, cfg, 48)))(keys))
  scale = np.sqrt(np.abs(np.linalg.det(ms[:, :2, :2])))
  angle = np.degrees(np.arctan2(-ms[:, 1, 0], ms[:, 0, 0]))
  assert np.all(np.abs(angle) <= 20.0 + 1e-4) and np.abs(angle).max() > 15.0
  assert np.all((scale >= 0.8 - 1e-5) & (scale <= 1.2 + 1e-5)) and np.ptp(scale) > 0.3
  # Translation of the centre is the shift alone: within +-0.1 * 48 pixels.
  c = 23.5
  centre_out = ms[:, :2, :2] @ np.array([c, c]) + ms[:, :2, 2] - c
  assert np.all(np.abs(centre_out) <= 4.8 + 1e-4) and np.abs(centre_out).max() > 4.0


def test_values_stay_in_unit_range_with_strong_augmentation():
  batch = jnp.asarray(np.stack([_image(seed=s) for s in range(16)]))
  cfg = _cfg(flip=True, rotation_deg=45.0, zoom=0.5, shift=0.3, shear_deg=30.0,
             brightness=0.9, contrast=0.9)
  for out_size in (48, 64):
    out = _pre(batch, _keys(16), cfg, out_size=out_size, train=True)
    assert out.dtype == np.float32 and out.shape == (16, out_size, out_size, 1)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (out == 0.0).any() and (out == 1.0).any()  # the clip was needed


def test_draws_differ_per_example_and_repeat_per_key():
  cfg = _cfg(flip=True, rotation_deg=15.0, zoom=0.1, shift=0.1, brightness=0.2, contrast=0.2)
  batch = jnp.asarray(np.repeat(_image()[None], 8, axis=0))
  run = lambda keys: _pre(batch, keys, cfg, out_size=48, train=True)
  a, a2, b = run(_keys(8, 0)), run(_keys(8, 0)), run(_keys(8, 1))
  np.testing.assert_array_equal(a, a2)
  for i in range(8):
    for j in range(i + 1, 8):
      assert not np.allclose(a[i], a[j])
    assert not np.allclose(a[i], b[i])


def test_result_does_not_depend_on_batch_split():
  cfg = _cfg(flip=True, rotation_deg=15.0, zoom=0.1, shift=0.1, contrast=0.3)
  batch = jnp.asarray(np.stack([_image(seed=s) for s in range(8)]))
  keys = _keys(8)
  full = _pre(batch, keys, cfg, out_size=48, train=True)
  halves = [_pre(batch[s], keys[s], cfg, out_size=48, train=True)
            for s in (slice(0, 4), slice(4, 8))]
  np.testing.assert_array_equal(full, np.concatenate(halves))


def test_eval_is_deterministic_and_ignores_keys():
  cfg = _cfg(flip=True, rotation_deg=30.0, brightness=0.5, standardize='dataset')
  batch = jnp.asarray(np.stack([_image(seed=s) for s in range(4)]))
  run = lambda keys, size: _pre(batch, keys, cfg, out_size=size, train=False, mean=0.5,
                                std=0.25)
  np.testing.assert_allclose(run(None, 48), (_float(np.asarray(batch)) - 0.5) / 0.25,
                             atol=1e-6)
  np.testing.assert_array_equal(run(None, 150), run(_keys(4, 7), 150))
  np.testing.assert_array_equal(run(_keys(4, 1), 150), run(_keys(4, 2), 150))


def test_resize_of_constant_stays_constant():
  batch = jnp.full((2, 48, 48, 1), 137, jnp.uint8)
  out = _pre(batch, None, _cfg(), out_size=150, train=False)
  assert out.shape == (2, 150, 150, 1)
  np.testing.assert_allclose(out, 137 / 255, atol=1e-6)


def test_resize_matches_jax_image_resize():
  yy, xx = np.mgrid[0:48, 0:48]
  grad = (2 * xx + 3 * yy + 40 * np.sin(xx / 9.0)).clip(0, 255).astype(np.uint8)[None, ..., None]
  out = _pre(grad, None, _cfg(), out_size=150, train=False)
  ref = jax.image.resize(jnp.asarray(_float(grad)), (1, 150, 150, 1), 'linear')
  np.testing.assert_allclose(out, np.asarray(ref), atol=1e-5)


def test_flip_commutes_with_resize():
  x = _image()
  out = _warp(x, True, 0.0, 1.0, 0.0, 0.0, 0.0, out_size=150)
  ref = np.asarray(jax.image.resize(jnp.asarray(_float(x)), (150, 150, 1), 'linear'))
  np.testing.assert_allclose(out, ref[:, ::-1], atol=1e-5)


def test_per_image_standardize():
  batch = np.stack([_image(seed=1), np.full((48, 48, 1), 9, np.uint8)])
  out = _pre(batch, None, _cfg(standardize='per_image'), out_size=48, train=False)
  np.testing.assert_allclose(out[0].mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(out[0].std(), 1.0, atol=1e-4)
  np.testing.assert_allclose(out[1], 0.0, atol=1e-6)  # constant image: no 0/0


def test_config_dict_and_bfloat16_input_under_jit():
  values = _cfg(flip=True, rotation_deg=10.0, zoom=0.1, shift=0.1, standardize='dataset')
  config_dict = ml_collections.ConfigDict(dataclasses.asdict(values))
  batch = jnp.asarray(np.stack([_image(seed=s) for s in range(4)]))
  keys = _keys(4)
  kwargs = dict(out_size=56, train=True, mean=0.5, std=0.25)
  ref = _pre(batch, keys, values, **kwargs)
  jitted = jax.jit(lambda b, k: augment.preprocess_batch(b, k, config_dict, **kwargs))
  np.testing.assert_array_equal(np.asarray(jitted(batch, keys)), ref)
  # Pixel values 0..255 are exact in bfloat16, so the result must not change.
  from_bf16 = jitted(batch.astype(jnp.bfloat16), keys)
  assert from_bf16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(from_bf16), ref, atol=1e-6)


def test_raw_uint32_keys_work():
  cfg = _cfg(rotation_deg=10.0)
  batch = jnp.asarray(np.stack([_image(seed=s) for s in range(2)]))
  raw = jax.random.split(jax.random.PRNGKey(0), 2)
  out = _pre(batch, raw, cfg, out_size=48, train=True)
  assert out.shape == (2, 48, 48, 1) and not np.allclose(out[0], _float(np.asarray(batch[0])))


def test_invalid_config_and_missing_keys_raise():
  batch = jnp.zeros((2, 48, 48, 1), jnp.uint8)
  with pytest.raises(ConfigError, match='standardize'):
    augment.preprocess_batch(batch, None, _cfg(standardize='zscore'), out_size=48, train=False)
  with pytest.raises(ConfigError, match='rotation_deg'):
    augment.preprocess_batch(batch, _keys(2), _cfg(rotation_deg=-5.0), out_size=48, train=True)
  with pytest.raises(ConfigError, match='std'):
    augment.preprocess_batch(batch, None, _cfg(standardize='dataset'), out_size=48,
                             train=False, mean=0.5, std=0.0)
  with pytest.raises(ValueError, match='one PRNG key per example'):
    augment.preprocess_batch(batch, None, _cfg(flip=True), out_size=48, train=True)


@pytest.mark.parametrize('out_size', [48, 150])
def test_flip_only_shortcut_equals_the_affine_resample(out_size):
  """Flip-only skips the general affine warp (a pixel flip, then the separable resize);
  the pixels must match warp's."""
  cfg = ml_collections.ConfigDict(dict(enabled=True, flip=True, rotation_deg=0.0, zoom=0.0,
                                       shift=0.0, shear_deg=0.0, brightness=0.0, contrast=0.0,
                                       standardize='none'))
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 48, 48, 1), np.uint8))
  keys = jax.random.split(jax.random.key(3), 16)
  fast = augment.preprocess_batch(images, keys, cfg, out_size=out_size, train=True)
  warped = jax.vmap(lambda im, k: augment.warp(im, augment.sample_affine(k, cfg, out_size),
                                               out_size))(augment.rescale(images), keys)
  # warp computes its sample positions in float32, `resize` its weights in float64: they
  # agree to a few 1e-6 (a pixel level is 1/255 = 4e-3).
  np.testing.assert_allclose(np.asarray(fast), np.asarray(warped), atol=1e-5)
  flipped = np.asarray(jax.vmap(augment.flip_draw)(keys))
  assert 0 < flipped.sum() < 16  # both branches were exercised
  plain = np.asarray(augment.preprocess_batch(images, None, cfg, out_size=out_size, train=False))
  np.testing.assert_array_equal(np.asarray(fast)[~flipped], plain[~flipped])
  np.testing.assert_allclose(np.asarray(fast)[flipped], plain[flipped][:, :, ::-1], atol=1e-6)


@pytest.mark.parametrize('size_in,size_out', [(48, 150), (48, 48), (40, 48), (48, 37)])
def test_resize_equals_identity_warp(size_in, size_out):
  image = jax.random.uniform(jax.random.key(4), (size_in, size_in, 2))
  np.testing.assert_allclose(augment.resize(image, size_out),
                             augment.warp(image, jnp.eye(3), size_out), atol=1e-5)
