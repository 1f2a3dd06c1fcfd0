"""PNG figures and an index.md for a trained workdir, or for a dataset before training.

  python -m fer_jax.report --workdir W [--split PrivateTest] [--checkpoint best] [--tta none]
  python -m fer_jax.report --config experiments/base.py --config.data.path=fer2013.csv.gz \
      --out_dir reports/fer2013

With --workdir the figures go into W/report/ (or --out_dir): the class distribution per split,
example faces per emotion, training curves from metrics.jsonl, the confusion matrix (counts and
row-normalised) of --split, the face-and-probabilities plot for chosen samples, and the most
confident mistakes; index.md shows them with the headline numbers. With --config alone (no
trained model) only the dataset figures are drawn.

Figures use matplotlib's object API on an Agg canvas (no pyplot, no display needed).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from fer_jax import paths
from fer_jax.data.types import Dataset, Split

# Split colours, fixed so every figure agrees.
_COLORS = {'Training': '#4C72B0', 'PublicTest': '#DD8452', 'PrivateTest': '#55A868'}
_FALLBACK_COLORS = ('#8172B3', '#937860', '#DA8BC3', '#8C8C8C')
_CORRECT, _WRONG, _OTHER = '#2ca02c', '#d62728', '#b0b0b0'


def _figure(width: float, height: float):
  from matplotlib.figure import Figure

  return Figure(figsize=(width, height), dpi=100, layout='constrained')


def _save(fig, path: str) -> str:
  paths.save_figure(fig, path, dpi=110)  # local or gs:// (matplotlib writes local files only)
  return path


def _split_color(name: str, i: int) -> str:
  return _COLORS.get(name, _FALLBACK_COLORS[i % len(_FALLBACK_COLORS)])


def _show_face(ax, image: np.ndarray) -> None:
  ax.imshow(
    image[..., 0] if image.ndim == 3 else image,
    cmap='gray',
    vmin=0,
    vmax=255,
    interpolation='nearest',
  )
  ax.set_xticks([])
  ax.set_yticks([])


def class_distribution(dataset: Dataset, path: str) -> str:
  """One bar chart per split, the count on every bar (splits differ 8x in size)."""
  names = dataset.class_names
  splits = list(dataset.splits.items())
  fig = _figure(4.2 * len(splits) + 0.6, 4.2)
  axes = fig.subplots(1, len(splits), squeeze=False)[0]
  for i, (ax, (split_name, split)) in enumerate(zip(axes, splits)):
    counts = np.bincount(split.labels, minlength=len(names))
    bars = ax.bar(range(len(names)), counts, color=_split_color(split_name, i))
    ax.bar_label(bars, labels=[f'{c:,}' for c in counts], padding=2, fontsize=8.5)
    ax.set_xticks(range(len(names)), names, rotation=40, ha='right')
    ax.set_title(f'{split_name} ({len(split):,} images)')
    ax.set_ylim(0, counts.max() * 1.14 if counts.max() else 1)
    ax.spines[['top', 'right']].set_visible(False)
  axes[0].set_ylabel('images')
  fig.suptitle('Class distribution per split')
  return _save(fig, path)


def example_faces(
  split: Split,
  class_names: Sequence[str],
  path: str,
  *,
  per_class: int = 8,
  seed: int = 0,
  title: str = 'Example faces per emotion',
) -> str:
  """A row of randomly chosen faces per emotion (fewer when a class has fewer)."""
  rng = np.random.default_rng(seed)
  k = len(class_names)
  fig = _figure(1.0 * per_class + 1.2, 1.05 * k + 0.5)
  axes = fig.subplots(k, per_class, squeeze=False, gridspec_kw={'wspace': 0.03, 'hspace': 0.03})
  for c, name in enumerate(class_names):
    idx = np.flatnonzero(split.labels == c)
    chosen = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
    for j in range(per_class):
      ax = axes[c, j]
      if j < len(chosen):
        _show_face(ax, split.images[chosen[j]])
      else:
        ax.set_axis_off()
      if j == 0:
        ax.set_axis_on()
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f'{name}\n({len(idx):,})', rotation=0, ha='right', va='center', fontsize=10)
  fig.suptitle(title)
  return _save(fig, path)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """metrics.jsonl records, the last one kept per (split, step) (a resumed run repeats steps)."""
  path = paths.resolve(workdir) / 'metrics.jsonl'
  if not path.is_file():
    return []
  latest: dict[tuple[str, int], dict[str, Any]] = {}
  with path.open() as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a crash mid-write
        continue
      latest[(record.get('split', ''), int(record.get('step', -1)))] = record
  return sorted(latest.values(), key=lambda r: (r['step'], r.get('split', '')))


def training_curves(
  records: Sequence[dict[str, Any]],
  path: str,
  *,
  eval_split: str = 'PublicTest',
  mark_step: int | None = None,
  mark_label: str = 'best checkpoint',
  steps_per_epoch: float | None = None,
) -> str | None:
  """Loss and accuracy per epoch, train vs `eval_split`; None when there is nothing per epoch.

  `mark_step` (e.g. the evaluated checkpoint) is drawn as a dashed line labelled `mark_label`.
  """
  train = [r for r in records if r.get('split') == 'train' and 'epoch' in r]
  evals = [r for r in records if r.get('split') == eval_split and 'epoch' in r]
  if not train and not evals:
    return None
  fig = _figure(11, 4.3)
  ax_loss, ax_acc = fig.subplots(1, 2)
  for ax, key, label in (
    (ax_loss, 'loss', 'loss (cross-entropy)'),
    (ax_acc, 'accuracy', 'accuracy'),
  ):
    if train:
      # The training loss without the L2 term, comparable with the evaluation loss.
      train_key = 'data_loss' if key == 'loss' and 'data_loss' in train[0] else key
      ax.plot(
        [r['epoch'] for r in train],
        [r[train_key] for r in train],
        'o-',
        ms=3.5,
        color=_COLORS['Training'],
        label='train (augmented, dropout on)',
      )
    if evals:
      ax.plot(
        [r['epoch'] for r in evals],
        [r[key] for r in evals],
        's-',
        ms=3.5,
        color=_COLORS['PublicTest'],
        label=eval_split,
      )
    if mark_step is not None and steps_per_epoch:
      epoch = mark_step / steps_per_epoch
      ax.axvline(epoch, color='0.45', ls='--', lw=1, label=f'{mark_label} (epoch {epoch:.3g})')
    ax.set_xlabel('epoch')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.spines[['top', 'right']].set_visible(False)
  ax_acc.legend(loc='lower right', fontsize=9)
  ax_loss.legend(loc='upper right', fontsize=9)
  fig.suptitle('Training curves')
  return _save(fig, path)


def confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str, *, title: str) -> str:
  """Counts and row-normalised (recall per true class), side by side."""
  cm = np.asarray(cm, np.int64)
  rows = cm.sum(axis=1, keepdims=True)
  norm = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
  k = len(class_names)
  fig = _figure(13, 6.0)
  axes = fig.subplots(1, 2)
  for ax, values, fmt, sub in (
    (axes[0], cm, '{:,}', 'counts'),
    (axes[1], norm, '{:.0%}', 'row-normalised (recall)'),
  ):
    image = ax.imshow(values, cmap='Blues', vmin=0, vmax=max(values.max(), 1e-9))
    threshold = values.max() * 0.55
    for i in range(k):
      for j in range(k):
        ax.text(
          j,
          i,
          fmt.format(values[i, j]),
          ha='center',
          va='center',
          fontsize=9,
          color='white' if values[i, j] > threshold else 'black',
        )
    ax.set_xticks(range(k), class_names, rotation=40, ha='right')
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(sub)
    fig.colorbar(image, ax=ax, shrink=0.8)
  fig.suptitle(title)
  return _save(fig, path)


def default_samples(labels: np.ndarray, num_classes: int) -> list[int]:
  """The first example of every class present: one panel per emotion."""
  return [int(np.flatnonzero(labels == c)[0]) for c in range(num_classes) if np.any(labels == c)]


def sample_predictions(
  split: Split,
  probs: np.ndarray,
  indices: Sequence[int],
  class_names: Sequence[str],
  path: str,
  *,
  title: str,
) -> str:
  """Each sample's face beside its predicted probabilities; the true class is marked."""
  per_row = 2
  n_rows = -(-len(indices) // per_row)
  fig = _figure(12, 2.3 * n_rows + 0.6)
  grid = fig.add_gridspec(n_rows, 2 * per_row, width_ratios=[1, 2.2] * per_row)
  k = len(class_names)
  for n, idx in enumerate(indices):
    r, c = divmod(n, per_row)
    ax_img = fig.add_subplot(grid[r, 2 * c])
    ax_bar = fig.add_subplot(grid[r, 2 * c + 1])
    true, p = int(split.labels[idx]), probs[idx]
    pred = int(np.argmax(p))
    _show_face(ax_img, split.images[idx])
    ax_img.set_title(f'#{idx}', fontsize=9)
    colors = [_OTHER] * k
    colors[pred] = _CORRECT if pred == true else _WRONG
    colors[true] = _CORRECT
    bars = ax_bar.barh(range(k), p, color=colors)
    ax_bar.bar_label(bars, labels=[f'{v:.2f}' for v in p], padding=2, fontsize=8)
    ax_bar.set_yticks(
      range(k),
      [f'{name} (true)' if i == true else name for i, name in enumerate(class_names)],
      fontsize=9,
    )
    ax_bar.get_yticklabels()[true].set_fontweight('bold')
    ax_bar.invert_yaxis()
    ax_bar.set_xlim(0, 1.15)
    ax_bar.set_xticks([0, 0.5, 1])
    ax_bar.spines[['top', 'right']].set_visible(False)
    verdict = 'correct' if pred == true else f'predicted {class_names[pred]}'
    ax_bar.set_title(
      f'true {class_names[true]}: {verdict}',
      fontsize=10,
      color=_CORRECT if pred == true else _WRONG,
    )
  fig.suptitle(title)
  return _save(fig, path)


def most_confident_mistakes(labels: np.ndarray, probs: np.ndarray, count: int) -> np.ndarray:
  """Indices of up to `count` wrong predictions, the most confident first."""
  pred = np.argmax(probs, -1)
  wrong = np.flatnonzero(pred != labels)
  return wrong[np.argsort(-probs[wrong, pred[wrong]], kind='stable')][:count]


def confident_mistakes(
  split: Split,
  probs: np.ndarray,
  class_names: Sequence[str],
  path: str,
  *,
  title: str,
  count: int = 24,
  per_row: int = 6,
) -> str | None:
  """A grid of the most confident mistakes; None when there are none."""
  order = most_confident_mistakes(split.labels, probs, count)
  if not len(order):
    return None
  pred = np.argmax(probs, -1)
  n_rows = -(-len(order) // per_row)
  fig = _figure(1.75 * per_row, 2.05 * n_rows + 0.5)
  axes = fig.subplots(n_rows, per_row, squeeze=False)
  for ax in axes.flat:
    ax.set_axis_off()
  for ax, idx in zip(axes.flat, order):
    ax.set_axis_on()
    _show_face(ax, split.images[idx])
    ax.set_title(
      f'true {class_names[split.labels[idx]]}\npred {class_names[pred[idx]]} '
      f'{probs[idx, pred[idx]]:.2f}',
      fontsize=9,
    )
  fig.suptitle(title)
  return _save(fig, path)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(v) for v in row) + ' |' for row in rows]
  return '\n'.join(lines)


