"""A gs:// workdir end to end against a local GCS emulator: train, stop, resume, evaluate, report.

The emulator (gcp-storage-emulator, in the `gcs` extra) runs in this process on 127.0.0.1;
gcsfs (etils.epath's gs backend) finds it through STORAGE_EMULATOR_HOST and tensorstore (orbax's
array writer) through TENSORSTORE_GCS_HTTP_URL, with a fake token. Nothing may land in a local
`./gs:` directory, which is what plain file I/O makes of a gs:// path.
"""

import json
import logging
import socket

import pytest

pytest.importorskip('gcp_storage_emulator')
pytest.importorskip('gcsfs')

from tests.conftest import synthetic_config  # noqa: E402

BUCKET = 'fer-test'


@pytest.fixture
def gcs(monkeypatch):
  from gcp_storage_emulator.server import create_server

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  server = create_server('127.0.0.1', port, in_memory=True, default_bucket=BUCKET)
  server.start()
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


def test_gs_workdir_train_stop_resume_evaluate(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  try:
    _train_stop_resume_evaluate(f'{gcs}/runs/tiny', tmp_path)
  except ValueError as e:
    # The emulator now and then answers a tensorstore write with a generation tensorstore
    # rejects ("Malformed StorageGeneration"; seen in one of this test's runs so far): run the
    # whole scenario once more on a fresh workdir; any other error, or a second one, fails.
    if 'Malformed StorageGeneration' not in str(e):
      raise
    _train_stop_resume_evaluate(f'{gcs}/runs/tiny_again', tmp_path)


def _train_stop_resume_evaluate(workdir: str, tmp_path) -> None:
  from etils import epath

  from fer_jax import evaluate, report, train, trained_model

  cfg = lambda **kw: synthetic_config(
    train_examples=256,
    test_examples=64,
    **{'batch_size': 32, 'eval_batch_size': 64, 'epochs': 2, 'log_every_steps': 4, **kw},
  )
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
