"""On-device augmentation and preprocessing, traced into the jitted train step.

The loader ships uint8 (B, H, W, C) batches; everything here is pure JAX so the
host does no per-example work. Geometry (flip, rotation, zoom, shift, shear) is
composed into ONE affine map per example and applied by ONE bilinear resample
that also folds in the resize to the model's input size (48 -> 150), so an
augmented 150x150 image is interpolated once, not twice.

Conventions (all in pixel units of the OUTPUT grid, x = column, y = row, y
pointing down, pixel centres at integer indices, the centre at (S-1)/2):
- A matrix maps where content sits in the (resized) source to where it sits in
  the output; `warp` sends every output pixel through the inverse.
- Positive angles rotate counter-clockwise as displayed (np.rot90's sense).
- scale > 1 enlarges the content (zooms in); tx > 0 moves it right, ty > 0 down.
- Input and output grids are pixel-centre aligned (jax.image.resize,
  align_corners=False); outside the input the nearest edge pixel is repeated
  (Keras ImageDataGenerator fill_mode='nearest').

Config switches are read as Python values at trace time: a component that is
off draws no random numbers and costs nothing, and when no geometric component
is on and no resize is needed the resample is skipped (the output then equals
the rescaled input exactly). A flip alone is a pixel copy, and a plain resize
uses the same bilinear weights as two small matmuls (`resize`), so neither pays
for the general resample's gathers.

Ingredients of the published FER2013 recipes (e.g. Khaireddin & Chen 2021):
- Crops (`crop_fraction`, `crop_scale`): the model sees a fraction of the stored
  face (40 of 48 pixels), which jitters its position and scale in training.
  Training takes a random crop whose area varies within
  `crop_scale` of that view, composed into the same single affine resample as
  the other geometry (crop first), so the crop costs no second interpolation;
  evaluation takes the centre crop (`crop_side`), a pixel copy when its side is
  the model's input size.
- Whole pixels (`whole_pixels`): the random crop's position (at a fixed crop size) and the
  shifts are drawn as whole pixels, so when flips are the only other geometry and no resize
  follows, a training view is a pixel copy of the stored face (torchvision's RandomCrop).
  Fractional offsets make every training view a bilinear blend of neighbouring pixels while
  evaluation sees the sharp centre crop.
- Random erasing (`erase_*`, torchvision's RandomErasing): training only, after
  standardization, zeroes one rectangle per example so the model cannot rely on
  a single facial region.
- Mixup / CutMix (`mix_pairs`, `mixup_alpha`, `cutmix_alpha`, `mix_prob`):
  training on blends of two faces and of their targets regularises a small,
  label-noisy dataset. Runs in the train step on preprocessed images and their
  targets (so targets may already be smoothed or weighted); partners are the
  adjacent examples (2k, 2k+1), so any slice that keeps pairs together (a device
  shard, a gradient chunk) gives the same result as the whole batch.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates

from fer_jax.errors import ConfigError

STANDARDIZE_MODES = ('dataset', 'per_image', 'none')

# fold_in tags: each component has its own stream, so switching one component
# on or off does not change the draws of the others.
# mix_pairs' tags differ from preprocess_batch's, so the train step may give both
# the same per-example keys.
_FLIP, _ANGLE, _SCALE, _TX, _TY, _SHEAR, _BRIGHT, _CONTRAST = range(8)
_CROP_SCALE, _CROP_X, _CROP_Y = range(8, 11)
_ERASE, _ERASE_AREA, _ERASE_RATIO, _ERASE_Y, _ERASE_X = range(11, 16)
_MIX, _MIX_KIND, _MIXUP_LAM, _CUTMIX_LAM, _CUT_Y, _CUT_X = range(16, 22)


def _num(cfg: Any, name: str) -> float:
  """Reads a non-negative range from the config at trace time."""
  value = float(getattr(cfg, name))
  if not math.isfinite(value) or value < 0:
    raise ConfigError(f'augment.{name} must be a finite number >= 0, got {value}')
  return value


def _geometry(cfg: Any) -> dict[str, float]:
  """The geometric ranges; all zero/False means no warp is needed."""
  g = dict(
    flip=float(bool(cfg.flip)),
    rotation_deg=_num(cfg, 'rotation_deg'),
    zoom=_num(cfg, 'zoom'),
    shift=_num(cfg, 'shift'),
    shear_deg=_num(cfg, 'shear_deg'),
  )
  if g['zoom'] >= 1:
    raise ConfigError(f'augment.zoom must be < 1 (scale in [1-zoom, 1+zoom]), got {g["zoom"]}')
  if g['shear_deg'] >= 90:
    raise ConfigError(f'augment.shear_deg must be < 90, got {g["shear_deg"]}')
  return g


def _opt(cfg: Any, name: str, default: float, hi: float = math.inf) -> float:
  """An optional number in [0, hi]; configs (and checkpoints) older than the field get
  `default`, the value that turns the component off."""
  try:
    value = float(getattr(cfg, name, default))
  except (TypeError, ValueError):
    raise ConfigError(f'augment.{name} must be a number, got {getattr(cfg, name)!r}') from None
  if not math.isfinite(value) or not 0 <= value <= hi:
    bounds = f'in [0, {hi:g}]' if math.isfinite(hi) else '>= 0'
    raise ConfigError(f'augment.{name} must be a finite number {bounds}, got {value}')
  return value


def _pair(
  cfg: Any, name: str, default: tuple[float, float], hi: float = math.inf
) -> tuple[float, float]:
  """An optional (lo, hi) range with 0 < lo <= hi (<= `hi`)."""
  raw = getattr(cfg, name, default)
  try:
    lo, up = (float(v) for v in raw)
  except (TypeError, ValueError):
    raise ConfigError(f'augment.{name} must be a pair (lo, hi), got {raw!r}') from None
  if not (math.isfinite(lo) and math.isfinite(up) and 0 < lo <= up <= hi):
    bound = f' <= {hi:g}' if math.isfinite(hi) else ''
    raise ConfigError(f'augment.{name} must satisfy 0 < lo <= hi{bound}, got ({lo}, {up})')
  return lo, up


def _whole_pixels(cfg: Any) -> bool:
  """augment.whole_pixels (False for configs and checkpoints older than the field)."""
  value = getattr(cfg, 'whole_pixels', False)
  if not isinstance(value, (bool, np.bool_)):
    raise ConfigError(f'augment.whole_pixels must be True or False, got {value!r}')
  return bool(value)


def _crop(cfg: Any) -> tuple[float, tuple[float, float]]:
  """(crop_fraction, crop_scale); crop_fraction 0 means no crop."""
  return _opt(cfg, 'crop_fraction', 0.0, hi=1.0), _pair(cfg, 'crop_scale', (1.0, 1.0))


def _erase(cfg: Any) -> tuple[float, tuple[float, float], tuple[float, float]]:
  """(erase_prob, erase_area, erase_ratio); erase_prob 0 means no erasing."""
  return (
    _opt(cfg, 'erase_prob', 0.0, hi=1.0),
    _pair(cfg, 'erase_area', (0.02, 0.33), hi=1.0),
    _pair(cfg, 'erase_ratio', (0.3, 3.3)),
  )


def _mix(cfg: Any) -> tuple[float, float, float]:
  """(mixup_alpha, cutmix_alpha, mix_prob); both alphas 0 means no mixing."""
  return (
    _opt(cfg, 'mixup_alpha', 0.0),
    _opt(cfg, 'cutmix_alpha', 0.0),
    _opt(cfg, 'mix_prob', 1.0, hi=1.0),
  )


def check_config(cfg: Any) -> None:
  """Raises ConfigError (one line naming augment.<field>) for any invalid augment field, so a
  bad value is reported before training starts rather than at the first trace."""
  mode = str(cfg.standardize)
  if mode not in STANDARDIZE_MODES:
    raise ConfigError(f'augment.standardize must be one of {STANDARDIZE_MODES}, got {mode!r}')
  _geometry(cfg)
  _num(cfg, 'brightness')
  _num(cfg, 'contrast')
  _crop(cfg)
  _whole_pixels(cfg)
  _erase(cfg)
  _mix(cfg)


def _crop_len(n: int, fraction: float) -> int:
  """The centre crop's length along an axis of n pixels (n when cropping is off)."""
  if not fraction:
    return n
  return max(1, min(n, int(math.floor(n * fraction + 0.5))))


