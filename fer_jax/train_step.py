"""The train step (driven by jax.jit over the mesh or jax.pmap), its optimizer and schedule.

Randomness is per example: each example's augmentation key is
fold_in(fold_in(seed_key, step), global_index_in_batch) and its dropout masks are keyed by the
step's dropout key and the same global index (`example_ids`). The numbers therefore do not depend
on how the global batch is split over devices or hosts, which is what lets jit and pmap (and
1 host x 4 devices vs 2 hosts x 2 devices) agree.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from fer_jax import augment
from fer_jax.errors import ConfigError
from fer_jax.models import l2_kernels

OPTIMIZERS = ('adamw', 'sgd')
SCHEDULES = ('constant', 'cosine', 'step', 'plateau')
L2_SCOPES = ('model', 'all')


class TrainState(train_state.TrainState):
  """flax's TrainState plus the model's other variable collections and the plateau state.

  `model_state` holds every collection `model.init` returns besides 'params' (BatchNorm's
  'batch_stats'; empty for SeedCNN): the train step updates it (`mutable=`), evaluation reads
  it, and it is checkpointed with the rest. `plateau` is optax's reduce-on-plateau state when
  the schedule is 'plateau' (None otherwise); its `scale` multiplies every update. `ema` is an
  exponential moving average of the model's variables (params and the other collections) when
  `train.ema_decay` > 0 (None otherwise): evaluation, checkpoint selection and `load` use it.
  """

  model_state: Any = flax.struct.field(default_factory=dict)
  plateau: Any = None
  ema: Any = None


def model_variables(state: TrainState) -> dict[str, Any]:
  """The `variables` that `model.apply` takes: params and the other collections."""
  return {'params': state.params, **state.model_state}


def eval_variables(state: TrainState) -> dict[str, Any]:
  """The variables to evaluate and select on: the moving average when there is one."""
  return state.ema if state.ema is not None else model_variables(state)


def ema_decay_rate(train_cfg: ml_collections.ConfigDict) -> float:
  """`train.ema_decay`: 0 switches the moving average of the weights off."""
  decay = float(train_cfg.get('ema_decay', 0.0))
  if not 0.0 <= decay < 1.0:
    raise ConfigError(f'config.train.ema_decay={decay} must be in [0, 1) (0: no moving average)')
  return decay


def _global_norm(tree: Any) -> jax.Array:
  # optax's name for this moved between the versions fer_jax supports (global_norm, tree.norm).
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def sam_radius(train_cfg: ml_collections.ConfigDict) -> float:
  """`train.sam_rho`: 0 switches sharpness-aware minimisation off (each step costs two passes)."""
  rho = float(train_cfg.get('sam_rho', 0.0))
  if not rho >= 0:
    raise ConfigError(f'config.train.sam_rho={rho} must be >= 0 (0: plain gradient steps)')
  return rho


def self_distill_weight(train_cfg: ml_collections.ConfigDict) -> float:
  """`train.self_distill`: the final weight of the moving average's predictions in the targets
  (0: off). The moving average is the teacher, so it needs `train.ema_decay` > 0."""
  alpha = float(train_cfg.get('self_distill', 0.0))
  if not 0.0 <= alpha < 1.0:
    raise ConfigError(f'config.train.self_distill={alpha} must be in [0, 1) (0: off)')
  if alpha > 0 and ema_decay_rate(train_cfg) == 0:
    raise ConfigError(
      f'config.train.self_distill={alpha} distils from the moving average of the weights: '
      'set config.train.ema_decay > 0 (e.g. 0.999)'
    )
  if train_cfg.get('self_distill_flip', False) and alpha == 0:
    raise ConfigError(
      'config.train.self_distill_flip=True mirrors the teacher of self-distillation, which is '
      'off: set config.train.self_distill > 0 (e.g. 0.8) or leave self_distill_flip False'
    )
  return alpha


def distill_targets(targets: jax.Array, teacher: jax.Array, alpha: jax.Array) -> jax.Array:
  """(1 - alpha) * targets + alpha * the teacher's probabilities, scaled to each row's sum: with
  mixup the targets carry the class weights, and the teacher's share keeps them."""
  mass = jnp.sum(targets, axis=-1, keepdims=True)
  return (1.0 - alpha) * targets + alpha * mass * teacher


