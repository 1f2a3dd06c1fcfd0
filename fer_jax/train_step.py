"""The train and eval steps: one function each, driven by jax.jit (mesh) or jax.pmap.

Randomness is per example: each example's augmentation key is
fold_in(fold_in(seed_key, step), global_index_in_batch) and its dropout masks are keyed by the
step's dropout key and the same global index (`example_ids`). The numbers therefore do not depend
on how the global batch is split over devices or hosts, which is what lets jit and pmap (and
1 host x 4 devices vs 2 hosts x 2 devices) agree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from fer_jax import augment
from fer_jax.errors import ConfigError
from fer_jax.models import l2_kernels

TrainState = train_state.TrainState


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


# Chunk size (images) that keeps a SeedCNN forward+backward inside the CPU's caches without
# re-reading the dense kernel too often. Measured with the C++ conv kernels (2-core AVX-512
# machine, images/s, alternating runs): 48x48 batch 256, chunks of 32: 3235, 3260; 64: 3034,
# 3047; 128: 2495, 2872; whole: 2733, 2684; 48x48 batch 64, 32 vs whole: 2846 vs 2779.
# 150x150 batch 64, chunks of 16: 210, 199, 190, 202, 196; 32: 228, 214, 218, 216, 171;
# whole: 184, 209, 228, 157, 220. (With the im2col lowering 150x150 had preferred 16.)
_CPU_CHUNK_IMAGES = 32


def resolve_microbatch(requested: int, per_device_batch: int, backend: str) -> int:
  """Examples per device per gradient chunk (0: no chunking).

  -1 ('auto') chunks only on CPU, where XLA runs each op over the whole batch and the
  activations of a large batch spill out of the caches; there the step processes the batch
  as a scan over chunks and sums their gradients (exact: SeedCNN has no batch statistics).
  """
  if requested == -1:
    if backend != 'cpu':
      return 0
    requested = max(d for d in range(1, per_device_batch + 1)
                    if per_device_batch % d == 0 and d <= _CPU_CHUNK_IMAGES)
  if requested < 0:
    raise ConfigError(f'config.train.microbatch_size={requested}: expected -1 (auto), 0 or a size')
  if requested and per_device_batch % requested:
    raise ConfigError(f'config.train.microbatch_size={requested} does not divide the per-device '
                      f'batch of {per_device_batch}')
  return 0 if requested >= per_device_batch else requested


def make_optimizer(train_cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """adamw with the configured schedule; decoupled weight decay on kernels only."""
  total = max(int(train_cfg.epochs * steps_per_epoch), 1)
  warmup = min(int(train_cfg.warmup_epochs * steps_per_epoch), total - 1)
  if train_cfg.schedule == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0, train_cfg.learning_rate, max(warmup, 1) if warmup else 1,
                                            total, end_value=0.0)
  elif train_cfg.schedule == 'constant':
    lr = train_cfg.learning_rate
  else:
    raise ConfigError(f"config.train.schedule={train_cfg.schedule!r}: expected 'constant' or 'cosine'")
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key == 'kernel', params)
  return optax.adamw(lr, weight_decay=train_cfg.weight_decay, mask=decay_mask)


def create_train_state(ctx: StepContext, tx: optax.GradientTransformation) -> TrainState:
  dummy = jnp.zeros((1, ctx.image_size, ctx.image_size, 1), jnp.float32)
  params = ctx.model.init(jax.random.key(ctx.seed), dummy, train=False)['params']
  return TrainState.create(apply_fn=ctx.model.apply, params=params, tx=tx)


def _example_keys(ctx: StepContext, step: jax.Array, batch_size: int, axis_name: str | None):
  """Per-example augmentation keys, the step's dropout key, and global example ids."""
  offset = jax.lax.axis_index(axis_name) * batch_size if axis_name else 0
  ids = offset + jnp.arange(batch_size)
  step_key = jax.random.fold_in(jax.random.key(ctx.seed + 1), step)
  aug_keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(ids)
  dropout_key = jax.random.fold_in(jax.random.key(ctx.seed + 2), step)
  return aug_keys, dropout_key, ids


