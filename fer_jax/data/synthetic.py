"""Procedural FER2013-layout faces: a stand-in dataset when the real CSV is absent.

Faces are drawn with anti-aliased distance fields on a 48x48 grid, a batch at a
time. The seven expressions differ only in geometry (mouth curve, openness and
width, brow slant and height, eye openness, a frown furrow), and every sample
gets random head pose, lighting, background, noise and an expression intensity
that blends it towards neutral, so a small CNN learns it well above chance but
not perfectly.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from fer_jax import errors
from fer_jax.data import types

# Bump when the renderer changes, so cached CSVs from older versions are not reused.
GENERATOR_VERSION = 1
IMAGE_SIZE = 48

# Mildly FER2013-like class frequencies (disgust rarer, happy commoner).
CLASS_PROBS = np.array([0.14, 0.05, 0.14, 0.22, 0.16, 0.12, 0.17])

# Expression parameters, one row per class in FER2013 order:
#   curve: mouth corners up (+) / down (-); open: mouth opening; width: mouth half-width;
#   asym: mouth tilt (disgust sneer); wave: mouth wobble; slant: brows' inner end down (+)
#   or up (-); raise: brows up (-) / down (+); eye: eye openness; teeth: teeth shown in
#   an open mouth; furrow: frown lines between the brows.
_PARAM_NAMES = (
  'curve',
  'open',
  'width',
  'asym',
  'wave',
  'slant',
  'raise',
  'eye',
  'teeth',
  'furrow',
)
_CLASS_PARAMS = np.array(
  [
    # curve  open  width  asym  wave  slant  raise  eye  teeth furrow
    [-0.05, 0.00, 0.26, 0.00, 0.00, 0.14, 0.08, 0.80, 0.0, 1.0],  # angry
    [-0.07, 0.03, 0.33, 0.09, 0.035, 0.07, 0.07, 0.50, 0.0, 0.6],  # disgust
    [-0.06, 0.15, 0.36, 0.00, 0.00, -0.10, -0.12, 1.45, 0.5, 0.0],  # fear
    [0.16, 0.11, 0.46, 0.00, 0.00, 0.00, 0.00, 0.75, 1.0, 0.0],  # happy
    [-0.13, 0.00, 0.33, 0.00, 0.00, -0.12, -0.02, 0.80, 0.0, 0.0],  # sad
    [0.00, 0.32, 0.19, 0.00, 0.00, -0.02, -0.17, 1.55, 0.0, 0.0],  # surprise
    [0.00, 0.00, 0.36, 0.00, 0.00, 0.00, 0.00, 1.00, 0.0, 0.0],  # neutral
  ],
  dtype=np.float32,
)
_PARAM_NOISE = np.array(
  [0.045, 0.03, 0.045, 0.02, 0.01, 0.045, 0.045, 0.2, 0.0, 0.25], dtype=np.float32
)
# Probability that a sample of the class opens its mouth at all (happy: open smile).
_OPEN_PROB = np.array([0.0, 1.0, 1.0, 0.55, 0.0, 1.0, 0.0], dtype=np.float32)
_NEUTRAL = 6

# Small enough that the per-pixel temporaries stay in cache. The random stream is drawn
# batch by batch, so changing this changes the images: bump GENERATOR_VERSION with it.
_BATCH = 128


def _soft(d: np.ndarray) -> np.ndarray:
  """Coverage of a pixel whose centre is `d` pixels outside a shape's edge."""
  return np.clip(0.5 - d, 0.0, 1.0)


def _ellipse_dist(u, v, a, b):
  """Approximate signed distance to an axis-aligned ellipse (first-order, in u/v units)."""
  q = np.sqrt((u / a) ** 2 + (v / b) ** 2)
  g = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2)
  return (q - 1.0) * q / np.maximum(g, 1e-6)


