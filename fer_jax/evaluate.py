"""Evaluate a trained workdir on any split, with optional test-time augmentation (TTA).

  python -m fer_jax.evaluate --workdir W [--split PrivateTest] [--tta none|flip|tencrop]
      [--checkpoint best|latest|STEP] [--data_path CSV_OR_FOLDER]

Prints the per-class table and writes `W/eval/<split>_<checkpoint>_<tta>.json` (accuracy,
macro-F1, per-class precision/recall/F1, confusion matrix, and which TTA was used). The figures
come from `fer_jax.evaluation`, the evaluation of the training loop: with --tta none they equal
the run's results.json exactly.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from fer_jax import evaluation, metrics
from fer_jax.data.types import Split
from fer_jax.errors import ConfigError, DataError, FerJaxError
from fer_jax.trained_model import TrainedModel


def load_eval_split(
  trained: TrainedModel, split: str, data_path: str = ''
) -> tuple[str, Split, str]:
  """(split name, Split, data description) of the workdir's dataset or of `data_path`."""
  from fer_jax.data.datasets import load_dataset_or_path

  dataset, source = load_dataset_or_path(
    trained.config.data,
    image_size=trained.image_size,
    data_size=trained.data_size,
    data_path=data_path,
  )
  if tuple(dataset.class_names) != trained.class_names:
    raise DataError(f'the data has classes {dataset.class_names}, the model {trained.class_names}')
  if len(dataset.splits) == 1:  # a single folder of emotion folders
    return *next(iter(dataset.splits.items())), source
  if split not in dataset.splits:
    raise ConfigError(f'split {split!r} not in the dataset (it has {sorted(dataset.splits)})')
  return split, dataset[split], source


def evaluate(
  trained: TrainedModel,
  *,
  split: str = 'PrivateTest',
  tta: str = 'none',
  data_path: str = '',
  batch_size: int = 0,
) -> tuple[dict[str, Any], np.ndarray, Split]:
  """(JSON-ready report, (N, K) probabilities, the evaluated Split)."""
  evaluation.check_tta(tta)
  name, data, source = load_eval_split(trained, split, data_path)
  report, probs = evaluation.evaluate_trained(trained, data, tta=tta, batch_size=batch_size)
  header = {
    'workdir': trained.workdir,
    'checkpoint': trained.checkpoint,
    'step': trained.step,
    'split': name,
    'data': source,
    'test_time_augmentation': tta,
    'tta_views': len(evaluation.tta_views(tta, *data.images.shape[1:3])[2]),
  }
  return {**header, **report, 'class_names': list(trained.class_names)}, probs, data


def checkpoint_tag(trained: TrainedModel) -> str:
  """'best' / 'latest' as asked, else 'step<N>': part of the output file names."""
  return trained.checkpoint if trained.checkpoint in ('best', 'latest') else f'step{trained.step}'


def write_report(report: dict[str, Any], trained: TrainedModel) -> str:
  """Writes `W/eval/<split>_<checkpoint>_<tta>.json` atomically; returns its path."""
  from fer_jax import paths  # pylint: disable=import-outside-toplevel

  path = (
    paths.resolve(trained.workdir)
    / 'eval'
    / f'{report["split"]}_{checkpoint_tag(trained)}_{report["test_time_augmentation"]}.json'
  )
  paths.write_json(path, report, indent=1)
  return os.fspath(path)


def format_summary(report: dict[str, Any]) -> str:
  """The header line and per-class table that the CLI prints."""
  head = (
    f'{report["split"]} ({report["data"]}), checkpoint {report["checkpoint"]} '
    f'(step {report["step"]}), test-time augmentation: {report["test_time_augmentation"]} '
    f'({report["tta_views"]} view{"s" if report["tta_views"] > 1 else ""})'
  )
  return head + '\n' + metrics.format_table(report, report['class_names'])


def main(argv: list[str]) -> None:
  from absl import app, flags

  from fer_jax import logs, trained_model

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_logs()
  f = flags.FLAGS
  try:
    trained = trained_model.load(f.workdir, f.checkpoint)
    report, _, _ = evaluate(
      trained, split=f.split, tta=f.tta, data_path=f.data_path, batch_size=f.batch_size
    )
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
  flags.DEFINE_enum('tta', 'none', evaluation.TTA_MODES, 'Test-time augmentation.')
  flags.DEFINE_string('checkpoint', 'best', "'best' (PublicTest accuracy), 'latest' or a step.")
  flags.DEFINE_string(
    'data_path',
    '',
    'Evaluate other data: a FER2013 CSV, a Kaggle image-folder '
    'root (train/, test/) or one folder of emotion folders. Default: the '
    "workdir's configured dataset.",
  )
  flags.DEFINE_integer('batch_size', 0, 'Evaluation batch; 0: config.train.eval_batch_size.')


if __name__ == '__main__':
  from absl import app

  _define_flags()
  app.run(main)
