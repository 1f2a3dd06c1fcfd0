"""An HTTP service (FastAPI + uvicorn) and a web page for a trained model.

  python -m fer_jax.serve --workdir W | --model model.onnx [--host 127.0.0.1] [--port 8000]

Endpoints (every error is a 4xx JSON {"error": "one line"}; the service stays up):
  GET  /                  a web page: upload a photo or use the webcam; boxes and probabilities
  POST /v1/predict        one image, as the raw body (Content-Type image/* or
                          application/octet-stream) or one multipart/form-data file
                          -> {"width", "height", "faces": [{"box", "emotion", "score",
                              "probabilities"}], "note"?}   (fer_jax.predict's JSON)
                          ?whole_image=true classifies the whole image when no face is found
  POST /v1/predict/batch  several multipart files -> {"results": [one record or {"error"} each]}
  GET  /v1/model          classes, input size, checkpoint step, accuracy (results.json), limits
  GET  /healthz           {"status": "ok"}

Why a dynamic batcher: face detection runs in a thread pool, one request per thread, and the
crops of requests that arrive together go through ONE model call; it waits at most
`batch_wait_ms` for more crops, and only while other requests are still being decoded, so a
lone request is not delayed.

Request data never names a file: uploads are parsed in memory (bodies are limited in size,
images in pixels, before decoding). The service binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.resources
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from fer_jax import predict
from fer_jax.errors import DataError, FerJaxError

try:  # module level: FastAPI reads the handlers' annotations (strings here) in this namespace
  from fastapi import FastAPI, Request
  from fastapi.exceptions import RequestValidationError
  from fastapi.responses import HTMLResponse, JSONResponse
  from starlette.exceptions import HTTPException
except ImportError:
  raise FerJaxError(
    'fer_jax.serve needs FastAPI and uvicorn: pip install "fer_jax[serve]"'
  ) from None

RAW_TYPES = ('image/', 'application/octet-stream')


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may carry; larger ones are refused with 413 before any decoding."""

  max_body_bytes: int = 20 * 2**20
  max_pixels: int = 40_000_000
  max_batch_images: int = 32


