"""Cluster set-ups checked against JAX's own cluster detection (faked environments), the mesh,
CPU-only lowerings on another backend, and the shared-workdir check with two processes."""

import logging
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import clusters
from jax._src.clusters import cloud_tpu_cluster

from fer_jax import parallel
from fer_jax.errors import FerJaxError
from tests.conftest import REPO
from tests.test_multihost import _free_port, _kill_all

SLURM_KEYS = (
  'SLURM_JOB_ID',
  'SLURM_STEP_NODELIST',
  'SLURM_NTASKS',
  'SLURM_PROCID',
  'SLURM_LOCALID',
  'SLURM_STEP_NUM_NODES',
  'SLURM_NODEID',
  'SLURM_GPUS_ON_NODE',
  'SLURM_STEP_TASKS_PER_NODE',
  'SLURM_TASKS_PER_NODE',
  'JAX_LOCAL_DEVICE_IDS',
  'JAX_COORDINATOR_PORT',
  'TPU_WORKER_HOSTNAMES',
  'TPU_WORKER_ID',
  'TPU_PROCESS_ADDRESSES',
  'OMPI_MCA_orte_hnp_uri',
)


def readme_sbatch() -> dict[str, int]:
  """The README's SLURM recipe: {'nodes': .., 'ntasks-per-node': .., 'gpus-per-node': ..}."""
  text = (REPO / 'README.md').read_text()
  line = next(l for l in text.splitlines() if l.startswith('#SBATCH --nodes'))
  return {k: int(v) for k, v in re.findall(r'--([a-z-]+)=(\d+)', line)}


