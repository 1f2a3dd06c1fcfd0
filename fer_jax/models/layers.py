"""CPU-friendly lowerings of SeedCNN's convolution and max-pool.

Why: on XLA:CPU the gradient of `nn.max_pool` lowers to select_and_scatter and the gradients of
`lax.conv_general_dilated` run far below the machine's matmul speed. The 'dot' and 'native'
lowerings write the same maths with pieces XLA:CPU is good at:

- 2x2 max-pool as crop-to-even + reshape + max over the window axes, whose gradient is a cheap
  elementwise mask;
- the conv's input cropped to the rows and columns the following floor-pool keeps;
- a hand-written gradient for conv + relu + pool (`conv_relu_pool`): one mask and the conv's
  two gradients, instead of JAX's tie-counting max gradient;
- the convolution (stride 1, 'VALID') itself: under 'dot' as im2col, the kh*kw shifted views
  concatenated on the channel axis and multiplied by the reshaped kernel in ONE matmul; under
  'native' by the C++ direct-convolution kernels of `fer_jax.native` (called through the XLA
  FFI; no patch matrix, which at 150x150 costs as much memory traffic as the matmul).

`ConvReluPool` is the layer SeedCNN uses (conv + relu + pool under every lowering). 'auto' picks
'native' on the CPU backend ('dot' where the kernels cannot be built) and 'xla' elsewhere.

The parameters are the same `nn.Conv` kernels in every lowering, so checkpoints are
interchangeable; 'xla' stays the straightforward path used on GPU/TPU.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax import lax

from fer_jax import native

LOWERINGS: tuple[str, ...] = ('auto', 'xla', 'dot', 'native')
# The products of the convs: 'bfloat16' rounds both operands to bfloat16 and sums in float32,
# in the C++ kernels' forward conv and both gradients (two products per instruction on CPUs
# with AVX512-BF16). It takes effect on the 'native' lowering where `native.bf16_products()`;
# elsewhere the products stay float32 (`notice_conv_precision` says so once).
CONV_PRECISIONS: tuple[str, ...] = ('float32', 'bfloat16')


def backend() -> str:
  """The backend the lowerings are resolved for (a function, so tests can force a non-CPU one)."""
  return jax.default_backend()


_NOTICED: set[str] = set()


def resolve_lowering(lowering: str) -> str:
  """Maps 'auto' to 'native' on the CPU backend ('dot' where the C++ kernels cannot be built)
  and to 'xla' elsewhere. 'native' and 'dot' are CPU lowerings (the C++ kernels are XLA:CPU
  FFI targets): on another backend, e.g. a CPU-trained checkpoint evaluated on a GPU, they
  resolve to 'xla' with a one-line notice; the parameters are the same."""
  if lowering not in LOWERINGS:
    raise ValueError(f'unknown lowering {lowering!r}; expected one of {LOWERINGS}')
  name = backend()
  if lowering == 'auto':
    if name != 'cpu':
      return 'xla'
    return 'native' if native.available() else 'dot'
  if lowering in ('native', 'dot') and name != 'cpu':
    if lowering not in _NOTICED:
      _NOTICED.add(lowering)
      logging.warning(
        "lowering=%r is a CPU lowering: using XLA's convolution on %s", lowering, name
      )
    return 'xla'
  return lowering


def notice_conv_precision(lowering: str) -> None:
  """Logs once where conv_precision='bfloat16' cannot take effect (float32 products instead)."""
  resolved = resolve_lowering(lowering)
  if resolved == 'native' and native.bf16_products():
    return
  why = (
    f'the {resolved!r} lowering has no bfloat16 conv kernels'
    if resolved != 'native'
    else 'this CPU has no AVX512-BF16'
  )
  if why not in _NOTICED:
    _NOTICED.add(why)
    logging.warning("conv_precision='bfloat16': %s; the convs' products stay float32", why)


def _pool_windows(y: jax.Array) -> jax.Array:
  """(B, 2H, 2W, C) -> (B, H, 2, W, 2, C): each 2x2 pool window on its own pair of axes."""
  b, h, w, c = y.shape
  return y.reshape(b, h // 2, 2, w // 2, 2, c)


def max_pool_2x2(x: jax.Array, lowering: str = 'auto') -> jax.Array:
  """2x2 max-pool, stride 2, 'valid' padding on NHWC input.

  Odd sizes are floored like Keras MaxPool2D(padding='valid'):
  out = floor(n / 2), the last row/column is dropped.
  """
  if resolve_lowering(lowering) == 'xla':
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding='VALID')
  _, h, w, _ = x.shape
  return jnp.max(_pool_windows(x[:, : h // 2 * 2, : w // 2 * 2, :]), axis=(2, 4))


def im2col_patches(x: jax.Array, kh: int, kw: int) -> jax.Array:
  """(B, H, W, C) -> (B, Ho, Wo, kh*kw*C): the kh*kw shifted views of a stride-1 'VALID' conv,
  concatenated on the channel axis in HWI order (matching an HWIO kernel's reshape)."""
  _, h, w, _ = x.shape
  ho, wo = h - kh + 1, w - kw + 1
  return jnp.concatenate(
    [x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)], axis=-1
  )