def _segment_dist(u, v, u0, v0, u1, v1):
  """Distance from (u, v) to the segment (u0, v0)-(u1, v1)."""
  du, dv = u1 - u0, v1 - v0
  t = np.clip(((u - u0) * du + (v - v0) * dv) / (du * du + dv * dv), 0.0, 1.0)
  return np.hypot(u - u0 - t * du, v - v0 - t * dv)


def _paint(img, alpha, value):
  """Composites `value` over `img` with coverage `alpha` (in place)."""
  img += alpha * (value - img)


def _col(x):
  """Per-sample scalars (B,) -> (B, 1, 1) for broadcasting over the pixel grid."""
  return np.asarray(x, np.float32)[:, None, None]


def _expression_params(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Per-sample expression parameters: class means blended towards neutral, plus jitter."""
  n = len(labels)
  base = _CLASS_PARAMS[labels]
  intensity = rng.uniform(0.35, 1.1, size=(n, 1)).astype(np.float32)
  p = _CLASS_PARAMS[_NEUTRAL] + intensity * (base - _CLASS_PARAMS[_NEUTRAL])
  p = p + rng.normal(size=p.shape).astype(np.float32) * _PARAM_NOISE
  opens = rng.uniform(size=n) < _OPEN_PROB[labels]
  p[:, 1] = np.where(opens, np.maximum(p[:, 1], 0.0), 0.0)
  p[:, 2] = np.maximum(p[:, 2], 0.12)
  p[:, 3] *= rng.choice(np.array([-1.0, 1.0], np.float32), size=n)  # sneer on either side
  p[:, 7] = np.clip(p[:, 7], 0.3, 2.0)
  p[:, 8] = (rng.uniform(size=n) < p[:, 8]).astype(np.float32)
  p[:, 9] = np.clip(p[:, 9], 0.0, 1.0)
  return dict(zip(_PARAM_NAMES, p.T))


def _render_batch(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Draws one batch of faces as float32 (B, 48, 48) in grey levels."""
  n = len(labels)
  s = IMAGE_SIZE
  e = {k: _col(v) for k, v in _expression_params(labels, rng).items()}

  # Pose: the face frame (u right, v down) is in units of `unit` pixels.
  unit = _col(19.0 * rng.uniform(0.88, 1.1, n))
  px = 1.0 / unit  # one pixel in face units, for anti-aliasing
  cx = _col(s / 2 + rng.normal(0, 1.8, n))
  cy = _col(s / 2 + 2.5 + rng.normal(0, 1.8, n))
  theta = _col(np.clip(rng.normal(0, np.deg2rad(7), n), -0.3, 0.3))
  grid = np.arange(s, dtype=np.float32) + 0.5
  dx, dy = grid[None, None, :] - cx, grid[None, :, None] - cy
  cos, sin = np.cos(theta), np.sin(theta)
  u = (dx * cos + dy * sin) / unit
  v = (-dx * sin + dy * cos) / unit
  au = np.abs(u)  # features mirrored about the face's midline

  # Background: a level, a linear gradient and low-frequency clutter.
  skin = _col(rng.uniform(80, 210, n))
  bg_offset = rng.uniform(25, 110, n) * rng.choice([-1.0, 1.0], n)
  bg = _col(np.clip(skin[:, 0, 0] + bg_offset, 5, 250))
  phi = rng.uniform(0, 2 * np.pi, n)
  gx, gy = _col(np.cos(phi)), _col(np.sin(phi))
  ramp = (grid[None, None, :] - s / 2) * gx + (grid[None, :, None] - s / 2) * gy
  img = bg + _col(rng.uniform(-25, 25, n)) * ramp / (s / 2)
  coarse = rng.normal(0, 1, (n, 4, 4)).astype(np.float32)
  interp = np.clip(1 - np.abs(np.linspace(0, 3, s)[:, None] - np.arange(4)[None, :]), 0, 1)
  img += _col(rng.uniform(0, 18, n)) * (interp @ coarse @ interp.T).astype(np.float32)

  # Head: a shaded ellipse, hair on top, lit from a random side.
  ax_h = _col(rng.uniform(0.95, 1.1, n))
  ay_h = _col(rng.uniform(1.25, 1.4, n))
  head_d = _ellipse_dist(u, v, ax_h, ay_h)
  light = _col(rng.uniform(-0.25, 0.25, n)) * u + _col(rng.uniform(-0.1, 0.15, n)) * v
  shade = skin * (1.0 + light) * (1.0 - 0.18 * ((u / ax_h) ** 2 + (v / ay_h) ** 2))
  _paint(img, _soft(head_d / px), shade)
  hair_line = _col(rng.uniform(-1.25, -0.8, n)) + 0.25 * u**2
  hair_d = _ellipse_dist(u, v, ax_h + 0.12, ay_h + 0.12)
  hair_alpha = _soft(hair_d / px) * _soft((v - hair_line) / px)
  hair_alpha *= _col(rng.uniform(size=n) < 0.75)
  _paint(img, hair_alpha, _col(rng.uniform(10, 120, n)))

  # Eyes: sclera ellipse with a dark iris; openness scales the height.
  ex = _col(rng.normal(0.36, 0.02, n))
  ey = _col(rng.normal(-0.1, 0.03, n))
  ew = 0.17
  eh = 0.085 * e['eye']
  eye_d = _ellipse_dist(au - ex, v - ey, ew, eh)
  eye_alpha = _soft(eye_d / px)
  _paint(img, eye_alpha, skin * 0.9 + 20)
  iris = _soft((np.hypot(au - ex, v - ey) - 0.085) / px) * eye_alpha
  _paint(img, iris, skin * 0.2)
  lid = _soft((np.abs(eye_d) - 0.03) / px) * _soft((v - ey) / px)  # upper lid line
  _paint(img, lid, skin * 0.3)

  # Brows: thick segments; slant moves the inner end, raise moves both.
  by = ey - 0.27 + e['raise']
  brow_d = _segment_dist(au, v, 0.1, by + e['slant'], 0.58, by - 0.6 * e['slant'])
  _paint(img, _soft((brow_d - 0.065) / px), skin * _col(rng.uniform(0.2, 0.45, n)))
  furrow_d = _segment_dist(au, v, 0.06, by + 0.02, 0.07, by + 0.22)
  _paint(img, _soft((furrow_d - 0.02) / px) * e['furrow'] * 0.7, skin * 0.45)

  # Nose: a side shadow and nostrils.
  nose_d = _segment_dist(u, v, 0.05, ey + 0.1, 0.1, ey + 0.45)
  _paint(img, _soft((nose_d - 0.03) / px) * 0.35, skin * 0.6)
  nostril = _ellipse_dist(au - 0.09, v - (ey + 0.5), 0.06, 0.035)
  _paint(img, _soft(nostril / px) * 0.7, skin * 0.4)

  # Mouth: a centre line yc(u) with corners up or down, a lens-shaped opening.
  my = _col(rng.normal(0.68, 0.04, n))
  mw = e['width']
  t = np.clip(u / mw, -1.0, 1.0)
  yc = my - e['curve'] * t**2 + e['asym'] * t + e['wave'] * np.sin(2 * np.pi * t)
  slope = (-2 * e['curve'] * t + e['asym'] + e['wave'] * 2 * np.pi * np.cos(2 * np.pi * t)) / mw
  half_open = 0.5 * e['open'] * np.sqrt(np.clip(1 - t**2, 0, 1))
  lip = 0.045
  vert = np.abs(v - yc) / np.sqrt(1 + slope**2)
  mouth_d = np.maximum(vert - half_open - lip, au - mw)
  _paint(img, _soft(mouth_d / px), skin * 0.3)
  inner_d = np.maximum(vert - half_open + 0.01, au - mw + 0.03)
  _paint(img, _soft(inner_d / px) * (e['open'] > 0.02), skin * 0.12)
  teeth_d = np.maximum(inner_d, (v - (yc - half_open * 0.2)))
  _paint(img, _soft(teeth_d / px) * e['teeth'], skin * 0.85 + 30)

  # Camera: contrast, brightness and sensor noise.
  mean = img.mean(axis=(1, 2), keepdims=True)
  img = mean + _col(rng.uniform(0.65, 1.25, n)) * (img - mean) + _col(rng.normal(0, 12, n))
  img += rng.normal(size=img.shape).astype(np.float32) * _col(rng.uniform(1.5, 9.0, n))
  return img


def render_faces(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Renders one face per label (FER2013 order 0..6) as uint8 (N, 48, 48)."""
  labels = np.asarray(labels)
  num_classes = len(types.FER2013_CLASSES)
  if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
    raise ValueError(f'labels must be a 1-D array of ints in [0, 6], got {labels!r}')
  labels = labels.astype(np.int64)
  out = np.empty((len(labels), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
  for start in range(0, len(labels), _BATCH):
    batch = _render_batch(labels[start : start + _BATCH], rng)
    out[start : start + _BATCH] = np.clip(np.rint(batch), 0, 255).astype(np.uint8)
  return out


def _split_labels(num: int, rng: np.random.Generator) -> np.ndarray:
  """Shuffled labels with CLASS_PROBS frequencies and every class at least once."""
  k = len(CLASS_PROBS)
  counts = np.ones(k, np.int64)
  counts += np.floor(CLASS_PROBS * (num - k)).astype(np.int64)
  remainder = CLASS_PROBS * (num - k) - np.floor(CLASS_PROBS * (num - k))
  counts[np.argsort(-remainder, kind='stable')[: num - counts.sum()]] += 1
  return rng.permutation(np.repeat(np.arange(k), counts))


def synthetic_splits(
  *, num_train: int, num_test: int, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'Training'|'PublicTest'|'PrivateTest': (images uint8 (N,48,48), labels int32 (N,))}."""
  k = len(types.FER2013_CLASSES)
  if num_train < k or num_test < k:
    raise errors.ConfigError(
      f'synthetic data needs at least {k} rows per split (one per class), '
      f'got num_train={num_train} num_test={num_test}'
    )
  out = {}
  for i, (usage, num) in enumerate(zip(types.FER2013_USAGES, (num_train, num_test, num_test))):
    # One independent stream per split: the test splits do not depend on num_train.
    rng = np.random.default_rng([seed, GENERATOR_VERSION, i])
    labels = _split_labels(num, rng)
    out[usage] = (render_faces(labels, rng), labels.astype(np.int32))
  return out


def write_synthetic_csv(path: str, *, num_train: int, num_test: int, seed: int = 0) -> None:
  """Writes a valid FER2013-layout CSV of synthetic faces, atomically."""
  splits = synthetic_splits(num_train=num_train, num_test=num_test, seed=seed)
  table = [str(i) for i in range(256)]
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.synthetic-', suffix='.csv.tmp', dir=directory)
  try:
    with os.fdopen(fd, 'w', newline='') as f:
      f.write('emotion,pixels,Usage\n')
      for usage, (images, labels) in splits.items():
        flat = images.reshape(len(images), -1).tolist()
        f.writelines(
          f'{label},{" ".join(map(table.__getitem__, row))},{usage}\n'
          for label, row in zip(labels.tolist(), flat)
        )
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def ensure_synthetic_csv(cache_dir: str, *, num_train: int, num_test: int, seed: int) -> str:
  """Returns the cached synthetic CSV for these parameters, generating it if missing."""
  name = f'synthetic_v{GENERATOR_VERSION}_train{num_train}_test{num_test}_seed{seed}.csv'
  path = os.path.join(cache_dir, name)
  if not os.path.isfile(path):
    write_synthetic_csv(path, num_train=num_train, num_test=num_test, seed=seed)
  return path
