"""fer_jax.evaluate: exact metrics, TTA views on the device, image folders, the CLI."""

import functools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from experiments import cpu_budget
from fer_jax import evaluate, evaluation, models, trained_model
from fer_jax.data.types import FER2013_CLASSES
from fer_jax.errors import ConfigError, FerJaxError
from tests.conftest import REPO


@pytest.fixture(scope='module')
def trained(trained_workdir):
  return trained_model.load(str(trained_workdir), 'best')


@pytest.fixture(scope='module')
def private_test(trained):
  return evaluate.load_eval_split(trained, 'PrivateTest')[1]


def _probs_fn(trained, tta):
  return functools.partial(evaluation.probabilities, evaluation.spec_for(trained, tta))


def test_tta_views_geometry():
  ch, cw, views = evaluation.tta_views('tencrop', 48, 48, 42 / 48)
  assert (ch, cw) == (42, 42)
  assert len({tuple(v) for v in views}) == 10
  assert {(y, x) for y, x, _ in views} == {(0, 0), (0, 6), (6, 0), (6, 6), (3, 3)}
  assert sorted(views[:, 2]) == [0] * 5 + [1] * 5
  assert evaluation.padding(48, 48, ch, cw, views) == ((0, 0), (0, 0))
  assert evaluation.tta_views('flip', 48, 48)[2].tolist() == [[0, 0, 0], [0, 0, 1]]
  assert evaluation.tta_views('tencrop', 150, 150, 40 / 48)[:2] == (125, 125)
  # Trained without crops: whole-face views at the same offsets, from the edge-padded image.
  ch, cw, whole = evaluation.tta_views('tencrop', 48, 48)
  assert (ch, cw) == (48, 48) and whole.tolist() == views.tolist()
  assert evaluation.padding(48, 48, ch, cw, whole) == ((3, 3), (3, 3))
  ch, cw, whole = evaluation.tta_views('tencrop', 150, 150)  # 131-px offsets: 0, 9, 19
  assert (ch, cw) == (150, 150) and evaluation.padding(150, 150, ch, cw, whole) == ((9, 10),) * 2
  with pytest.raises(ConfigError, match='tta'):
    evaluation.tta_views('fivecrop', 48, 48)


_FIGURES = ('accuracy', 'macro_f1', 'loss', 'per_class_accuracy', 'confusion_matrix')


def test_none_equals_the_training_loops_evaluation(trained, trained_workdir):
  results = json.loads((trained_workdir / 'results.json').read_text())
  assert trained.step == results['best_step']
  for split in ('PublicTest', 'PrivateTest'):
    report, probs, data = evaluate.evaluate(trained, split=split, tta='none')
    expected = results['splits'][split]
    # One evaluation function: the figures are equal, not close (the loss included).
    assert {k: report[k] for k in _FIGURES} == expected
    assert probs.shape == (len(data), 7)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert report['test_time_augmentation'] == 'none' and report['tta_views'] == 1
  # Another batch size sums in another order: the same counts, the loss within rounding.
  other, _, _ = evaluate.evaluate(trained, split='PrivateTest', tta='none', batch_size=24)
  assert other['confusion_matrix'] == results['splits']['PrivateTest']['confusion_matrix']
  assert other['loss'] == pytest.approx(results['splits']['PrivateTest']['loss'], rel=1e-5)


def test_cli_private_test_equals_the_training_runs_figures(trained_workdir, tmp_path):
  work = tmp_path / 'w'
  shutil.copytree(trained_workdir, work)
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'fer_jax.evaluate',
      f'--workdir={work}',
      '--split',
      'PrivateTest',
      '--tta',
      'none',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ),
  )
  assert out.returncode == 0, out.stderr[-3000:]
  saved = json.loads((work / 'eval' / 'PrivateTest_best_none.json').read_text())
  expected = json.loads((work / 'results.json').read_text())['splits']['PrivateTest']
  assert {k: saved[k] for k in _FIGURES} == expected


def test_flip_averages_image_and_mirror(trained, private_test):
  images = private_test.images[:16]
  none = jax.jit(_probs_fn(trained, 'none'))
  flip = jax.jit(_probs_fn(trained, 'flip'))
  expected = (
    np.asarray(none(trained.variables, images))
    + np.asarray(none(trained.variables, images[:, :, ::-1]))
  ) / 2
  np.testing.assert_allclose(np.asarray(flip(trained.variables, images)), expected, atol=1e-6)


def test_tencrop_averages_ten_shifted_whole_faces(trained, private_test):
  # The fixture's model trained on whole faces: its ten views are the face shifted by the ten
  # crops' offsets (+-3 px, edges repeated as the training shifts do) and mirrored, not resized.
  assert not trained.config.augment.get('crop_fraction', 0.0)
  images = private_test.images[:8]
  none = jax.jit(_probs_fn(trained, 'none'))
  tencrop = jax.jit(_probs_fn(trained, 'tencrop'))
  padded = np.pad(images.astype(np.float32), ((0, 0), (3, 3), (3, 3), (0, 0)), mode='edge')
  total = 0
  for top, left in ((0, 0), (0, 6), (6, 0), (6, 6), (3, 3)):
    crop = padded[:, top : top + 48, left : left + 48]
    for view in (crop, crop[:, :, ::-1]):
      total = total + np.asarray(none(trained.variables, view))
  np.testing.assert_allclose(np.asarray(tencrop(trained.variables, images)), total / 10, atol=1e-5)
  # And the views differ: ten-crop is not the plain prediction.
  assert not np.allclose(total / 10, np.asarray(none(trained.variables, images)), atol=1e-4)