def crop_side(height: int, cfg: Any) -> int:
  """The side of the evaluation centre crop of an image `height` pixels high: round(height *
  crop_fraction), or `height` when cropping is off. Ten-crop TTA cuts views of this side."""
  return _crop_len(int(height), _crop(cfg)[0])


def crop_matrix(x0, y0, crop_w, crop_h, height: int, width: int, out_size: int) -> jax.Array:
  """The (3, 3) forward matrix, in warp's convention, of cropping the window of size
  (crop_w, crop_h) input pixels at top-left (x0, y0) (pixel edges; may be fractional) and
  resizing it to out_size: output pixel p samples input x0 + (p + 0.5) * crop_w / out - 0.5.

  warp maps p through the inverse to q (the source resized to out_size) and then to the input
  (q + 0.5) * in / out - 0.5, so the inverse here is q = (c / in) p + x0 out / in + 0.5 c / in
  - 0.5 per axis, and this matrix is its inverse.
  """
  f32 = jnp.float32
  rows = []
  for i, (start, side, n) in enumerate(((x0, crop_w, width), (y0, crop_h, height))):
    start, side = jnp.asarray(start, f32), jnp.asarray(side, f32)
    scale = f32(n) / side
    offset = (f32(0.5 * n) - start * f32(out_size)) / side - f32(0.5)
    row = [f32(0), f32(0), offset]
    row[i] = scale
    rows.append(jnp.stack(row))
  return jnp.stack(rows + [jnp.asarray([0, 0, 1], f32)]).astype(f32)


