"""Images/s of the same model and loss in Keras (TensorFlow backend): the speed issue's peer.

  .venv-keras/bin/python benchmarks/peer_keras.py --size 48 --batch 64
prints per-window rates on stderr and, as its last stdout line, one JSON object.

Standalone on purpose (tensorflow/keras, numpy and the standard library only) so it runs in
its own virtualenv. It trains the way Keras users do, `model.fit` on in-memory numpy arrays
(fit feeds them through tf.data), and mirrors what benchmarks/train_throughput.py times for
fer_jax with the base config (experiments/base.py):
- input: uint8 48x48x1 batches; preprocessing runs inside the model (fer_jax does it inside
  the jitted step): x / 255, at --size 150 a bilinear resize 48 -> 150 (pixel-centre aligned,
  as fer_jax's resample), a random horizontal flip unless --no-augment, then per-image
  standardization (x - mean) / max(std, 1/sqrt(N)) -- fer_jax standardizes with or without
  augmentation, so --no-augment drops the flip only;
- SeedCNN: Conv(32,3,relu,valid) MaxPool(2) Dropout(.1) Conv(64,3,relu,valid) MaxPool(2)
  Dropout(.1) Flatten Dense(128,relu,l2(1e-4)) Dropout(.25) Dense(7) logits, float32;
- loss: sparse softmax cross-entropy on logits (mean over the batch) + the L2 term;
- optimizer: AdamW(2e-3, weight_decay=1e-4), biases excluded from the decay (fer_jax decays
  kernels only); accuracy is computed every step as fer_jax's step does.
Threading is TensorFlow's default (intra/inter-op pools sized to the machine) unless
--intra-op/--inter-op say otherwise. Warm-up steps (tracing) are excluded; the figure is the
median of consecutive timed windows, as in train_throughput.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

# fer_jax's SeedCNN (7 classes) at each input size; the peer must match it exactly.
EXPECTED_TRAINABLE_PARAMS = {48: 839_047, 150: 10_636_679}
NUM_CLASSES = 7
DROPOUT = (0.1, 0.1, 0.25)  # experiments/base.py
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
L2 = 1e-4
# glibc settings that fer_jax's runtime.py applies at start-up (copied: this file is
# standalone); off by default here, since Keras users run with glibc's defaults.
MALLOC_ENV = {
  'MALLOC_MMAP_THRESHOLD_': str(1 << 32),
  'MALLOC_TRIM_THRESHOLD_': str(1 << 32),
  'MALLOC_TOP_PAD_': str(512 << 20),
}


def _parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--size', type=int, default=48, choices=sorted(EXPECTED_TRAINABLE_PARAMS))
  p.add_argument('--batch', type=int, default=32, help='batch size (base config: 32)')
  p.add_argument('--no-augment', action='store_true', help='no random flip (still standardizes)')
  p.add_argument('--windows', type=int, default=5)
  p.add_argument('--steps-per-window', type=int, default=10)
  p.add_argument('--warmup-steps', type=int, default=3, help='untimed steps first (tracing)')
  p.add_argument('--intra-op', type=int, default=0, help='TF intra-op threads (0: TF default)')
  p.add_argument('--inter-op', type=int, default=0, help='TF inter-op threads (0: TF default)')
  p.add_argument(
    '--onednn',
    default='default',
    choices=('default', 'on', 'off'),
    help='sets TF_ENABLE_ONEDNN_OPTS before importing TF (default: leave as is)',
  )
  p.add_argument(
    '--malloc-tuned',
    action='store_true',
    help="re-run with fer_jax's glibc MALLOC_* settings (a like-for-like check)",
  )
  p.add_argument(
    '--jit-compile',
    default='auto',
    choices=('auto', 'true', 'false'),
    help="model.compile(jit_compile=...); Keras' 'auto' means no XLA on CPU",
  )
  return p.parse_args()


def _onednn_enabled() -> bool | None:
  """Whether TF's oneDNN ops are on (TF decides per CPU when TF_ENABLE_ONEDNN_OPTS is unset)."""
  try:
    from tensorflow.python.util import _pywrap_util_port  # private; absent in some builds

    return bool(_pywrap_util_port.IsMklEnabled())
  except (ImportError, AttributeError):
    return None


def build_model(size: int, augment: bool, seed: int = 0):
  """uint8 (B, 48, 48, 1) -> float32 (B, 7) logits, preprocessing included."""
  import keras
  import tensorflow as tf
  from keras import layers

  class PerImageStandardization(layers.Layer):
    """fer_jax's per_image mode, which is tf.image.per_image_standardization's formula."""

    def call(self, x):
      return tf.image.per_image_standardization(x)

  inputs = keras.Input((48, 48, 1), dtype='uint8', name='image')
  x = layers.Rescaling(1 / 255, name='rescale')(inputs)
  if size != 48:
    x = layers.Resizing(size, size, interpolation='bilinear', name='resize')(x)
  if augment:
    x = layers.RandomFlip('horizontal', seed=seed, name='flip')(x)
  x = PerImageStandardization(name='standardize')(x)
  p1, p2, p3 = DROPOUT
  x = layers.Conv2D(32, 3, activation='relu', padding='valid', name='conv1')(x)
  x = layers.MaxPooling2D(2, name='pool1')(x)
  x = layers.Dropout(p1, seed=seed, name='drop1')(x)
  x = layers.Conv2D(64, 3, activation='relu', padding='valid', name='conv2')(x)
  x = layers.MaxPooling2D(2, name='pool2')(x)
  x = layers.Dropout(p2, seed=seed + 1, name='drop2')(x)
  x = layers.Flatten(name='flatten')(x)
  x = layers.Dense(
    128, activation='relu', kernel_regularizer=keras.regularizers.l2(L2), name='dense1'
  )(x)
  x = layers.Dropout(p3, seed=seed + 2, name='drop3')(x)
  logits = layers.Dense(NUM_CLASSES, name='logits')(x)
  return keras.Model(inputs, logits, name='seed_cnn')


