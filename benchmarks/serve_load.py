"""Load test of fer_jax.serve on loopback: N concurrent clients for a bounded time.

  python benchmarks/serve_load.py --model model.onnx [--clients 1 8 32] [--seconds 10]
      [--batching on off] [--detector haar|none] [--image photo.jpg]

For each batching setting a server (`python -m fer_jax.serve`, 127.0.0.1, a free port) is
started; for each client count, that many clients POST the image to /v1/predict back to back
for `--seconds` (after one warm-up request each). Prints one JSON line per row, then a markdown
table: p50 / p99 latency, requests/s, errors, and the faces per model call (from the batcher's
count in /v1/model; 1 without batching). Traffic goes to 127.0.0.1 only, and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_server(source: list[str], batching: bool, detector: str) -> tuple[subprocess.Popen, str]:
  port = _free_port()
  server = subprocess.Popen(
    [
      sys.executable,
      '-m',
      'fer_jax.serve',
      *source,
      f'--port={port}',
      '--log_level=warning',
      f'--detector={detector}',
      '--noaccess_log',
      '--batching' if batching else '--nobatching',
    ],
    cwd=REPO,
    env={**os.environ, 'PYTHONPATH': REPO},
    stderr=subprocess.PIPE,
    text=True,
  )
  base = f'http://127.0.0.1:{port}'
  deadline = time.time() + 300
  while time.time() < deadline:
    try:
      if httpx.get(f'{base}/healthz', timeout=1).status_code == 200:
        return server, base
    except httpx.TransportError:
      pass
    if server.poll() is not None:
      raise SystemExit(f'the server exited: {server.stderr.read()[-2000:]}')
    time.sleep(0.2)
  server.kill()
  raise SystemExit('the server did not start in 300 s')


async def load(base: str, image: bytes, clients: int, seconds: float) -> dict:
  latencies: list[float] = []
  errors = 0
  limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
  async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as c:
    post = lambda: c.post('/v1/predict', content=image, headers={'Content-Type': 'image/jpeg'})
    await asyncio.gather(*(post() for _ in range(clients)))  # warm-up: connections, threads
    stop = time.perf_counter() + seconds

    async def client():
      nonlocal errors
      while time.perf_counter() < stop:
        t = time.perf_counter()
        try:
          r = await post()
          ok = r.status_code == 200 and len(r.json()['faces']) == 1
        except httpx.HTTPError:
          ok = False
        if ok:
          latencies.append(time.perf_counter() - t)
        else:
          errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
  ms = np.asarray(latencies) * 1000
  return {
    'clients': clients,
    'requests': len(latencies),
    'errors': errors,
    'p50_ms': round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
    'p99_ms': round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
    'requests_per_s': round(len(latencies) / wall, 1),
  }


def _default_image(detector: str) -> bytes:
  """skimage's astronaut (512x512); with --detector none her face alone, 48x48 grayscale."""
  from PIL import Image
  from skimage import data

  image = Image.fromarray(data.astronaut())
  if detector == 'none':
    image = image.crop((167, 56, 286, 175)).convert('L').resize((48, 48), Image.BILINEAR)
  out = io.BytesIO()
  image.save(out, 'JPEG', quality=90)
  return out.getvalue()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--model', help='an ONNX export (fer_jax.export)')
  src.add_argument('--workdir', help='a trained workdir (JAX)')
  p.add_argument('--clients', type=int, nargs='+', default=[1, 8, 32])
  p.add_argument('--seconds', type=float, default=10.0, help='per row')
  p.add_argument('--batching', nargs='+', choices=['on', 'off'], default=['on', 'off'])
  p.add_argument(
    '--detector',
    choices=['haar', 'none'],
    default='haar',
    help="the server's: 'none' for clients that send face crops",
  )
  p.add_argument(
    '--image',
    help='a JPEG with one face (default: skimage astronaut, 512x512, '
    'or her 48x48 face with --detector none)',
  )
  args = p.parse_args()
  image = open(args.image, 'rb').read() if args.image else _default_image(args.detector)
  source = [f'--model={args.model}'] if args.model else [f'--workdir={args.workdir}']
  rows = []
  for setting in args.batching:
    server, base = start_server(source, setting == 'on', args.detector)
    try:
      for clients in args.clients:
        calls = lambda: httpx.get(f'{base}/v1/model').json()['batching'].get('model_calls')
        before = calls()
        row = {'batching': setting, **asyncio.run(load(base, image, clients, args.seconds))}
        if before is not None:  # the warm-up requests and the timed ones, one face each
          row['faces_per_model_call'] = round(
            (row['requests'] + row['errors'] + clients) / max(1, calls() - before), 2
          )
        rows.append(row)
        print(json.dumps(row), flush=True)
    finally:
      server.terminate()
      server.wait(timeout=30)
  print('\n| batching | clients | p50 ms | p99 ms | req/s | errors | faces/model call |')
  print('|---|---:|---:|---:|---:|---:|---:|')
  for r in rows:
    print(
      f'| {r["batching"]} | {r["clients"]} | {r["p50_ms"]} | {r["p99_ms"]} | '
      f'{r["requests_per_s"]} | {r["errors"]} | {r.get("faces_per_model_call", 1)} |'
    )


if __name__ == '__main__':
  main()