def _per_class_table(report: dict[str, Any], class_names: Sequence[str]) -> str:
  rows = [
    (
      name,
      f'{report["per_class_precision"][i]:.3f}',
      f'{report["per_class_recall"][i]:.3f}',
      f'{report["per_class_f1"][i]:.3f}',
      report['per_class_support'][i],
    )
    for i, name in enumerate(class_names)
  ]
  return _markdown_table(('class', 'precision', 'recall', 'F1', 'support'), rows)


def _eval_files_table(workdir: str) -> str | None:
  """Every evaluation written by fer_jax.evaluate into W/eval/, e.g. with and without TTA."""
  eval_dir = paths.resolve(workdir) / 'eval'
  if not eval_dir.is_dir():
    return None
  rows = []
  for file in sorted(eval_dir.iterdir(), key=lambda p: p.name):
    if file.name.endswith('.json'):
      r = json.loads(file.read_text())
      rows.append(
        (
          r['split'],
          f'{r["checkpoint"]} (step {r["step"]})',
          r['test_time_augmentation'],
          f'{r["accuracy"]:.4f}',
          f'{r["macro_f1"]:.4f}',
          r['num_examples'],
        )
      )
  if not rows:
    return None
  return _markdown_table(('split', 'checkpoint', 'TTA', 'accuracy', 'macro-F1', 'n'), rows)


