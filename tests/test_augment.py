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


_jit_preprocess = jax.jit(
  augment.preprocess_batch,
  static_argnums=(2,),
  static_argnames=('out_size', 'train', 'mean', 'std'),
)


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
  cfg = _cfg(
    flip=True, rotation_deg=45.0, zoom=0.5, shift=0.3, shear_deg=30.0, brightness=0.9, contrast=0.9
  )
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
  halves = [
    _pre(batch[s], keys[s], cfg, out_size=48, train=True) for s in (slice(0, 4), slice(4, 8))
  ]
  np.testing.assert_array_equal(full, np.concatenate(halves))


def test_eval_is_deterministic_and_ignores_keys():
  cfg = _cfg(flip=True, rotation_deg=30.0, brightness=0.5, standardize='dataset')
  batch = jnp.asarray(np.stack([_image(seed=s) for s in range(4)]))
  run = lambda keys, size: _pre(batch, keys, cfg, out_size=size, train=False, mean=0.5, std=0.25)
  np.testing.assert_allclose(run(None, 48), (_float(np.asarray(batch)) - 0.5) / 0.25, atol=1e-6)
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
  # The same arithmetic in another program: its rounding may differ (~1e-5 unoptimised).
  np.testing.assert_allclose(np.asarray(from_bf16), ref, atol=5e-5)


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
    augment.preprocess_batch(
      batch, None, _cfg(standardize='dataset'), out_size=48, train=False, mean=0.5, std=0.0
    )
  with pytest.raises(ValueError, match='one PRNG key per example'):
    augment.preprocess_batch(batch, None, _cfg(flip=True), out_size=48, train=True)


@pytest.mark.parametrize('out_size', [48, 150])
def test_flip_only_shortcut_equals_the_affine_resample(out_size):
  """Flip-only skips the general affine warp (a pixel flip, then the separable resize);
  the pixels must match warp's."""
  cfg = ml_collections.ConfigDict(
    dict(
      enabled=True,
      flip=True,
      rotation_deg=0.0,
      zoom=0.0,
      shift=0.0,
      shear_deg=0.0,
      brightness=0.0,
      contrast=0.0,
      standardize='none',
    )
  )
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 48, 48, 1), np.uint8))
  keys = jax.random.split(jax.random.key(3), 16)
  fast = augment.preprocess_batch(images, keys, cfg, out_size=out_size, train=True)
  warped = jax.vmap(
    lambda im, k: augment.warp(im, augment.sample_affine(k, cfg, out_size), out_size)
  )(augment.rescale(images), keys)
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
  np.testing.assert_allclose(
    augment.resize(image, size_out), augment.warp(image, jnp.eye(3), size_out), atol=1e-5
  )


# --- Crops, random erasing, mixup / CutMix --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _NewCfg(_Cfg):
  """_Cfg plus the recipe fields (which _Cfg lacks, like configs saved before them)."""

  crop_fraction: float = 0.0
  crop_scale: tuple = (1.0, 1.0)
  erase_prob: float = 0.0
  erase_area: tuple = (0.02, 0.33)
  erase_ratio: tuple = (0.3, 3.3)
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_prob: float = 1.0
  whole_pixels: bool = False


_CROP = 40 / 48


def _bilinear(img: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
  """Host bilinear sample of (H, W, C) at float coordinates, edges repeated."""
  h, w = img.shape[:2]
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
  at = lambda y, x: img[np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)]
  return (1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1)) + fy * (
    (1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)
  )


def test_new_fields_default_to_off_and_change_nothing():
  batch = jnp.asarray(np.stack([_image(seed=s) for s in range(4)]))
  keys = _keys(4)
  for old in (_Cfg(), _Cfg(flip=True), _Cfg(flip=True, rotation_deg=10.0, contrast=0.2)):
    new = _NewCfg(**dataclasses.asdict(old))
    for train, size in ((True, 48), (True, 64), (False, 48), (False, 64)):
      np.testing.assert_array_equal(
        _pre(batch, keys, new, out_size=size, train=train),
        _pre(batch, keys, old, out_size=size, train=train),
      )
  assert augment.crop_side(48, _Cfg()) == 48 and augment.crop_side(48, _NewCfg()) == 48
  x, t = jnp.ones((3, 4, 4, 1)), jnp.eye(3)
  mixed = augment.mix_pairs(x, t, _keys(3), _Cfg())
  assert mixed[0] is x and mixed[1] is t  # off: untouched, even for an odd batch
  augment.check_config(_Cfg())
  augment.check_config(ml_collections.ConfigDict(dataclasses.asdict(_NewCfg())))


