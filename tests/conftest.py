"""Test setup: 4 simulated CPU devices (set before jax starts), shared paths and fixtures."""

import os
import pathlib

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_FER2013 = REPO.parent / 'shared' / 'data' / 'fer2013.csv.gz'


@pytest.fixture
def fer2013_path() -> pathlib.Path:
  if not SHARED_FER2013.exists():
    pytest.skip(f'{SHARED_FER2013} not present')
  return SHARED_FER2013


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
  """Each test session caches parsed data in its own temporary directory."""
  monkeypatch.setenv('FER_JAX_CACHE', str(tmp_path_factory.getbasetemp() / 'fer_jax_cache'))
