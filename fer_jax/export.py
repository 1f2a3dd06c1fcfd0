"""Export a trained workdir as one self-contained model file: ONNX or serialized StableHLO.

  python -m fer_jax.export --workdir W [--checkpoint best] --format onnx|stablehlo --out PATH
      [--input_dtype uint8|float32]

Why: so the model runs without fer_jax, JAX or the checkpoint: in onnxruntime (Python, C++,
the browser's ONNX Runtime Web, phones) or in any XLA runtime.

The input contract (both formats): a batch of grayscale face crops, shape (N, S, S, 1), NHWC,
with pixel values 0..255, uint8 by default (`--input_dtype float32`: the same values as
float32); N is dynamic, S is the training images' side (48 for FER2013). The output is float32
(N, K) class probabilities (softmax). Everything the model was trained with happens inside the
graph: the centre crop and resize to the model's input, the standardization (per image, or the
training set's mean and std), BatchNorm with its running averages (eval mode). Cropping the
face out of a photo is the caller's job (fer_jax.predict does it: Haar box + margin, grayscale,
resized to S x S).

Metadata (class names, S, the model, checkpoint step, accuracy, the preprocessing) travels in
the ONNX file's metadata_props under the key 'fer_jax' (a JSON string, readable with
onnxruntime's `get_modelmeta().custom_metadata_map`), and for StableHLO in `PATH.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fer_jax import predict
from fer_jax.errors import FerJaxError

FORMATS = ('onnx', 'stablehlo')
INPUT_DTYPES = ('uint8', 'float32')
METADATA_KEY = predict.ONNX_METADATA_KEY
# jax2onnx is pre-1.0; the version the export was tested with (see pyproject.toml's 'serve').
JAX2ONNX_TESTED = '0.12.5'
ONNX_OPSET = 21  # onnxruntime 1.20+ (and its Web build) run it


def load_trained(workdir: str, checkpoint: str | int = 'best') -> Any:
  """The workdir's checkpoint on the first device (fer_jax's only use of the workdir loader)."""
  from fer_jax import trained_model

  return trained_model.load(
    workdir, checkpoint, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
  )


def metadata(trained: Any, input_dtype: str = 'uint8') -> dict[str, Any]:
  """What a runtime needs beside the graph: classes, input contract, provenance."""
  aug = trained.config.augment
  return {
    'format_version': 1,
    'class_names': list(trained.class_names),
    'input': {
      'shape': ['N', trained.data_size, trained.data_size, 1],
      'layout': 'NHWC',
      'dtype': input_dtype,
      'range': [0, 255],
      'color': 'grayscale',
      'what': 'face crops: the detector box grown by a margin on every side, '
      'squared, resized to the side above',
    },
    'output': {
      'shape': ['N', len(trained.class_names)],
      'dtype': 'float32',
      'what': 'class probabilities (softmax)',
    },
    'face_size': trained.data_size,
    'model_input_size': trained.image_size,
    'preprocessing_in_graph': {
      'crop_fraction': float(aug.get('crop_fraction', 0.0)),
      'resize_to': trained.image_size,
      'standardize': str(aug.standardize),
      'pixel_mean': trained.pixel_mean,
      'pixel_std': trained.pixel_std,
    },
    'model': str(trained.config.model.name),
    'checkpoint': trained.checkpoint,
    'checkpoint_step': int(trained.step),
    'workdir': os.path.basename(trained.workdir.rstrip(os.sep)),
    'accuracy': predict.read_accuracy(trained.workdir),
  }


def inference_fn(trained: Any, input_dtype: str = 'uint8') -> Callable[[jax.Array], jax.Array]:
  """images (N, S, S, 1) -> float32 (N, K) probabilities, the weights baked in as constants.

  The model is rebuilt with the 'xla' lowering: the CPU lowerings ('native' calls C++ kernels
  through the XLA FFI, 'dot' an im2col with a hand-written gradient) compute the same numbers
  but only 'xla' is made of standard operations every runtime has.
  """
  from fer_jax import evaluation

  if input_dtype not in INPUT_DTYPES:
    raise FerJaxError(f'input_dtype={input_dtype!r}: expected one of {INPUT_DTYPES}')
  model = trained.model
  if 'lowering' in {f.name for f in dataclasses.fields(model)}:
    model = model.clone(lowering='xla')
  probs = evaluation.probabilities_fn(dataclasses.replace(trained, model=model), 'none')
  variables = trained.variables

  def fn(images: jax.Array) -> jax.Array:
    if input_dtype == 'float32':  # documented as 0..255: clip and round as a uint8 would be
      images = jnp.clip(jnp.round(images), 0, 255)
    return probs(variables, images)

  return fn


def input_spec(trained: Any, input_dtype: str, batch: Any = 'N') -> jax.ShapeDtypeStruct:
  s = trained.data_size
  return jax.ShapeDtypeStruct((batch, s, s, 1), jnp.dtype(input_dtype))


def to_onnx(trained: Any, out: str, *, input_dtype: str = 'uint8') -> dict[str, Any]:
  """Writes the ONNX model to `out`; returns its metadata. FerJaxError names an unsupported op."""
  try:
    import jax2onnx
    import onnx
  except ImportError:
    raise FerJaxError('ONNX export needs jax2onnx and onnx: pip install "fer_jax[serve]"') from None
  meta = metadata(trained, input_dtype)
  model = convert_to_onnx(
    inference_fn(trained, input_dtype),
    [input_spec(trained, input_dtype)],
    name=f'fer_jax_{meta["model"]}',
    jax2onnx=jax2onnx,
  )
  model.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
  model.doc_string = (
    'fer_jax facial-expression classifier: uint8/float32 grayscale faces '
    '(N, S, S, 1) in 0..255 -> (N, K) probabilities; see metadata "fer_jax".'
  )
  onnx.checker.check_model(model)
  _atomic_write(out, model.SerializeToString())
  return meta


def convert_to_onnx(
  fn: Callable[..., Any], inputs: list[Any], *, name: str, jax2onnx: Any = None
) -> Any:
  """jax2onnx's conversion with input 'images' and output 'probabilities'; an operation it
  cannot convert becomes one FerJaxError naming it."""
  if jax2onnx is None:
    import jax2onnx
  try:
    with _quiet_converter():
      model = jax2onnx.to_onnx(
        fn,
        inputs,
        model_name=name,
        opset=ONNX_OPSET,
        input_names=['images'],
        output_names=['probabilities'],
      )
  except NotImplementedError as e:
    raise FerJaxError(
      f'ONNX export: {_unsupported_op(e)} (jax2onnx '
      f'{getattr(jax2onnx, "__version__", "?")}, tested with {JAX2ONNX_TESTED})'
    ) from None
  # jax2onnx annotates some BatchNorm activations with NCHW shapes where the values are NHWC;
  # onnxruntime infers every intermediate shape itself, so the annotations go.
  del model.graph.value_info[:]
  return model


@contextlib.contextmanager
def _quiet_converter():
  """jax2onnx logs (with tracebacks) its plugins for other libraries that fail to import under
  this JAX, onnx_ir warns about untyped shape constants, it logs its arguments on the root
  logger, and one plugin prints: none of it concerns the export, so it is hidden; errors
  still raise."""
  loggers = [logging.getLogger(n) for n in ('jax2onnx', 'onnx_ir', None)]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def _unsupported_op(e: Exception) -> str:
  """jax2onnx's 'No plugins registered for [op]'-style message as one line."""
  text = ' '.join(str(e).split())
  return text[:300] if text else f'an operation jax2onnx cannot convert ({type(e).__name__})'