def test_centre_crop_is_an_exact_slice():
  batch = np.stack([_image(seed=s, channels=2) for s in range(3)])
  cfg = _NewCfg(crop_fraction=_CROP, flip=True, rotation_deg=20.0)
  assert augment.crop_side(48, cfg) == 40
  # Evaluation, and training with augmentation off, take the centre crop.
  for c, train in ((cfg, False), (dataclasses.replace(cfg, enabled=False), True)):
    out = _pre(batch, _keys(3), c, out_size=40, train=train)
    np.testing.assert_array_equal(out, _float(batch)[:, 4:44, 4:44])
  # Another model size: the centre crop, then the plain resize.
  out = _pre(batch, None, cfg, out_size=150, train=False)
  ref = augment.resize(jnp.asarray(_float(batch)[:, 4:44, 4:44]), 150)
  np.testing.assert_allclose(out, np.asarray(ref), atol=1e-6)
  # The ten-crop side for other fractions rounds the pixel count.
  assert augment.crop_side(48, _NewCfg(crop_fraction=0.9)) == 43
  assert augment.crop_side(48, _NewCfg(crop_fraction=1.0)) == 48


def test_crop_matrix_with_integer_offsets_is_an_exact_subwindow():
  img = _float(_image(channels=2))
  offsets = jnp.asarray([(x0, y0) for x0 in range(9) for y0 in range(9)], jnp.float32)
  crops = jax.jit(
    jax.vmap(
      lambda o: augment.warp(
        jnp.asarray(img), augment.crop_matrix(o[0], o[1], 40.0, 40.0, 48, 48, 40), 40
      )
    )
  )(offsets)
  for (x0, y0), out in zip(np.asarray(offsets).astype(int), np.asarray(crops)):
    np.testing.assert_allclose(out, img[y0 : y0 + 40, x0 : x0 + 40], atol=1e-5)
  # A non-square window shrunk to another size equals the plain resize of the slice (when
  # enlarging, warp's border samples read the real pixels beyond the window, not its edge).
  m = augment.crop_matrix(3.0, 5.0, 30.0, 40.0, 48, 48, 24)
  np.testing.assert_allclose(
    augment.warp(jnp.asarray(img), m, 24),
    augment.resize(jnp.asarray(img[5:45, 3:33]), 24),
    atol=1e-5,
  )


def test_random_crop_is_a_subwindow_and_offsets_cover_the_range():
  cfg = _NewCfg(crop_fraction=_CROP)
  batch = np.stack([_image(seed=s) for s in range(16)])
  keys = _keys(16)
  out = _pre(batch, keys, cfg, out_size=40, train=True)
  x0, y0, cw, ch = (
    np.asarray(v) for v in jax.vmap(lambda k: augment.sample_crop(k, cfg, 48, 48))(keys)
  )
  np.testing.assert_array_equal(cw, 40.0)
  np.testing.assert_array_equal(ch, 40.0)
  grid = np.arange(40, dtype=np.float64)
  for i in range(16):
    ref = _bilinear(
      _float(batch[i]).astype(np.float64), y0[i] + grid[:, None], x0[i] + grid[None, :]
    )
    np.testing.assert_allclose(out[i], ref, atol=1e-5)
  many = jax.jit(jax.vmap(lambda k: augment.sample_crop(k, cfg, 48, 48)[:2]))(_keys(4000, 1))
  for v in map(np.asarray, many):
    assert v.min() >= 0 and v.max() <= 8 and v.min() < 0.05 and v.max() > 7.95
    assert np.histogram(v, bins=8, range=(0, 8))[0].min() > 350  # uniform, roughly


def test_random_crop_scale_and_oversized_crops():
  cfg = _NewCfg(crop_fraction=_CROP, crop_scale=(0.5, 1.0))
  x0, y0, cw, ch = (
    np.asarray(v) for v in jax.vmap(lambda k: augment.sample_crop(k, cfg, 48, 48))(_keys(1000))
  )
  np.testing.assert_array_equal(cw, ch)
  assert cw.min() >= 40 * np.sqrt(0.5) - 1e-4 and cw.max() <= 40 + 1e-4 and np.ptp(cw) > 10
  assert np.all(x0 >= 0) and np.all(x0 + cw <= 48 + 1e-4)
  # Larger than the image: centred, and the edges repeat.
  big = _NewCfg(crop_fraction=1.0, crop_scale=(1.44, 1.44))
  x0, y0, cw, _ = augment.sample_crop(jax.random.key(0), big, 48, 48)
  np.testing.assert_allclose([float(x0), float(y0), float(cw)], [-4.8, -4.8, 57.6], atol=1e-4)


