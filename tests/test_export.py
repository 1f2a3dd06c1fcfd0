"""fer_jax.export: ONNX (onnxruntime) and StableHLO (jax.export.deserialize) artifacts give
fer_jax's probabilities on 256 faces, for SeedCNN and a BatchNorm network; the metadata; an
operation jax2onnx cannot convert is one clear error; predict --model runs without JAX."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ort = pytest.importorskip('onnxruntime')
pytest.importorskip('jax2onnx')

from experiments import synthetic, vgg_fer2013  # noqa: E402
from fer_jax import evaluation, export, predict, train  # noqa: E402
from fer_jax.data.synthetic import render_faces  # noqa: E402
from fer_jax.errors import FerJaxError  # noqa: E402
from tests.conftest import REPO  # noqa: E402

N_IMAGES = 256


@pytest.fixture(scope='session')
def vgg_workdir(tmp_path_factory):
  """A narrow vgg_fer (BatchNorm, 40-px centre crop, dataset standardization), 4 steps."""
  c = vgg_fer2013.get_config()
  c.data = synthetic.get_config().data
  c.data.synthetic_train, c.data.synthetic_test = 64, 40
  c.model.width, c.model.dense = 0.125, (32,)
  c.train.batch_size, c.train.eval_batch_size = 8, 16
  c.train.epochs, c.train.max_steps, c.train.warmup_epochs = 1, 4, 0.0
  c.train.final_tta = ()
  path = tmp_path_factory.mktemp('vgg_export')
  train.train_and_evaluate(c, str(path))
  return path


@pytest.fixture(scope='session')
def exports(trained_workdir, vgg_workdir, tmp_path_factory):
  """{'seed_cnn' | 'vgg_fer': (TrainedModel, onnx path, stablehlo path)}."""
  out = tmp_path_factory.mktemp('exports')
  models = {}
  for name, workdir in (('seed_cnn', trained_workdir), ('vgg_fer', vgg_workdir)):
    trained = export.load_trained(str(workdir))
    onnx_path, hlo_path = str(out / f'{name}.onnx'), str(out / f'{name}.stablehlo')
    export.to_onnx(trained, onnx_path)
    export.to_stablehlo(trained, hlo_path)
    models[name] = (trained, onnx_path, hlo_path)
  return models


@pytest.fixture(scope='session')
def onnx_model(trained_workdir, tmp_path_factory):
  """The shared SeedCNN workdir as ONNX (for the predict and serve tests)."""
  path = str(tmp_path_factory.mktemp('onnx_model') / 'seed_cnn.onnx')
  export.to_onnx(export.load_trained(str(trained_workdir)), path)
  return path


@pytest.fixture(scope='module')
def images():
  return render_faces(np.arange(N_IMAGES) % 7, np.random.default_rng(0))[..., None]


def _reference(trained, images):
  """fer_jax's probabilities, as evaluate and predict compute them (the model's own lowering)."""
  return np.asarray(jax.jit(evaluation.probabilities_fn(trained))(trained.variables, images))


@pytest.mark.parametrize('name', ['seed_cnn', 'vgg_fer'])
def test_onnx_and_stablehlo_match_fer_jax(exports, images, name):
  trained, onnx_path, hlo_path = exports[name]
  expected = _reference(trained, images)
  session = ort.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])
  (batch_dim,) = session.get_inputs()[0].shape[:1]
  assert isinstance(batch_dim, str)  # dynamic batch
  got = session.run(None, {'images': images})[0]
  assert got.shape == expected.shape
  assert np.max(np.abs(got - expected)) <= 1e-4
  np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))
  # A batch of one and of another size through the same file.
  np.testing.assert_allclose(session.run(None, {'images': images[:1]})[0], expected[:1], atol=1e-4)

  with open(hlo_path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  got = np.asarray(exported.call(images))
  assert np.max(np.abs(got - expected)) <= 1e-4
  np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))
  assert np.asarray(exported.call(images[:3])).shape == (3, trained.num_classes)


def test_metadata_describes_the_input_contract(exports):
  trained, onnx_path, hlo_path = exports['vgg_fer']
  session = ort.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])
  meta = json.loads(session.get_modelmeta().custom_metadata_map['fer_jax'])
  with open(hlo_path + '.json') as f:
    assert json.load(f)['class_names'] == meta['class_names']
  assert meta['class_names'] == list(trained.class_names)
  assert meta['input']['dtype'] == 'uint8' and meta['input']['shape'] == ['N', 48, 48, 1]
  assert session.get_inputs()[0].type == 'tensor(uint8)'
  pre = meta['preprocessing_in_graph']
  assert pre['resize_to'] == 40 and pre['standardize'] == 'dataset'
  assert pre['pixel_std'] == pytest.approx(trained.pixel_std)
  assert meta['checkpoint_step'] == trained.step and meta['model'] == 'vgg_fer'
  assert set(meta['accuracy']) == {'PublicTest', 'PrivateTest'}


def test_float_input_gives_the_uint8_probabilities(exports, images, tmp_path):
  trained, onnx_path, _ = exports['vgg_fer']
  path = str(tmp_path / 'float.onnx')
  export.to_onnx(trained, path, input_dtype='float32')
  session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
  assert session.get_inputs()[0].type == 'tensor(float)'
  uint8 = ort.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])
  np.testing.assert_allclose(
    session.run(None, {'images': images[:32].astype(np.float32)})[0],
    uint8.run(None, {'images': images[:32]})[0],
    atol=1e-6,
  )


def test_unconvertible_operation_is_named():
  def fn(x):
    return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

  with pytest.raises(FerJaxError, match='pure_callback'):
    export.convert_to_onnx(fn, [jax.ShapeDtypeStruct(('N', 4), jnp.float32)], name='bad')


def test_bad_arguments_are_one_line_errors(trained_workdir, tmp_path):
  with pytest.raises(FerJaxError, match='format'):
    export.export(str(trained_workdir), str(tmp_path / 'm'), fmt='tflite')
  with pytest.raises(FerJaxError, match='does not exist'):
    export.export(str(trained_workdir), str(tmp_path / 'no' / 'm.onnx'), fmt='stablehlo')
  with pytest.raises(FerJaxError, match='not found'):
    export.export(str(tmp_path / 'missing'), str(tmp_path / 'm.onnx'))


def test_cli_writes_stablehlo(trained_workdir, tmp_path):
  out = tmp_path / 'model.stablehlo'
  run = subprocess.run(
    [
      sys.executable,
      '-m',
      'fer_jax.export',
      f'--workdir={trained_workdir}',
      '--format=stablehlo',
      f'--out={out}',
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    env={**os.environ, 'PYTHONPATH': str(REPO)},
    timeout=300,
  )
  assert run.returncode == 0, run.stderr
  assert 'wrote' in run.stdout and out.stat().st_size > 10_000
  assert json.loads((tmp_path / 'model.stablehlo.json').read_text())['model'] == 'seed_cnn'


def test_predictor_on_onnx_equals_the_workdir(trained_workdir, onnx_model):
  from skimage import data

  by_jax = predict.Predictor(str(trained_workdir)).predict_image(data.astronaut())
  by_onnx = predict.Predictor(model=onnx_model).predict_image(data.astronaut())
  assert len(by_onnx) == 1 and by_onnx[0]['box'] == by_jax[0]['box']
  assert by_onnx[0]['emotion'] == by_jax[0]['emotion']
  for name, p in by_jax[0]['probabilities'].items():
    assert by_onnx[0]['probabilities'][name] == pytest.approx(p, abs=2e-4)  # 4-decimal JSON
  with pytest.raises(FerJaxError, match='single view'):
    predict.Predictor(model=onnx_model, tta='flip')
  with pytest.raises(FerJaxError, match='not both'):
    predict.Predictor(str(trained_workdir), model=onnx_model)


def test_predict_model_never_imports_jax(onnx_model, tmp_path):
  from PIL import Image
  from skimage import data

  photo = tmp_path / 'astronaut.jpg'
  Image.fromarray(data.astronaut()).save(photo)
  script = (
    'import sys, time\n'
    't = time.perf_counter()\n'
    'from fer_jax import predict\n'
    f'p = predict.Predictor(model={onnx_model!r})\n'
    f'faces = p.predict_image(predict.read_image({str(photo)!r}))\n'
    'print(time.perf_counter() - t, len(faces), "jax" in sys.modules, "jaxlib" in sys.modules)\n'
    'sys.argv = ["predict", "--model", ' + repr(onnx_model) + ', ' + repr(str(photo)) + ']\n'
    'from absl import app\n'
    'predict._define_flags()\n'
    'try:\n'
    '  app.run(predict.main)\n'
    'finally:\n'
    '  print("jax" in sys.modules)\n'
  )
  run = subprocess.run(
    [sys.executable, '-c', script],
    capture_output=True,
    text=True,
    cwd=REPO,
    env={**os.environ, 'PYTHONPATH': str(REPO)},
    timeout=120,
  )
  assert run.returncode == 0, run.stderr
  first, record, last = run.stdout.strip().splitlines()
  seconds, n_faces, jax_loaded, jaxlib_loaded = first.split()
  assert (n_faces, jax_loaded, jaxlib_loaded, last) == ('1', 'False', 'False', 'False')
  # Imports, the ONNX session, the Haar cascade and one photo: ~0.3 s on an idle core.
  assert float(seconds) < 3.0
  assert len(json.loads(record)['faces']) == 1


def test_predict_repeats_evaluates_tta_modes():
  assert predict.TTA_MODES == evaluation.TTA_MODES