def test_tencrop_of_a_crop_trained_model_cuts_its_crops():
  # A crop-trained model (cpu_budget.py's 44 of 48 px): the ten views are its crops at the
  # corners and the centre and their mirrors, neither padded nor resized.
  config = cpu_budget.get_config()
  config.model.width = 0.125
  model = models.get_model(config.model, 7)
  variables = model.init(jax.random.key(0), np.zeros((1, 44, 44, 1), np.float32), train=False)
  spec = evaluation.EvalSpec(model, config.augment, 44, 7, mean=128.0, std=64.0)
  images = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 1), np.uint8)
  tencrop = jax.jit(functools.partial(evaluation.probabilities, replace(spec, tta='tencrop')))
  # The reference applies the model to the views as given (no centre crop of them).
  uncropped = ml_collections.ConfigDict({**config.augment.to_dict(), 'crop_fraction': 0.0})
  whole = replace(spec, augment_cfg=uncropped)
  none = jax.jit(functools.partial(evaluation.probabilities, whole))
  pixels = images.astype(np.float32)
  views = []
  for top, left in ((0, 0), (0, 4), (4, 0), (4, 4), (2, 2)):
    crop = pixels[:, top : top + 44, left : left + 44]
    views += [np.asarray(none(variables, v)) for v in (crop, crop[:, :, ::-1])]
  np.testing.assert_allclose(np.asarray(tencrop(variables, images)), np.mean(views, 0), atol=1e-7)
  assert np.abs(views[0] - views[3]).max() > 1e-5  # the views differ beyond the tolerance


def _write_class_folders(root, split, limit=None):
  for i, (image, label) in enumerate(zip(split.images[:limit], split.labels[:limit])):
    folder = root / FER2013_CLASSES[label].capitalize()
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0]).save(folder / f'{i:04d}.png')


def test_image_folders_give_the_same_numbers(trained, private_test, tmp_path):
  direct, _, _ = evaluate.evaluate(trained, split='PrivateTest', tta='flip')
  _write_class_folders(tmp_path / 'fer' / 'test', private_test)
  # One folder of emotion folders: the folder is the split.
  single, _, data = evaluate.evaluate(trained, tta='flip', data_path=str(tmp_path / 'fer' / 'test'))
  assert single['split'] == 'test' and len(data) == len(private_test)
  assert single['confusion_matrix'] == direct['confusion_matrix']
  assert 'image folder' in single['data']
  # The Kaggle root (train/ and test/): test/ serves as PrivateTest.
  _write_class_folders(tmp_path / 'fer' / 'train', private_test, limit=30)
  root, _, _ = evaluate.evaluate(
    trained, split='PrivateTest', tta='flip', data_path=str(tmp_path / 'fer')
  )
  assert root['confusion_matrix'] == direct['confusion_matrix']


def test_unknown_checkpoint_and_split_are_one_line_errors(trained_workdir, trained):
  with pytest.raises(FerJaxError, match='no checkpoint at step 5; kept steps: 12, 24'):
    trained_model.load(str(trained_workdir), 5)
  with pytest.raises(FerJaxError, match="expected 'best', 'latest' or a step"):
    trained_model.load(str(trained_workdir), 'newest')
  with pytest.raises(FerJaxError, match='not found'):
    trained_model.load(str(trained_workdir / 'nope'))
  with pytest.raises(ConfigError, match="split 'Validation' not in the dataset"):
    evaluate.evaluate(trained, split='Validation')


def test_cli_prints_table_and_writes_json(trained_workdir, tmp_path):
  work = tmp_path / 'w'
  shutil.copytree(trained_workdir, work)
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'fer_jax.evaluate',
      f'--workdir={work}',
      '--tta=tencrop',
      '--checkpoint=latest',
      '--split=PublicTest',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ),
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'test-time augmentation: tencrop (10 views)' in out.stdout
  assert 'macro_f1' in out.stdout and 'surprise' in out.stdout
  saved = json.loads((work / 'eval' / 'PublicTest_latest_tencrop.json').read_text())
  assert saved['test_time_augmentation'] == 'tencrop' and saved['step'] == 24
  assert np.asarray(saved['confusion_matrix']).sum() == saved['num_examples'] == 100
  assert len(saved['per_class_f1']) == 7 and saved['class_names'][3] == 'happy'
  bad = subprocess.run(
    [sys.executable, '-m', 'fer_jax.evaluate', f'--workdir={work}', '--checkpoint=7'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert bad.returncode == 1
  assert 'error:' in bad.stderr and 'step 7' in bad.stderr and 'Traceback' not in bad.stderr