def update_ema(ema: Any, variables: Any, decay: float, step: jax.Array) -> Any:
  """One moving-average update. The decay ramps up as min(decay, (1 + step) / (10 + step)),
  as TensorFlow's ExponentialMovingAverage with num_updates, so early averages are not
  dominated by the random initialisation."""
  step = jnp.asarray(step, jnp.float32)
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, v: (d * e + (1.0 - d) * v).astype(e.dtype), ema, variables)


@dataclasses.dataclass(frozen=True)
class StepContext:
  """Everything the steps close over: static model/config plus small constant arrays."""

  model: nn.Module
  augment_cfg: ml_collections.ConfigDict
  image_size: int
  num_classes: int
  class_weights: jax.Array  # (K,) float32
  l2: float
  label_smoothing: float
  mean: float
  std: float
  seed: int
  microbatch: int = 0  # examples per device per chunk; 0 = the whole batch (resolve_microbatch)
  l2_scope: str = 'model'  # 'model': the kernels the model names (L2_KERNEL_PATHS); 'all'
  ema_decay: float = 0.0  # > 0: keep a moving average of the variables (update_ema)
  sam_rho: float = 0.0  # > 0: sharpness-aware minimisation's radius (sam_radius)
  self_distill: float = 0.0  # > 0: the teacher's final weight in the targets (self_distill_weight)
  self_distill_flip: bool = False  # the teacher averages the image's and its mirror's softmax
  total_steps: int = 0  # the run's steps, over which self_distill ramps up (0: no ramp)


def takes_example_ids(model: nn.Module) -> bool:
  """Whether the model asks for per-example dropout ids (an `example_ids` call argument)."""
  return 'example_ids' in inspect.signature(type(model).__call__).parameters


# Chunk size (images) that keeps a SeedCNN forward+backward inside the CPU's caches without
# re-reading the dense kernel too often (the measurements behind 32 are in benchmarks/README.md,
# 'Figures behind constants in the code').
_CPU_CHUNK_IMAGES = 32


def resolve_microbatch(
  requested: int, per_device_batch: int, backend: str, batch_statistics: bool = False
) -> int:
  """Examples per device per gradient chunk (0: no chunking).

  -1 ('auto') chunks only on CPU, where XLA runs each op over the whole batch and the
  activations of a large batch spill out of the caches; there the step processes the batch
  as a scan over chunks and sums their gradients (exact for models without batch statistics).
  A model with batch statistics (BatchNorm) is never chunked: its statistics are over the
  whole global batch, so 'auto' means no chunking and an explicit size is an error.
  """
  if batch_statistics:
    if requested > 0:
      raise ConfigError(
        f'config.train.microbatch_size={requested}: the model has batch '
        'statistics (BatchNorm), which gradient chunks would change; use -1 or 0'
      )
    return 0
  if requested == -1:
    if backend != 'cpu':
      return 0
    requested = max(
      d
      for d in range(1, per_device_batch + 1)
      if per_device_batch % d == 0 and d <= _CPU_CHUNK_IMAGES
    )
  if requested < 0:
    raise ConfigError(f'config.train.microbatch_size={requested}: expected -1 (auto), 0 or a size')
  if requested and per_device_batch % requested:
    raise ConfigError(
      f'config.train.microbatch_size={requested} does not divide the per-device '
      f'batch of {per_device_batch}'
    )
  return 0 if requested >= per_device_batch else requested


def has_batch_statistics(model: nn.Module, image_size: int) -> bool:
  """Whether `model.init` returns collections besides 'params' (BatchNorm's 'batch_stats')."""
  shapes = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 1), jnp.float32), train=False
    )
  )
  return any(name != 'params' for name in shapes)