def crop_for_pool(x: jax.Array, kernel_size: int) -> jax.Array:
  """Crops H and W so a VALID conv of `kernel_size` yields an even size.

  The 2x2 floor-pool that follows drops the conv's last odd row/column, and those outputs are
  the only ones that read the input's last row/column: cropping it first changes nothing but
  saves the wasted outputs and, on XLA:CPU, halves the conv's gradient time (measured: the
  slice after an odd-sized im2col matmul is far slower to differentiate than one before it).
  """
  _, h, w, _ = x.shape
  keep = lambda n: n - ((n - kernel_size + 1) % 2)
  return x[:, : keep(h), : keep(w), :]


def _im2col_conv(xc: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The conv as one matmul over the im2col patches; returns (output, patches)."""
  kh, kw, c, o = kernel.shape
  patches = im2col_patches(xc, kh, kw)
  y = jnp.dot(patches.reshape(-1, kh * kw * c), kernel.reshape(kh * kw * c, o))
  return y.reshape(*patches.shape[:3], o), patches


def _im2col_conv_grads(
  xc: jax.Array, patches: jax.Array, kernel: jax.Array, dy: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(d xc, d kernel) of `_im2col_conv`, given the output gradient dy (B, Ho, Wo, O)."""
  kh, kw, c, o = kernel.shape
  flat, dy = patches.reshape(-1, kh * kw * c), dy.reshape(-1, o)
  d_kernel = jnp.dot(flat.T, dy).reshape(kernel.shape)
  d_patches = jnp.dot(dy, kernel.reshape(kh * kw * c, o).T).reshape(patches.shape)
  _, patches_vjp = jax.vjp(lambda v: im2col_patches(v, kh, kw), xc)
  return patches_vjp(d_patches)[0], d_kernel


def _conv_relu_pool_fwd(x, kernel, bias, method, bf16=False):
  xc = crop_for_pool(x, kernel.shape[0])
  if method == 'direct':
    # The C++ kernel pools as it convolves: the conv output never leaves the cache, and the
    # pool's winners come back as a one-byte code per pooled value.
    pooled, winners = native.conv_pool(xc, kernel, bf16)
    patches = None
  else:
    y, patches = _im2col_conv(xc, kernel)
    pooled = jnp.max(_pool_windows(y), axis=(2, 4))
    winners = y
  # max(y + b) == max(y) + b exactly (rounding is monotonic), and relu(max) == max(relu):
  # the bias and relu act on the 4x smaller pooled array.
  out = jnp.maximum(pooled + bias, 0)
  return out, (x, patches, kernel, bias, winners, pooled)


def _conv_relu_pool_bwd(method, bf16, res, d_out):
  x, patches, kernel, bias, winners, pooled = res
  # The pool's gradient is a mask: the window's max, if it survives the relu, takes d_out.
  d_pooled = jnp.where(pooled + bias > 0, d_out, 0).astype(pooled.dtype)
  crop = lambda v: crop_for_pool(v, kernel.shape[0])
  if method == 'direct':
    # The first max of each window takes the gradient. The kernel gradient expands it in
    # cache; only the input gradient needs dy itself (and XLA drops it for the first layer).
    d_kernel = native.conv_kernel_grad_pooled(crop(x), d_pooled, winners, kernel.shape[:2], bf16)
    d_xc = native.conv_input_grad(native.unpool_grad(d_pooled, winners), kernel, (0, 0), bf16)
  else:
    y = winners  # every element equal to its window's max (ties: all of them)
    winner = _pool_windows(y) == pooled[:, :, None, :, None, :]
    dy = jnp.where(winner, d_pooled[:, :, None, :, None, :], 0).reshape(y.shape)
    d_xc, d_kernel = _im2col_conv_grads(crop(x), patches, kernel, dy)
  (d_x,) = jax.vjp(crop, x)[1](d_xc)
  return d_x, d_kernel, jnp.sum(d_pooled, axis=(0, 1, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv_relu_pool(
  x: jax.Array, kernel: jax.Array, bias: jax.Array, method: str = 'im2col', bf16: bool = False
) -> jax.Array:
  """max_pool_2x2(relu(conv(x, kernel) + bias)) with a hand-written gradient.

  `method` computes the conv: 'im2col' (patches + one XLA matmul) or 'direct' (the C++
  kernels of `fer_jax.native`, float32 on the CPU backend, no patch matrix, the pool fused
  into the forward conv; `bf16`: its bfloat16 products, see `native_conv`).

  Why the custom VJP: differentiating `jnp.max` makes JAX count the ties in every window
  (compare, convert, sum, divide) and XLA:CPU spends longer on that than on the conv's
  matmul. Here the gradient is one mask (the window's max, if positive, takes the incoming
  gradient) and the conv's two gradients. It equals `nn.max_pool`'s wherever the window's
  max is unique, which holds for real-valued activations except exact ties; at a tie 'direct'
  picks the first maximum as `nn.max_pool` does, 'im2col' passes the gradient to every tie.
  """
  return _conv_relu_pool_fwd(x, kernel, bias, method, bf16)[0]


conv_relu_pool.defvjp(_conv_relu_pool_fwd, _conv_relu_pool_bwd)


class ConvReluPool(nn.Module):
  """Conv2D(features, k, relu, 'valid') then 2x2 max-pool (stride 2, floor), as one layer.

  Parameters are exactly nn.Conv's (`kernel` (k, k, C, features), lecun-normal; `bias`, zeros),
  so checkpoints are interchangeable with nn.Conv and between lowerings.

  'xla' is the straightforward path: lax.conv, bias, relu, nn.max_pool. 'dot' and 'native'
  compute the same numbers with `conv_relu_pool`: the rows the pool would drop are cropped, the
  conv is one im2col matmul ('dot') or the C++ direct kernels ('native', float32 models only: a
  bfloat16 one uses im2col; conv_precision='bfloat16' gives their bfloat16 products), the pool a
  reshape + max, and the gradient is written by hand.
  """

  features: int
  kernel_size: int = 3
  lowering: str = 'auto'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_precision: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param(
      'kernel', nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), self.param_dtype
    )
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    lowering = resolve_lowering(self.lowering)
    if lowering == 'xla':
      y = lax.conv_general_dilated(
        x, kernel, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
      )
      return max_pool_2x2(nn.relu(y + bias), 'xla')
    # The C++ kernels are float32; a bfloat16 model computes its convs by im2col.
    direct = lowering == 'native' and x.dtype == jnp.float32
    bf16 = direct and self.conv_precision == 'bfloat16'
    return conv_relu_pool(x, kernel, bias, 'direct' if direct else 'im2col', bf16)


def _same_padding(k: int) -> tuple[int, int]:
  """'SAME' padding of a stride-1 conv: (k - 1) // 2 before, the rest after (as XLA pads)."""
  return (k - 1) // 2, k - 1 - (k - 1) // 2


def _pad_hw(x: jax.Array, pad: tuple[int, int]) -> jax.Array:
  return jnp.pad(x, ((0, 0), pad, pad, (0, 0))) if any(pad) else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def native_conv(
  x: jax.Array, kernel: jax.Array, pad: tuple[int, int] = (0, 0), bf16: bool = False
) -> jax.Array:
  """Stride-1 conv of the zero-padded input on the C++ kernels, with a hand-written gradient
  (the kernel gradient and the input gradient are the C++ kernels too; XLA:CPU's own conv
  gradients are several times slower).

  bf16: the kernels' bfloat16 products summed in float32 (`native.conv`'s bf16) in all three
  convs of the step, the forward and both gradients; the output and the gradients come back in
  x's and the kernel's dtypes.
  """
  return _native_conv_fwd(x, kernel, pad, bf16)[0]


def _native_conv_fwd(x, kernel, pad, bf16):
  xp = _pad_hw(x, pad)
  return native.conv(xp, kernel, bf16).astype(x.dtype), (xp, kernel)


def _native_conv_bwd(pad, bf16, res, dy):
  xp, kernel = res
  d_kernel = native.conv_kernel_grad(xp, dy, kernel.shape[:2], bf16).astype(kernel.dtype)
  return native.conv_input_grad(dy, kernel, pad, bf16).astype(xp.dtype), d_kernel


native_conv.defvjp(_native_conv_fwd, _native_conv_bwd)


class Conv(nn.Module):
  """`nn.Conv` (square kernel, 'SAME' or 'VALID', stride 1 or 2) with the CPU lowerings.

  The parameters are nn.Conv's (`kernel` HWIO, optional `bias`), so checkpoints move between
  lowerings and backends. 'xla' is lax.conv. On CPU ('native'/'dot'): a 1x1 conv is a strided
  slice and one matmul; a stride-1 kxk conv runs on the C++ kernels ('native': float32, or
  bfloat16 products with conv_precision='bfloat16' or a bfloat16 dtype) or as one im2col matmul
  ('dot'); a strided kxk conv stays on lax.conv.
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: str = 'SAME'
  use_bias: bool = True
  lowering: str = 'auto'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  conv_precision: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s = self.kernel_size, self.strides
    if self.padding not in ('SAME', 'VALID'):
      raise ValueError(f"Conv padding {self.padding!r}: expected 'SAME' or 'VALID'")
    kernel = self.param(
      'kernel', self.kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype
    )
    bias = (
      self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    lowering = resolve_lowering(self.lowering)
    pad = _same_padding(k) if self.padding == 'SAME' else (0, 0)
    if lowering != 'xla' and k == 1:
      y = jnp.dot(x[:, ::s, ::s, :], kernel[0, 0])
    elif lowering != 'xla' and s == 1:
      if lowering == 'native' and x.dtype in (jnp.float32, jnp.bfloat16):
        # a bfloat16 model's convs take the kernels' bfloat16 products too
        bf16 = self.conv_precision == 'bfloat16' or x.dtype == jnp.bfloat16
        y = native_conv(x, kernel, pad, bf16)
      else:
        y = _im2col_conv(_pad_hw(x, pad), kernel)[0]
    else:
      y = lax.conv_general_dilated(
        x, kernel, (s, s), self.padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
      )
    return y + bias if bias is not None else y


class ConvBNReLU(nn.Module):
  """`Conv` -> BatchNorm -> ReLU (optional), the building block of the zoo's networks.

  BatchNorm keeps its running averages in the 'batch_stats' collection (momentum 0.9, as
  PyTorch's 0.1), uses the batch's statistics in training and the averages otherwise; under
  pmap `bn_axis_name` makes the statistics those of the global batch.
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  use_bias: bool = True
  relu: bool = True
  zero_init_scale: bool = False  # a residual branch's last BatchNorm starts at zero
  lowering: str = 'auto'
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  conv_precision: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Conv(
      self.features,
      self.kernel_size,
      self.strides,
      use_bias=self.use_bias,
      lowering=self.lowering,
      dtype=self.dtype,
      conv_precision=self.conv_precision,
      name='conv',
    )(x)
    x = nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
      axis_name=self.bn_axis_name if train else None,
      scale_init=(
        nn.initializers.zeros_init() if self.zero_init_scale else nn.initializers.ones_init()
      ),
      name='bn',
    )(x)
    return nn.relu(x) if self.relu else x


def _window_quarters(x: jax.Array) -> list[jax.Array]:
  """The four (B, H, W, C) corners of every 2x2 window of x (floor), in row-major order."""
  _, h, w, _ = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2, :]
  return [x[:, i::2, j::2, :] for i in (0, 1) for j in (0, 1)]


@jax.custom_vjp
def max_pool_2x2_fast(x: jax.Array) -> jax.Array:
  """2x2 / stride-2 floor max-pool as reshape + max, whose gradient goes to each window's first
  maximum (JAX's own max gradient counts ties, XLA's pool gradient is a slow select_and_scatter).

  The winner is recorded in the forward pass as a one-byte code per pooled value (argmax,
  a NaN counting as the maximum), never found again by comparing values in the backward pass:
  under jit XLA may fuse the layer that produced x into two consumers and recompute it with
  different rounding, and an equality test against the forward's maximum would then miss and
  drop that window's gradient."""
  _, h, w, _ = x.shape
  return jnp.max(_pool_windows(x[:, : h // 2 * 2, : w // 2 * 2, :]), axis=(2, 4))


def _max_pool_fwd(x):
  _, h, w, _ = x.shape
  pooled = jnp.max(_pool_windows(x[:, : h // 2 * 2, : w // 2 * 2, :]), axis=(2, 4))
  code = jnp.argmax(jnp.stack(_window_quarters(x), axis=-1), axis=-1).astype(jnp.int8)
  return pooled, (code, jnp.zeros((0, h, w), x.dtype))  # an empty array: x's size and dtype


def _max_pool_bwd(res, d_pooled):
  code, like = res
  _, h, w = like.shape
  d = [jnp.where(code == k, d_pooled, 0).astype(like.dtype) for k in range(4)]
  # (B, H/2, 2, W/2, 2, C): each window's two rows from its four quarters, then the image layout.
  d = jnp.stack([jnp.stack(d[0:2], axis=3), jnp.stack(d[2:4], axis=3)], axis=2)
  d = d.reshape(d.shape[0], h // 2 * 2, w // 2 * 2, d.shape[-1])
  return (jnp.pad(d, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2_fast.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, lowering: str = 'auto') -> jax.Array:
  """2x2 max-pool, stride 2, floor: nn.max_pool under 'xla', `max_pool_2x2_fast` on CPU."""
  if resolve_lowering(lowering) == 'xla':
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding='VALID')
  return max_pool_2x2_fast(x)


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijection on uint32 with full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 bits for every element of `shape`: a keyed hash of the element's index.

  The key's own bits (a threefry output, already well mixed) seed two murmur finalizer rounds
  over a counter, like a counter-based generator with a cheap round function.
  """
  k = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
  counter = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  h = _fmix32((counter * jnp.uint32(0x9E3779B9)) ^ k[0])
  return _fmix32(h + k[-1])


class Dropout(nn.Module):
  """Inverted dropout like nn.Dropout (rng stream 'dropout'), with hash-derived masks.

  Why: jax.random's threefry lowers on XLA:CPU to a rolled while-loop of small kernels, and
  XLA duplicates the mask computation into every consumer (the 9 im2col slices of the next
  conv); this mask costs ~10 integer ops per element. The key still comes from
  `make_rng('dropout')`, fresh each step.

  `example_ids` (B,) gives each example its own mask stream, fold_in(key, id): an example's
  mask then depends on its id, not on its position in whatever slice of the batch this call
  sees (a device's shard, a gradient chunk). Without ids the mask covers the whole array
  (per example under vmap, as with nn.Dropout).
  """

  rate: float
  deterministic: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, example_ids: jax.Array | None = None) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    threshold = jnp.uint32(min(int(round(self.rate * 2.0**32)), 2**32 - 1))
    key = self.make_rng('dropout')
    if example_ids is None:
      bits = hash_bits(key, x.shape)
    else:
      keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids)
      bits = jax.vmap(lambda k: hash_bits(k, x.shape[1:]))(keys)
    return jnp.where(bits >= threshold, x / (1.0 - self.rate), jnp.zeros_like(x)).astype(x.dtype)