def dataset_figures(dataset: Dataset, out_dir: str, *, seed: int = 0) -> dict[str, str]:
  """The figures that need no model: {'class_distribution': path, 'examples': path}."""
  first_name = 'Training' if 'Training' in dataset.splits else next(iter(dataset.splits))
  first = dataset[first_name]
  return {
    'class_distribution': class_distribution(
      dataset, os.path.join(out_dir, 'class_distribution.png')
    ),
    'examples': example_faces(
      first,
      dataset.class_names,
      os.path.join(out_dir, 'examples.png'),
      seed=seed,
      title=f'Example faces per emotion ({first_name})',
    ),
  }


def build_dataset_report(dataset: Dataset, source: str, out_dir: str) -> str:
  """Dataset-only figures and index.md; returns the index path."""
  paths.resolve(out_dir).mkdir(parents=True, exist_ok=True)
  figs = dataset_figures(dataset, out_dir)
  counts = [
    (name, *np.bincount(s.labels, minlength=dataset.num_classes).tolist(), len(s))
    for name, s in dataset.splits.items()
  ]
  lines = [
    '# Dataset report',
    '',
    f'Data: {source}',
    '',
    _markdown_table(('split', *dataset.class_names, 'total'), counts),
    '',
    *_dataset_sections(figs, out_dir),
  ]
  return _write_index(out_dir, lines)