class WindowTimer:
  """Times consecutive windows of batches through the Keras callback `callback()` returns.

  The clock starts when batch `warmup` begins and stops at the end of every
  `steps_per_window`-th batch after it; the window's last loss is read back first, so
  the step has really finished. Training stops after the last window.
  """

  def __init__(self, warmup: int, windows: int, steps_per_window: int, batch: int):
    self.warmup, self.windows, self.spw, self.batch = warmup, windows, steps_per_window, batch
    self.rates: list[float] = []
    self._start = 0.0

  def callback(self):
    import keras

    timer = self

    class _Callback(keras.callbacks.Callback):
      def on_train_batch_begin(self, batch, logs=None):
        if batch == timer.warmup:
          timer._start = time.perf_counter()

      def on_train_batch_end(self, batch, logs=None):
        done = batch + 1 - timer.warmup
        if batch + 1 == timer.warmup:
          float((logs or {}).get('loss', 0.0))  # settle the warm-up before the clock starts
        if done <= 0 or done % timer.spw:
          return
        float((logs or {}).get('loss', 0.0))
        now = time.perf_counter()
        rate = timer.spw * timer.batch / (now - timer._start)
        timer._start = now
        timer.rates.append(rate)
        print(f'window {len(timer.rates) - 1}: {rate:.0f} img/s', file=sys.stderr)
        if len(timer.rates) == timer.windows:
          self.model.stop_training = True

    return _Callback()


def main() -> None:
  args = _parse_args()
  if args.malloc_tuned and not any(k in os.environ for k in MALLOC_ENV):
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})
  if args.onednn != 'default':
    os.environ['TF_ENABLE_ONEDNN_OPTS'] = '1' if args.onednn == 'on' else '0'
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  import keras
  import numpy as np
  import tensorflow as tf

  if args.intra_op:
    tf.config.threading.set_intra_op_parallelism_threads(args.intra_op)
  if args.inter_op:
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
  keras.utils.set_random_seed(0)

  augment = not args.no_augment
  model = build_model(args.size, augment)
  trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
  print(f'trainable params: {trainable:,}', file=sys.stderr)
  expected = EXPECTED_TRAINABLE_PARAMS[args.size]
  assert trainable == expected, f'{trainable} trainable params, fer_jax SeedCNN has {expected}'

  optimizer = keras.optimizers.AdamW(learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  optimizer.exclude_from_weight_decay(var_names=['bias'])
  jit = {'auto': 'auto', 'true': True, 'false': False}[args.jit_compile]
  model.compile(
    optimizer=optimizer,
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=['accuracy'],
    jit_compile=jit,
  )

  # One epoch just long enough for warm-up plus the windows, so no epoch boundary is timed.
  steps = args.warmup_steps + args.windows * args.steps_per_window
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (steps * args.batch, 48, 48, 1), dtype=np.uint8)
  y = rng.integers(0, NUM_CLASSES, (steps * args.batch,)).astype(np.int32)
  timer = WindowTimer(args.warmup_steps, args.windows, args.steps_per_window, args.batch)
  model.fit(
    x, y, batch_size=args.batch, epochs=1, shuffle=True, verbose=0, callbacks=[timer.callback()]
  )
  if len(timer.rates) != args.windows:
    raise SystemExit(f'timed {len(timer.rates)} of {args.windows} windows')

  result = {
    'images_per_s': round(float(np.median(timer.rates)), 1),
    'size': args.size,
    'batch': args.batch,
    'framework': 'keras',
    'augment': augment,
    'windows': [round(r, 1) for r in timer.rates],
    'trainable_params': trainable,
    'tf': tf.__version__,
    'keras': keras.__version__,
    'jit_compile': bool(model.jit_compile),
    'onednn_enabled': _onednn_enabled(),
    'TF_ENABLE_ONEDNN_OPTS': os.environ.get('TF_ENABLE_ONEDNN_OPTS'),
    'malloc_tuned': all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()),
    'intra_op_threads': tf.config.threading.get_intra_op_parallelism_threads(),
    'inter_op_threads': tf.config.threading.get_inter_op_parallelism_threads(),
    'threads_note': '0 means TF default (sized to the machine)',
    'cpu_count': os.cpu_count(),
    'python': platform.python_version(),
  }
  print(json.dumps(result))


if __name__ == '__main__':
  main()