def test_random_crop_is_composed_before_flip_in_one_resample():
  cfg = _NewCfg(crop_fraction=_CROP, flip=True)
  batch = np.stack([_image(seed=s) for s in range(16)])
  keys = _keys(16, 2)
  out = _pre(batch, keys, cfg, out_size=40, train=True)
  x0, y0 = (
    np.asarray(v) for v in jax.vmap(lambda k: augment.sample_crop(k, cfg, 48, 48)[:2])(keys)
  )
  flips = np.asarray(jax.vmap(augment.flip_draw)(keys))
  assert 0 < flips.sum() < 16
  grid = np.arange(40, dtype=np.float64)
  for i in range(16):
    ref = _bilinear(
      _float(batch[i]).astype(np.float64), y0[i] + grid[:, None], x0[i] + grid[None, :]
    )
    np.testing.assert_allclose(out[i], ref[:, ::-1] if flips[i] else ref, atol=1e-5)
  # With more geometry: exactly warp(sample_affine @ crop), one interpolation.
  cfg = dataclasses.replace(cfg, rotation_deg=20.0, zoom=0.1, crop_scale=(0.6, 1.0))
  out = _pre(batch, keys, cfg, out_size=56, train=True)

  def ref_one(image, key):
    crop = augment.crop_matrix(*augment.sample_crop(key, cfg, 48, 48), 48, 48, 56)
    m = jnp.matmul(augment.sample_affine(key, cfg, 56), crop, precision='highest')
    return augment.warp(image, m, 56)

  ref = jax.jit(jax.vmap(ref_one))(augment.rescale(jnp.asarray(batch)), keys)
  np.testing.assert_allclose(out, np.asarray(ref), atol=5e-5)  # two programs' rounding


@pytest.mark.parametrize(
  'crop,shift,flip',
  [(44 / 48, 0.0, True), (44 / 48, 0.1, True), (0.0, 0.1, True), (40 / 48, 0.1, False)],
)
def test_whole_pixel_crops_and_shifts_are_pixel_copies_equal_to_the_resample(crop, shift, flip):
  cfg = _NewCfg(crop_fraction=crop, shift=shift, flip=flip, whole_pixels=True)
  side = augment.crop_side(48, cfg)
  batch = np.stack([_image(seed=s, channels=2) for s in range(64)])
  keys = _keys(64, 3)
  out = _pre(batch, keys, cfg, out_size=side, train=True)
  # Every view holds only the stored pixels: no bilinear blend.
  for i in range(64):
    assert np.isin(out[i], _float(batch[i])).all()
  # The same views as the general resample of the same (whole-pixel) draws (which is exact up
  # to the float rounding of its composed matrix).
  ref = jax.jit(
    jax.vmap(lambda im, k: augment.warp(im, augment.sample_transform(k, cfg, 48, 48, side), side))
  )(augment.rescale(jnp.asarray(batch)), keys)
  np.testing.assert_allclose(out, np.asarray(ref), atol=1e-5)
  # Fractional draws would blend pixels: the option changes the views.
  blended = _pre(
    batch, keys, dataclasses.replace(cfg, whole_pixels=False), out_size=side, train=True
  )
  assert not np.array_equal(out, blended)


def test_whole_pixel_draws_are_uniform_over_the_positions():
  cfg = _NewCfg(crop_fraction=44 / 48, shift=0.05, whole_pixels=True)
  keys = _keys(4000, 5)
  x0, y0, cw, ch = (
    np.asarray(v) for v in jax.jit(jax.vmap(lambda k: augment.sample_crop(k, cfg, 48, 48)))(keys)
  )
  np.testing.assert_array_equal(cw, 44.0)
  np.testing.assert_array_equal(ch, 44.0)
  for v in (x0, y0):
    np.testing.assert_array_equal(v, np.round(v))
    counts = np.bincount(v.astype(int), minlength=5)
    assert counts.size == 5 and counts.min() > 650  # 0..4, 800 each expected
  tx, ty = (
    np.asarray(v) for v in jax.jit(jax.vmap(lambda k: augment.sample_shift(k, cfg, 44)))(keys)
  )
  for v in (tx, ty):  # +-2.2 px -> whole pixels -2..2
    assert set(np.unique(v)) == {-2.0, -1.0, 0.0, 1.0, 2.0}
  # A random crop that scales keeps fractional positions (it resamples anyway).
  scaled = dataclasses.replace(cfg, crop_scale=(0.8, 1.0))
  x0 = np.asarray(jax.vmap(lambda k: augment.sample_crop(k, scaled, 48, 48)[0])(keys[:100]))
  assert not np.array_equal(x0, np.round(x0))


