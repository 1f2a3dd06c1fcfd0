"""fer_jax.report: every figure is written and listed, metrics.jsonl parsing, both CLI modes."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from fer_jax import report, trained_model
from tests.conftest import REPO

WORKDIR_FIGURES = [
  'class_distribution.png',
  'confident_mistakes.png',
  'confusion_matrix.png',
  'examples.png',
  'sample_predictions.png',
  'training_curves.png',
]


def _png_size(path):
  with Image.open(path) as img:
    assert img.format == 'PNG'
    return img.size


def test_workdir_report(trained_workdir, tmp_path):
  trained = trained_model.load(str(trained_workdir))
  out = tmp_path / 'report'
  index = report.build_report(trained, str(out), split='PrivateTest', samples=[5, 0, 99])
  assert sorted(n for n in os.listdir(out) if n.endswith('.png')) == WORKDIR_FIGURES
  for name in WORKDIR_FIGURES:
    width, height = _png_size(out / name)
    assert width >= 600 and height >= 300, (name, width, height)
  text = open(index).read()
  for name in WORKDIR_FIGURES:
    assert f']({name})' in text
  results = json.loads((trained_workdir / 'results.json').read_text())
  # The report's own evaluation (no TTA) agrees with the training run's.
  assert f'accuracy **{results["splits"]["PrivateTest"]["accuracy"]:.4f}**' in text
  assert 'test-time augmentation: none' in text and '| surprise |' in text
  assert not os.path.exists(trained_workdir / 'report')  # --out_dir elsewhere: workdir untouched


def test_read_metrics_keeps_the_last_record_per_step(tmp_path):
  lines = [
    {'step': 12, 'split': 'train', 'epoch': 1, 'loss': 2.0, 'accuracy': 0.1},
    {'step': 12, 'split': 'PublicTest', 'epoch': 1.0, 'loss': 1.9, 'accuracy': 0.2},
    {'step': 12, 'split': 'train', 'epoch': 1, 'loss': 1.5, 'accuracy': 0.3},
  ]  # resumed
  text = '\n'.join(json.dumps(l) for l in lines) + '\n{"step": 24, "split": "tr'  # cut short
  (tmp_path / 'metrics.jsonl').write_text(text)
  records = report.read_metrics(str(tmp_path))
  assert [(r['split'], r['loss']) for r in records] == [('PublicTest', 1.9), ('train', 1.5)]
  assert report._steps_per_epoch(records) == 12
  assert report.training_curves([], str(tmp_path / 'x.png')) is None
  assert report.training_curves(
    records, str(tmp_path / 'c.png'), mark_step=12, steps_per_epoch=12
  ) == str(tmp_path / 'c.png')


def test_confident_mistakes_are_the_most_confident_wrong_ones(tmp_path):
  from fer_jax.data.types import Split

  labels = np.array([0, 1, 2, 3], np.int32)
  probs = np.array([[0.9, 0.1, 0, 0], [0.8, 0.2, 0, 0], [0.3, 0.7, 0, 0], [0, 0, 0, 1.0]])
  assert report.most_confident_mistakes(labels, probs, 5).tolist() == [1, 2]
  split = Split(images=np.zeros((4, 48, 48, 1), np.uint8), labels=labels)
  names = ('a', 'b', 'c', 'd')
  assert report.confident_mistakes(split, probs, names, str(tmp_path / 'm.png'), title='t')
  right = np.eye(4)
  assert report.confident_mistakes(split, right, names, str(tmp_path / 'n.png'), title='t') is None


def test_dataset_only_cli(tmp_path):
  out = tmp_path / 'dataset_report'
  run = subprocess.run(
    [
      sys.executable,
      '-m',
      'fer_jax.report',
      '--config=experiments/synthetic.py',
      '--config.data.synthetic_train=70',
      '--config.data.synthetic_test=14',
      f'--out_dir={out}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ),
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert sorted(os.listdir(out)) == ['class_distribution.png', 'examples.png', 'index.md']
  text = (out / 'index.md').read_text()
  assert '| Training | 10 | 4 | 10 | 15 | 11 | 8 | 12 | 70 |' in text  # per-class counts


def test_cli_needs_exactly_one_of_workdir_and_config(trained_workdir, tmp_path):
  both = subprocess.run(
    [
      sys.executable,
      '-m',
      'fer_jax.report',
      f'--workdir={trained_workdir}',
      '--config=experiments/synthetic.py',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  neither = subprocess.run(
    [sys.executable, '-m', 'fer_jax.report'], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  for run in (both, neither):
    assert run.returncode != 0 and 'not both' in run.stderr and 'Traceback' not in run.stderr
