"""Images/s of fer_jax's zoo models trained in Keras (TensorFlow backend): a peer.

  .venv-keras/bin/python benchmarks/peer_keras.py --size 48 --batch 64     # the seed CNN
  compare_peers.py passes each zoo model's network and recipe (see peer_common.py)
prints per-window rates on stderr and, as its last stdout line, one JSON object.

Standalone on purpose (tensorflow/keras, numpy, the standard library and peer_common.py) so it
runs in its own virtualenv. It trains the way Keras users do, `model.fit` on in-memory numpy
arrays (fit feeds them through tf.data), with the network, loss, optimizer and input
pipeline that peer_common.py describes; the preprocessing (x / 255, RandomCrop, RandomFlip,
resize, standardization) are layers of the model, so they run inside the step as fer_jax's do.
Keras specifics: SGD's coupled weight decay is an l2(wd / 2) kernel regularizer (gradient
+= wd * w, as optax.add_decayed_weights); label smoothing uses one-hot labels with
CategoricalCrossentropy; `--ema` is the optimizer's use_ema. Keras' RandomCrop draws one
offset per batch (fer_jax and the PyTorch peer one per image): the same work.
Threading is TensorFlow's default (intra/inter-op pools sized to the machine) unless
--intra-op/--inter-op say otherwise. Warm-up steps (tracing) are excluded; the figure is the
median of consecutive timed windows, as in train_throughput.py.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common  # noqa: E402  (standard library only)

# glibc settings that fer_jax's runtime.py applies at start-up (copied: this file is
# standalone); off by default here, since Keras users run with glibc's defaults.
MALLOC_ENV = {
  'MALLOC_MMAP_THRESHOLD_': str(1 << 32),
  'MALLOC_TRIM_THRESHOLD_': str(1 << 32),
  'MALLOC_TOP_PAD_': str(512 << 20),
}


def _keras_args(p) -> None:
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


def _onednn_enabled() -> bool | None:
  """Whether TF's oneDNN ops are on (TF decides per CPU when TF_ENABLE_ONEDNN_OPTS is unset)."""
  try:
    from tensorflow.python.util import _pywrap_util_port  # private; absent in some builds

    return bool(_pywrap_util_port.IsMklEnabled())
  except (ImportError, AttributeError):
    return None


