"""fer_jax.serve: the predict JSON over HTTP, batch, model info, bad input as 4xx JSON with the
service still up, concurrent requests sharing model calls, and one real uvicorn server."""

import asyncio
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip('fastapi')
pytest.importorskip('httpx')
pytest.importorskip('onnxruntime')
skimage_data = pytest.importorskip('skimage.data')

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from fer_jax import predict, serve  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.test_export import onnx_model  # noqa: E402,F401  (a fixture)


def _encode(image: np.ndarray, fmt: str = 'JPEG') -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, fmt)
  return out.getvalue()


@pytest.fixture(scope='module')
def astronaut_jpeg():
  return _encode(skimage_data.astronaut())


@pytest.fixture(scope='module')
def predictor(onnx_model):  # noqa: F811
  return predict.Predictor(model=onnx_model)


@pytest.fixture(scope='module')
def client(predictor):
  app = serve.create_app(
    predictor, limits=serve.Limits(max_body_bytes=8 * 2**20, max_pixels=20_000_000)
  )
  with TestClient(app) as c:
    yield c


def _expected(predictor, jpeg):
  return predictor.predict_image(predict.decode_image(jpeg))


def test_raw_body_and_multipart_give_the_predict_json(client, predictor, astronaut_jpeg):
  expected = _expected(predictor, astronaut_jpeg)
  assert len(expected) == 1
  raw = client.post('/v1/predict', content=astronaut_jpeg, headers={'Content-Type': 'image/jpeg'})
  form = client.post('/v1/predict', files={'file': ('a.jpg', astronaut_jpeg, 'image/jpeg')})
  for r in (raw, form):
    assert r.status_code == 200, r.text
    assert r.json() == {'width': 512, 'height': 512, 'faces': expected}


def test_batch_reports_each_image(client, predictor, astronaut_jpeg):
  gray = _encode(predict.to_gray(skimage_data.astronaut()), 'PNG')
  r = client.post(
    '/v1/predict/batch',
    files=[
      ('files', ('a.jpg', astronaut_jpeg, 'image/jpeg')),
      ('files', ('b.txt', b'hello', 'text/plain')),
      ('files', ('c.png', gray, 'image/png')),
    ],
  )
  assert r.status_code == 200, r.text
  a, b, c = r.json()['results']
  assert a['name'] == 'a.jpg' and a['faces'] == _expected(predictor, astronaut_jpeg)
  assert b['status'] == 400 and 'b.txt: not an image' in b['error']
  # The lossless gray copy finds the face the JPEG did, give or take the JPEG's noise.
  assert len(c['faces']) == 1
  np.testing.assert_allclose(c['faces'][0]['box'], a['faces'][0]['box'], atol=4)


def test_model_info_health_and_page(client, predictor):
  info = client.get('/v1/model').json()
  assert info['classes'] == list(predictor.class_names)
  assert info['face_size'] == 48 and info['model'] == 'seed_cnn'
  assert info['checkpoint_step'] > 0 and set(info['accuracy']) == {'PublicTest', 'PrivateTest'}
  assert info['limits']['max_body_bytes'] == 8 * 2**20
  assert client.get('/healthz').json() == {'status': 'ok'}
  page = client.get('/')
  assert page.status_code == 200 and 'getUserMedia' in page.text and '/v1/predict' in page.text


def test_no_face_is_200_with_a_note(client):
  blank = _encode(np.full((100, 200, 3), 128, np.uint8), 'PNG')
  r = client.post('/v1/predict', content=blank, headers={'Content-Type': 'image/png'})
  assert r.status_code == 200 and r.json()['faces'] == [] and 'no face' in r.json()['note']
  r = client.post(
    '/v1/predict?whole_image=true', content=blank, headers={'Content-Type': 'image/png'}
  )
  (face,) = r.json()['faces']
  assert face['box'] == [0, 0, 200, 100] and face['whole_image'] is True