def build_report(
  trained,
  out_dir: str,
  *,
  split: str = 'PrivateTest',
  tta: str = 'none',
  data_path: str = '',
  samples: Sequence[int] = (),
  num_mistakes: int = 24,
) -> str:
  """All figures for a trained workdir and its index.md; returns the index path."""
  from fer_jax import evaluation
  from fer_jax.data.datasets import load_dataset_or_path

  paths.resolve(out_dir).mkdir(parents=True, exist_ok=True)
  dataset, source = load_dataset_or_path(
    trained.config.data,
    image_size=trained.image_size,
    data_size=trained.data_size,
    data_path=data_path,
  )
  if len(dataset.splits) == 1:
    split = next(iter(dataset.splits))
  if split not in dataset.splits:
    from fer_jax.errors import ConfigError

    raise ConfigError(f'split {split!r} not in the dataset (it has {sorted(dataset.splits)})')
  names = trained.class_names
  figs = dataset_figures(dataset, out_dir)

  records = read_metrics(trained.workdir)
  results = _read_json(os.path.join(trained.workdir, 'results.json'))
  spe = _steps_per_epoch(records)
  mark = 'best checkpoint' if trained.checkpoint == 'best' else f'checkpoint {trained.checkpoint}'
  curves = training_curves(
    records,
    os.path.join(out_dir, 'training_curves.png'),
    eval_split=trained.config.data.eval_split,
    mark_step=trained.step,
    mark_label=mark,
    steps_per_epoch=spe,
  )

  data = dataset[split]
  report, probs = evaluation.evaluate_trained(trained, data, tta=tta)
  what = f'{split}, checkpoint {trained.checkpoint} (step {trained.step}), TTA {tta}'
  figs['confusion_matrix'] = confusion_matrix(
    np.asarray(report['confusion_matrix']),
    names,
    os.path.join(out_dir, 'confusion_matrix.png'),
    title=f'Confusion matrix: {what}; accuracy {report["accuracy"]:.1%}',
  )
  indices = list(samples) or default_samples(data.labels, len(names))
  bad = [i for i in indices if not 0 <= i < len(data)]
  if bad:
    from fer_jax.errors import ConfigError

    raise ConfigError(f'samples {bad} are outside {split} (0..{len(data) - 1})')
  figs['samples'] = sample_predictions(
    data,
    probs,
    indices,
    names,
    os.path.join(out_dir, 'sample_predictions.png'),
    title=f'Predicted probabilities: {what}\n(green: the true class; red: a wrong prediction)',
  )
  mistakes = confident_mistakes(
    data,
    probs,
    names,
    os.path.join(out_dir, 'confident_mistakes.png'),
    title=f'Most confident mistakes: {what}',
    count=num_mistakes,
  )

  lines = [
    f'# Report: {trained.workdir}',
    '',
    f'Model `{trained.config.model.name}` at {trained.image_size}x{trained.image_size}; '
    f'data: {source}; checkpoint {trained.checkpoint} (step {trained.step}).',
    '',
    '## Headline numbers',
    '',
    f'**{split}** (test-time augmentation: {tta}): accuracy **{report["accuracy"]:.4f}**, '
    f'macro-F1 **{report["macro_f1"]:.4f}**, loss {report["loss"]:.4f} '
    f'(n={report["num_examples"]:,}).',
    '',
  ]
  if results:
    rows = [
      (name, f'{s["accuracy"]:.4f}', f'{s["macro_f1"]:.4f}', f'{s["loss"]:.4f}')
      for name, s in results.get('splits', {}).items()
    ]
    lines += [
      f'results.json (best checkpoint, step {results.get("best_step")}, '
      f'{results.get("epochs")} epochs, {results.get("wall_s")} s, no TTA):',
      '',
      _markdown_table(('split', 'accuracy', 'macro-F1', 'loss'), rows),
      '',
    ]
  table = _eval_files_table(trained.workdir)
  if table:
    lines += ['Evaluations in `eval/` (`python -m fer_jax.evaluate`):', '', table, '']
  lines += [
    f'Per class on {split}:',
    '',
    _per_class_table(report, names),
    '',
    *_dataset_sections(figs, out_dir),
    '## Training curves',
    '',
  ]
  lines += [
    f'![training curves]({_rel(curves, out_dir)})'
    if curves
    else '(no per-epoch records in metrics.jsonl)',
    '',
  ]
  lines += [
    '## Confusion matrix',
    '',
    f'![confusion matrix]({_rel(figs["confusion_matrix"], out_dir)})',
    '',
    '## Predictions for chosen samples',
    '',
    f'![sample predictions]({_rel(figs["samples"], out_dir)})',
    '',
    '## Most confident mistakes',
    '',
  ]
  lines += [
    f'![confident mistakes]({_rel(mistakes, out_dir)})' if mistakes else '(no mistakes)',
    '',
  ]
  return _write_index(out_dir, lines)


