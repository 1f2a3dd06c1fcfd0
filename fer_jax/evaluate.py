"""Evaluate a trained workdir on any split, with optional test-time augmentation (TTA).

  python -m fer_jax.evaluate --workdir W [--split PrivateTest] [--tta none|flip|tencrop]
      [--checkpoint best|latest|STEP] [--data_path CSV_OR_FOLDER]

Prints the per-class table and writes `W/eval/<split>_<checkpoint>_<tta>.json` (accuracy,
macro-F1, per-class precision/recall/F1, confusion matrix, and which TTA was used).

TTA averages the softmax outputs of several views of each image, all inside ONE jitted function
on the device: 'flip' = the image and its mirror; 'tencrop' = crops of 7/8 of the side (42 of 48)
at the four corners and the centre, each resized back to the model input, plus their mirrors.
The views are evaluated one after another (`lax.map`), so memory stays that of a single view.
With tta='none' the model input is exactly the training loop's evaluation input, so the numbers
match `results.json`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fer_jax import augment, metrics, parallel
from fer_jax.data import pipeline
from fer_jax.data.types import Dataset, Split
from fer_jax.errors import ConfigError, DataError, FerJaxError
from fer_jax.workdir import TrainedModel

TTA_MODES = ('none', 'flip', 'tencrop')
# Ten-crop side as a fraction of the image side: 42 of 48, the usual choice for FER2013.
TENCROP_FRACTION = 42 / 48


def tta_views(tta: str, height: int, width: int,
              crop_fraction: float = 0.0) -> tuple[int, int, np.ndarray]:
  """The views of one TTA mode as (crop_h, crop_w, int32 (V, 3) rows of [top, left, flip]).

  Ten-crop crops `crop_fraction` of the side (a model trained on crops: its crop size), else 42/48.
  """
  if tta not in TTA_MODES:
    raise ConfigError(f'tta={tta!r}: expected one of {TTA_MODES}')
  if tta == 'none':
    return height, width, np.array([[0, 0, 0]], np.int32)
  if tta == 'flip':
    return height, width, np.array([[0, 0, 0], [0, 0, 1]], np.int32)
  fraction = crop_fraction or TENCROP_FRACTION
  ch = max(1, round(height * fraction))
  cw = max(1, round(width * fraction))
  dy, dx = height - ch, width - cw
  corners = [(0, 0), (0, dx), (dy, 0), (dy, dx), (dy // 2, dx // 2)]
  rows = [(y, x, f) for f in (0, 1) for y, x in corners]
  return ch, cw, np.array(rows, np.int32)


def predict_probs_fn(trained: TrainedModel, tta: str = 'none') -> Callable[[Any, jax.Array], jax.Array]:
  """(variables, uint8 (B, H, W, C) images) -> float32 (B, K) TTA-averaged softmax; jit it.

  Every view is cropped from the stored image and resized straight to the model input, then
  goes through `augment.preprocess_batch(train=False)`, the evaluation preprocessing of training.
  """
  if tta not in TTA_MODES:
    raise ConfigError(f'tta={tta!r}: expected one of {TTA_MODES}')
  cfg, out = trained.config.augment, trained.image_size
  model, mean, std = trained.model, trained.pixel_mean, trained.pixel_std
  crop_fraction = float(cfg.get('crop_fraction', 0.0))
  # Ten-crop views are already the model's crops: preprocessing must not crop them again.
  view_cfg = ml_collections.ConfigDict({**cfg.to_dict(), 'crop_fraction': 0.0})

  def probs(variables: Any, x: jax.Array) -> jax.Array:
    logits = model.apply(variables, x, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  def fn(variables: Any, images: jax.Array) -> jax.Array:
    b, h, w, c = images.shape
    ch, cw, views = tta_views(tta, h, w, crop_fraction)
    whole = (ch, cw) == (h, w)
    if tta == 'none':
      return probs(variables, augment.preprocess_batch(images, None, cfg, out_size=out,
                                                       train=False, mean=mean, std=std))
    pixels = images.astype(jnp.float32)  # crops and resizes in [0, 255]; preprocess rescales

    def view(row: jax.Array) -> jax.Array:
      crop = jax.lax.dynamic_slice(pixels, (0, row[0], row[1], 0), (b, ch, cw, c))
      if not whole and (ch, cw) != (out, out):
        crop = jax.image.resize(crop, (b, out, out, c), method='linear')
      crop = jnp.where(row[2] > 0, crop[:, :, ::-1], crop)
      return probs(variables, augment.preprocess_batch(crop, None, cfg if whole else view_cfg,
                                                       out_size=out, train=False, mean=mean,
                                                       std=std))

    return jnp.mean(jax.lax.map(view, jnp.asarray(views)), axis=0)

  return fn


def predict_split(trained: TrainedModel, split: Split, *, tta: str = 'none',
                  batch_size: int = 512) -> np.ndarray:
  """float32 (N, K) probabilities for every example of `split`, in order.

  Runs the jitted function over the training mesh (parameters replicated, batch on 'data'),
  feeding padded batches from `pipeline.eval_batches`; single process.
  """
  if jax.process_count() > 1:
    raise FerJaxError('fer_jax.evaluate runs in a single process')
  mesh = parallel.make_mesh()
  n_dev = jax.device_count()
  global_batch = max(n_dev, -(-batch_size // n_dev) * n_dev)
  fn = jax.jit(predict_probs_fn(trained, tta),
               in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
               out_shardings=parallel.batch_sharded(mesh))
  variables = jax.device_put(trained.variables, parallel.replicated(mesh))
  out = []
  for batch in pipeline.eval_batches(split, global_batch=global_batch):
    images = parallel.to_global({'image': batch['image']}, mesh)['image']
    probs = np.asarray(fn(variables, images))
    out.append(probs[batch['mask'] > 0])
  return np.concatenate(out) if out else np.zeros((0, trained.num_classes), np.float32)


def summarize(probs: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> dict[str, Any]:
  """The classification report of argmax predictions, plus the mean cross-entropy."""
  labels = np.asarray(labels, np.int64)
  cm = metrics.confusion_matrix(labels, np.argmax(probs, -1), len(class_names))
  report = metrics.classification_report(cm)
  p_true = probs[np.arange(len(labels)), labels] if len(labels) else np.zeros(0)
  report['loss'] = float(-np.mean(np.log(np.maximum(p_true, 1e-12)))) if len(labels) else 0.0
  report['confusion_matrix'] = cm.tolist()
  report['class_names'] = list(class_names)
  return report


def load_data(data_cfg: ml_collections.ConfigDict, *, image_size: int, data_size: int,
              data_path: str = '') -> tuple[Dataset, str]:
  """(Dataset, description) of the configured data, or of `data_path` when given.

  `data_path` may be a FER2013 CSV (.csv or .csv.gz), a Kaggle image-folder root
  (train/ and test/ holding one folder per emotion), or a single folder of emotion folders
  (e.g. that root's test/), which becomes the only split, named after the folder.
  """
  from fer_jax.data.datasets import load_dataset
  data_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  if data_path:
    data_path = os.path.abspath(data_path)
    if os.path.isdir(data_path):
      if _is_class_folder(data_path):
        name = os.path.basename(data_path.rstrip(os.sep))
        return (Dataset(splits={name: _load_class_folder(data_path, data_size)}),
                f'image folder {data_path}')
      data_cfg.source = 'folders'
    elif os.path.isfile(data_path):
      data_cfg.source = 'csv'
    else:
      raise DataError(f'{data_path}: not found')
    data_cfg.path = data_path
  elif data_cfg.source != 'synthetic' and not os.path.exists(data_cfg.path):
    raise DataError(f'{data_cfg.path}: the configured dataset is not found (from {os.getcwd()}); '
                    'point to it with --data_path')
  dataset = load_dataset(data_cfg, image_size=image_size)
  what = {'csv': 'FER2013 CSV', 'folders': 'image folders', 'synthetic': 'synthetic faces'}
  where = f' {data_cfg.path}' if data_cfg.source != 'synthetic' else ''
  return dataset, f'{what.get(data_cfg.source, data_cfg.source)}{where}'


def load_eval_data(trained: TrainedModel, split: str,
                   data_path: str = '') -> tuple[str, Split, str]:
  """(split name, Split, data description) of the workdir's dataset or of `data_path`."""
  dataset, source = load_data(trained.config.data, image_size=trained.image_size,
                              data_size=trained.data_size, data_path=data_path)
  if tuple(dataset.class_names) != trained.class_names:
    raise DataError(f'the data has classes {dataset.class_names}, the model {trained.class_names}')
  if len(dataset.splits) == 1:  # a single folder of emotion folders
    return *next(iter(dataset.splits.items())), source
  if split not in dataset.splits:
    raise ConfigError(f'split {split!r} not in the dataset (it has {sorted(dataset.splits)})')
  return split, dataset[split], source


def _is_class_folder(path: str) -> bool:
  """True when `path` holds emotion folders directly (rather than train/ and test/)."""
  from fer_jax.data.types import FER2013_CLASSES
  names = {e.name.lower() for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.')}
  return bool(names) and names <= set(FER2013_CLASSES)


def _load_class_folder(path: str, size: int) -> Split:
  from concurrent import futures
  from fer_jax.data import folders
  files, labels = folders._list_split(path)  # pylint: disable=protected-access
  with futures.ThreadPoolExecutor(4) as pool:
    images = folders._decode_all(files, size, pool)  # pylint: disable=protected-access
  return Split(images=images, labels=labels)


def checkpoint_tag(trained: TrainedModel) -> str:
  """'best' / 'latest' as asked, else 'step<N>': part of the output file names."""
  return trained.checkpoint if trained.checkpoint in ('best', 'latest') else f'step{trained.step}'


def evaluate(trained: TrainedModel, *, split: str = 'PrivateTest', tta: str = 'none',
             data_path: str = '', batch_size: int = 0) -> tuple[dict[str, Any], np.ndarray, Split]:
  """(JSON-ready report, (N, K) probabilities, the evaluated Split)."""
  if tta not in TTA_MODES:
    raise ConfigError(f'tta={tta!r}: expected one of {TTA_MODES}')
  name, data, source = load_eval_data(trained, split, data_path)
  probs = predict_split(trained, data, tta=tta,
                        batch_size=batch_size or int(trained.config.train.eval_batch_size))
  report = summarize(probs, data.labels, trained.class_names)
  header = {'workdir': trained.workdir, 'checkpoint': trained.checkpoint, 'step': trained.step,
            'split': name, 'data': source, 'test_time_augmentation': tta,
            'tta_views': len(tta_views(tta, *data.images.shape[1:3])[2])}
  return {**header, **report}, probs, data


def write_report(report: dict[str, Any], trained: TrainedModel) -> str:
  """Writes `W/eval/<split>_<checkpoint>_<tta>.json` atomically; returns its path."""
  from fer_jax import paths  # pylint: disable=import-outside-toplevel
  path = (paths.resolve(trained.workdir) / 'eval'
          / f'{report["split"]}_{checkpoint_tag(trained)}_{report["test_time_augmentation"]}.json')
  paths.write_json(path, report, indent=1)
  return os.fspath(path)


def format_summary(report: dict[str, Any]) -> str:
  """The header line and per-class table that the CLI prints."""
  head = (f'{report["split"]} ({report["data"]}), checkpoint {report["checkpoint"]} '
          f'(step {report["step"]}), test-time augmentation: {report["test_time_augmentation"]} '
          f'({report["tta_views"]} view{"s" if report["tta_views"] > 1 else ""})')
  return head + '\n' + metrics.format_table(report, report['class_names'])


def main(argv: list[str]) -> None:
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from fer_jax import workdir
  workdir.quiet_library_logs()
  f = flags.FLAGS
  try:
    trained = workdir.load(f.workdir, f.checkpoint)
    report, _, _ = evaluate(trained, split=f.split, tta=f.tta, data_path=f.data_path,
                            batch_size=f.batch_size)
    path = write_report(report, trained)
  except FerJaxError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(format_summary(report))
  print(f'wrote {path}')


def _define_flags() -> None:
  from absl import flags
  flags.DEFINE_string('workdir', None, 'A trained workdir (holds checkpoints/).', required=True)
  flags.DEFINE_string('split', 'PrivateTest', 'Split of the dataset to evaluate.')
  flags.DEFINE_enum('tta', 'none', TTA_MODES, 'Test-time augmentation.')
  flags.DEFINE_string('checkpoint', 'best', "'best' (PublicTest accuracy), 'latest' or a step.")
  flags.DEFINE_string('data_path', '', 'Evaluate other data: a FER2013 CSV, a Kaggle image-folder '
                      'root (train/, test/) or one folder of emotion folders. Default: the '
                      "workdir's configured dataset.")
  flags.DEFINE_integer('batch_size', 0, 'Evaluation batch; 0: config.train.eval_batch_size.')


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
