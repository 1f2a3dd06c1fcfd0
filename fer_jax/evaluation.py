"""Evaluation on the device: the one path behind training's per-epoch and final evaluation,
`python -m fer_jax.evaluate`, `fer_jax.report` and `fer_jax.predict`.

`eval_step` turns a (masked) batch into sums (cross-entropy from the log-probabilities, the
confusion matrix) inside one compiled function; `evaluate_split` feeds it every example of a
split and `summarize` turns the sums into the report. The loss is therefore computed the same
way, on the device, wherever a figure comes from.

Test-time augmentation (TTA) is an option of the same function: it averages the softmax outputs
of several views of each image. 'flip' = the image and its mirror; 'tencrop' = crops at the four
corners and the centre, each resized back to the model input, plus their mirrors; the crop side
is the model's evaluation crop (`augment.crop_side`), or 42/48 of the image for a model trained
without crops. Views are evaluated one after another (`lax.map`), so memory stays that of a
single view. With tta='none' the input is the training evaluation's preprocessing exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fer_jax import augment, metrics, parallel
from fer_jax.data import pipeline
from fer_jax.data.types import Split
from fer_jax.errors import ConfigError, FerJaxError
from fer_jax.train_step import map_batch

TTA_MODES = ('none', 'flip', 'tencrop')
# The usual FER2013 ten-crop, 42 of 48 px: for a model trained without crops its corner and
# centre offsets (+-3 px at 48) become shifts of the whole face (tta_views).
TENCROP_FRACTION = 42 / 48


def check_tta(tta: str) -> None:
  if tta not in TTA_MODES:
    raise ConfigError(f'tta={tta!r}: expected one of {TTA_MODES}')


def tta_views(
  tta: str, height: int, width: int, crop_fraction: float = 0.0
) -> tuple[int, int, np.ndarray]:
  """The views of one TTA mode as (view_h, view_w, int32 (V, 3) rows of [top, left, flip]).

  Ten-crop of a crop-trained model cuts its evaluation crop (`crop_fraction`, as
  `augment.crop_side`) at the corners and the centre. A model trained on the whole face sees
  the whole face at the same ten offsets: views of the full side, cut from the image with its
  edges repeated out to the offsets (`padding`), i.e. the face shifted by up to half the margin
  a TENCROP_FRACTION crop leaves (+-3 px at 48, the training shifts' fill), never resized to a
  scale training did not show.
  """
  check_tta(tta)
  if tta == 'none':
    return height, width, np.array([[0, 0, 0]], np.int32)
  if tta == 'flip':
    return height, width, np.array([[0, 0, 0], [0, 0, 1]], np.int32)
  crop = ml_collections.ConfigDict({'crop_fraction': float(crop_fraction) or TENCROP_FRACTION})
  ch, cw = augment.crop_side(height, crop), augment.crop_side(width, crop)
  dy, dx = height - ch, width - cw
  corners = [(0, 0), (0, dx), (dy, 0), (dy, dx), (dy // 2, dx // 2)]
  rows = np.array([(y, x, f) for f in (0, 1) for y, x in corners], np.int32)
  return (ch, cw, rows) if crop_fraction else (height, width, rows)


def padding(
  height: int, width: int, view_h: int, view_w: int, views: np.ndarray
) -> tuple[tuple[int, int], tuple[int, int]]:
  """((top, bottom), (left, right)) edge padding the `tta_views` rows need: none when every
  view lies inside the image, else the overhang split evenly (the whole-face ten-crop)."""
  pads = []
  for side, n, offsets in ((view_h, height, views[:, 0]), (view_w, width, views[:, 1])):
    over = max(0, side + int(offsets.max()) - n)
    pads.append((over // 2, over - over // 2))
  return tuple(pads)


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """What evaluating a model needs besides its variables: the model, how its inputs are
  prepared (the training run's evaluation preprocessing), and the TTA mode."""

  model: nn.Module
  augment_cfg: ml_collections.ConfigDict
  image_size: int
  num_classes: int
  mean: float
  std: float
  microbatch: int = 0  # examples per device per chunk (train_step.resolve_microbatch); 0: whole
  tta: str = 'none'

  def __post_init__(self):
    check_tta(self.tta)


def _scores(spec: EvalSpec, variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(float32 (B, K) log of the TTA-averaged softmax, (B, K) scores whose argmax predicts).

  Without TTA the scores are the logits, as in training's evaluation; with TTA the averaged
  log-probabilities (log of the mean softmax, by logsumexp).
  """
  cfg, out = spec.augment_cfg, spec.image_size

  def logits_of(x: jax.Array) -> jax.Array:
    return spec.model.apply(variables, x, train=False).astype(jnp.float32)

  if spec.tta == 'none':
    logits = logits_of(
      augment.preprocess_batch(
        images, None, cfg, out_size=out, train=False, mean=spec.mean, std=spec.std
      )
    )
    return jax.nn.log_softmax(logits, axis=-1), logits
  b, h, w, c = images.shape
  ch, cw, views = tta_views(spec.tta, h, w, float(cfg.get('crop_fraction', 0.0)))
  whole = (ch, cw) == (h, w)
  # Ten-crop views are already the model's crops: preprocessing must not crop them again.
  view_cfg = cfg if whole else ml_collections.ConfigDict({**cfg.to_dict(), 'crop_fraction': 0.0})
  pixels = images.astype(jnp.float32)  # crops and resizes in [0, 255]; preprocess rescales
  pad_y, pad_x = padding(h, w, ch, cw, views)
  if pad_y != (0, 0) or pad_x != (0, 0):
    pixels = jnp.pad(pixels, ((0, 0), pad_y, pad_x, (0, 0)), mode='edge')

  def view(row: jax.Array) -> jax.Array:
    crop = jax.lax.dynamic_slice(pixels, (0, row[0], row[1], 0), (b, ch, cw, c))
    if not whole and (ch, cw) != (out, out):
      crop = jax.image.resize(crop, (b, out, out, c), method='linear')
    crop = jnp.where(row[2] > 0, crop[:, :, ::-1], crop)
    x = augment.preprocess_batch(
      crop, None, view_cfg, out_size=out, train=False, mean=spec.mean, std=spec.std
    )
    return jax.nn.log_softmax(logits_of(x), axis=-1)

  per_view = jax.lax.map(view, jnp.asarray(views))  # (V, B, K)
  log_probs = jax.nn.logsumexp(per_view, axis=0) - jnp.log(jnp.float32(len(views)))
  return log_probs, log_probs


def log_probabilities(spec: EvalSpec, variables: Any, images: jax.Array) -> jax.Array:
  """uint8 (B, H, W, C) images -> float32 (B, K) log of the TTA-averaged softmax; jittable."""
  return _scores(spec, variables, images)[0]


def probabilities(spec: EvalSpec, variables: Any, images: jax.Array) -> jax.Array:
  """uint8 (B, H, W, C) images -> float32 (B, K) TTA-averaged softmax; jittable."""
  return jnp.exp(log_probabilities(spec, variables, images))


def eval_step(
  variables: Any,
  batch: dict[str, jax.Array],
  spec: EvalSpec,
  axis_name: str | None = None,
  per_example: bool = False,
) -> Any:
  """Sums over the (masked) batch: cross-entropy, count and the confusion matrix (rows true,
  columns predicted); with `per_example`, also (sums, (B, K) log-probabilities).

  `variables` are what `model.apply` takes: BatchNorm uses its running averages here.
  """

  def sums(chunk):
    images, labels, mask = chunk
    log_probs, scores = _scores(spec, variables, images)
    ce = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    true = jax.nn.one_hot(labels, spec.num_classes) * mask[:, None]
    pred = jax.nn.one_hot(jnp.argmax(scores, -1), spec.num_classes)
    out = {
      'loss_sum': jnp.sum(ce * mask),
      'count': jnp.sum(mask),
      'confusion': jnp.einsum('bi,bj->ij', true, pred),
    }
    return out, (log_probs if per_example else ())

  out, log_probs = map_batch(
    sums, (batch['image'], batch['label'], batch['mask']), spec.microbatch, axis_name
  )
  if axis_name:
    out = jax.lax.psum(out, axis_name)
  return (out, log_probs) if per_example else out


class CompiledEval:
  """`eval_step` compiled for one parallel mode, with how to feed it and read its output."""

  def __init__(self, spec: EvalSpec, mode: str, mesh: jax.sharding.Mesh, per_example: bool = False):
    self.mode, self.mesh, self.per_example = mode, mesh, per_example
    if mode == 'pmap':
      if per_example:
        raise FerJaxError('per-example outputs are gathered under jit only')
      axis = parallel.DATA_AXIS
      self.fn = jax.pmap(functools.partial(eval_step, spec=spec, axis_name=axis), axis_name=axis)
      self.put_batch = parallel.to_pmap
    else:
      repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
      self.fn = jax.jit(
        functools.partial(eval_step, spec=spec, per_example=per_example),
        in_shardings=(repl, data),
        out_shardings=(repl, data) if per_example else repl,
      )
      self.put_batch = functools.partial(parallel.to_global, mesh=mesh)

  def __call__(self, variables: Any, batch: dict[str, np.ndarray]) -> tuple[Any, Any]:
    """(host sums, host per-example log-probabilities or None) of one host batch."""
    out = self.fn(variables, self.put_batch(batch))
    per_example = None
    if self.per_example:
      out, per_example = out
      per_example = np.asarray(per_example)
    if self.mode == 'pmap':
      out = parallel.unreplicate_from_pmap(out)
    return parallel.to_host(out), per_example


def evaluate_split(
  compiled: CompiledEval, variables: Any, split: Split, *, global_batch: int
) -> tuple[dict[str, Any], np.ndarray | None]:
  """(summed totals, (N, K) log-probabilities in order when asked for) over every example of
  `split`; the last batch is padded and masked."""
  if compiled.per_example and jax.process_count() > 1:
    raise FerJaxError('per-example evaluation runs in a single process')
  totals, per_example = None, []
  for batch in pipeline.eval_batches(
    split,
    global_batch=global_batch,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    out, log_probs = compiled(variables, batch)
    totals = out if totals is None else jax.tree.map(np.add, totals, out)
    if log_probs is not None:
      per_example.append(log_probs[np.asarray(batch['mask']) > 0])
  if totals is None:
    raise FerJaxError('evaluation of an empty split')
  return totals, (np.concatenate(per_example) if compiled.per_example else None)


def summarize(totals: dict[str, Any], num_examples: int) -> dict[str, Any]:
  """The classification report of the summed confusion matrix, plus the mean cross-entropy."""
  cm = np.rint(totals['confusion']).astype(np.int64)
  if cm.sum() != num_examples:
    raise FerJaxError(f'evaluation counted {cm.sum()} examples of {num_examples}')
  report = metrics.classification_report(cm)
  report['loss'] = float(totals['loss_sum'] / totals['count'])
  report['confusion_matrix'] = cm.tolist()
  return report


def eval_global_batch(batch_size: int) -> int:
  """The evaluation batch rounded up to a multiple of the device count."""
  n_dev = jax.device_count()
  return max(n_dev, -(-int(batch_size) // n_dev) * n_dev)


def spec_for(trained: Any, tta: str = 'none', microbatch: int | None = None) -> EvalSpec:
  """The EvalSpec of a `trained_model.TrainedModel`; the gradient chunks its training used
  unless `microbatch` is given, so the sums equal the training run's bit for bit."""
  from fer_jax.train_step import microbatch_for

  if microbatch is None:
    microbatch = microbatch_for(trained.config, trained.model)
  return EvalSpec(
    model=trained.model,
    augment_cfg=trained.config.augment,
    image_size=trained.image_size,
    num_classes=trained.num_classes,
    mean=trained.pixel_mean,
    std=trained.pixel_std,
    microbatch=microbatch,
    tta=tta,
  )


def probabilities_fn(trained: Any, tta: str = 'none') -> Callable[[Any, jax.Array], jax.Array]:
  """(variables, uint8 images) -> probabilities for a `TrainedModel`, on batches of any size
  on one device (no gradient chunks): what predict, export and the service call."""
  return functools.partial(probabilities, spec_for(trained, tta, microbatch=0))


def evaluate_trained(
  trained: Any, split: Split, *, tta: str = 'none', batch_size: int = 0
) -> tuple[dict[str, Any], np.ndarray]:
  """(report, float32 (N, K) probabilities) of a TrainedModel on `split`, single process.

  Runs the training run's compiled evaluation over the mesh (parameters replicated, batch on
  'data') with the training run's evaluation batch, so with tta='none' every figure equals
  the run's results.json exactly.
  """
  mesh = parallel.make_mesh()
  compiled = CompiledEval(spec_for(trained, tta), 'jit', mesh, per_example=True)
  variables = jax.device_put(trained.variables, parallel.replicated(mesh))
  totals, log_probs = evaluate_split(
    compiled,
    variables,
    split,
    global_batch=eval_global_batch(batch_size or trained.config.train.eval_batch_size),
  )
  return summarize(totals, len(split)), np.exp(log_probs)