def _rectangle(mask: np.ndarray) -> tuple[int, int]:
  """(height, width) of the True region, asserting it is one filled rectangle."""
  rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
  assert rows.size and cols.size
  box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
  assert box.all() and mask.sum() == box.size
  return box.shape


def test_random_erasing():
  rng = np.random.default_rng(0)
  batch = rng.integers(1, 256, (32, 48, 48, 3), np.uint8)  # no pixel is 0 before erasing
  keys = _keys(32)
  plain = _pre(batch, keys, _NewCfg(flip=True), out_size=48, train=True)
  np.testing.assert_array_equal(
    _pre(batch, keys, _NewCfg(flip=True, erase_prob=0.0), out_size=48, train=True), plain
  )
  cfg = _NewCfg(flip=True, erase_prob=1.0, erase_area=(0.05, 0.2), erase_ratio=(0.5, 2.0))
  out = _pre(batch, keys, cfg, out_size=48, train=True)
  np.testing.assert_array_equal(out, _pre(batch, keys, cfg, out_size=48, train=True))
  assert not np.array_equal(out, _pre(batch, _keys(32, 5), cfg, out_size=48, train=True))
  fractions = []
  for o, p in zip(out, plain):
    erased = o != p
    assert (erased.all(-1) | ~erased.any(-1)).all()  # all channels together
    eh, ew = _rectangle(erased[..., 0])
    assert np.all(o[erased] == 0) and 0.4 <= eh / ew <= 2.5
    fractions.append(eh * ew / 48**2)
  fractions = np.array(fractions)
  assert fractions.min() >= 0.05 - 0.01 and fractions.max() <= 0.2 + 0.01
  assert np.ptp(fractions) > 0.05
  # Default ranges (rectangles that may not fit are shrunk), fill 0 after standardization,
  # probability 0.5, and nothing at evaluation.
  cfg = _NewCfg(erase_prob=0.5, standardize='dataset')
  run = lambda train: _pre(batch, keys, cfg, out_size=48, train=train, mean=0.5, std=0.25)
  out, ref = run(True), (_float(batch) - 0.5) / 0.25
  masks = np.abs(out - ref) > 1e-5  # the standardization itself agrees to a few ulps
  erased = masks.reshape(32, -1).any(axis=1)
  assert 0 < erased.sum() < 32
  for o, mask, e in zip(out, masks, erased):
    if e:
      _rectangle(mask[..., 0])
      assert np.all(o[mask] == 0) and mask[..., 0].sum() / 48**2 <= 0.33 + 0.01
  np.testing.assert_allclose(run(False), ref, atol=1e-6)


def _mix(x, t, keys, cfg):
  out = jax.jit(augment.mix_pairs, static_argnums=3)(jnp.asarray(x), jnp.asarray(t), keys, cfg)
  return tuple(map(np.asarray, out))


def test_mixup_mixes_pairs_linearly():
  rng = np.random.default_rng(1)
  x = rng.uniform(-2, 2, (16, 8, 8, 2)).astype(np.float32)
  weights = rng.uniform(0.5, 3, 16).astype(np.float32)  # unnormalised (class-weighted) rows
  t = np.diag(weights)
  xm, tm = _mix(x, t, _keys(16), _NewCfg(mixup_alpha=0.4))
  partner = np.arange(16) ^ 1
  lam = tm[np.arange(16), np.arange(16)] / weights
  assert np.all(np.isfinite(lam)) and np.all((lam >= 0) & (lam <= 1)) and np.ptp(lam) > 0.3
  np.testing.assert_allclose(tm[np.arange(16), partner], (1 - lam) * weights[partner], atol=1e-5)
  other = np.ones_like(tm, bool)
  other[np.arange(16), np.arange(16)] = other[np.arange(16), partner] = False
  assert np.all(tm[other] == 0)
  np.testing.assert_allclose(
    xm, lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[partner], atol=1e-5
  )