def microbatch_for(config: ml_collections.ConfigDict, model: nn.Module) -> int:
  """The gradient chunk (`resolve_microbatch`) of `config` on this machine's devices; the
  evaluation of a trained model uses the same chunks, so its sums equal the training run's."""
  per_device_batch = max(config.train.batch_size // jax.device_count(), 1)
  return resolve_microbatch(
    config.train.get('microbatch_size', 0),
    per_device_batch,
    jax.default_backend(),
    has_batch_statistics(model, config.model.image_size),
  )


def _warmup_steps(train_cfg: ml_collections.ConfigDict, steps_per_epoch: int, total: int) -> int:
  """`train.warmup_steps` when set (> 0), else `train.warmup_epochs` x steps per epoch."""
  steps = int(train_cfg.get('warmup_steps', 0))
  if steps < 0:
    raise ConfigError(f'config.train.warmup_steps={steps}: must not be negative')
  if not steps:
    steps = int(train_cfg.warmup_epochs * steps_per_epoch)
  return min(steps, total - 1)


def learning_rate_schedule(
  train_cfg: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """'constant' (no warmup), or a linear warmup from 0 followed by 'cosine' (to 0 at the last
  step), 'step' (times `decay_factor` at each of `decay_epochs`) or 'plateau' (constant here;
  `make_plateau`'s scale lowers it when PublicTest accuracy stalls)."""
  name = train_cfg.schedule
  if name not in SCHEDULES:
    raise ConfigError(f'config.train.schedule={name!r}: expected one of {SCHEDULES}')
  lr = float(train_cfg.learning_rate)
  if name == 'constant':
    return optax.constant_schedule(lr)
  total = max(int(train_cfg.epochs * steps_per_epoch), 1)
  warmup = _warmup_steps(train_cfg, steps_per_epoch, total)
  if name == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), total, end_value=0.0)
  if name == 'step':
    factor = float(train_cfg.get('decay_factor', 0.1))
    epochs = tuple(train_cfg.get('decay_epochs', ()))
    if not 0 < factor <= 1 or not epochs or any(e <= 0 for e in epochs):
      raise ConfigError(
        f"schedule='step' needs config.train.decay_epochs (positive epochs, got "
        f'{epochs}) and decay_factor in (0, 1] (got {factor})'
      )
    after = optax.piecewise_constant_schedule(
      lr, {int(e * steps_per_epoch) - warmup: factor for e in sorted(epochs)}
    )
  else:  # plateau
    after = optax.constant_schedule(lr)
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(
  train_cfg: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
  """adamw (decoupled weight decay) or SGD with (Nesterov) momentum and PyTorch-style weight
  decay (added to the gradient); weight decay on kernels only."""
  name = train_cfg.get('optimizer', 'adamw')
  if name not in OPTIMIZERS:
    raise ConfigError(f'config.train.optimizer={name!r}: expected one of {OPTIMIZERS}')
  lr = learning_rate_schedule(train_cfg, steps_per_epoch)
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
    lambda path, _: path[-1].key == 'kernel', params
  )
  if name == 'adamw':
    return optax.adamw(lr, weight_decay=train_cfg.weight_decay, mask=decay_mask)
  momentum = float(train_cfg.get('momentum', 0.9))
  if not 0 <= momentum < 1:
    raise ConfigError(f'config.train.momentum={momentum}: expected a value in [0, 1)')
  return optax.chain(
    optax.add_decayed_weights(train_cfg.weight_decay, mask=decay_mask),
    optax.sgd(lr, momentum=momentum or None, nesterov=bool(train_cfg.get('nesterov', True))),
  )