def build_model(args, seed: int = 0):
  """uint8 (B, 48, 48, 1) -> float32 (B, 7) logits, preprocessing included."""
  import keras
  import tensorflow as tf
  from keras import layers

  class PerImageStandardization(layers.Layer):
    """fer_jax's per_image mode, which is tf.image.per_image_standardization's formula."""

    def call(self, x):
      return tf.image.per_image_standardization(x)

  sgd_decay = args.weight_decay / 2 if args.optimizer == 'sgd' else 0.0

  def reg(extra: float = 0.0):
    total = sgd_decay + extra
    return keras.regularizers.l2(total) if total else None

  def bn(name: str, zero: bool = False):
    return layers.BatchNormalization(
      momentum=0.9, epsilon=1e-5, gamma_initializer='zeros' if zero else 'ones', name=name
    )

  def conv(x, c: int, k: int, stride: int, bias: bool, name: str):
    return layers.Conv2D(
      c, k, strides=stride, padding='same', use_bias=bias, kernel_regularizer=reg(), name=name
    )(x)

  inputs = keras.Input((48, 48, 1), dtype='uint8', name='image')
  if args.standardize == 'dataset':  # x / 255, then (x - mean) / std, in one affine map
    scale, offset = 1 / (255 * peer_common.DATASET_STD), -peer_common.DATASET_MEAN
    x = layers.Rescaling(scale, offset / peer_common.DATASET_STD, name='rescale')(inputs)
  else:
    x = layers.Rescaling(1 / 255, name='rescale')(inputs)
  if args.crop < 48:
    crop = layers.CenterCrop if args.no_augment else layers.RandomCrop
    x = crop(args.crop, args.crop, name='crop')(x)
  if args.size != args.crop:
    x = layers.Resizing(args.size, args.size, interpolation='bilinear', name='resize')(x)
  if not args.no_augment:
    x = layers.RandomFlip('horizontal', seed=seed, name='flip')(x)
  if args.standardize == 'per_image':
    x = PerImageStandardization(name='standardize')(x)

  rates = peer_common.dropout(args)
  if args.net == 'seed_cnn':
    x = layers.Conv2D(32, 3, activation='relu', kernel_regularizer=reg(), name='conv1')(x)
    x = layers.MaxPooling2D(2, name='pool1')(x)
    x = layers.Dropout(rates[0], seed=seed, name='drop1')(x)
    x = layers.Conv2D(64, 3, activation='relu', kernel_regularizer=reg(), name='conv2')(x)
    x = layers.MaxPooling2D(2, name='pool2')(x)
    x = layers.Dropout(rates[1], seed=seed + 1, name='drop2')(x)
    x = layers.Flatten(name='flatten')(x)
    x = layers.Dense(128, activation='relu', kernel_regularizer=reg(args.l2), name='dense1')(x)
    x = layers.Dropout(rates[2], seed=seed + 2, name='drop3')(x)
  elif args.net == 'vgg':
    for b, channels in enumerate(peer_common.blocks(args)):
      for j, c in enumerate(channels):
        x = conv(x, c, 3, 1, True, f'conv{b + 1}_{j}')
        x = layers.ReLU()(bn(f'bn{b + 1}_{j}')(x))
      x = layers.MaxPooling2D(2, name=f'pool{b + 1}')(x)
    x = layers.Flatten(name='flatten')(x)
    for i, d in enumerate(peer_common.ints(args.dense)):
      x = layers.Dense(d, activation='relu', kernel_regularizer=reg(), name=f'dense{i + 1}')(x)
      x = layers.Dropout(rates[0], seed=seed + i, name=f'drop{i + 1}')(x)
  else:
    x = layers.ReLU()(bn('stem_bn')(conv(x, args.width, 3, 1, False, 'stem')))
    for i, n in enumerate(peer_common.ints(args.stages)):
      for j in range(n):
        c, stride, name = args.width * 2**i, 2 if i > 0 and j == 0 else 1, f's{i + 1}b{j + 1}'
        y = layers.ReLU()(bn(f'{name}_bn1')(conv(x, c, 3, stride, False, f'{name}_conv1')))
        y = bn(f'{name}_bn2', zero=True)(conv(y, c, 3, 1, False, f'{name}_conv2'))
        if x.shape[-1] != c or stride != 1:
          x = bn(f'{name}_bn_sc')(conv(x, c, 1, stride, False, f'{name}_shortcut'))
        x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.GlobalAveragePooling2D(name='pool')(x)
    if rates[0] > 0:
      x = layers.Dropout(rates[0], seed=seed, name='drop')(x)
  logits = layers.Dense(peer_common.NUM_CLASSES, kernel_regularizer=reg(), name='logits')(x)
  return keras.Model(inputs, logits, name=args.net)  # Keras names allow no ':'


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
  args = peer_common.parse_args(__doc__.splitlines()[0], _keras_args)
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

  model = build_model(args)
  trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
  print(f'trainable params: {trainable:,}', file=sys.stderr)
  peer_common.check_params(args, trainable)

  ema = dict(use_ema=True, ema_momentum=args.ema) if args.ema else {}
  if args.optimizer == 'adamw':
    optimizer = keras.optimizers.AdamW(
      learning_rate=args.lr, weight_decay=args.weight_decay, epsilon=1e-8, **ema
    )
    optimizer.exclude_from_weight_decay(var_names=['bias', 'gamma', 'beta'])
  else:  # the decay is the kernels' l2(wd / 2) regularizer (build_model)
    optimizer = keras.optimizers.SGD(
      learning_rate=args.lr, momentum=args.momentum, nesterov=not args.no_nesterov, **ema
    )
  smoothing = args.label_smoothing
  loss = (
    keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing)
    if smoothing
    else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  )
  jit = {'auto': 'auto', 'true': True, 'false': False}[args.jit_compile]
  model.compile(optimizer=optimizer, loss=loss, metrics=['accuracy'], jit_compile=jit)

  # One epoch just long enough for warm-up plus the windows, so no epoch boundary is timed.
  steps = args.warmup_steps + args.windows * args.steps_per_window
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (steps * args.batch, 48, 48, 1), dtype=np.uint8)
  y = rng.integers(0, peer_common.NUM_CLASSES, (steps * args.batch,)).astype(np.int32)
  if smoothing:
    y = np.eye(peer_common.NUM_CLASSES, dtype=np.float32)[y]
  timer = WindowTimer(args.warmup_steps, args.windows, args.steps_per_window, args.batch)
  model.fit(
    x, y, batch_size=args.batch, epochs=1, shuffle=True, verbose=0, callbacks=[timer.callback()]
  )
  if len(timer.rates) != args.windows:
    raise SystemExit(f'timed {len(timer.rates)} of {args.windows} windows')

  result = peer_common.result(args, 'keras', timer.rates, trainable)
  result.update(
    tf=tf.__version__,
    keras=keras.__version__,
    jit_compile=bool(model.jit_compile),
    onednn_enabled=_onednn_enabled(),
    TF_ENABLE_ONEDNN_OPTS=os.environ.get('TF_ENABLE_ONEDNN_OPTS'),
    malloc_tuned=all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()),
    intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
    inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads(),
    threads_note='0 means TF default (sized to the machine)',
  )
  print(json.dumps(result))


if __name__ == '__main__':
  main()