def sample_crop(
  key: jax.Array, cfg: Any, height: int, width: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Draws ONE example's random training crop: (x0, y0, crop_w, crop_h) in input pixels.

  The side is crop_fraction * sqrt(u) of the image side with u ~ U(crop_scale) (so u scales
  the area of the evaluation view) and is not rounded; the top-left is uniform over the
  positions that keep the crop inside the image, or centred when the crop is larger than the
  image (warp then repeats the edges). Only meaningful when crop_fraction > 0.

  With augment.whole_pixels and a fixed crop_scale of (1, 1), the side is the evaluation crop's
  (`crop_side`) and the top-left a uniform whole pixel in [0, n - side], as in
  torchvision's RandomCrop.
  """
  fraction, (lo, hi) = _crop(cfg)
  f32 = jnp.float32
  if _pixel_crop(cfg):
    crop_w, crop_h = f32(_crop_len(width, fraction)), f32(_crop_len(height, fraction))
  elif lo == hi:
    root = f32(math.sqrt(lo))
    crop_w, crop_h = f32(width * fraction) * root, f32(height * fraction) * root
  else:
    root = jnp.sqrt(jax.random.uniform(jax.random.fold_in(key, _CROP_SCALE), (), f32, lo, hi))
    crop_w, crop_h = f32(width * fraction) * root, f32(height * fraction) * root

  def start(tag: int, n: int, side: jax.Array) -> jax.Array:
    room = f32(n) - side
    u = jax.random.uniform(jax.random.fold_in(key, tag), (), f32)
    if _pixel_crop(cfg):  # room is a whole number >= 0
      return jnp.minimum(jnp.floor(u * (room + 1)), room)
    return jnp.where(room >= 0, u * room, room / 2)

  return start(_CROP_X, width, crop_w), start(_CROP_Y, height, crop_h), crop_w, crop_h


def _pixel_crop(cfg: Any) -> bool:
  """Whether random crops are whole-pixel windows of the evaluation crop's size."""
  fraction, scale = _crop(cfg)
  return bool(fraction) and scale == (1.0, 1.0) and _whole_pixels(cfg)


def sample_transform(key: jax.Array, cfg: Any, height: int, width: int, out_size: int) -> jax.Array:
  """ONE example's complete training map from its (height, width) image to the output: the
  random crop (when crop_fraction > 0) followed by `sample_affine`'s geometry about the output
  centre, as one (3, 3) forward matrix for a single `warp`."""
  geometry = sample_affine(key, cfg, out_size)
  if not _crop(cfg)[0]:
    return geometry
  crop = crop_matrix(*sample_crop(key, cfg, height, width), height, width, out_size)
  return jnp.matmul(geometry, crop, precision=jax.lax.Precision.HIGHEST)


def affine_matrix(flip, angle, scale, tx, ty, shear, size: int) -> jax.Array:
  """The (3, 3) forward affine map for explicit parameters, about the centre.

  Args:
    flip: mirror left-right (bool or traced bool), applied first.
    angle: rotation in degrees, counter-clockwise as displayed.
    scale: isotropic zoom factor (> 1 enlarges).
    tx, ty: shift in output pixels (right, down).
    shear: shear angle in degrees (x += tan(shear) * y).
    size: the output side length S; the centre is (S - 1) / 2.

  Returns:
    float32 (3, 3) matrix M with [x_out, y_out, 1] = M @ [x_src, y_src, 1].
  """
  f32 = jnp.float32
  sign = jnp.where(jnp.asarray(flip), f32(-1), f32(1))
  theta = jnp.deg2rad(jnp.asarray(angle, f32))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  sh = jnp.tan(jnp.deg2rad(jnp.asarray(shear, f32)))
  s = jnp.asarray(scale, f32)
  # linear = R(angle) @ Shear @ Zoom @ Flip, written out to keep zeros exact.
  a = cos * s * sign
  b = (cos * sh + sin) * s
  c = -sin * s * sign
  d = (-sin * sh + cos) * s
  centre = f32((size - 1) / 2)
  e = centre + jnp.asarray(tx, f32) - (a + b) * centre
  g = centre + jnp.asarray(ty, f32) - (c + d) * centre
  zero, one = f32(0), f32(1)
  return jnp.stack(
    [
      jnp.stack([a, b, e]),
      jnp.stack([c, d, g]),
      jnp.stack([zero, zero, one]),
    ]
  ).astype(f32)


def flip_draw(key: jax.Array) -> jax.Array:
  """Whether this example is mirrored left-right (the same draw as in sample_affine)."""
  return jax.random.bernoulli(jax.random.fold_in(key, _FLIP))


def sample_affine(key: jax.Array, cfg: Any, out_size: int) -> jax.Array:
  """Draws ONE example's random affine map from `cfg`'s ranges.

  Args:
    key: this example's PRNG key (never shared with other examples).
    cfg: the `augment` config (flip, rotation_deg, zoom, shift, shear_deg).
    out_size: output side length; shifts are fractions of it.

  Returns:
    float32 (3, 3) forward matrix; components that are off are exact identity.
  """
  g = _geometry(cfg)

  def uniform(tag: int, lo: float, hi: float) -> jax.Array:
    return jax.random.uniform(jax.random.fold_in(key, tag), (), jnp.float32, lo, hi)

  flip = flip_draw(key) if g['flip'] else False
  r, z, sh = g['rotation_deg'], g['zoom'], g['shear_deg']
  angle = uniform(_ANGLE, -r, r) if r else 0.0
  scale = uniform(_SCALE, 1 - z, 1 + z) if z else 1.0
  tx, ty = sample_shift(key, cfg, out_size)
  shear = uniform(_SHEAR, -sh, sh) if sh else 0.0
  return affine_matrix(flip, angle, scale, tx, ty, shear, out_size)


def sample_shift(key: jax.Array, cfg: Any, out_size: int) -> tuple[jax.Array, jax.Array]:
  """ONE example's shift (tx, ty) in output pixels, uniform in +-shift * out_size (0.0 when
  off); with augment.whole_pixels, rounded to whole pixels."""
  t = _geometry(cfg)['shift'] * out_size
  if not t:
    return jnp.float32(0), jnp.float32(0)

  def draw(tag: int) -> jax.Array:
    v = jax.random.uniform(jax.random.fold_in(key, tag), (), jnp.float32, -t, t)
    return jnp.round(v) if _whole_pixels(cfg) else v

  return draw(_TX), draw(_TY)


def warp(image: jax.Array, matrix: jax.Array, out_size: int) -> jax.Array:
  """Bilinear resample of one (H, W, C) image to (out_size, out_size, C).

  Each output pixel goes through the inverse of `matrix` (output pixel units)
  and then the pixel-centre-aligned scaling to the input grid, so geometry and
  resize cost one interpolation. Coordinates outside the input are clamped to
  the edge (fill_mode='nearest'). Uses jax.scipy.ndimage.map_coordinates, which is
  faster on CPU than hand-written flat-index gathers (benchmarks/README.md, 'Figures behind
  constants in the code').
  """
  h, w, ch = image.shape
  image = image.astype(jnp.float32)
  m = matrix.astype(jnp.float32)
  a, b, e = m[0, 0], m[0, 1], m[0, 2]
  c, d, g = m[1, 0], m[1, 1], m[1, 2]
  det = a * d - b * c
  ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
  # Output pixel p -> source (output units) q = L^-1 (p - t) -> input grid
  # (q + 0.5) * in / out - 0.5; folded into one affine map per axis.
  sx, sy = w / out_size, h / out_size
  ax, bx = ia * sx, ib * sx
  ex = -(ia * e + ib * g) * sx + (0.5 * sx - 0.5)
  ay, by = ic * sy, id_ * sy
  ey = -(ic * e + id_ * g) * sy + (0.5 * sy - 0.5)
  grid = jnp.arange(out_size, dtype=jnp.float32)
  xs, ys = grid[None, :], grid[:, None]
  x = ax * xs + bx * ys + ex
  y = ay * xs + by * ys + ey
  # mode='nearest' clamps the neighbour indices to the edge. The weights are
  # products of (1 - f) and f, exact at integer coordinates, so identity and
  # flips reproduce the input bit for bit.
  channels = [map_coordinates(image[..., k], [y, x], order=1, mode='nearest') for k in range(ch)]
  return jnp.stack(channels, axis=-1)


def translate(
  image: jax.Array, x0: jax.Array, y0: jax.Array, tx: jax.Array, ty: jax.Array, flip, out_size: int
) -> jax.Array:
  """`warp` of one (H, W, C) image for a crop of side out_size at whole-pixel top-left
  (x0, y0), then a flip, then a whole-pixel shift (tx, ty), as a pixel copy: output pixel
  (y, x) takes input pixel (y0 + y - ty, x0 + q) with q = x - tx, or out_size - 1 - (x - tx)
  when flipped, clamped to the image (warp's repeated edges): warp's result without the float
  rounding of its composed matrix."""
  h, w, _ = image.shape
  i32 = jnp.int32
  grid = jnp.arange(out_size, dtype=i32)
  q = grid - jnp.asarray(tx).astype(i32)
  q = jnp.where(jnp.asarray(flip), out_size - 1 - q, q)
  cols = jnp.clip(jnp.asarray(x0).astype(i32) + q, 0, w - 1)
  rows = jnp.clip(jnp.asarray(y0).astype(i32) + grid - jnp.asarray(ty).astype(i32), 0, h - 1)
  return jnp.take(jnp.take(image, rows, axis=0), cols, axis=1)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of warp's identity resample along one axis: pixel-centre aligned,
  linear between the two nearest input pixels, clamped to the edge."""
  t = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  lo = np.floor(t)
  frac = t - lo
  m = np.zeros((n_out, n_in))
  rows = np.arange(n_out)
  np.add.at(m, (rows, np.clip(lo, 0, n_in - 1).astype(int)), 1 - frac)
  np.add.at(m, (rows, np.clip(lo + 1, 0, n_in - 1).astype(int)), frac)
  return m.astype(np.float32)


def resize(images: jax.Array, out_size: int) -> jax.Array:
  """(..., H, W, C) -> (..., out_size, out_size, C): the same bilinear resample as `warp` with
  the identity matrix, written as two small matmuls (bilinear with edge clamping is
  separable), which XLA:CPU runs far faster than map_coordinates' gathers."""
  h, w = images.shape[-3], images.shape[-2]
  rows, cols = _bilinear_matrix(h, out_size), _bilinear_matrix(w, out_size)
  images = images.astype(jnp.float32)
  return jnp.einsum('yi,...ijc,xj->...yxc', rows, images, cols, precision=jax.lax.Precision.HIGHEST)


def rescale(images: jax.Array) -> jax.Array:
  """Pixel values [0, 255] (any dtype) -> float32 [0, 1].

  Written as a multiply by float32(1/255) on purpose: XLA rewrites x / 255 into
  exactly this, so spelling it out makes host-side references (NumPy) match the
  device bit for bit.
  """
  return images.astype(jnp.float32) * jnp.float32(1 / 255)


def _photometric(image: jax.Array, key: jax.Array, brightness: float, contrast: float) -> jax.Array:
  """Random contrast (around the per-channel mean), then brightness, in [0, 1]."""
  if contrast:
    factor = jax.random.uniform(
      jax.random.fold_in(key, _CONTRAST), (), jnp.float32, 1 - contrast, 1 + contrast
    )
    mean = image.mean(axis=(0, 1), keepdims=True)
    image = (image - mean) * factor + mean
  if brightness:
    delta = jax.random.uniform(
      jax.random.fold_in(key, _BRIGHT), (), jnp.float32, -brightness, brightness
    )
    image = image + delta
  return image


def _standardize(x: jax.Array, mode: str, mean: float, std: float) -> jax.Array:
  """Scales [0, 1] images for the model; see preprocess_batch."""
  if mode == 'none':
    return x
  if mode == 'dataset':
    return (x - jnp.float32(mean)) / jnp.float32(std)
  # per_image, as tf.image.per_image_standardization: the std is floored at
  # 1/sqrt(N) so constant images map to zeros instead of dividing by zero.
  n = x.shape[1] * x.shape[2] * x.shape[3]
  mu = x.mean(axis=(1, 2, 3), keepdims=True)
  sd = x.std(axis=(1, 2, 3), keepdims=True)
  return (x - mu) / jnp.maximum(sd, 1.0 / math.sqrt(n))


def _erase_one(
  image: jax.Array,
  key: jax.Array,
  prob: float,
  area: tuple[float, float],
  ratio: tuple[float, float],
) -> jax.Array:
  """torchvision's RandomErasing on one (H, W, C) image, value 0: with probability `prob`
  one rectangle of area fraction ~ U(area) and aspect (height / width) log-uniform in
  `ratio`, shrunk to fit when it would not, at a uniform valid top-left. Written with iota
  comparisons so every shape is static."""
  h, w, _ = image.shape
  f32, i32 = jnp.float32, jnp.int32
  fold = lambda tag: jax.random.fold_in(key, tag)
  target = jax.random.uniform(fold(_ERASE_AREA), (), f32, area[0], area[1]) * f32(h * w)
  aspect = jnp.exp(
    jax.random.uniform(fold(_ERASE_RATIO), (), f32, math.log(ratio[0]), math.log(ratio[1]))
  )
  eh = jnp.clip(jnp.round(jnp.sqrt(target * aspect)), 1, h).astype(i32)
  ew = jnp.clip(jnp.round(jnp.sqrt(target / aspect)), 1, w).astype(i32)
  top = jax.random.randint(fold(_ERASE_Y), (), 0, h - eh + 1, i32)
  left = jax.random.randint(fold(_ERASE_X), (), 0, w - ew + 1, i32)
  rows = jax.lax.broadcasted_iota(i32, (h, w), 0)
  cols = jax.lax.broadcasted_iota(i32, (h, w), 1)
  inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
  if prob < 1:
    inside = inside & jax.random.bernoulli(fold(_ERASE), prob)
  return jnp.where(inside[..., None], jnp.zeros((), image.dtype), image)


def preprocess_batch(
  images_u8: jax.Array,
  keys: jax.Array | None,
  cfg: Any,
  *,
  out_size: int,
  train: bool,
  mean: float = 0.0,
  std: float = 1.0,
) -> jax.Array:
  """uint8 (B, H, W, C) batch -> float32 (B, out_size, out_size, C) model input.

  Args:
    images_u8: pixel values in [0, 255] (uint8, or any dtype holding them,
      e.g. bfloat16); always rescaled by `rescale`.
    keys: (B,) per-example PRNG keys (typed or raw uint32 (B, 2)); examples
      are processed independently with their own key so the result does not
      depend on how the batch is sharded. Unused (may be None) when no random
      component is active, e.g. train=False.
    cfg: the `augment` config section.
    out_size: model input side length.
    train: True applies the random augmentation (if cfg.enabled): random crop
      and geometry in one resample, photometric changes, standardization, then
      random erasing. False is deterministic: the centre crop (crop_fraction >
      0), resize (when needed) and standardization only.
    mean, std: dataset statistics in [0, 1] units for standardize='dataset'.

  Returns:
    float32 images: standardized, or in [0, 1] for standardize='none'.
  """
  mode = str(cfg.standardize)
  if mode not in STANDARDIZE_MODES:
    raise ConfigError(f'augment.standardize must be one of {STANDARDIZE_MODES}, got {mode!r}')
  if mode == 'dataset' and isinstance(std, (int, float)) and not std > 0:
    raise ConfigError(f'standardize="dataset" needs a positive dataset std, got {std}')
  if images_u8.ndim != 4:
    raise ValueError(f'expected (B, H, W, C) images, got shape {images_u8.shape}')
  bsz, h, w, _ = images_u8.shape
  x = rescale(images_u8)

  augment = bool(train) and bool(cfg.enabled)
  geometry = _geometry(cfg)
  fraction, _ = _crop(cfg)
  whole_pixels = _whole_pixels(cfg)
  erase_prob, erase_area, erase_ratio = _erase(cfg)
  random_crop = augment and fraction > 0
  if fraction and not random_crop:
    # Evaluation (or augmentation off): the centre crop, a pixel copy.
    ch, cw = _crop_len(h, fraction), _crop_len(w, fraction)
    top, left = (h - ch) // 2, (w - cw) // 2
    x = x[:, top : top + ch, left : left + cw, :]
    h, w = ch, cw
  resizing = (h, w) != (out_size, out_size)

  geometric = augment and (random_crop or any(geometry.values()))
  # A flip alone is a pixel copy: no affine resample, at most the fixed `resize`. So are
  # whole-pixel crops and shifts with at most a flip and no resize (`translate`); any other
  # random crop needs the general resample.
  flips_and_shifts = not any(v for k, v in geometry.items() if k not in ('flip', 'shift'))
  flip_only = geometric and not random_crop and flips_and_shifts and not geometry['shift']
  pixel_copy = (
    geometric
    and not flip_only
    and flips_and_shifts
    and whole_pixels
    and (not random_crop or _pixel_crop(cfg))
    and (crop_side(h, cfg), crop_side(w, cfg)) == (out_size, out_size)
  )
  brightness = _num(cfg, 'brightness') if augment else 0.0
  contrast = _num(cfg, 'contrast') if augment else 0.0
  erase = augment and erase_prob > 0

  if geometric or brightness or contrast or erase:
    if keys is None or keys.shape[0] != bsz:
      raise ValueError(
        f'augmentation needs one PRNG key per example ({bsz}), got '
        f'{None if keys is None else keys.shape}'
      )

  if geometric or brightness or contrast:

    def one(image: jax.Array, key: jax.Array) -> jax.Array:
      if pixel_copy:
        x0, y0 = sample_crop(key, cfg, h, w)[:2] if random_crop else (0, 0)
        flip = flip_draw(key) if geometry['flip'] else False
        image = translate(image, x0, y0, *sample_shift(key, cfg, out_size), flip, out_size)
      elif geometric and not flip_only:
        image = warp(image, sample_transform(key, cfg, h, w, out_size), out_size)
      else:
        if flip_only:
          image = jnp.where(flip_draw(key), image[:, ::-1, :], image)
        if resizing:
          image = resize(image, out_size)
      return jnp.clip(_photometric(image, key, brightness, contrast), 0.0, 1.0)

    x = jax.vmap(one)(x, keys)
  elif resizing:
    x = jnp.clip(resize(x, out_size), 0.0, 1.0)
  x = _standardize(x, mode, mean, std)
  if erase:
    x = jax.vmap(lambda im, k: _erase_one(im, k, erase_prob, erase_area, erase_ratio))(x, keys)
  return x


def _cutmix_box(key: jax.Array, lam: jax.Array, h: int, w: int) -> jax.Array:
  """(H, W) bool: CutMix's box of area (1 - lam) of the image at a uniform integer centre,
  clipped to the image (so it may be smaller)."""
  i32 = jnp.int32
  cut = jnp.sqrt(jnp.maximum(1 - lam, 0))
  ch = jnp.floor(cut * h).astype(i32)
  cw = jnp.floor(cut * w).astype(i32)
  cy = jax.random.randint(jax.random.fold_in(key, _CUT_Y), (), 0, h, i32)
  cx = jax.random.randint(jax.random.fold_in(key, _CUT_X), (), 0, w, i32)
  top, left = cy - ch // 2, cx - cw // 2
  rows = jax.lax.broadcasted_iota(i32, (h, w), 0)
  cols = jax.lax.broadcasted_iota(i32, (h, w), 1)
  return (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)


def mix_pairs(
  x: jax.Array, targets: jax.Array, keys: jax.Array, cfg: Any
) -> tuple[jax.Array, jax.Array]:
  """Mixup / CutMix of adjacent examples: (B, H, W, C) images, (B, K) targets -> the same.

  Example i is mixed with its partner i ^ 1 using its own draws (from keys[i]): with
  probability mix_prob, lam ~ Beta(alpha, alpha) and either mixup (x_i' = lam x_i +
  (1 - lam) x_j) or CutMix (a box of area 1 - lam from x_j, lam then recomputed from the
  clipped box's pixel count); when both alphas are > 0 each example picks one with
  probability 0.5. Targets mix linearly, t_i' = lam t_i + (1 - lam) t_j, whatever they hold
  (one-hot, soft, class-weighted). Pairs never straddle an even slice of the batch, so a
  device shard or gradient chunk gives the same result as the whole batch.

  Args:
    x: preprocessed float images.
    targets: float per-example targets.
    keys: (B,) per-example PRNG keys (typed or raw uint32 (B, 2)).
    cfg: the `augment` config (mixup_alpha, cutmix_alpha, mix_prob; absent = off).

  Returns:
    (mixed images, mixed targets) with the input dtypes; the inputs themselves, with no
    random draws, when both alphas are 0 or mix_prob is 0.
  """
  mixup_alpha, cutmix_alpha, prob = _mix(cfg)
  if not (mixup_alpha or cutmix_alpha) or not prob:
    return x, targets
  if x.ndim != 4 or targets.ndim != 2 or x.shape[0] != targets.shape[0]:
    raise ValueError(
      f'expected (B, H, W, C) images and (B, K) targets, got {x.shape} and {targets.shape}'
    )
  bsz, h, w, _ = x.shape
  if bsz % 2:
    raise ValueError(f'mix_pairs pairs examples (2k, 2k+1): the batch size must be even, got {bsz}')
  if keys is None or keys.shape[0] != bsz:
    raise ValueError(
      f'mix_pairs needs one PRNG key per example ({bsz}), got '
      f'{None if keys is None else keys.shape}'
    )
  swap = lambda a: a.reshape((bsz // 2, 2) + a.shape[1:])[:, ::-1].reshape(a.shape)
  f32 = jnp.float32

  def one(
    xi: jax.Array, xj: jax.Array, ti: jax.Array, tj: jax.Array, key: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    fold = lambda tag: jax.random.fold_in(key, tag)
    if mixup_alpha and cutmix_alpha:
      use_cut = jax.random.bernoulli(fold(_MIX_KIND))
    else:
      use_cut = bool(cutmix_alpha)
    apply = jax.random.bernoulli(fold(_MIX), prob) if prob < 1 else True
    xi32, xj32 = xi.astype(f32), xj.astype(f32)
    out_x, lam = xi32, f32(1)
    if mixup_alpha:
      lam_up = jax.random.beta(fold(_MIXUP_LAM), mixup_alpha, mixup_alpha, (), f32)
      lam_up = jnp.where(apply & ~jnp.asarray(use_cut), lam_up, f32(1))
      out_x = lam_up * xi32 + (1 - lam_up) * xj32
      lam = lam_up
    if cutmix_alpha:
      lam_cut = jax.random.beta(fold(_CUTMIX_LAM), cutmix_alpha, cutmix_alpha, (), f32)
      box = _cutmix_box(key, lam_cut, h, w) & apply & jnp.asarray(use_cut)
      lam_box = 1 - box.sum(dtype=f32) / f32(h * w)
      if mixup_alpha:
        out_x = jnp.where(use_cut, jnp.where(box[..., None], xj32, xi32), out_x)
        lam = jnp.where(use_cut, lam_box, lam)
      else:
        out_x = jnp.where(box[..., None], xj32, xi32)
        lam = lam_box
    out_t = lam * ti.astype(f32) + (1 - lam) * tj.astype(f32)
    return out_x.astype(x.dtype), out_t.astype(targets.dtype)

  return jax.vmap(one)(x, swap(x), targets, swap(targets), keys)
