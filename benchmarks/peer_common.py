"""What the Keras and PyTorch peers share: their command line and their JSON line.

Standard library only, so peer_keras.py and peer_torch.py stay standalone (their framework,
numpy and this file). The network and the recipe come as flags, which compare_peers.py derives
from fer_jax's own model and experiment config at run time; without them the peer is the seed
CNN of experiments/base.py, as peer_keras.py always was.

Networks (`--net`):
- seed_cnn: Conv(32,3,valid) relu MaxPool(2) Dropout, Conv(64,3,valid) relu MaxPool(2) Dropout,
  Flatten, Dense(128, relu, L2 `--l2`) Dropout, Dense(classes); dropout rates `--dropout a,b,c`.
- vgg: per block (`--blocks 64,64/128,128/...`: each block's conv channels, '/' between
  blocks) 3x3 'SAME' conv + bias + BatchNorm + ReLU per channel count, then MaxPool(2);
  Flatten; per `--dense` width Dense + ReLU + Dropout(`--dropout`); Dense(classes).
- resnet: CIFAR stem (3x3 conv, no bias, BatchNorm, ReLU), BasicBlocks (`--stages 2,2,2,2`,
  `--width` channels doubling per stage, stride 2 at each later stage's first block, 1x1 conv +
  BatchNorm shortcut where the shape changes, the last BatchNorm of a branch initialised to
  zero), global average pool, Dropout(`--dropout`) if > 0, Dense(classes).
BatchNorm everywhere: momentum 0.9 (PyTorch's 0.1), epsilon 1e-5, batch statistics in training.

Input: uint8 48x48x1 batches; inside the timed step x / 255, then (with augmentation) a random
`--crop`-px crop (none when it is 48) and a random horizontal flip, or the centre crop
without; a bilinear resize to `--size` if that differs; `--standardize per_image` ((x - mean) /
max(std, 1/sqrt(N)) per image) or `dataset` ((x - 0.5) / 0.25, the constants fer_jax's
benchmark uses).

Loss and optimizer: softmax cross-entropy on logits (mean over the batch, `--label-smoothing`),
plus `--l2` x sum(w^2) of the seed CNN's Dense-128 kernel; `--optimizer adamw` (decoupled
`--weight-decay`, eps 1e-8) or `sgd` (`--momentum`, Nesterov unless `--no-nesterov`, weight
decay added to the gradient), decay on conv and dense kernels only (not biases, not
BatchNorm), a constant `--lr` (fer_jax's schedules cost nothing measurable); `--ema D` keeps
an exponential moving average of the weights, updated every step. Accuracy is computed every
step, as fer_jax's step does.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

NUM_CLASSES = 7
# fer_jax's SeedCNN (7 classes) at each input size, for runs without --expect-params.
SEED_CNN_PARAMS = {48: 839_047, 150: 10_636_679}
DATASET_MEAN, DATASET_STD = 0.5, 0.25  # what benchmarks/train_throughput.py standardizes with


def parse_args(description: str, extra=None) -> argparse.Namespace:
  """The peers' shared flags; `extra(parser)` adds a framework's own."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument('--net', default='seed_cnn', choices=('seed_cnn', 'vgg', 'resnet'))
  p.add_argument('--model-name', default='', help='label for the JSON line (e.g. vgg_fer)')
  p.add_argument('--size', type=int, default=48, help='model input side')
  p.add_argument('--crop', type=int, default=48, help='random crop side of the 48-px image')
  p.add_argument('--blocks', default='', help="vgg: conv channels per block, '/' between blocks")
  p.add_argument('--dense', default='', help='vgg: hidden dense widths, comma-separated')
  p.add_argument('--width', type=int, default=64, help='resnet: first stage channels')
  p.add_argument('--stages', default='2,2,2,2', help='resnet: BasicBlocks per stage')
  p.add_argument('--dropout', default='', help='seed_cnn: 3 rates; vgg/resnet: 1 rate')
  p.add_argument('--standardize', default='per_image', choices=('per_image', 'dataset'))
  p.add_argument('--optimizer', default='adamw', choices=('adamw', 'sgd'))
  p.add_argument('--lr', type=float, default=2e-3)
  p.add_argument('--weight-decay', type=float, default=1e-4)
  p.add_argument('--momentum', type=float, default=0.9)
  p.add_argument('--no-nesterov', action='store_true')
  p.add_argument('--l2', type=float, default=1e-4, help="seed_cnn's Dense-128 kernel L2")
  p.add_argument('--label-smoothing', type=float, default=0.0)
  p.add_argument('--ema', type=float, default=0.0, help='EMA decay of the weights (0: none)')
  p.add_argument('--expect-params', type=int, default=0, help="fer_jax's trainable count")
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--no-augment', action='store_true', help='centre crop, no flip')
  p.add_argument('--windows', type=int, default=5)
  p.add_argument('--steps-per-window', type=int, default=10)
  p.add_argument('--warmup-steps', type=int, default=3, help='untimed steps first (tracing)')
  if extra is not None:
    extra(p)
  args = p.parse_args()
  if args.net == 'vgg' and not (args.blocks and args.dense):
    p.error('--net vgg needs --blocks and --dense')
  if not 0 < args.crop <= 48:
    p.error(f'--crop {args.crop}: expected 1..48')
  return args


def blocks(args: argparse.Namespace) -> list[list[int]]:
  return [[int(c) for c in b.split(',')] for b in args.blocks.split('/')]


def ints(text: str) -> list[int]:
  return [int(v) for v in text.split(',') if v]


def dropout(args: argparse.Namespace) -> list[float]:
  """seed_cnn: 3 rates (base.py's 0.1, 0.1, 0.25 by default); vgg/resnet: 1 rate."""
  default = {'seed_cnn': '0.1,0.1,0.25', 'vgg': '0.2', 'resnet': '0'}[args.net]
  rates = [float(v) for v in (args.dropout or default).split(',')]
  if len(rates) != (3 if args.net == 'seed_cnn' else 1):
    raise SystemExit(f'--dropout {args.dropout!r}: wrong number of rates for --net {args.net}')
  return rates


def expected_params(args: argparse.Namespace) -> int | None:
  if args.expect_params:
    return args.expect_params
  if args.net == 'seed_cnn' and args.crop == 48:
    return SEED_CNN_PARAMS.get(args.size)
  return None


def check_params(args: argparse.Namespace, trainable: int) -> None:
  """Stops the run when the peer's network is not fer_jax's (parameter counts differ)."""
  expected = expected_params(args)
  if expected is not None and trainable != expected:
    raise SystemExit(f'peer has {trainable:,} trainable params, fer_jax {expected:,}: not the same')


def result(args: argparse.Namespace, framework: str, rates: list[float], trainable: int) -> dict:
  """The JSON line's common fields; the framework adds its versions and settings."""
  return {
    'images_per_s': round(statistics.median(rates), 1),
    'framework': framework,
    'model': args.model_name or args.net,
    'net': args.net,
    'size': args.size,
    'batch': args.batch,
    'augment': not args.no_augment,
    'crop': args.crop,
    'windows': [round(r, 1) for r in rates],
    'trainable_params': trainable,
    'params_checked': expected_params(args) is not None,
    'optimizer': args.optimizer,
    'cpu_count': os.cpu_count(),
    'python': platform.python_version(),
  }