def make_plateau(
  train_cfg: ml_collections.ConfigDict,
) -> optax.GradientTransformationExtraArgs | None:
  """optax's reduce-on-plateau on the evaluation accuracy, once per evaluation (None unless
  schedule='plateau'): after `plateau_patience` evaluations without a new best the learning
  rate is multiplied by `plateau_factor`, as PyTorch's ReduceLROnPlateau(mode='max')."""
  if train_cfg.schedule != 'plateau':
    return None
  factor = float(train_cfg.get('plateau_factor', 0.75))
  patience = int(train_cfg.get('plateau_patience', 5))
  if not 0 < factor < 1 or patience < 1:
    raise ConfigError(
      f'config.train.plateau_factor={factor} must be in (0, 1) and '
      f'plateau_patience={patience} at least 1'
    )
  return optax.contrib.reduce_on_plateau(
    factor=factor,
    patience=patience,
    rtol=0.0,
    atol=1e-6,
    min_scale=float(train_cfg.get('plateau_min_scale', 0.0)),
  )


@functools.partial(jax.jit, static_argnums=0)
def update_plateau(
  plateau: optax.GradientTransformationExtraArgs, plateau_state: Any, accuracy: float
) -> Any:
  """The plateau state after one evaluation (it minimises, so it is given -accuracy)."""
  return plateau.update(jnp.zeros(()), plateau_state, value=-jnp.asarray(accuracy, jnp.float32))[1]


def create_train_state(
  ctx: StepContext,
  tx: optax.GradientTransformation,
  plateau: optax.GradientTransformationExtraArgs | None = None,
) -> TrainState:
  dummy = jnp.zeros((1, ctx.image_size, ctx.image_size, 1), jnp.float32)
  variables = dict(ctx.model.init(jax.random.key(ctx.seed), dummy, train=False))
  params = variables.pop('params')
  return TrainState.create(
    apply_fn=ctx.model.apply,
    params=params,
    tx=tx,
    model_state=variables,
    plateau=plateau.init(params) if plateau is not None else None,
    ema={'params': params, **variables} if ctx.ema_decay > 0 else None,
  )


def example_keys(ctx: StepContext, step: jax.Array, batch_size: int, axis_name: str | None):
  """Per-example augmentation keys, the step's dropout key, and global example ids."""
  offset = jax.lax.axis_index(axis_name) * batch_size if axis_name else 0
  ids = offset + jnp.arange(batch_size)
  step_key = jax.random.fold_in(jax.random.key(ctx.seed + 1), step)
  aug_keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(ids)
  dropout_key = jax.random.fold_in(jax.random.key(ctx.seed + 2), step)
  return aug_keys, dropout_key, ids


def l2_penalty(model: nn.Module, params: Any, scope: str = 'model') -> jax.Array:
  """Keras `kernel_regularizer=l2(lam)` adds lam * sum(W**2) of the regularised kernels: those
  the model names (scope 'model', e.g. SeedCNN's Dense-128) or every kernel ('all')."""
  if scope not in L2_SCOPES:
    raise ConfigError(f'config.train.l2_scope={scope!r}: expected one of {L2_SCOPES}')
  if scope == 'all':
    kernels = [
      x for path, x in jax.tree_util.tree_leaves_with_path(params) if path[-1].key == 'kernel'
    ]
  else:
    kernels = l2_kernels(model, params)
  return sum((jnp.sum(jnp.square(k)) for k in kernels), jnp.float32(0))


def _chunked(fn, inputs, chunks: int, devices: int):
  """`fn` over `chunks` sequential slices of the batch; returns (summed carry, stacked outputs).

  fn(chunk) -> (tree to sum, per-example outputs). The batch axis holds `devices` contiguous
  per-device blocks (a batch sharded on the mesh's 'data' axis), so every chunk takes the
  same slice of each block: the scan stays device-local and needs no communication.
  """

  def split(a):
    a = a.reshape(devices, chunks, -1, *a.shape[1:])
    return a.swapaxes(0, 1).reshape(chunks, -1, *a.shape[3:])

  def merge(a):
    a = a.reshape(chunks, devices, -1, *a.shape[2:])
    return a.swapaxes(0, 1).reshape(-1, *a.shape[3:])

  xs = jax.tree.map(split, inputs)
  first = jax.tree.map(lambda a: a[0], xs)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, first)[0])

  def body(total, chunk):
    summed, out = fn(chunk)
    return jax.tree.map(jnp.add, total, summed), out

  total, outs = jax.lax.scan(body, zeros, xs)
  return total, jax.tree.map(merge, outs)