def to_stablehlo(trained: Any, out: str, *, input_dtype: str = 'uint8') -> dict[str, Any]:
  """Writes `jax.export`'s serialized artifact to `out` and its metadata to `out + '.json'`.

  Reload with `jax.export.deserialize(open(out, 'rb').read()).call(images)`. The batch is a
  symbolic dimension; the artifact runs on CPU and, where XLA has them, GPU and TPU.
  """
  meta = metadata(trained, input_dtype)
  (batch,) = jax.export.symbolic_shape('N')
  platforms = ['cpu', 'cuda', 'tpu']
  exported = jax.export.export(jax.jit(inference_fn(trained, input_dtype)), platforms=platforms)(
    input_spec(trained, input_dtype, batch)
  )
  meta['platforms'] = platforms
  _atomic_write(out, exported.serialize())
  _atomic_write(out + '.json', json.dumps(meta, indent=1).encode())
  return meta


def _atomic_write(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FerJaxError(f'--out {path}: the folder {directory} does not exist')
  with open(path + '.tmp', 'wb') as f:
    f.write(data)
  os.replace(path + '.tmp', path)


def export(
  workdir: str,
  out: str,
  *,
  fmt: str = 'onnx',
  checkpoint: str | int = 'best',
  input_dtype: str = 'uint8',
) -> dict[str, Any]:
  """Exports `workdir`'s checkpoint to `out` in `fmt` ('onnx' or 'stablehlo'); the metadata."""
  if fmt not in FORMATS:
    raise FerJaxError(f'format={fmt!r}: expected one of {FORMATS}')
  if input_dtype not in INPUT_DTYPES:
    raise FerJaxError(f'input_dtype={input_dtype!r}: expected one of {INPUT_DTYPES}')
  trained = load_trained(workdir, checkpoint)
  writer = to_onnx if fmt == 'onnx' else to_stablehlo
  return writer(trained, out, input_dtype=input_dtype)


def main(argv: list[str]) -> None:
  from absl import app, flags

  from fer_jax import logs

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}', exitcode=2)
  f = flags.FLAGS
  logs.quiet_library_logs()
  try:
    meta = export(
      f.workdir, f.out, fmt=f.format, checkpoint=f.checkpoint, input_dtype=f.input_dtype
    )
  except FerJaxError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  size = os.path.getsize(f.out)
  print(
    f'wrote {f.out} ({size / 1e6:.2f} MB, {f.format}): {meta["model"]} step '
    f'{meta["checkpoint_step"]}, input {f.input_dtype} (N, {meta["face_size"]}, '
    f'{meta["face_size"]}, 1) in 0..255, classes {", ".join(meta["class_names"])}'
  )


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string('workdir', None, 'A trained workdir (holds checkpoints/).', required=True)
  flags.DEFINE_string('checkpoint', 'best', "'best' (PublicTest accuracy), 'latest' or a step.")
  flags.DEFINE_enum('format', 'onnx', FORMATS, 'onnx (jax2onnx) or stablehlo (jax.export).')
  flags.DEFINE_string('out', None, 'The file to write (e.g. model.onnx).', required=True)
  flags.DEFINE_enum('input_dtype', 'uint8', INPUT_DTYPES, 'The input tensor type (values 0..255).')


if __name__ == '__main__':
  from absl import app

  _define_flags()
  app.run(main)
