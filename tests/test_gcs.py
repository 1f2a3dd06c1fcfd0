"""A gs:// workdir end to end against a local GCS emulator: train, stop, resume, evaluate, report.

The emulator (gcp-storage-emulator, in the `gcs` extra) runs in this process on 127.0.0.1;
gcsfs (etils.epath's gs backend) finds it through STORAGE_EMULATOR_HOST and tensorstore (orbax's
array writer) through TENSORSTORE_GCS_HTTP_URL, with a fake token. Nothing may land in a local
`./gs:` directory, which is what plain file I/O makes of a gs:// path.
"""

import json
import logging
import socket
from http import HTTPStatus

import pytest

pytest.importorskip('gcp_storage_emulator')
pytest.importorskip('gcsfs')

from tests.conftest import synthetic_config  # noqa: E402

BUCKET = 'fer-test'


@pytest.fixture
def gcs(monkeypatch):
  server, port = start_emulator(monkeypatch)
  url = f'http://127.0.0.1:{port}'
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', url)
  monkeypatch.setenv('TENSORSTORE_GCS_HTTP_URL', url)
  monkeypatch.setenv('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'emulator')
  monkeypatch.setenv('NO_GCE_CHECK', 'True')  # google-auth: no metadata-server probe per client
  # The emulator logs every 404 (orbax probing for files) and broken pipe as an error.
  for name in ('gcp_storage_emulator', 'gcsfs'):
    monkeypatch.setattr(logging.getLogger(name), 'disabled', True)
  import fsspec

  fsspec.filesystem('gs').clear_instance_cache()  # no client bound to another emulator port
  yield f'gs://{BUCKET}'
  server.stop()


def start_emulator(monkeypatch):
  """Starts the emulator on a free port with what of GCS tensorstore relies on and it lacks.

  The emulator ignores the generation preconditions (`ifGenerationMatch`,
  `ifGenerationNotMatch`) and sends no `x-goog-generation` with an object's bytes. tensorstore's
  OCDBT writer updates its manifest by compare-and-swap on those generations; without them it
  now and then fails a checkpoint with "Malformed StorageGeneration" (reads come back as
  generation 0, stale writes succeed). Both are answered here as GCS answers them.
  """
  from gcp_storage_emulator import server as emulator
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  def generation(request, storage, name) -> int:  # of the live object; 0: there is none
    try:
      return int(storage.get_file_obj(request.params['bucket_name'], name)['generation'])
    except NotFound:
      return 0

  def precondition(request, current: int):  # GCS's answer when one fails, else None
    match, not_match = (request.query.get(k) for k in ('ifGenerationMatch', 'ifGenerationNotMatch'))
    if match and int(match[0]) != current:
      return HTTPStatus.PRECONDITION_FAILED
    if not_match and int(not_match[0]) == current:
      return HTTPStatus.NOT_MODIFIED if request.method == 'GET' else HTTPStatus.PRECONDITION_FAILED
    return None

  download, media_upload = objects.download, objects._media_upload

  def conditional_download(request, response, storage, *args, **kwargs):
    current = generation(request, storage, request.params['object_id'])
    if current and (failed := precondition(request, current)):
      response.status = failed
    else:  # a missing object is a 404, whatever the conditions
      download(request, response, storage, *args, **kwargs)
      if current:
        response['x-goog-generation'] = str(current)

  def conditional_upload(request, response, storage):
    failed = precondition(request, generation(request, storage, request.query['name'][0]))
    if failed:
      response.status = failed
    else:
      media_upload(request, response, storage)

  monkeypatch.setattr(objects, 'download', conditional_download)
  monkeypatch.setattr(objects, '_media_upload', conditional_upload)
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  server = emulator.create_server('127.0.0.1', port, in_memory=True, default_bucket=BUCKET)
  server.start()
  return server, port


def test_the_emulator_keeps_gcs_generations(gcs):
  """What the OCDBT manifest's compare-and-swap needs, through tensorstore's own gcs driver."""
  import tensorstore as ts

  kv = ts.KvStore.open({'driver': 'gcs', 'bucket': BUCKET, 'path': 'generations/'}).result()
  first = kv.write('k', b'one').result().generation
  read = kv.read('k').result()
  assert (read.value, read.stamp.generation) == (b'one', first)  # x-goog-generation
  assert kv.read('k', if_not_equal=first).result().state == 'unspecified'  # 304 Not Modified
  second = kv.write('k', b'two', if_equal=first).result().generation
  assert second not in (b'', first)
  assert kv.write('k', b'three', if_equal=first).result().generation == b''  # 412: stale
  assert kv.read('k').result().value == b'two'


def test_gs_workdir_train_stop_resume_evaluate(gcs, tmp_path, monkeypatch):
  from etils import epath

  from fer_jax import evaluate, report, train, trained_model

  cfg = lambda **kw: synthetic_config(
    train_examples=256,
    test_examples=64,
    **{'batch_size': 32, 'eval_batch_size': 64, 'epochs': 2, 'log_every_steps': 4, **kw},
  )
  monkeypatch.chdir(tmp_path)
  workdir = f'{gcs}/runs/tiny'
  first = train.train_and_evaluate(cfg(max_steps=5), workdir)  # stops mid-epoch, checkpointed
  assert first['steps'] == 5
  root = epath.Path(workdir)
  assert (root / 'checkpoints' / '5').is_dir()
  assert json.loads((root / 'results.json').read_text())['steps'] == 5

  results = train.train_and_evaluate(cfg(), workdir)  # resumes from step 5
  assert results['steps'] == 16
  on_store = json.loads((root / 'results.json').read_text())
  assert on_store['best_step'] == results['best_step']
  records = [json.loads(l) for l in (root / 'metrics.jsonl').read_text().splitlines()]
  steps = [r['step'] for r in records if r['split'] == 'train_steps']
  assert steps[:2] == [4, 5] and 8 in steps and 16 in steps  # both runs, appended
  assert any(p.name.startswith('events.out.tfevents') for p in (root / 'tensorboard').iterdir())

  trained = trained_model.load(workdir, 'latest')
  assert trained.step == 16
  rep, _, _ = evaluate.evaluate(trained, split='PrivateTest')
  path = evaluate.write_report(rep, trained)
  assert path.startswith('gs://') and json.loads(epath.Path(path).read_text())['num_examples'] == 64
  assert report.read_metrics(workdir)  # the report tool reads the same records back
  assert not (tmp_path / 'gs:').exists()  # nothing written through plain file I/O