def test_cutmix_lambda_is_the_fraction_kept():
  b = 16
  x = np.broadcast_to(
    np.arange(1, b + 1, dtype=np.float32)[:, None, None, None], (b, 12, 10, 1)
  ).copy()
  xm, tm = _mix(x, np.eye(b, dtype=np.float32), _keys(b), _NewCfg(cutmix_alpha=1.0))
  partner = np.arange(b) ^ 1
  lam = tm[np.arange(b), np.arange(b)]
  np.testing.assert_allclose(tm[np.arange(b), partner], 1 - lam, atol=1e-6)
  for i in range(b):
    taken = xm[i, ..., 0] == x[partner[i], 0, 0, 0]
    assert np.all(taken | (xm[i, ..., 0] == x[i, 0, 0, 0]))
    np.testing.assert_allclose(taken.mean(), 1 - lam[i], atol=1e-6)
    if taken.any():
      _rectangle(taken)
  assert np.ptp(lam) > 0.3 and lam.min() < 1


def test_mixup_or_cutmix_with_probability():
  rng = np.random.default_rng(2)
  b = 64
  x = rng.normal(size=(b, 8, 8, 1)).astype(np.float32)
  t = np.eye(b, dtype=np.float32)
  cfg = _NewCfg(mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.6)
  xm, tm = _mix(x, t, _keys(b, 3), cfg)
  partner = np.arange(b) ^ 1
  kinds = []
  for i in range(b):
    lam = tm[i, i]
    np.testing.assert_allclose(tm[i, partner[i]], 1 - lam, atol=1e-6)
    if lam == 1:
      np.testing.assert_array_equal(xm[i], x[i])
      kinds.append('none')
    elif np.all((xm[i] == x[i]) | (xm[i] == x[partner[i]])):
      np.testing.assert_allclose((xm[i] == x[partner[i]]).mean(), 1 - lam, atol=1e-6)
      kinds.append('cutmix')
    else:
      np.testing.assert_allclose(xm[i], lam * x[i] + (1 - lam) * x[partner[i]], atol=1e-5)
      kinds.append('mixup')
  assert min(kinds.count(k) for k in ('none', 'cutmix', 'mixup')) >= 8, kinds


def test_mix_pairs_is_deterministic_and_independent_of_the_split():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
  t = rng.uniform(size=(16, 7)).astype(np.float32)
  keys = _keys(16)
  cfg = _NewCfg(mixup_alpha=0.5, cutmix_alpha=1.0, mix_prob=0.8)
  full = _mix(x, t, keys, cfg)
  again = _mix(x, t, keys, cfg)
  other = _mix(x, t, _keys(16, 9), cfg)
  for a, b_, c in zip(full, again, other):
    np.testing.assert_array_equal(a, b_)
    assert not np.array_equal(a, c)
  parts = [_mix(x[s], t[s], keys[s], cfg) for s in (slice(0, 4), slice(4, 10), slice(10, 16))]
  for k in range(2):
    np.testing.assert_array_equal(full[k], np.concatenate([p[k] for p in parts]))
  with pytest.raises(ValueError, match='even'):
    augment.mix_pairs(jnp.asarray(x[:5]), jnp.asarray(t[:5]), keys[:5], cfg)


@pytest.mark.parametrize(
  'field,value',
  [
    ('crop_fraction', 1.5),
    ('crop_fraction', -0.1),
    ('crop_scale', (0.0, 1.0)),
    ('crop_scale', (0.9, 0.5)),
    ('crop_scale', (1.0,)),
    ('erase_prob', 1.2),
    ('erase_area', (0.1, 1.5)),
    ('erase_ratio', (0.0, 2.0)),
    ('mixup_alpha', -1.0),
    ('cutmix_alpha', float('nan')),
    ('mix_prob', 2.0),
    ('whole_pixels', 'yes'),
  ],
)
def test_invalid_recipe_fields_raise_one_line(field, value):
  cfg = dataclasses.replace(_NewCfg(), **{field: value})
  with pytest.raises(ConfigError, match=f'augment.{field}') as err:
    augment.check_config(cfg)
  assert '\n' not in str(err.value)
  batch, x, t = jnp.zeros((2, 48, 48, 1), jnp.uint8), jnp.zeros((2, 8, 8, 1)), jnp.eye(2)
  with pytest.raises(ConfigError, match=f'augment.{field}'):
    if field in ('mixup_alpha', 'cutmix_alpha', 'mix_prob'):
      augment.mix_pairs(x, t, _keys(2), cfg)
    else:
      augment.preprocess_batch(batch, _keys(2), cfg, out_size=48, train=True)