def _bad_requests(jpeg):
  huge = io.BytesIO()
  Image.new('L', (8000, 6500)).save(huge, 'PNG')  # 52 megapixels in 50 kB
  return {
    'not an image': (b'hello world', 'image/jpeg', 400, 'not an image'),
    'truncated JPEG': (jpeg[: len(jpeg) // 2], 'image/jpeg', 400, 'truncated'),
    'empty body': (b'', 'image/jpeg', 400, 'empty'),
    '50 megapixels': (huge.getvalue(), 'image/png', 413, 'megapixels'),
    '100 MB body': (bytes(100 * 2**20), 'application/octet-stream', 413, 'limit'),
    'wrong content type': (jpeg, 'application/json', 415, 'content type'),
    'multipart without a file': (
      b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--x--\r\n',
      'multipart/form-data; boundary=x',
      400,
      'no file',
    ),
  }


@pytest.mark.parametrize('case', list(_bad_requests(b'\xff\xd8' * 100)))
def test_bad_input_is_a_4xx_json_and_the_next_request_succeeds(client, astronaut_jpeg, case):
  body, content_type, status, words = _bad_requests(astronaut_jpeg)[case]
  r = client.post('/v1/predict', content=body, headers={'Content-Type': content_type})
  assert r.status_code == status, r.text
  assert words in r.json()['error']
  ok = client.post('/v1/predict', content=astronaut_jpeg, headers={'Content-Type': 'image/jpeg'})
  assert ok.status_code == 200 and len(ok.json()['faces']) == 1


def test_concurrent_requests_share_model_calls(predictor, astronaut_jpeg):
  app = serve.create_app(predictor, batch_wait_ms=50)
  expected = _expected(predictor, astronaut_jpeg)

  async def run():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url='http://test') as c:
      return await asyncio.gather(
        *(
          c.post('/v1/predict', content=astronaut_jpeg, headers={'Content-Type': 'image/jpeg'})
          for _ in range(12)
        )
      )

  responses = asyncio.run(run())
  assert all(r.status_code == 200 and r.json()['faces'] == expected for r in responses)
  assert app.state.batcher.calls < 12  # faces of concurrent requests went through together


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model: str, *flags: str):
  """`python -m fer_jax.serve --model model` on a free loopback port: yields (base URL, Popen)."""
  port = _free_port()
  server = subprocess.Popen(
    [
      sys.executable,
      '-m',
      'fer_jax.serve',
      f'--model={model}',
      f'--port={port}',
      '--log_level=warning',
      *flags,
    ],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env={**os.environ, 'PYTHONPATH': str(REPO)},
  )
  base = f'http://127.0.0.1:{port}'
  try:
    deadline = time.time() + 60
    while True:
      try:
        if httpx.get(f'{base}/healthz', timeout=1).status_code == 200:
          break
      except httpx.TransportError:
        pass
      assert server.poll() is None, server.stderr.read()
      assert time.time() < deadline, 'the server did not start in 60 s'
      time.sleep(0.1)
    yield base, server
  finally:
    server.terminate()
    server.communicate(timeout=30)


def test_real_server_on_loopback(onnx_model, astronaut_jpeg):  # noqa: F811
  with running_server(onnx_model, '--max_body_mb=1') as (base, server):
    with httpx.Client(base_url=base, timeout=30) as c:
      good = lambda: c.post(
        '/v1/predict', content=astronaut_jpeg, headers={'Content-Type': 'image/jpeg'}
      )
      assert len(good().json()['faces']) == 1
      assert (
        c.post('/v1/predict', content=b'junk', headers={'Content-Type': 'image/png'}).status_code
        == 400
      )
      try:
        big = c.post(
          '/v1/predict',
          content=bytes(3 * 2**20),
          headers={'Content-Type': 'application/octet-stream'},
        )
        assert big.status_code == 413 and 'limit' in big.json()['error']
      except httpx.TransportError:  # the server may close the connection after its 413
        pass
    r = httpx.post(
      f'{base}/v1/predict',
      content=astronaut_jpeg,
      headers={'Content-Type': 'image/jpeg'},
      timeout=30,
    )
    assert r.status_code == 200 and len(r.json()['faces']) == 1
    assert server.poll() is None
    # Bound to loopback by default: no other address of this machine answers.
    listening = (
      subprocess.run(['ss', '-ltn'], capture_output=True, text=True).stdout
      if shutil.which('ss')
      else ''
    )
    port = base.rsplit(':', 1)[1]
    assert all(
      line.split()[3] == f'127.0.0.1:{port}'
      for line in listening.splitlines()
      if len(line.split()) > 3 and line.split()[3].endswith(f':{port}')
    )


def test_workdir_backend_serves_the_same_json(trained_workdir, predictor, astronaut_jpeg):
  jax_predictor = predict.Predictor(str(trained_workdir))
  with TestClient(serve.create_app(jax_predictor, batching=False)) as c:
    info = c.get('/v1/model').json()
    r = c.post('/v1/predict', content=astronaut_jpeg, headers={'Content-Type': 'image/jpeg'})
  assert info['backend'] == 'jax' and info['checkpoint_step'] == predictor.info()['checkpoint_step']
  assert info['accuracy'] == predictor.info()['accuracy']
  (face,) = r.json()['faces']
  (expected,) = _expected(predictor, astronaut_jpeg)
  assert face['box'] == expected['box'] and face['emotion'] == expected['emotion']


def test_load_benchmark_runs_without_errors(onnx_model):  # noqa: F811
  out = subprocess.run(
    [
      sys.executable,
      'benchmarks/serve_load.py',
      f'--model={onnx_model}',
      '--clients',
      '1',
      '4',
      '--seconds',
      '1',
      '--batching',
      'on',
      '--detector',
      'none',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  import json

  rows = [json.loads(l) for l in out.stdout.splitlines() if l.startswith('{')]
  assert [r['clients'] for r in rows] == [1, 4]
  assert all(r['errors'] == 0 and r['requests'] > 0 and r['p99_ms'] >= r['p50_ms'] for r in rows)
  assert '| on | 4 |' in out.stdout