def _steps_per_epoch(records: Sequence[dict[str, Any]]) -> float | None:
  """From the 'train' records (written at each epoch's last step, with the integer epoch)."""
  for r in records:
    if r.get('split') == 'train' and r.get('epoch'):
      return r['step'] / r['epoch']
  return None


def _read_json(path: str) -> dict[str, Any] | None:
  if not paths.resolve(path).is_file():
    return None
  return paths.read_json(path)


def _rel(path: str, out_dir: str) -> str:
  return os.path.relpath(path, out_dir)


def _dataset_sections(figs: dict[str, str], out_dir: str) -> list[str]:
  """The class-distribution and example-faces sections of both reports' index.md."""
  return [
    '## Class distribution',
    '',
    f'![class distribution]({_rel(figs["class_distribution"], out_dir)})',
    '',
    '## Example faces',
    '',
    f'![examples]({_rel(figs["examples"], out_dir)})',
    '',
  ]


def _write_index(out_dir: str, lines: Sequence[str]) -> str:
  path = os.path.join(out_dir, 'index.md')
  paths.write_text(path, '\n'.join(lines))
  return path


def main(argv: list[str]) -> None:
  from absl import app, flags

  from fer_jax import logs, trained_model
  from fer_jax.errors import FerJaxError

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  config = _CONFIG.value
  if bool(f.workdir) == (config is not None):
    raise app.UsageError(
      'give --workdir (a trained run) or --config (a dataset alone, before '
      'training), not both; --data_path points a workdir at moved data'
    )
  logs.quiet_library_logs()
  try:
    samples = [int(s) for s in f.samples]
  except ValueError:
    raise app.UsageError(f'--samples must be example indices, got {f.samples}') from None
  try:
    if f.workdir:
      trained = trained_model.load(f.workdir, f.checkpoint)
      out_dir = f.out_dir or os.path.join(trained.workdir, 'report')
      index = build_report(
        trained,
        out_dir,
        split=f.split,
        tta=f.tta,
        data_path=f.data_path,
        samples=samples,
        num_mistakes=f.num_mistakes,
      )
    else:
      if not f.out_dir:
        raise app.UsageError('--out_dir is required with --config')
      from fer_jax.data.datasets import load_dataset_or_path

      size = int(config.model.image_size)
      dataset, source = load_dataset_or_path(
        config.data,
        image_size=size,
        data_size=size if config.data.source == 'folders' else 48,
        data_path=f.data_path,
      )
      index = build_dataset_report(dataset, source, f.out_dir)
  except FerJaxError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  out = paths.resolve(os.path.dirname(index))
  pngs = sorted(p.name for p in out.iterdir() if p.name.endswith('.png'))
  print(f'wrote {index} and {", ".join(pngs)}')


