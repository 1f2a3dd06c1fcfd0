"""fer_jax.predict: faces in a real photo, synthetic faces, bad files, videos, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import require  # noqa: E402

cv2 = require('cv2')
skimage_data = require('skimage.data')

from fer_jax import evaluation, predict  # noqa: E402
from fer_jax.data.synthetic import render_faces  # noqa: E402
from fer_jax.data.types import Split  # noqa: E402
from tests.conftest import REPO  # noqa: E402

# Eileen Collins' face in skimage.data.astronaut() (x, y, w, h), as drawn by hand.
ASTRONAUT_FACE = (175, 60, 100, 105)


@pytest.fixture(scope='module')
def predictor(trained_workdir):
  return predict.Predictor(str(trained_workdir))


@pytest.fixture(scope='module')
def faces():
  return render_faces(np.arange(7), np.random.default_rng(1))


def _iou(a, b):
  ax, ay, aw, ah = a
  bx, by, bw, bh = b
  w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
  h = max(0, min(ay + ah, by + bh) - max(ay, by))
  return w * h / (aw * ah + bw * bh - w * h)


def test_astronaut_has_one_face(predictor):
  found = predictor.predict_image(skimage_data.astronaut())
  assert len(found) == 1
  face = found[0]
  assert _iou(face['box'], ASTRONAUT_FACE) > 0.6
  assert list(face['probabilities']) == list(predictor.class_names)
  assert sum(face['probabilities'].values()) == pytest.approx(1.0, abs=1e-3)
  assert face['emotion'] == max(face['probabilities'], key=face['probabilities'].get)
  # The same photo in grayscale finds the same face.
  gray = predict.to_gray(skimage_data.astronaut())
  assert predictor.predict_image(gray)[0]['box'] == face['box']


def test_whole_image_faces_match_the_evaluation_path(trained_workdir, predictor, faces):
  whole = predict.Predictor(str(trained_workdir), detector='none')
  got = np.array(
    [
      [f['probabilities'][n] for n in whole.class_names]
      for image in faces
      for f in whole.predict_image(image)
    ]
  )
  split = Split(images=faces[..., None], labels=np.arange(7, dtype=np.int32))
  _, expected = evaluation.evaluate_trained(predictor.trained, split, batch_size=8)
  np.testing.assert_allclose(got, expected, atol=1e-4)  # JSON rounds to 4 decimals


def test_no_face_is_reported_and_whole_image_fallback(trained_workdir, predictor):
  blank = np.full((120, 160, 3), 128, np.uint8)
  assert predictor.predict_image(blank) == []
  fallback = predict.Predictor(str(trained_workdir), whole_image_fallback=True)
  (face,) = fallback.predict_image(blank)
  assert face['box'] == [0, 0, 160, 120] and face['whole_image'] is True


def test_pluggable_detector_and_one_device_call_per_group(trained_workdir, faces, tmp_path):
  boxes = np.array([[2, 2, 20, 20], [20, 20, 28, 28]])
  p = predict.Predictor(str(trained_workdir), detector=lambda gray: boxes)
  calls = []
  jitted = p._fn
  p._fn = lambda params, batch: calls.append(batch.shape) or jitted(params, batch)
  paths = []
  for i, image in enumerate(faces[:3]):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(image).save(paths[-1])
  records = list(p.predict_paths(paths))
  assert [len(r['faces']) for r in records] == [2, 2, 2]
  assert [f['box'] for f in records[0]['faces']] == boxes.tolist()
  assert calls == [(8, 48, 48, 1)]  # six faces of three images, padded to 8, in one call


def test_crop_face_margin_and_edges():
  gray = np.arange(100 * 100, dtype=np.int64).reshape(100, 100) % 251
  gray = gray.astype(np.uint8)
  exact = predict.crop_face(gray, (10, 20, 48, 48), margin=0.0, size=48)
  np.testing.assert_array_equal(exact, gray[20:68, 10:58])
  # A box at the corner with a margin reaches outside: the edge pixels repeat.
  corner = predict.crop_face(gray, (0, 0, 24, 24), margin=0.5, size=48)
  assert corner.shape == (48, 48)
  np.testing.assert_array_equal(corner[:12, :12], np.full((12, 12), gray[0, 0]))
  np.testing.assert_array_equal(corner[12:, 12:], gray[:36, :36])


def test_video_frames(predictor, tmp_path):
  path = str(tmp_path / 'clip.avi')
  frame = cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR)
  writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'MJPG'), 5.0, (512, 512))
  for _ in range(5):
    writer.write(frame)
  writer.release()
  records = list(predictor.predict_paths([path], frame_step=2))
  assert [r['frame'] for r in records] == [0, 2, 4]
  assert [r['time_s'] for r in records] == [0.0, 0.4, 0.8]
  assert all(
    len(r['faces']) == 1 and _iou(r['faces'][0]['box'], ASTRONAUT_FACE) > 0.6 for r in records
  )


def test_cli_mixed_inputs(trained_workdir, faces, tmp_path):
  photos = tmp_path / 'photos'
  (photos / 'synthetic').mkdir(parents=True)
  Image.fromarray(skimage_data.astronaut()).save(photos / 'astronaut.jpg')
  for i in range(2):
    Image.fromarray(faces[i]).save(photos / 'synthetic' / f'face{i}.png')
  (photos / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 40)
  (photos / 'README').write_text('not an image, skipped inside folders')
  notes = tmp_path / 'notes.txt'
  notes.write_text('not an image, named explicitly')
  ann = tmp_path / 'annotated'
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'fer_jax.predict',
      f'--workdir={trained_workdir}',
      '--whole_image',
      f'--annotate_dir={ann}',
      str(photos),
      str(notes),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ),
  )
  assert out.returncode == 1, out.stderr[-3000:]  # two inputs failed, the rest ran
  errors = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 2
  assert 'broken.png' in errors[0] and 'notes.txt' in errors[1]
  records = [json.loads(l) for l in out.stdout.splitlines()]
  assert [os.path.basename(r['path']) for r in records] == [
    'astronaut.jpg',
    'face0.png',
    'face1.png',
  ]
  assert len(records[0]['faces']) == 1 and 'whole_image' not in records[0]['faces'][0]
  # Each synthetic face is either detected, or (--whole_image) classified as the whole image.
  detector = predict.HaarDetector()
  for record, face in zip(records[1:], faces):
    assert len(record['faces']) == 1
    assert record['faces'][0].get('whole_image', False) == (len(detector(face)) == 0)
  assert sorted(os.listdir(ann)) == ['astronaut.jpg', 'face0.png', 'face1.png']
  annotated = np.asarray(Image.open(ann / 'astronaut.jpg'))
  x, y, w, h = records[0]['faces'][0]['box']
  assert annotated[y + h // 2, x, 1] > 180 and annotated[y + h // 2, x, 0] < 80  # green box edge


def test_bad_workdir_exits_2(tmp_path):
  out = subprocess.run(
    [sys.executable, '-m', 'fer_jax.predict', f'--workdir={tmp_path}', 'x.png'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 2
  assert 'has no checkpoints/' in out.stderr and 'Traceback' not in out.stderr


def test_predictor_is_exported_lazily():
  code = (
    'import sys, fer_jax; assert "jax" not in sys.modules; '
    'P = fer_jax.Predictor; assert P.__module__ == "fer_jax.predict"; print("ok")'
  )
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert out.stdout.strip() == 'ok', out.stderr[-2000:]
