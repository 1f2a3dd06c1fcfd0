"""Images/s of fer_jax's zoo models trained in PyTorch (eager, or `--compile`): a peer.

  .venv-torch/bin/python benchmarks/peer_torch.py --size 48 --batch 64       # the seed CNN
  compare_peers.py passes each zoo model's network and recipe (see peer_common.py)
prints per-window rates on stderr and, as its last stdout line, one JSON object.

Standalone on purpose (torch, numpy, the standard library and peer_common.py) so it runs in its
own virtualenv (the CPU wheel). It trains the way PyTorch users do: a plain loop over uint8
batches already in memory, the preprocessing (x / 255, a random crop per image, a random
flip per image, resize, standardization) as tensor ops at the start of each step, then
forward, cross-entropy, backward and the optimizer step, with the network, loss and optimizer
that peer_common.py describes. NCHW (PyTorch's default) unless --channels-last;
`--compile` wraps the model in torch.compile (forward and backward; the optimizer step stays
eager), whose compilation falls in the warm-up steps. Threads: PyTorch's default (one per
core) unless --threads. The figure is the median of consecutive timed windows.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common  # noqa: E402  (standard library only)


def _torch_args(p) -> None:
  p.add_argument('--compile', action='store_true', help='torch.compile the model')
  p.add_argument('--channels-last', action='store_true', help='NHWC memory format')
  p.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: default)')


def build_model(args):
  """float32 (B, 1, S, S) -> (B, 7) logits (preprocessing is `preprocess`)."""
  import torch
  from torch import nn

  rates = peer_common.dropout(args)

  def bn(c: int, zero: bool = False) -> nn.BatchNorm2d:
    layer = nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)
    if zero:
      nn.init.zeros_(layer.weight)
    return layer

  class BasicBlock(nn.Module):
    def __init__(self, cin: int, c: int, stride: int):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
      self.bn1 = bn(c)
      self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
      self.bn2 = bn(c, zero=True)
      self.shortcut = (
        nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), bn(c))
        if cin != c or stride != 1
        else nn.Identity()
      )

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      return torch.relu(self.shortcut(x) + self.bn2(self.conv2(y)))

  if args.net == 'seed_cnn':
    trunk = [nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(rates[0])]
    trunk += [nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(rates[1])]
    trunk += [nn.Flatten()]
    hidden, head_rate = [128], rates[2]
  elif args.net == 'vgg':
    trunk, cin = [], 1
    for channels in peer_common.blocks(args):
      for c in channels:
        trunk += [nn.Conv2d(cin, c, 3, 1, 1), bn(c), nn.ReLU()]
        cin = c
      trunk += [nn.MaxPool2d(2)]
    trunk += [nn.Flatten()]
    hidden, head_rate = peer_common.ints(args.dense), rates[0]
  else:
    w = args.width
    trunk, cin = [nn.Conv2d(1, w, 3, 1, 1, bias=False), bn(w), nn.ReLU()], w
    for i, n in enumerate(peer_common.ints(args.stages)):
      for j in range(n):
        trunk.append(BasicBlock(cin, w * 2**i, 2 if i > 0 and j == 0 else 1))
        cin = w * 2**i
    trunk += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if rates[0] > 0:
      trunk.append(nn.Dropout(rates[0]))
    hidden, head_rate = [], 0.0
  trunk = nn.Sequential(*trunk)
  with torch.no_grad():
    features = trunk.eval()(torch.zeros(2, 1, args.size, args.size)).shape[1]
  head = []
  for d in hidden:
    head += [nn.Linear(features, d), nn.ReLU(), nn.Dropout(head_rate)]
    features = d
  head.append(nn.Linear(features, peer_common.NUM_CLASSES))
  return nn.Sequential(trunk, *head)


def main() -> None:
  args = peer_common.parse_args(__doc__.splitlines()[0], _torch_args)
  import numpy as np
  import torch
  import torch.nn.functional as F

  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = build_model(args)
  trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
  print(f'trainable params: {trainable:,}', file=sys.stderr)
  peer_common.check_params(args, trainable)
  memory = torch.channels_last if args.channels_last else torch.contiguous_format
  model = model.to(memory_format=memory).train()

  # Weight decay on conv and dense kernels only (fer_jax decays leaves named 'kernel').
  decay = [p for p in model.parameters() if p.ndim > 1]
  rest = [p for p in model.parameters() if p.ndim <= 1]
  groups = [{'params': decay, 'weight_decay': args.weight_decay}, {'params': rest}]
  if args.optimizer == 'adamw':
    optimizer = torch.optim.AdamW(groups, lr=args.lr, eps=1e-8, weight_decay=0.0)
  else:
    optimizer = torch.optim.SGD(
      groups, lr=args.lr, momentum=args.momentum, nesterov=not args.no_nesterov, weight_decay=0.0
    )
  ema = None
  if args.ema:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
  l2_kernel = model[1].weight if args.net == 'seed_cnn' and args.l2 else None
  forward = torch.compile(model) if args.compile else model

  side, crop = 48, args.crop
  arange = torch.arange(crop)

  def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1, 48, 48) -> standardized float32 (B, 1, S, S)."""
    x = images.float().div_(255.0)
    b = x.shape[0]
    if crop < side:
      if args.no_augment:
        top = left = torch.full((b,), (side - crop) // 2)
      else:
        top, left = torch.randint(0, side - crop + 1, (2, b))
      rows = (top[:, None] + arange)[:, :, None]
      cols = (left[:, None] + arange)[:, None, :]
      x = x[torch.arange(b)[:, None, None], 0, rows, cols][:, None]
    if args.size != crop:
      x = F.interpolate(x, size=(args.size, args.size), mode='bilinear', align_corners=False)
    if not args.no_augment:
      flip = torch.rand(b) < 0.5
      x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if args.standardize == 'dataset':
      x = (x - peer_common.DATASET_MEAN) / peer_common.DATASET_STD
    else:
      mean = x.mean(dim=(1, 2, 3), keepdim=True)
      std = x.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
      x = (x - mean) / torch.clamp(std, min=(x[0].numel()) ** -0.5)
    return x.contiguous(memory_format=memory)

  def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = forward(preprocess(images))
    loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
    if l2_kernel is not None:
      loss = loss + args.l2 * l2_kernel.square().sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if ema is not None:
      ema.update_parameters(model)
    (logits.detach().argmax(1) == labels).float().mean()  # the accuracy, as fer_jax's step
    return loss.detach()

  rng = np.random.default_rng(0)
  batches = [
    (
      torch.from_numpy(rng.integers(0, 256, (args.batch, 1, 48, 48), dtype=np.uint8)),
      torch.from_numpy(rng.integers(0, peer_common.NUM_CLASSES, (args.batch,)).astype(np.int64)),
    )
    for _ in range(4)
  ]
  t = time.perf_counter()
  for i in range(max(1, args.warmup_steps)):
    float(step(*batches[i % 4]))
  print(f'warm-up: {time.perf_counter() - t:.1f} s', file=sys.stderr)
  rates = []
  for w in range(args.windows):
    t = time.perf_counter()
    for i in range(args.steps_per_window):
      loss = step(*batches[i % 4])
    float(loss)
    rates.append(args.steps_per_window * args.batch / (time.perf_counter() - t))
    print(f'window {w}: {rates[-1]:.0f} img/s', file=sys.stderr)

  result = peer_common.result(args, 'torch_compile' if args.compile else 'torch', rates, trainable)
  result.update(
    torch=torch.__version__,
    compiled=args.compile,
    channels_last=args.channels_last,
    threads=torch.get_num_threads(),
    mkldnn=torch.backends.mkldnn.is_available(),
  )
  print(json.dumps(result))


if __name__ == '__main__':
  main()