_CONFIG = None


def _define_flags() -> None:
  global _CONFIG
  from absl import flags
  from ml_collections import config_flags

  from fer_jax.evaluation import TTA_MODES

  _CONFIG = config_flags.DEFINE_config_file(
    'config',
    None,
    'Dataset-only report: an experiment config (overrides as --config.data.path=...).',
    lock_config=True,
  )
  flags.DEFINE_string('workdir', None, 'A trained workdir; figures go into W/report/.')
  flags.DEFINE_string('out_dir', '', 'Where the figures and index.md go (default W/report).')
  flags.DEFINE_string(
    'data_path',
    '',
    'Other data than the configured one: a FER2013 CSV, a Kaggle '
    'image-folder root, or one folder of emotion folders.',
  )
  flags.DEFINE_string('split', 'PrivateTest', 'The split for the confusion matrix and the samples.')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a step.")
  flags.DEFINE_enum('tta', 'none', TTA_MODES, 'Test-time augmentation for the predictions.')
  flags.DEFINE_list(
    'samples',
    [],
    'Indices (in --split) for the probability plot; default: the first example of each emotion.',
  )
  flags.DEFINE_integer('num_mistakes', 24, 'How many confident mistakes to show.')


if __name__ == '__main__':
  from absl import app

  _define_flags()
  app.run(main)
