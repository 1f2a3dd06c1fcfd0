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
_FLIP, _ANGLE, _SCALE, _TX, _TY, _SHEAR, _BRIGHT, _CONTRAST = range(8)


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
  return jnp.stack([
      jnp.stack([a, b, e]),
      jnp.stack([c, d, g]),
      jnp.stack([zero, zero, one]),
  ]).astype(f32)


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
  r, z, t, sh = g['rotation_deg'], g['zoom'], g['shift'] * out_size, g['shear_deg']
  angle = uniform(_ANGLE, -r, r) if r else 0.0
  scale = uniform(_SCALE, 1 - z, 1 + z) if z else 1.0
  tx = uniform(_TX, -t, t) if t else 0.0
  ty = uniform(_TY, -t, t) if t else 0.0
  shear = uniform(_SHEAR, -sh, sh) if sh else 0.0
  return affine_matrix(flip, angle, scale, tx, ty, shear, out_size)


def warp(image: jax.Array, matrix: jax.Array, out_size: int) -> jax.Array:
  """Bilinear resample of one (H, W, C) image to (out_size, out_size, C).

  Each output pixel goes through the inverse of `matrix` (output pixel units)
  and then the pixel-centre-aligned scaling to the input grid, so geometry and
  resize cost one interpolation. Coordinates outside the input are clamped to
  the edge (fill_mode='nearest'). Uses jax.scipy.ndimage.map_coordinates, which
  measured faster on CPU than hand-written flat-index gathers (B=64, 150x150:
  ~9 ms vs ~15 ms).
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
  channels = [map_coordinates(image[..., k], [y, x], order=1, mode='nearest')
              for k in range(ch)]
  return jnp.stack(channels, axis=-1)


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
  return jnp.einsum('yi,...ijc,xj->...yxc', rows, images, cols,
                    precision=jax.lax.Precision.HIGHEST)


def rescale(images: jax.Array) -> jax.Array:
  """Pixel values [0, 255] (any dtype) -> float32 [0, 1].

  Written as a multiply by float32(1/255) on purpose: XLA rewrites x / 255 into
  exactly this, so spelling it out makes host-side references (NumPy) match the
  device bit for bit.
  """
  return images.astype(jnp.float32) * jnp.float32(1 / 255)


def _photometric(image: jax.Array, key: jax.Array, brightness: float,
                 contrast: float) -> jax.Array:
  """Random contrast (around the per-channel mean), then brightness, in [0, 1]."""
  if contrast:
    factor = jax.random.uniform(jax.random.fold_in(key, _CONTRAST), (), jnp.float32,
                                1 - contrast, 1 + contrast)
    mean = image.mean(axis=(0, 1), keepdims=True)
    image = (image - mean) * factor + mean
  if brightness:
    delta = jax.random.uniform(jax.random.fold_in(key, _BRIGHT), (), jnp.float32,
                               -brightness, brightness)
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


def preprocess_batch(images_u8: jax.Array, keys: jax.Array | None, cfg: Any, *,
                     out_size: int, train: bool, mean: float = 0.0,
                     std: float = 1.0) -> jax.Array:
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
    train: True applies the random augmentation (if cfg.enabled); False is
      deterministic: resize (when needed) and standardization only.
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
  resizing = (h, w) != (out_size, out_size)

  augment = bool(train) and bool(cfg.enabled)
  geometry = _geometry(cfg)
  geometric = augment and any(geometry.values())
  # A flip alone is a pixel copy: no affine resample, at most the fixed `resize`.
  flip_only = geometric and not any(v for k, v in geometry.items() if k != 'flip')
  brightness = _num(cfg, 'brightness') if augment else 0.0
  contrast = _num(cfg, 'contrast') if augment else 0.0

  if geometric or brightness or contrast:
    if keys is None or keys.shape[0] != bsz:
      raise ValueError(f'augmentation needs one PRNG key per example ({bsz}), got '
                       f'{None if keys is None else keys.shape}')

    def one(image: jax.Array, key: jax.Array) -> jax.Array:
      if geometric and not flip_only:
        image = warp(image, sample_affine(key, cfg, out_size), out_size)
      else:
        if flip_only:
          image = jnp.where(flip_draw(key), image[:, ::-1, :], image)
        if resizing:
          image = resize(image, out_size)
      return jnp.clip(_photometric(image, key, brightness, contrast), 0.0, 1.0)

    x = jax.vmap(one)(x, keys)
  elif resizing:
    x = jnp.clip(resize(x, out_size), 0.0, 1.0)
  return _standardize(x, mode, mean, std)
