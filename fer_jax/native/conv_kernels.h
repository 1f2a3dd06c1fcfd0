// Direct (im2col-free) stride-1 'VALID' convolution kernels for XLA:CPU, called through the
// XLA FFI (see ffi.cc). Layouts: input NHWC, kernel HWIO, output NHWC, all float32, dense
// row-major.
//
// bf16: where the build has AVX512-BF16 (Bf16Products()), the products are taken of the inputs
// rounded to bfloat16 (round to nearest even) and summed in float32 (vdpbf16ps: two products per
// lane and instruction). The forward conv does so where kw*c is even (the reduction pairs
// neighbouring channels), the kernel gradient always (it pairs neighbouring output pixels).
// Elsewhere the flag is ignored and the products are float32.
//
// Why: the im2col formulation materialises a kh*kw-times larger patch matrix; at 150x150 a
// 16-image chunk's patches are 96 MB, so copying them in (im2col) and out (its transpose)
// runs at DRAM speed. These kernels read the input in place.
#ifndef FER_JAX_NATIVE_CONV_KERNELS_H_
#define FER_JAX_NATIVE_CONV_KERNELS_H_

#include <cstdint>
#include <functional>

namespace fer_jax {

// Calls body(i) once for every i in [0, n), possibly concurrently on other threads, and
// returns when every call has finished. The caller's thread takes part.
using ParallelFor = std::function<void(int64_t n, const std::function<void(int64_t)>& body)>;

// Input (n, h, w, c); kernel (kh, kw, c, o); output (n, h - kh + 1, w - kw + 1, o).
struct ConvShape {
  int64_t n, h, w, c, kh, kw, o;
  int64_t oh() const { return h - kh + 1; }
  int64_t ow() const { return w - kw + 1; }
};

// y[b, p, q, f] = sum_{i, j, ch} x[b, p + i, q + j, ch] * k[i, j, ch, f]
void ConvForward(const ConvShape& s, const float* x, const float* k, float* y,
                 const ParallelFor& parallel_for, bool bf16 = false);

// The conv followed by a 2x2, stride-2 max-pool, without writing the conv output: oh and ow
// must be even; pooled (n, oh/2, ow/2, o) and code (same shape): 2 di + dj of the first
// maximum of each window (its position in row-major order).
void ConvPoolForward(const ConvShape& s, const float* x, const float* k, float* pooled,
                     uint8_t* code, const ParallelFor& parallel_for, bool bf16 = false);

// dk[i, j, ch, f] = sum_{b, p, q} x[b, p + i, q + j, ch] * dy[b, p, q, f]
void ConvKernelGrad(const ConvShape& s, const float* x, const float* dy, float* dk,
                    const ParallelFor& parallel_for, bool bf16 = false);

// The same, when the conv was followed by ConvPoolForward's 2x2 max-pool: dy is d_pooled
// (n, oh/2, ow/2, o) at each window's winner (code) and 0 elsewhere, never materialised.
void ConvKernelGradPooled(const ConvShape& s, const float* x, const float* d_pooled,
                          const uint8_t* code, float* dk, const ParallelFor& parallel_for, bool bf16 = false);

// Whether this build holds the bfloat16 kernels (AVX512-BF16 at compile time).
bool Bf16Products();

}  // namespace fer_jax

#endif  // FER_JAX_NATIVE_CONV_KERNELS_H_
