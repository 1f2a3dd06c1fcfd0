"""Test setup: 4 simulated CPU devices, XLA's optimisation off and a compilation cache (set
before jax starts), the files' order for xdist, shared paths and fixtures."""

import importlib
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# Most of the suite's CPU time is XLA compiling the same train and eval steps again: in this
# process, in the other xdist workers (which inherit this environment) and in the launch.py
# subprocesses. One persistent compilation cache serves the whole session; the process that
# made it removes it at the end. A loaded executable is the same code as a freshly compiled one,
# so the tests' bitwise comparisons between runs are unaffected.
_XLA_CACHE_MADE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _XLA_CACHE_MADE = tempfile.mkdtemp(prefix='fer_jax_tests_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _XLA_CACHE_MADE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

import jax  # noqa: E402  (after the environment above, which it reads at import)
import pytest  # noqa: E402

# The suite compiles hundreds of small programs in-process and runs each a few steps: XLA's
# LLVM optimisation costs more than it saves there (flax/examples' tests do the same). Not for
# the launch.py subprocesses, which load their programs from the cache above and then train:
# optimised code runs them faster (benchmarks/README.md). Runs stay deterministic, so the tests'
# bitwise comparisons between runs hold; two programs of the same arithmetic can round
# differently.
jax.config.update('jax_disable_most_optimizations', True)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_FER2013 = REPO.parent / 'shared' / 'data' / 'fer2013.csv.gz'


def require(module: str):
  """Imports a declared dependency. Without it the test is skipped, except in CI (CI set, as
  .ci/run does), where a missing or broken install of a declared dependency must fail."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    if os.environ.get('CI'):
      pytest.fail(f'{module} is a declared dependency but does not import: {e}', pytrace=False)
    pytest.skip(f'{module} does not import: {e}', allow_module_level=True)


# The files that train or start processes, longest first (the slowest measured, then those that
# train end to end). xdist (--dist loadfile, --no-loadscope-reorder in pyproject.toml) hands
# files to its workers in this order, so the long ones start first and the short ones fill in
# at the end, instead of a worker finishing alone on a long file that came last.
LONGEST_FIRST = (
  'test_zoo_train.py',
  'test_multihost.py',
  'test_native.py',
  'test_benchmarks.py',
  'test_train.py',
  'test_zoo.py',
  'test_faults.py',
  'test_export.py',
  'test_serve.py',
  'test_safety_net.py',
  'test_gcs.py',
  'test_bad_input.py',
  'test_evaluate.py',
  'test_predict.py',
  'test_report.py',
  'test_cluster.py',
  'test_web.py',
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_unconfigure(config):
  if _XLA_CACHE_MADE:
    shutil.rmtree(_XLA_CACHE_MADE, ignore_errors=True)


@pytest.fixture
def fer2013_path() -> pathlib.Path:
  if not SHARED_FER2013.exists():
    pytest.skip(f'{SHARED_FER2013} not present')
  return SHARED_FER2013


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
  """Each test session caches parsed data in its own temporary directory."""
  monkeypatch.setenv('FER_JAX_CACHE', str(tmp_path_factory.getbasetemp() / 'fer_jax_cache'))


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory) -> pathlib.Path:
  """ONE tiny synthetic run (2 epochs, ~15 s), shared read-only by the evaluate/report/predict
  tests.

  Its data cache is the session's (as `_isolated_cache`), named in the config so the tools that
  reload the dataset from the checkpoint's config find it.
  """
  from experiments import synthetic
  from fer_jax import train

  c = synthetic.get_config()
  c.data.synthetic_train = 384
  c.data.synthetic_test = 100
  c.data.cache_dir = str(tmp_path_factory.getbasetemp() / 'fer_jax_cache')
  c.train.batch_size = 32
  c.train.eval_batch_size = 64
  c.train.epochs = 2
  c.train.log_every_steps = 4
  workdir = tmp_path_factory.mktemp('trained_workdir')
  train.train_and_evaluate(c, str(workdir))
  return workdir


def synthetic_config(*, train_examples: int, test_examples: int, **train):
  """experiments/synthetic.py shrunk to `train_examples` / `test_examples` faces per split,
  with `config.train` overrides: the end-to-end tests' common starting point."""
  from experiments import synthetic

  c = synthetic.get_config()
  c.data.synthetic_train = train_examples
  c.data.synthetic_test = test_examples
  for k, v in train.items():
    c.train[k] = v
  return c


def one_train_step(ctx, steps, state, batch, mode, mesh):
  """One step of `train.compile_steps`'s train function (which sums its metrics on the device
  into a log window) -> (state, that step's metrics as floats)."""
  import jax

  from fer_jax import checkpointing, loop_metrics, parallel, train

  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  canonical = checkpointing.abstract_like(steps.canonical(state))
  sums = train.sums_factory(ctx, canonical, spec, mode, mesh)()
  state, sums = steps.train(state, steps.put_batch(batch), sums)
  host = loop_metrics.to_host(sums)
  if mode == 'pmap':
    host = parallel.unreplicate_from_pmap(host)
  return state, loop_metrics.means(host)