def fake_slurm(monkeypatch, *, nodes, tasks_per_node, gpus_per_node, proc_id):
  for key in SLURM_KEYS:
    monkeypatch.delenv(key, raising=False)
  env = {
    'SLURM_JOB_ID': '4242',
    'SLURM_STEP_NODELIST': f'gpu[001-{nodes:03d}]',
    'SLURM_NTASKS': str(nodes * tasks_per_node),
    'SLURM_PROCID': str(proc_id),
    'SLURM_LOCALID': str(proc_id % tasks_per_node),
    'SLURM_STEP_NUM_NODES': str(nodes),
    'SLURM_NODEID': str(proc_id // tasks_per_node),
    'SLURM_GPUS_ON_NODE': str(gpus_per_node),
    'SLURM_STEP_TASKS_PER_NODE': f'{tasks_per_node}(x{nodes})',
  }
  for k, v in env.items():
    monkeypatch.setenv(k, v)


def detect():
  """What jax.distributed.initialize() would use with no arguments."""
  return clusters.ClusterEnv.auto_detect_unset_distributed_params(
    None, None, None, None, None, None
  )


def test_readme_slurm_recipe_uses_every_gpu_through_jax_detection(monkeypatch):
  spec = readme_sbatch()
  nodes, tasks, gpus = spec['nodes'], spec['ntasks-per-node'], spec['gpus-per-node']
  used = set()
  for proc in range(nodes * tasks):
    fake_slurm(monkeypatch, nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus, proc_id=proc)
    address, n_proc, proc_id, local_ids = detect()
    assert address == 'gpu001:' + str(4242 % 4096 + 65535 - 4096 + 1)
    assert (n_proc, proc_id) == (nodes * tasks, proc)
    # JAX restricts each process to local_device_ids; fer_jax's check agrees.
    parallel.check_slurm_gpus(len(local_ids), 'gpu')
    used |= {(proc // tasks, d) for d in local_ids}
  assert used == {(n, g) for n in range(nodes) for g in range(gpus)}  # every GPU, once


def test_one_task_per_node_with_eight_gpus_is_refused(monkeypatch):
  fake_slurm(monkeypatch, nodes=2, tasks_per_node=1, gpus_per_node=8, proc_id=1)
  _, _, _, local_ids = detect()
  assert local_ids == [0]  # what JAX does: one GPU per node
  with pytest.raises(FerJaxError, match='--ntasks-per-node=8'):
    parallel.check_slurm_gpus(len(local_ids), 'gpu')
  monkeypatch.setenv('JAX_LOCAL_DEVICE_IDS', '0,1,2,3,4,5,6,7')  # the documented alternative
  parallel.check_slurm_gpus(8, 'gpu')
  parallel.check_slurm_gpus(1, 'cpu')  # only GPU jobs are checked


def test_tpu_initialize_failure_is_an_error(monkeypatch):
  for key in SLURM_KEYS:
    monkeypatch.delenv(key, raising=False)
  # A pod worker as JAX's TPU cluster class sees it (metadata given through the environment).
  monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', True)
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0,w1,w2,w3')
  monkeypatch.setenv('TPU_WORKER_ID', '2')
  for key, value in (
    ('TPU_SKIP_MDS_QUERY', '1'),
    ('MEGASCALE_NUM_SLICES', '1'),
    ('MEGASCALE_SLICE_ID', '0'),
  ):  # no metadata server here
    monkeypatch.setenv(key, value)
  present = [
    c for c in clusters.ClusterEnv._cluster_types if not c.opt_in_only_method and c.is_env_present()
  ]
  assert present and present[0] is cloud_tpu_cluster.GkeTpuCluster
  assert present[0].get_process_id() == 2 and present[0].get_process_count() == 4
  monkeypatch.setattr(parallel, 'on_cloud_tpu_vm', lambda: True)
  calls = []

  def failing_initialize(**kwargs):
    calls.append(kwargs)
    raise RuntimeError('Unable to connect to coordinator w0:8476')

  monkeypatch.setattr(jax.distributed, 'initialize', failing_initialize)
  with pytest.raises(FerJaxError, match='failed on this Cloud TPU VM.*--num_processes=1'):
    parallel.maybe_initialize_distributed()
  assert calls == [{}]
  parallel.maybe_initialize_distributed(num_processes=1)  # the explicit single-host opt-out
  assert len(calls) == 1


def test_mesh_comes_from_jax_make_mesh(monkeypatch):
  seen = []
  real = jax.make_mesh

  def spy(*args, **kwargs):
    seen.append((args, kwargs))
    return real(*args, **kwargs)

  monkeypatch.setattr(jax, 'make_mesh', spy)
  mesh = parallel.make_mesh()
  assert seen and seen[0][0] == ((jax.device_count(),), (parallel.DATA_AXIS,))
  assert mesh.axis_names == (parallel.DATA_AXIS,) and mesh.size == jax.device_count()
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)  # shardings stay jit's to choose


def test_native_lowering_checkpoint_runs_xla_conv_off_cpu(tmp_path, monkeypatch, caplog):
  """A checkpoint trained with lowering='native' is evaluated under a forced non-CPU resolution:
  no FFI custom call (CPU-only targets) is left in the program, the numbers are the same."""
  from fer_jax import checkpointing, evaluation, native, trained_model
  from fer_jax.data.types import Split
  from fer_jax.models import get_model, layers

  if not native.available():
    pytest.skip(f'C++ kernels unavailable: {native.unavailable_reason()}')
  from experiments import synthetic

  config = synthetic.get_config()
  config.model.lowering = 'native'
  model = get_model(config.model, 7)
  params = model.init(jax.random.key(0), jnp.zeros((1, 48, 48, 1)), train=False)['params']
  manager = checkpointing.make_manager(str(tmp_path), keep_latest=1, keep_best=1)
  import orbax.checkpoint as ocp

  manager.save(
    1,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave({'params': params}),
      meta=ocp.args.JsonSave(
        {
          'config': config.to_dict(),
          'class_names': [str(i) for i in range(7)],
          'pixel_mean': 0.5,
          'pixel_std': 0.25,
        }
      ),
    ),
    metrics={'accuracy': 0.0},
  )
  manager.wait_until_finished()
  manager.close()
  rng = np.random.default_rng(0)
  split = Split(
    images=rng.integers(0, 256, (8, 48, 48, 1), dtype=np.uint8),
    labels=rng.integers(0, 7, 8).astype(np.int32),
  )

  def run():
    trained = trained_model.load(str(tmp_path), 'latest')
    fn = evaluation.probabilities_fn(trained, 'none')
    hlo = jax.jit(fn).lower(trained.variables, split.images).as_text()
    return trained, hlo, evaluation.evaluate_trained(trained, split, batch_size=8)[1]

  _, hlo_cpu, probs_cpu = run()
  assert 'custom_call' in hlo_cpu  # on CPU the checkpoint's 'native' lowering is used
  monkeypatch.setattr(layers, 'backend', lambda: 'gpu')
  monkeypatch.setattr(layers, '_NOTICED', set())
  with caplog.at_level(logging.WARNING):
    trained, hlo_gpu, probs_gpu = run()
  assert trained.config.model.lowering == 'native'
  assert 'custom_call' not in hlo_gpu and 'convolution' in hlo_gpu
  notices = [r for r in caplog.records if 'CPU lowering' in r.getMessage()]
  assert len(notices) == 1 and '\n' not in notices[0].getMessage()
  np.testing.assert_allclose(probs_gpu, probs_cpu, rtol=1e-4, atol=1e-5)


def test_two_processes_on_different_workdirs_stop_clearly(tmp_path):
  """Each process gets its own directory (no shared filesystem): both stop with one clear line."""
  port = _free_port()
  procs, logs = [], []
  try:
    for pid in range(2):
      log = tmp_path / f'p{pid}.log'
      args = [
        sys.executable,
        'launch.py',
        '--config',
        'experiments/synthetic.py',
        '--config.data.synthetic_train=64',
        '--config.data.synthetic_test=16',
        '--config.train.batch_size=8',
        f'--workdir={tmp_path / f"host{pid}"}',
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={pid}',
      ]
      env = {
        **__import__('os').environ,
        'JAX_PLATFORMS': 'cpu',
        'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
      }
      with open(log, 'w') as f:
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT))
      logs.append(log)
    codes = [p.wait(timeout=240) for p in procs]
  finally:
    _kill_all(procs)
  texts = [l.read_text() for l in logs]
  for code, text in zip(codes, texts):
    assert code == 1, text[-2000:]
    assert re.search(r'error: workdir .*host\d is not shared: process\(es\) 1 cannot read', text), (
      text[-2000:]
    )
  assert not list((tmp_path / 'host0').glob('checkpoints/*'))  # stopped before training


def test_cpu_runtime_tweaks_only_for_the_cpu_backend(monkeypatch):
  """malloc re-exec and inline dispatch are XLA:CPU fixes: not applied where JAX will use an
  accelerator (JAX_PLATFORMS, or an installed plugin), decided before JAX starts."""
  import importlib.util

  from fer_jax import runtime

  for key in (
    'FER_JAX_MALLOC_TUNED',
    'MALLOC_MMAP_THRESHOLD_',
    'MALLOC_TRIM_THRESHOLD_',
    'MALLOC_TOP_PAD_',
    'MALLOC_ARENA_MAX',
    'FER_JAX_ASYNC_DISPATCH',
  ):
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  assert not runtime.cpu_backend_expected()
  assert runtime.tuned_environ() is None and not runtime.inline_cpu_dispatch()
  monkeypatch.delenv('JAX_PLATFORMS')
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    'find_spec',
    lambda name, *a: object() if name == 'jax_cuda12_plugin' else real(name, *a),
  )
  assert not runtime.cpu_backend_expected() and runtime.tuned_environ() is None
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert runtime.cpu_backend_expected()
  if runtime._glibc():
    assert runtime.tuned_environ()['MALLOC_TOP_PAD_']