def l2_penalty(model: nn.Module, params: Any) -> jax.Array:
  """Keras `kernel_regularizer=l2(lam)` adds lam * sum(W**2) of the regularised kernels."""
  return sum(jnp.sum(jnp.square(k)) for k in l2_kernels(model, params))


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


def _map_batch(fn, inputs, ctx: StepContext, axis_name: str | None):
  """fn over the whole batch, or chunk by chunk when ctx.microbatch asks for it."""
  batch = jax.tree.leaves(inputs)[0].shape[0]
  devices = 1 if axis_name else jax.device_count()  # jit sees the global batch
  per_device = batch // devices
  if not ctx.microbatch or per_device <= ctx.microbatch:
    return fn(inputs)
  size = next(m for m in range(ctx.microbatch, 0, -1) if per_device % m == 0)  # eval batches
  return _chunked(fn, inputs, per_device // size, devices)


def train_step(state: TrainState, batch: dict[str, jax.Array], ctx: StepContext,
               axis_name: str | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a uint8 batch: augment on device, weighted CE + L2, adamw."""
  images, labels = batch['image'], batch['label']
  batch_size = images.shape[0]
  aug_keys, dropout_key, example_ids = _example_keys(ctx, state.step, batch_size, axis_name)
  # FER+ probability mode trains on the vote distribution; otherwise one-hot labels.
  targets = (batch['soft_label'] if 'soft_label' in batch
             else jax.nn.one_hot(labels, ctx.num_classes))
  targets = optax.smooth_labels(targets, ctx.label_smoothing)
  weights = ctx.class_weights[labels]

  def weighted_ce_sum(params, images, targets, weights, aug_keys, example_ids):
    x = augment.preprocess_batch(images, aug_keys, ctx.augment_cfg, out_size=ctx.image_size,
                                 train=True, mean=ctx.mean, std=ctx.std)
    logits = state.apply_fn({'params': params}, x, train=True, rngs={'dropout': dropout_key},
                            example_ids=example_ids)
    return jnp.sum(weights * optax.softmax_cross_entropy(logits, targets)), logits

  def chunk_grads(chunk):
    (ce_sum, logits), grads = jax.value_and_grad(weighted_ce_sum, has_aux=True)(state.params, *chunk)
    return (ce_sum, grads), logits

  (ce_sum, grads), logits = _map_batch(
      chunk_grads, (images, targets, weights, aug_keys, example_ids), ctx, axis_name)
  # Keras class_weight: per-example weight, mean over the batch size (not over the weights).
  data_loss = ce_sum / batch_size
  l2_loss, l2_grads = jax.value_and_grad(lambda p: ctx.l2 * l2_penalty(ctx.model, p))(state.params)
  grads = jax.tree.map(lambda g, g2: g / batch_size + g2, grads, l2_grads)
  metrics = {'loss': data_loss + l2_loss, 'data_loss': data_loss,
             'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)}
  if axis_name:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.pmean(metrics, axis_name)
  return state.apply_gradients(grads=grads), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], ctx: StepContext,
              axis_name: str | None = None) -> dict[str, jax.Array]:
  """Sums over the (masked) batch: loss, and the confusion matrix (rows true, cols predicted)."""
  def sums(chunk):
    images, labels, mask = chunk
    x = augment.preprocess_batch(images, None, ctx.augment_cfg, out_size=ctx.image_size,
                                 train=False, mean=ctx.mean, std=ctx.std)
    logits = ctx.model.apply({'params': params}, x, train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    true = jax.nn.one_hot(labels, ctx.num_classes) * mask[:, None]
    pred = jax.nn.one_hot(jnp.argmax(logits, -1), ctx.num_classes)
    return {'loss_sum': jnp.sum(ce * mask), 'count': jnp.sum(mask),
            'confusion': jnp.einsum('bi,bj->ij', true, pred)}, ()

  out, _ = _map_batch(sums, (batch['image'], batch['label'], batch['mask']), ctx, axis_name)
  if axis_name:
    out = jax.lax.psum(out, axis_name)
  return out