def map_batch(fn, inputs, microbatch: int, axis_name: str | None):
  """fn over the whole batch, or in chunks of at most `microbatch` examples per device
  (0: the whole batch)."""
  batch = jax.tree.leaves(inputs)[0].shape[0]
  devices = 1 if axis_name else jax.device_count()  # jit sees the global batch
  per_device = batch // devices
  if not microbatch or per_device <= microbatch:
    return fn(inputs)
  size = next(m for m in range(microbatch, 0, -1) if per_device % m == 0)  # eval batches
  return _chunked(fn, inputs, per_device // size, devices)


def _mixing(ctx: StepContext) -> bool:
  cfg = ctx.augment_cfg
  return bool(cfg.enabled) and (
    float(getattr(cfg, 'mixup_alpha', 0.0)) > 0 or float(getattr(cfg, 'cutmix_alpha', 0.0)) > 0
  )


def train_step(
  state: TrainState, batch: dict[str, jax.Array], ctx: StepContext, axis_name: str | None = None
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a uint8 batch: augment on device, weighted CE + L2, the optimizer.

  With mixup/cutmix each example is mixed with its neighbour (2k <-> 2k+1, which stay in one
  device shard and one chunk); the class weights ride on the targets, so the loss is
  lam * w_i * CE(y_i) + (1 - lam) * w_j * CE(y_j).
  """
  images, labels = batch['image'], batch['label']
  batch_size = images.shape[0]
  aug_keys, dropout_key, example_ids = example_keys(ctx, state.step, batch_size, axis_name)
  # FER+ probability mode trains on the vote distribution; otherwise one-hot labels.
  targets = (
    batch['soft_label'] if 'soft_label' in batch else jax.nn.one_hot(labels, ctx.num_classes)
  )
  targets = optax.smooth_labels(targets, ctx.label_smoothing)
  weights = ctx.class_weights[labels]
  mixing = _mixing(ctx)
  extra = {'example_ids': example_ids} if takes_example_ids(ctx.model) else {}
  mutable = list(state.model_state)

  if ctx.self_distill > 0:
    # Progressive self-distillation (Kim et al. 2021, "PS-KD") with the moving average of the
    # weights as the teacher: its predictions on the same inputs take a weight in the targets
    # that grows linearly over the run to self_distill, softening labels the network and its
    # average disagree with (FER2013's are noisy).
    alpha = ctx.self_distill
    if ctx.total_steps:
      alpha = alpha * jnp.minimum(1.0, jnp.asarray(state.step, jnp.float32) / ctx.total_steps)

  def step_inputs(images, targets, weights, aug_keys, example_ids):
    """The network's input and targets: the augmented (and mixed) images; the targets with the
    class weights when mixing, and the teacher's share when distilling."""
    x = augment.preprocess_batch(
      images,
      aug_keys,
      ctx.augment_cfg,
      out_size=ctx.image_size,
      train=True,
      mean=ctx.mean,
      std=ctx.std,
    )
    if mixing:
      x, targets = augment.mix_pairs(x, weights[:, None] * targets, aug_keys, ctx.augment_cfg)
    if ctx.self_distill > 0:
      views, ids = x, example_ids
      if ctx.self_distill_flip:  # mirrored faces keep their expression: a steadier teacher
        views, ids = jnp.concatenate([x, x[:, :, ::-1]]), jnp.concatenate([ids, ids])
      logits = ctx.model.apply(state.ema, views, train=False, **{k: ids for k in extra})
      probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
      if ctx.self_distill_flip:
        probs = 0.5 * (probs[: x.shape[0]] + probs[x.shape[0] :])
      targets = distill_targets(targets, probs, alpha)
    return x, targets

  def weighted_ce_sum(params, x, targets, weights, example_ids):
    kwargs = {k: example_ids for k in extra}
    variables = {'params': params, **state.model_state}
    if mutable:
      logits, new_model_state = ctx.model.apply(
        variables, x, train=True, mutable=mutable, rngs={'dropout': dropout_key}, **kwargs
      )
    else:
      logits = ctx.model.apply(variables, x, train=True, rngs={'dropout': dropout_key}, **kwargs)
      new_model_state = {}
    if mixing:  # the targets carry the class weights
      ce = optax.softmax_cross_entropy(logits, targets)
    else:
      ce = weights * optax.softmax_cross_entropy(logits, targets)
    return jnp.sum(ce), (logits, new_model_state)

  def gradients(params, inputs, prepared: bool = False, keep_inputs: bool = False):
    """The batch's mean loss gradient at `params` (all devices'), with what the pass saw.
    `inputs` are the batch's (images, targets, weights, aug_keys, example_ids), or with
    `prepared` step_inputs' (x, targets) in place of the first two; `keep_inputs` also returns
    those, for a second pass on the same inputs."""

    def chunk_grads(chunk):
      images, targets, weights, aug_keys, example_ids = chunk
      x, targets = (images, targets) if prepared else step_inputs(*chunk)
      (ce_sum, aux), grads = jax.value_and_grad(weighted_ce_sum, has_aux=True)(
        params, x, targets, weights, example_ids
      )
      return (ce_sum, grads), (*aux, (x, targets) if keep_inputs else ())

    (ce_sum, grads), (logits, new_model_state, seen) = map_batch(
      chunk_grads, inputs, ctx.microbatch, axis_name
    )
    l2_loss, l2_grads = jax.value_and_grad(
      lambda p: ctx.l2 * l2_penalty(ctx.model, p, ctx.l2_scope)
    )(params)
    grads = jax.tree.map(lambda g, g2: g / batch_size + g2, grads, l2_grads)
    if axis_name:
      grads = jax.lax.pmean(grads, axis_name)
    # Keras class_weight: per-example weight, mean over the batch size (not over the weights).
    return grads, ce_sum / batch_size, l2_loss, logits, new_model_state, seen

  inputs = (images, targets, weights, aug_keys, example_ids)
  grads, data_loss, l2_loss, logits, new_model_state, seen = gradients(
    state.params, inputs, keep_inputs=ctx.sam_rho > 0
  )
  if ctx.sam_rho > 0:
    # Sharpness-aware minimisation (Foret et al. 2021): step with the gradient taken at the
    # worst weights within rho, to first order w + rho g / |g|, on the same inputs and targets
    # (the teacher's predictions are not recomputed) and dropout masks. The metrics and
    # BatchNorm's running statistics are the first pass's.
    scale = ctx.sam_rho / (_global_norm(grads) + 1e-12)
    perturbed = jax.tree.map(lambda p, g: p + scale * g, state.params, grads)
    grads = gradients(perturbed, (*seen, *inputs[2:]), prepared=True)[0]
  metrics = {
    'loss': data_loss + l2_loss,
    'data_loss': data_loss,
    'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
  }
  if axis_name:
    metrics = jax.lax.pmean(metrics, axis_name)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  if state.plateau is not None:
    updates = jax.tree.map(lambda u: u * state.plateau.scale, updates)
  new_state = state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    opt_state=opt_state,
    model_state=new_model_state,
  )
  if state.ema is not None:
    new_state = new_state.replace(
      ema=update_ema(state.ema, model_variables(new_state), ctx.ema_decay, state.step)
    )
  metrics['learning_rate_scale'] = (
    state.plateau.scale if state.plateau is not None else jnp.float32(1)
  )
  return new_state, metrics
