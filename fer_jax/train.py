"""`train_and_evaluate(config, workdir)`: the whole job, readable top to bottom.

Sections: setup -> data -> model and optimizer -> restore -> compile -> train loop (evaluate
PublicTest and checkpoint every epoch) -> final evaluation of the best checkpoint on
PublicTest and PrivateTest -> results.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fer_jax import (
  checkpointing,
  evaluation,
  loop_metrics,
  metrics,
  parallel,
  paths,
  preemption,
  runtime,
  scaling,
  time_budget,
)
from fer_jax.config_checks import check_resume_config, check_workdir_writable, validate_config
from fer_jax.data import pipeline, resident
from fer_jax.data.datasets import class_weights, load_dataset, pixel_stats
from fer_jax.data.epoch_order import EpochBatches
from fer_jax.data.types import Split
from fer_jax.errors import ConfigError, FerJaxError
from fer_jax.metric_writer import MetricWriter
from fer_jax.models import for_pmap, get_model
from fer_jax.train_step import (
  StepContext,
  create_train_state,
  ema_decay_rate,
  eval_variables,
  make_optimizer,
  make_plateau,
  microbatch_for,
  sam_radius,
  self_distill_weight,
  train_step,
  update_plateau,
)

# What results.json and metrics.jsonl keep of `evaluation.summarize`'s report for each split.
_EVAL_FIGURES = ('accuracy', 'macro_f1', 'loss', 'per_class_accuracy', 'confusion_matrix')


def evaluate(
  compiled: evaluation.CompiledEval, variables: Any, split: Split, *, global_batch: int
) -> dict[str, Any]:
  """Exact metrics over every example of `split` (the last batch is padded and masked)."""
  totals, _ = evaluation.evaluate_split(compiled, variables, split, global_batch=global_batch)
  report = evaluation.summarize(totals, len(split))
  return {k: report[k] for k in _EVAL_FIGURES}


def _sums_to_host(acc: Any, mode: str) -> dict[str, Any]:
  host = loop_metrics.to_host(acc)  # one transfer for the whole log window
  return parallel.unreplicate_from_pmap(host) if mode == 'pmap' else host


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _raise_if_diverged(
  host_sums: dict[str, Any], last_step: int, manager: Any, params: Any = None
) -> None:
  """Stops at the first step whose loss (or, before a save, whose parameters) is not finite.

  Checked on every log window and before every checkpoint, so nothing from after the
  divergence is saved; the last good checkpoint finishes writing before the error.
  """
  if int(host_sums['first_bad_step']) >= 0:
    problem = (
      f'loss became {float(host_sums["first_bad_loss"])} at step {int(host_sums["first_bad_step"])}'
    )
  elif params is not None and not bool(_all_finite(params)):
    problem = f'the parameters became non-finite at step {last_step}'
  else:
    return
  manager.wait_until_finished()
  kept = manager.latest_step()
  raise FerJaxError(
    f'{problem}: training diverged (lower config.train.learning_rate?); '
    + (
      f'the last good checkpoint is step {kept}'
      if kept is not None
      else 'no checkpoint was written'
    )
  )


class Steps(NamedTuple):
  """The compiled steps for one parallel mode, and how to feed them."""

  train: Callable  # (state, batch, metric sums) -> (state, metric sums), see loop_metrics
  eval: evaluation.CompiledEval  # (variables, host batch) -> host sums
  put_batch: Callable  # host batch -> device batch
  prepare_state: Callable  # canonical (mesh-replicated) state -> the step's layout
  canonical: Callable  # the step's layout -> canonical state (for checkpoints)
  # With the training split resident on the devices (data/resident.py), batches are
  # {'index': int32} and `train_block` runs K steps in one dispatch on {'index': (K, B)}.
  train_block: Callable | None = None


def eval_spec(ctx: StepContext, tta: str = 'none') -> evaluation.EvalSpec:
  """The evaluation of the model the steps train, with its evaluation preprocessing."""
  return evaluation.EvalSpec(
    model=ctx.model,
    augment_cfg=ctx.augment_cfg,
    image_size=ctx.image_size,
    num_classes=ctx.num_classes,
    mean=ctx.mean,
    std=ctx.std,
    microbatch=ctx.microbatch,
    tta=tta,
  )


def compile_steps(
  ctx: StepContext,
  mode: str,
  mesh: jax.sharding.Mesh,
  resident_data: dict[str, jax.Array] | None = None,
) -> Steps:
  """jit over the mesh (batch on 'data', state replicated) or pmap: the same step functions.

  With `resident_data` (the training split on the devices, `resident.put_split`; jit only) the
  step takes the batch's indices and gathers its rows first: the same step behind a gather.
  """
  if mode == 'pmap':
    if resident_data is not None:
      raise ConfigError("the training split on the devices needs config.parallel='jit'")
    axis = parallel.DATA_AXIS
    ctx = dataclasses.replace(ctx, model=for_pmap(ctx.model, axis))  # BatchNorm over all devices
    return Steps(
      train=jax.pmap(
        functools.partial(_step_and_sum, ctx=ctx, axis_name=axis),
        axis_name=axis,
        donate_argnums=0,  # not the window sums: one zeroed set starts every window
      ),
      eval=evaluation.CompiledEval(eval_spec(ctx), mode, mesh),
      put_batch=parallel.to_pmap,
      prepare_state=parallel.replicate_for_pmap,
      canonical=parallel.unreplicate_from_pmap,
    )
  repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  common = dict(
    eval=evaluation.CompiledEval(eval_spec(ctx), mode, mesh),
    prepare_state=lambda s: s,
    canonical=lambda s: s,
  )
  if resident_data is None:
    train_fn = jax.jit(
      functools.partial(_step_and_sum, ctx=ctx),
      in_shardings=(repl, data, repl),
      out_shardings=(repl, repl),
      donate_argnums=0,  # not the window sums: one zeroed set starts every window
    )
    return Steps(
      train=train_fn, put_batch=functools.partial(parallel.to_global, mesh=mesh), **common
    )
  one, block = (
    jax.jit(
      functools.partial(fn, ctx=ctx, mesh=mesh),
      in_shardings=(repl, resident.index_sharding(mesh, ndim), repl, repl),
      out_shardings=(repl, repl),
      donate_argnums=0,  # not the window sums: one zeroed set starts every window
    )
    for fn, ndim in ((_gather_step_and_sum, 1), (_gather_steps_and_sum, 2))
  )
  return Steps(
    train=lambda state, feed, sums: one(state, feed, sums, resident_data),
    train_block=lambda state, feed, sums: block(state, feed, sums, resident_data),
    put_batch=functools.partial(resident.put_indices, mesh=mesh),
    **common,
  )


def _step_and_sum(
  state: Any, batch: Any, sums: Any, ctx: StepContext, axis_name: str | None = None
) -> tuple[Any, Any]:
  """One train step whose metrics are added to the device-side window sums (loop_metrics)."""
  state, step_metrics = train_step(state, batch, ctx, axis_name)
  return state, loop_metrics.accumulate(sums, step_metrics, state.step)


def _gather_step_and_sum(
  state: Any, feed: Any, sums: Any, data: Any, ctx: StepContext, mesh: jax.sharding.Mesh
) -> tuple[Any, Any]:
  """`_step_and_sum` on the rows `feed['index']` of the resident split."""
  batch = jax.lax.with_sharding_constraint(
    resident.gather(data, feed['index']), parallel.batch_sharded(mesh)
  )
  return _step_and_sum(state, batch, sums, ctx)


def _gather_steps_and_sum(
  state: Any, feed: Any, sums: Any, data: Any, ctx: StepContext, mesh: jax.sharding.Mesh
) -> tuple[Any, Any]:
  """K steps in one dispatch: a scan of `_gather_step_and_sum` over feed['index'] (K, B)."""

  def body(carry, index):
    state, sums = carry
    return _gather_step_and_sum(state, {'index': index}, sums, data, ctx, mesh), None

  return jax.lax.scan(body, (state, sums), feed['index'])[0]


def _epochs_in_budget(
  config: ml_collections.ConfigDict,
  *,
  budget: float,
  started: float,
  spe: int,
  steps: Steps,
  state: Any,
  sums: Any,
  train_iter: EpochBatches,
  run_eval: Callable,
  eval_split: Split,
  test_size: int,
) -> int:
  """`train.time_budget_min`: times the train step and the evaluation on a copy of the fresh
  state, then the most epochs that fit (time_budget.py), the same on every process."""
  probe = jax.tree.map(jnp.copy, state)
  batches = (steps.put_batch(next(train_iter)) for _ in itertools.count())
  step_s, first_s, windows, probe = time_budget.time_train_step(steps.train, probe, batches, sums)
  train_iter.seek(0)
  variables = eval_variables(probe)
  run_eval(variables, eval_split)  # compiles
  t0 = time.time()
  run_eval(variables, eval_split)
  eval_s = time.time() - t0
  every = int(config.train.get('eval_every_epochs', 1)) or 1
  final_s = time_budget.final_eval_s(
    eval_s, len(eval_split), test_size, config.train.get('final_tta', ())
  )
  elapsed = time.time() - started
  max_epochs = int(config.train.epochs)
  fit = functools.partial(
    time_budget.epochs_that_fit,
    budget=budget,
    step_s=step_s,
    steps_per_epoch=spe,
    eval_s=eval_s / every,
    final_eval_s=final_s,
    max_epochs=max_epochs,
  )
  epochs = fit(elapsed=elapsed)
  if epochs != max_epochs:  # a new schedule: the step compiles again
    epochs = fit(elapsed=elapsed + max(first_s - step_s, 0.0))
  epochs = time_budget.agree(epochs)
  time_budget.log_choice(
    budget,
    epochs,
    max_epochs,
    windows,
    elapsed=elapsed,
    step=step_s,
    epoch=step_s * spe,
    evaluation=eval_s,
    final_evaluation=final_s,
  )
  return epochs


def sums_factory(
  ctx: StepContext, state: Any, batch: Any, mode: str, mesh: jax.sharding.Mesh
) -> Callable[[], Any]:
  """A function that returns zeroed window sums in the train step's layout (replicated over the
  mesh; stacked per device for pmap). The metric shapes are traced once, here. The steps do not
  donate their sums argument, so one zeroed set can start every log window (making a new one
  was a dispatch per window, ~340 µs on 8 simulated CPU devices)."""
  shapes = jax.eval_shape(functools.partial(train_step, ctx=ctx), state, batch)[1]
  if mode == 'pmap':
    host = parallel.to_host(loop_metrics.zeros_like_metrics(shapes))
    return lambda: parallel.replicate_for_pmap(host)
  return jax.jit(
    lambda: loop_metrics.zeros_like_metrics(shapes), out_shardings=parallel.replicated(mesh)
  )


def make_step_context(
  config: ml_collections.ConfigDict,
  *,
  num_classes: int,
  weights: np.ndarray,
  mean: float,
  std: float,
  steps_per_epoch: int = 0,
) -> StepContext:
  """What the steps close over; `steps_per_epoch` (0: unknown) sets the run's length, over which
  `train.self_distill` ramps up."""
  model = get_model(config.model, num_classes)
  return StepContext(
    model=model,
    augment_cfg=config.augment,
    image_size=config.model.image_size,
    num_classes=num_classes,
    class_weights=jnp.asarray(weights),
    l2=config.train.l2,
    label_smoothing=config.train.label_smoothing,
    mean=mean,
    std=std,
    seed=config.seed,
    l2_scope=config.train.get('l2_scope', 'model'),
    ema_decay=ema_decay_rate(config.train),
    sam_rho=sam_radius(config.train),
    self_distill=self_distill_weight(config.train),
    self_distill_flip=bool(config.train.get('self_distill_flip', False)),
    total_steps=int(steps_per_epoch) * int(config.train.epochs),
    microbatch=microbatch_for(config, model),
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, started: float | None = None
) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates, writes results.json.

  `started` (a `time.time()`; default: now) is when `train.time_budget_min` starts counting;
  launch.py passes its process's start.

  On SIGTERM (preemption) it checkpoints at the next step boundary and returns
  `{'preempted': True, 'steps': step}` without the final evaluation; rerunning resumes.
  Whatever way it ends (an error included), the checkpoint manager and the metric writer are
  closed and the SIGTERM handler is restored.
  """
  started = time.time() if started is None else started
  with contextlib.ExitStack() as cleanup:
    return _train_and_evaluate(config, workdir, cleanup, started)