class RequestError(Exception):
  """A bad request: becomes a `status` JSON response {"error": message}."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


class Batcher:
  """Collects the face crops of concurrent requests into one model call.

  `classify` (uint8 (N, S, S) -> (N, K)) runs in a worker thread, one call at a time. A call
  takes every crop queued by then; while other requests are still decoding (`begin` counted
  them and `submit` or `done` not yet), it waits up to `max_wait_s` for their crops, up to
  `max_faces` crops in all.
  """

  def __init__(
    self,
    classify: Callable[[np.ndarray], np.ndarray],
    *,
    max_wait_s: float = 0.004,
    max_faces: int = 64,
  ):
    self._classify = classify
    self.max_wait_s, self.max_faces = max_wait_s, max_faces
    self._queue: asyncio.Queue | None = None
    self._task: asyncio.Task | None = None
    self._loop: asyncio.AbstractEventLoop | None = None
    self._preparing = 0
    self.calls = 0  # model calls made, for tests and the benchmark

  def begin(self) -> None:
    """A request started decoding: its crops may come soon."""
    self._preparing += 1

  def done(self) -> None:
    """A request counted by `begin` will submit nothing (it failed, or found no face)."""
    self._preparing -= 1

  async def submit(self, crops: np.ndarray) -> np.ndarray:
    """The probabilities of `crops` (uint8 (N, S, S)), computed in a shared model call."""
    self._preparing -= 1
    loop = asyncio.get_running_loop()
    if self._task is None or self._task.done() or self._loop is not loop:
      # Started on the first request's event loop (and again if a test client makes a new one).
      self._queue, self._loop = asyncio.Queue(), loop
      self._task = loop.create_task(self._run())
    future = loop.create_future()
    self._queue.put_nowait((crops, future))
    return await future

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      items = [await self._queue.get()]
      count = len(items[0][0])
      deadline = loop.time() + self.max_wait_s
      while count < self.max_faces:
        if not self._queue.empty():
          items.append(self._queue.get_nowait())
        elif self._preparing > 0 and loop.time() < deadline:
          try:
            items.append(await asyncio.wait_for(self._queue.get(), deadline - loop.time()))
          except TimeoutError:
            break
        else:
          break
        count += len(items[-1][0])
      self.calls += 1
      try:
        probs = await asyncio.to_thread(self._classify, np.concatenate([c for c, _ in items]))
      except Exception as e:  # the requests fail, the batcher goes on
        for _, future in items:
          if not future.done():
            future.set_exception(e)
        continue
      start = 0
      for crops, future in items:
        if not future.done():
          future.set_result(probs[start : start + len(crops)])
        start += len(crops)


def _parse_multipart(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
  """(file name, bytes) of every file part of a multipart/form-data body, in memory."""
  from python_multipart.multipart import MultipartParser, parse_options_header

  _, options = parse_options_header(content_type)
  boundary = options.get(b'boundary')
  if not boundary:
    raise RequestError(400, 'multipart/form-data without a boundary')
  parts: list[dict[str, Any]] = []
  field, value = [], []

  def on_part_begin():
    parts.append({'headers': {}, 'data': []})

  def on_header_end():
    parts[-1]['headers'][b''.join(field).lower()] = b''.join(value).strip()
    field.clear()
    value.clear()

  callbacks = {
    'on_part_begin': on_part_begin,
    'on_header_field': lambda d, s, e: field.append(d[s:e]),
    'on_header_value': lambda d, s, e: value.append(d[s:e]),
    'on_header_end': on_header_end,
    'on_part_data': lambda d, s, e: parts[-1]['data'].append(d[s:e]),
  }
  try:
    parser = MultipartParser(boundary, callbacks)
    parser.write(body)
    parser.finalize()
  except Exception as e:  # python_multipart's errors: malformed bodies
    raise RequestError(400, f'malformed multipart/form-data body ({e})') from None
  files = []
  for part in parts:
    _, disposition = parse_options_header(part['headers'].get(b'content-disposition', b''))
    name = disposition.get(b'filename')
    if name is not None or disposition.get(b'name') in (b'file', b'image', b'files', b'images'):
      label = (name or disposition.get(b'name', b'')).decode('utf-8', 'replace')[:200]
      files.append((label, b''.join(part['data'])))
  return files


async def _read_body(request: Any, limit: int) -> bytes:
  """The request body, refused with 413 as soon as it passes `limit` bytes."""
  declared = request.headers.get('content-length', '')
  too_large = RequestError(413, f'request body larger than the limit of {limit / 2**20:.1f} MiB')
  if declared.isdigit() and int(declared) > limit:
    raise too_large
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise too_large
    chunks.append(chunk)
  return b''.join(chunks)


async def _images_of(request: Any, limits: Limits) -> list[tuple[str, bytes]]:
  """(name, encoded bytes) of the images a request carries (raw body or multipart files)."""
  content_type = request.headers.get('content-type', '').strip()
  kind = content_type.split(';')[0].strip().lower()
  if kind and not kind.startswith(RAW_TYPES) and kind != 'multipart/form-data':
    raise RequestError(
      415,
      f'content type {kind!r} is not accepted: send the image as the '
      'body (image/jpeg, image/png, ..., application/octet-stream) or as '
      'multipart/form-data files',
    )
  body = await _read_body(request, limits.max_body_bytes)
  if kind != 'multipart/form-data':
    return [('image', body)]
  files = _parse_multipart(body, content_type)
  if not files:
    raise RequestError(400, 'the multipart/form-data body has no file part')
  return files


def create_app(
  predictor: predict.Predictor,
  *,
  limits: Limits = Limits(),
  batching: bool = True,
  batch_wait_ms: float = 4.0,
  max_batch_faces: int = 64,
) -> Any:
  """The FastAPI app serving `predictor` (see the module doc)."""
  app = FastAPI(
    title='fer_jax', summary='Facial-expression recognition', docs_url='/docs', redoc_url=None
  )
  batcher = (
    Batcher(predictor.classify_faces, max_wait_s=batch_wait_ms / 1000, max_faces=max_batch_faces)
    if batching
    else None
  )
  app.state.batcher = batcher
  page = importlib.resources.files('fer_jax').joinpath('web/index.html').read_text()
  info = {
    **predictor.info(),
    'limits': dataclasses.asdict(limits),
    'batching': {'enabled': batching, 'max_wait_ms': batch_wait_ms, 'max_faces': max_batch_faces},
  }

  def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({'error': message}, status_code=status)

  @app.exception_handler(RequestError)
  async def _request_error(request: Request, e: RequestError):
    return error(e.status, e.message)

  @app.exception_handler(HTTPException)
  async def _http_error(request: Request, e: HTTPException):
    return error(e.status_code, str(e.detail))

  @app.exception_handler(RequestValidationError)
  async def _validation_error(request: Request, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    where = '.'.join(str(p) for p in first.get('loc', ()))
    return error(400, f'{where}: {first.get("msg", "invalid")}')

  @app.exception_handler(Exception)
  async def _internal_error(request: Request, e: Exception):
    return error(500, f'internal error: {type(e).__name__}: {str(e)[:200]}')

  async def predict_one(name: str, data: bytes, whole_image: bool) -> dict[str, Any]:
    """One encoded image -> its record; RequestError for bad data."""
    if batcher:
      batcher.begin()
    submitted = False
    try:
      try:
        image = await asyncio.to_thread(
          predict.decode_image, data, what=name, max_pixels=limits.max_pixels
        )
      except predict.ImageTooLarge as e:
        raise RequestError(413, str(e)) from None
      except DataError as e:
        raise RequestError(400, str(e)) from None
      boxes, whole, crops = await asyncio.to_thread(
        predictor.find_faces, image, whole_image_fallback=whole_image
      )
      if len(crops) == 0:
        probs = np.zeros((0, len(predictor.class_names)), np.float32)
      elif batcher:
        submitted = True
        probs = await batcher.submit(crops)
      else:
        probs = await asyncio.to_thread(predictor.classify_faces, crops)
    finally:
      if batcher and not submitted:
        batcher.done()
    record = {
      'width': int(image.shape[1]),
      'height': int(image.shape[0]),
      'faces': predictor.face_records(boxes, probs, whole),
    }
    if not record['faces']:
      record['note'] = 'no face detected (?whole_image=true classifies the whole image)'
    return record

  @app.get('/', response_class=HTMLResponse, include_in_schema=False)
  async def index():
    return HTMLResponse(page)

  @app.get('/healthz')
  async def healthz():
    return {'status': 'ok'}

  @app.get('/v1/model')
  async def model_info():
    if batcher:  # how well the batcher batches: faces per call = faces / model_calls
      return {**info, 'batching': {**info['batching'], 'model_calls': batcher.calls}}
    return info

  @app.post('/v1/predict')
  async def predict_image(request: Request, whole_image: bool = False):
    images = await _images_of(request, limits)
    if len(images) != 1:
      raise RequestError(
        400, f'expected one image, got {len(images)} files (POST several to /v1/predict/batch)'
      )
    return await predict_one(*images[0], whole_image)

  @app.post('/v1/predict/batch')
  async def predict_batch(request: Request, whole_image: bool = False):
    images = await _images_of(request, limits)
    if len(images) > limits.max_batch_images:
      raise RequestError(
        413, f'{len(images)} images; the limit is {limits.max_batch_images} per request'
      )

    async def one(name: str, data: bytes) -> dict[str, Any]:
      try:
        return {'name': name, **await predict_one(name, data, whole_image)}
      except RequestError as e:
        return {'name': name, 'error': e.message, 'status': e.status}

    return {'results': list(await asyncio.gather(*(one(n, d) for n, d in images)))}

  return app


def main(argv: list[str]) -> None:
  from absl import app, flags

  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}', exitcode=2)
  if bool(f.workdir) == bool(f.model):
    raise app.UsageError(
      'give --workdir (a trained workdir) or --model (an ONNX export)', exitcode=2
    )
  from fer_jax import logs  # absl only: the --model path imports no JAX

  logs.quiet_library_logs()
  try:
    predictor = predict.Predictor(
      f.workdir or None, f.checkpoint, model=f.model or None, detector=f.detector, margin=f.margin
    )
  except FerJaxError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  # The first call compiles (JAX) or plans (onnxruntime): done before the first request.
  predictor.classify_faces(np.zeros((1, predictor.face_size, predictor.face_size), np.uint8))
  limits = Limits(
    max_body_bytes=int(f.max_body_mb * 2**20),
    max_pixels=int(f.max_megapixels * 1e6),
    max_batch_images=f.max_batch_images,
  )
  application = create_app(
    predictor,
    limits=limits,
    batching=f.batching,
    batch_wait_ms=f.batch_wait_ms,
    max_batch_faces=f.max_batch_faces,
  )
  import uvicorn

  print(
    f'serving {predictor.info()["source"]} at http://{f.host}:{f.port}/',
    file=sys.stderr,
    flush=True,
  )
  uvicorn.run(application, host=f.host, port=f.port, log_level=f.log_level, access_log=f.access_log)


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string('workdir', '', 'A trained workdir (JAX runs its checkpoint).')
  flags.DEFINE_string('model', '', 'Instead of --workdir: an ONNX export (onnxruntime, no JAX).')
  flags.DEFINE_string('checkpoint', 'best', "With --workdir: 'best', 'latest' or a step.")
  flags.DEFINE_string('host', '127.0.0.1', 'The address to bind (0.0.0.0: every interface).')
  flags.DEFINE_integer('port', 8000, 'The TCP port.')
  flags.DEFINE_enum(
    'detector',
    'haar',
    ('haar', 'none'),
    "'haar': OpenCV's frontal-face cascade; 'none': each image is one face "
    '(for clients that send face crops).',
  )
  flags.DEFINE_float(
    'margin',
    0.1,
    'Added around each detected face box, as a fraction of its side (as fer_jax.predict).',
  )
  flags.DEFINE_float('max_body_mb', 20.0, 'Largest request body, MiB.')
  flags.DEFINE_float('max_megapixels', 40.0, 'Largest image, megapixels (checked before decoding).')
  flags.DEFINE_integer('max_batch_images', 32, 'Most images in one /v1/predict/batch request.')
  flags.DEFINE_bool('batching', True, 'Batch the faces of concurrent requests into one model call.')
  flags.DEFINE_float('batch_wait_ms', 4.0, 'Longest wait for more faces before a model call.')
  flags.DEFINE_integer('max_batch_faces', 64, 'Most faces in one model call.')
  flags.DEFINE_enum(
    'log_level', 'info', ('critical', 'error', 'warning', 'info', 'debug'), "uvicorn's log level."
  )
  flags.DEFINE_bool('access_log', True, 'Log one line per request.')


if __name__ == '__main__':
  from absl import app

  _define_flags()
  app.run(main)