def _train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, cleanup: contextlib.ExitStack, started: float
) -> dict[str, Any]:
  # ---- Setup --------------------------------------------------------------------------------
  runtime.tune_malloc()  # no-op when launch.py already started us with tuned MALLOC_* variables
  runtime.inline_cpu_dispatch()  # takes effect only if JAX has not started yet (launch.py: first)
  config = scaling.resolve(config, jax.device_count())  # per_device_batch_size, if set
  validate_config(config)
  budget = time_budget.budget_s(config.train)  # seconds, 0: none
  check_workdir_writable(workdir)
  paths.check_shared(workdir)  # several processes: all must see one workdir
  is_chief = jax.process_index() == 0
  mode = config.parallel
  if mode == 'pmap' and jax.process_count() > 1:
    raise ConfigError("config.parallel='pmap' is single-host; use 'jit' across hosts")
  mesh = parallel.make_mesh()
  global_batch = config.train.batch_size
  parallel.check_batch_size(global_batch)
  n_dev = jax.device_count()
  eval_batch = evaluation.eval_global_batch(config.train.eval_batch_size)
  logging.info(
    'devices: %d (%s) on %d process(es); global batch %d',
    n_dev,
    jax.devices()[0].platform,
    jax.process_count(),
    global_batch,
  )

  # ---- Data ---------------------------------------------------------------------------------
  dataset = load_dataset(config.data, image_size=config.model.image_size)
  train_split = dataset[config.data.train_split]
  eval_split = dataset[config.data.eval_split]
  spe = pipeline.steps_per_epoch(len(train_split), global_batch)
  if spe == 0:
    raise ConfigError(
      f'config.train.batch_size={global_batch} is larger than the '
      f'{len(train_split)} training examples'
    )
  mean, std = pixel_stats(train_split.images)
  weights = class_weights(train_split.labels, dataset.num_classes, config.data.class_weights)
  logging.info(
    'data: %s; %d steps/epoch; class weights %s; pixel mean %.4f std %.4f',
    {k: len(v) for k, v in dataset.splits.items()},
    spe,
    np.round(weights, 3),
    mean,
    std,
  )

  # The split on the devices, each step shipping its indices (data/resident.py), or fed from
  # the host; K steps per dispatch need the former.
  on_device = resident.use_resident(
    config.data, backend=jax.default_backend(), mode=mode, nbytes=resident.split_bytes(train_split)
  )
  dispatch = loop_metrics.steps_per_dispatch(config.train, on_device)
  if not dispatch:
    if resident.setting(config.data) == 'off':
      raise ConfigError(
        f'config.train.steps_per_dispatch={config.train.steps_per_dispatch} needs the training '
        "split on the devices: config.data.on_device='on' or 'auto' (GPU/TPU)"
      )
    logging.warning('steps_per_dispatch > 1 needs the split on the devices: 1 step per dispatch')
    dispatch = 1
  logging.info(
    'training split %s (%.1f MB); %d step(s) per dispatch',
    'on the devices, steps ship indices' if on_device else 'fed from the host',
    resident.split_bytes(train_split) / 2**20,
    dispatch,
  )

  # ---- Checkpoints: a resume keeps the checkpoint's recipe -----------------------------------
  manager = cleanup.enter_context(
    contextlib.closing(
      checkpointing.make_manager(
        workdir, keep_latest=config.train.keep_latest, keep_best=config.train.keep_best
      )
    )
  )
  if manager.all_steps():
    newest = max(manager.all_steps())
    try:
      saved_config = checkpointing.restore_meta(manager, newest)['config']
    except Exception:  # pylint: disable=broad-except
      saved_config = None  # unreadable: restore_newest_readable below says why
    if saved_config is not None:
      if budget:  # the epochs were fixed when the run first started
        config = time_budget.with_epochs(config, saved_config['train']['epochs'])
      check_resume_config(
        saved_config, config, f'{manager.directory} (checkpoint of step {newest})'
      )

  # ---- Model and optimizer ------------------------------------------------------------------
  ctx = make_step_context(
    config,
    num_classes=dataset.num_classes,
    weights=weights,
    mean=mean,
    std=std,
    steps_per_epoch=spe,
  )
  tx = make_optimizer(config.train, spe)
  plateau = make_plateau(config.train)
  repl = parallel.replicated(mesh)

  def init_state(tx):
    return jax.jit(lambda: create_train_state(ctx, tx, plateau), out_shardings=repl)()

  state = init_state(tx)
  abstract_state = checkpointing.abstract_like(state)  # restore target: replicated on the mesh
  # Positioned by the step alone (nothing per process in the checkpoint): see epoch_order.
  train_iter = cleanup.enter_context(
    contextlib.closing(
      EpochBatches(
        train_split,
        global_batch=global_batch,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        indices_only=on_device,
      )
    )
  )
  meta = {
    'config': config.to_dict(),
    'class_names': list(dataset.class_names),
    'pixel_mean': mean,
    'pixel_std': std,
    'wall_s': 0.0,
  }

  # ---- Restore ------------------------------------------------------------------------------
  start_step = 0
  if manager.all_steps():
    found = checkpointing.restore_newest_readable(manager, abstract_state)
    if found.step is None and not config.train.restart_if_unreadable:
      reasons = '; '.join(f'step {s}: {r}' for s, r in found.unreadable.items())
      raise FerJaxError(
        f'{manager.directory}: no checkpoint is readable ({reasons}); pass '
        '--config.train.restart_if_unreadable=True to train from scratch'
      )
    if found.unreadable:
      moved_to = checkpointing.set_aside(manager, list(found.unreadable))
      logging.warning(
        'moved the unreadable checkpoint(s) of step(s) %s to %s',
        ', '.join(map(str, found.unreadable)),
        moved_to,
      )
    if found.step is None:
      logging.warning('no readable checkpoint: training from scratch (restart_if_unreadable)')
    else:
      start_step, state = found.step, found.state
      train_iter.seek(start_step)
      meta['wall_s'] = found.meta.get('wall_s', 0.0)
      logging.info('resumed from step %d (epoch %.2f)', start_step, start_step / spe)

  # ---- Compile ------------------------------------------------------------------------------
  batch_spec = {
    'image': jax.ShapeDtypeStruct((global_batch, *train_split.images.shape[1:]), np.uint8),
    'label': jax.ShapeDtypeStruct((global_batch,), np.int32),
  }
  if train_split.soft_labels is not None:
    batch_spec['soft_label'] = jax.ShapeDtypeStruct(
      (global_batch, *train_split.soft_labels.shape[1:]), np.float32
    )
  fresh_sums = sums_factory(ctx, checkpointing.abstract_like(state), batch_spec, mode, mesh)
  resident_split = resident.put_split(train_split, mesh) if on_device else None
  steps = compile_steps(ctx, mode, mesh, resident_split)
  state = steps.prepare_state(state)

  def run_eval(variables: Any, split: Split) -> dict[str, Any]:
    return evaluate(steps.eval, variables, split, global_batch=eval_batch)

  if time_budget.applies(config.train, start_step):
    epochs = _epochs_in_budget(
      config,
      budget=budget,
      started=started,
      spe=spe,
      steps=steps,
      state=state,
      sums=fresh_sums(),
      train_iter=train_iter,
      run_eval=run_eval,
      eval_split=eval_split,
      test_size=len(dataset[config.data.test_split]),
    )
    if epochs != config.train.epochs:
      config = time_budget.with_epochs(config, epochs)
      tx = make_optimizer(config.train, spe)  # the schedule's length changes, not its state
      if ctx.self_distill > 0:  # its ramp spans the run: the steps close over the run's length
        ctx = dataclasses.replace(ctx, total_steps=spe * epochs)
        steps = compile_steps(ctx, mode, mesh, resident_split)
      fresh = init_state(tx)
      abstract_state = checkpointing.abstract_like(fresh)  # the best checkpoint's restore target
      state = steps.prepare_state(fresh)
      meta['config'] = config.to_dict()
  train_fn, put_batch, canonical = steps.train, steps.put_batch, steps.canonical
  total_steps = spe * config.train.epochs
  stop_step = (
    total_steps if config.train.max_steps < 0 else min(total_steps, config.train.max_steps)
  )

  # ---- Train loop ---------------------------------------------------------------------------
  writer = cleanup.enter_context(contextlib.closing(MetricWriter(workdir, enabled=is_chief)))
  cadence = loop_metrics.Cadence(config.train, spe)
  log_every = config.train.log_every_steps  # read once: a ConfigDict lookup costs ~3 µs
  t_start = time.time()
  timed_images, timed_s = 0, 0.0
  zero_sums = fresh_sums()  # never donated (compile_steps): it starts every window
  sums, window = zero_sums, 0  # device-side metric sums over the log window, its length
  epoch_sums: dict[str, float] = {}
  epoch_count = 0
  step = start_step
  t_last = time.time()
  watcher = cleanup.enter_context(preemption.PreemptionWatcher(start_step, agree_every=log_every))
  preempted = False
  periods = (log_every, spe, cadence.every_steps)
  while step < stop_step:
    k = loop_metrics.block_length(step, dispatch, periods=periods, stop_step=stop_step)
    if k == 1:
      state, sums = train_fn(state, put_batch(next(train_iter)), sums)
    else:
      state, sums = steps.train_block(state, put_batch(train_iter.next_block(k)), sums)
    preempted = False
    for s in range(step + 1, step + k + 1):  # every step, in order (the sync protocol counts)
      preempted = watcher.should_stop(s) or preempted  # the same answer on every process
    step += k
    window += k
    window_end = step % log_every == 0 or step == stop_step or step % spe == 0 or preempted
    if window_end:
      host = _sums_to_host(sums, mode)
      now = time.time()
      # The first window of a run includes compilation: leave it out of the throughput.
      if step - window > start_step:
        timed_images += window * global_batch
        timed_s += now - t_last
      ips = window * global_batch / max(now - t_last, 1e-9)
      _raise_if_diverged(host, step, manager)
      means = loop_metrics.means(host)
      for k, v in means.items():
        epoch_sums[k] = epoch_sums.get(k, 0.0) + v * window
      epoch_count += window
      logging.info(
        'step %d/%d  epoch %.2f  loss %.4f  acc %.3f  %.0f img/s',
        step,
        total_steps,
        step / spe,
        means['loss'],
        means['accuracy'],
        ips,
      )
      writer.write(step, {**means, 'images_per_s': ips}, 'train_steps')
      sums, window, t_last = zero_sums, 0, time.time()
    epoch_end = step % spe == 0
    if epoch_end and epoch_count:
      train_means = {k: v / epoch_count for k, v in epoch_sums.items()}
      writer.write(step, {'epoch': step // spe, **train_means}, 'train')
      epoch_sums, epoch_count = {}, 0
    if cadence.due(step, window_end=window_end) or step == stop_step or preempted:
      _raise_if_diverged(_sums_to_host(sums, mode), step, manager, params=state.params)
      result = run_eval(eval_variables(state), eval_split)
      if plateau is not None and epoch_end:
        # At epoch ends only (never at a mid-epoch stop or preemption, so a resumed run updates
        # it at the same steps): the patience counts evaluations (epochs with
        # eval_every_epochs=1). The state is checkpointed below.
        new_plateau = update_plateau(plateau, canonical(state).plateau, result['accuracy'])
        state = state.replace(plateau=steps.prepare_state(new_plateau))
        result['learning_rate_scale'] = float(parallel.to_host(new_plateau.scale))
      writer.write(step, {'epoch': step / spe, **result}, config.data.eval_split)
      logging.info(
        'step %d  %s: accuracy %.4f  macro-F1 %.4f  loss %.4f',
        step,
        config.data.eval_split,
        result['accuracy'],
        result['macro_f1'],
        result['loss'],
      )
      meta['wall_s'] += time.time() - t_start
      t_start = time.time()
      checkpointing.save(
        manager, step, canonical(state), None, meta, {'accuracy': result['accuracy']}
      )
      cadence.done()
      t_last = time.time()  # eval and save are not training time
    if preempted:
      break
  watcher.close()  # SIGTERM terminates again during the final evaluation
  manager.wait_until_finished()
  if preempted:
    logging.warning(
      'preempted: checkpoint at step %d saved in %s; run the same command again to resume',
      step,
      workdir,
    )
    return {'preempted': True, 'steps': int(step)}

  # ---- Final evaluation of the best checkpoint ------------------------------------------------
  best_step = manager.best_step()
  if best_step is None:
    raise FerJaxError(f'no checkpoint in {workdir}: nothing to evaluate')
  best_state, _ = checkpointing.restore(manager, best_step, abstract_state)
  best_variables = eval_variables(best_state)
  splits = {}
  for name in (config.data.eval_split, config.data.test_split):
    splits[name] = run_eval(steps.prepare_state(best_variables), dataset[name])
    logging.info(
      'best checkpoint (step %d) on %s:\n%s',
      best_step,
      name,
      metrics.format_table(
        metrics.classification_report(np.asarray(splits[name]['confusion_matrix'])),
        dataset.class_names,
      ),
    )
  tta = {}
  for tta_mode in config.train.get('final_tta', ()):
    # The same evaluation with test-time augmentation (= python -m fer_jax.evaluate --tta).
    compiled = evaluation.CompiledEval(eval_spec(ctx, tta_mode), mode, mesh)
    tta[tta_mode] = {}
    for name in (config.data.eval_split, config.data.test_split):
      result = evaluate(
        compiled, steps.prepare_state(best_variables), dataset[name], global_batch=eval_batch
      )
      tta[tta_mode][name] = {k: result[k] for k in ('accuracy', 'macro_f1', 'loss')}
      logging.info(
        'best checkpoint (step %d) on %s with %s TTA: accuracy %.4f',
        best_step,
        name,
        tta_mode,
        result['accuracy'],
      )
  meta['wall_s'] += time.time() - t_start
  results = {
    'config': config.to_dict(),
    'epochs': int(step // spe),
    'steps': int(step),
    'wall_s': round(meta['wall_s'], 2),
    'train_images_per_s': round(timed_images / timed_s, 1) if timed_s else None,
    'best_step': int(best_step),
    'test_time_augmentation': 'none',  # the figures in 'splits' are single view
    'splits': splits,
  }
  if tta:
    results['tta'] = tta  # mode -> split -> the same figures with that test-time augmentation
  if is_chief:
    path = os.path.join(workdir, 'results.json')
    paths.write_json(path, results, indent=1, default=_json_default)  # local or gs://
    logging.info(
      'wrote %s: %s accuracy %.4f, %s accuracy %.4f',
      path,
      config.data.eval_split,
      splits[config.data.eval_split]['accuracy'],
      config.data.test_split,
      splits[config.data.test_split]['accuracy'],
    )
  return results


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, tuple):
    return list(o)
  raise TypeError(type(o))
