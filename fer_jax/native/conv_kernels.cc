// Direct stride-1 'VALID' convolution kernels (see conv_kernels.h).
//
// Both kernels rest on one fact about NHWC: for a fixed kernel row i, the kw*c input values
// that output pixel (p, q) meets are contiguous: x[b, p + i, q : q + kw, :]. Call that the
// "run" (length kw*c) and index it with r = j*c + ch; the HWIO kernel row i is then a dense
// (run x o) matrix at k + i*run*o.
//
// ConvForward: register tile of MR output pixels x NV*8 output channels. Per reduction step
// (i, r): NV vector loads of the packed kernel panel, MR broadcasts of x, MR*NV FMAs. Pixels are
// numbered over the flattened (b, p, q) space, so a tile may span rows; each pixel carries its
// own x pointer. Kernel panels (NV*8 channels wide, zero-padded) are packed once per call.
//
// ConvKernelGrad: a GEMM dk[(i, r), f] = sum_pixels x[pix + i*w*c + r] * dy[pix, f]. Register
// tile of MR consecutive r x NV*8 f, reduced over a chunk of output pixels whose x rows and dy
// rows stay in L1 (dy repacked per chunk into contiguous NV*8-wide panels: the strided original
// rows thrash L1 sets). Work items are fixed chunks of pixel rows (independent of the thread count),
// each accumulating into its own partial dk; the partials are summed in item order, so the
// result is bitwise independent of threading.
#include "conv_kernels.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define FER_JAX_SIMD 1
#define FER_JAX_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FER_JAX_SIMD 1
#define FER_JAX_AVX512 0
#else
#define FER_JAX_SIMD 0
#define FER_JAX_AVX512 0
#endif
// bfloat16 products (vdpbf16ps): AVX-512 builds for CPUs with AVX512-BF16 (and BW, for the
// word shuffles that pair the operands).
#if FER_JAX_AVX512 && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define FER_JAX_BF16 1
#else
#define FER_JAX_BF16 0
#endif

// Fully unrolls the small register-tile loops early, so the accumulators become registers.
#if defined(__clang__)
#define FER_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define FER_UNROLL _Pragma("GCC unroll 16")
#else
#define FER_UNROLL
#endif

namespace fer_jax {
namespace {

// Tuning constants: work-item sizes and thresholds of the kernels below (how they were chosen,
// and on which CPU: benchmarks/README.md, 'Figures behind constants in the code').
constexpr int64_t kFwdMaxChunk = 192;     // output pixels per ConvForward work item (max)
constexpr int64_t kStreamBytes = int64_t{16} << 20;  // streaming stores for outputs this large
constexpr int64_t kStreamMaxDepth = 64;   // ... of convs with a reduction this short
constexpr int64_t kDkChunkPixels = 128;   // output pixels per ConvKernelGrad chunk (about)
constexpr int64_t kDkImageChunkPixels = 256;  // ... when a chunk holds whole (small) images
constexpr int64_t kDkMaxItems = 16;       // ConvKernelGrad partial sums (fixed, not per thread)
constexpr int64_t kDkPartialBytes = int64_t{64} << 20;  // cap on all partial sums together

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows of output pixels per ConvKernelGrad chunk: about `target` pixels, at least one row.
inline int64_t RowsPerChunk(int64_t ow, int64_t target) {
  return std::max<int64_t>(1, std::min<int64_t>(target / std::max<int64_t>(ow, 1), 1 << 20));
}

// Reduces `items` partial buffers of `len` floats (laid out one after another) into out, in item
// order, split over parallel_for by element ranges (deterministic).
void ReducePartials(const float* parts, int64_t items, int64_t len, float* out,
                    const ParallelFor& parallel_for) {
  if (items == 1) {
    std::memcpy(out, parts, sizeof(float) * len);
    return;
  }
  const int64_t block = 4096;
  const int64_t nblocks = CeilDiv(len, block);
  auto body = [&](int64_t bi) {
    const int64_t e0 = bi * block, e1 = std::min(len, e0 + block);
    for (int64_t e = e0; e < e1; ++e) out[e] = parts[e];
    for (int64_t it = 1; it < items; ++it) {
      const float* p = parts + it * len;
      for (int64_t e = e0; e < e1; ++e) out[e] += p[e];
    }
  };
  if (nblocks == 1) {
    body(0);
  } else {
    parallel_for(nblocks, body);
  }
}

// The conv's output gradient as ConvKernelGrad reads it: dense dy (n, oh, ow, o), or the
// gradient of the 2x2 max-pool that followed the conv (d_pooled and code as ConvPoolForward
// makes them), from which dy is expanded on the fly: d_pooled at each window's winner, else 0.
struct OutputGrad {
  const float* dy = nullptr;
  const float* d_pooled = nullptr;
  const uint8_t* code = nullptr;

  // Offset of pixel (b, p, q)'s channel 0 in dy, or in d_pooled/code; k: its window position.
  int64_t DenseIndex(const ConvShape& s, int64_t b, int64_t p, int64_t q) const {
    return ((b * s.oh() + p) * s.ow() + q) * s.o;
  }
  int64_t PooledIndex(const ConvShape& s, int64_t b, int64_t p, int64_t q) const {
    return ((b * (s.oh() / 2) + p / 2) * (s.ow() / 2) + q / 2) * s.o;
  }
  static uint8_t Position(int64_t p, int64_t q) { return static_cast<uint8_t>(2 * (p & 1) + (q & 1)); }

  // dy[b, p, q, f0 .. f0 + n) into out, one element at a time.
  void Scalar(const ConvShape& s, int64_t b, int64_t p, int64_t q, int64_t f0, int64_t n,
              float* out) const {
    if (dy) {
      const float* src = dy + DenseIndex(s, b, p, q) + f0;
      for (int64_t f = 0; f < n; ++f) out[f] = src[f];
      return;
    }
    const int64_t i = PooledIndex(s, b, p, q) + f0;
    const uint8_t k = Position(p, q);
    for (int64_t f = 0; f < n; ++f) out[f] = code[i + f] == k ? d_pooled[i + f] : 0.0f;
  }
};

#if FER_JAX_SIMD

// One vector ISA, chosen at compile time (-march=native): AVX-512F (16 lanes, 32 registers) or
// AVX2 + FMA (8 lanes, 16 registers). The tiles below are written once against this interface.
#if FER_JAX_AVX512
struct Simd {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr int kRegs = 32;
  static inline V Zero() { return _mm512_setzero_ps(); }
  static inline V Load(const float* p) { return _mm512_load_ps(p); }  // aligned
  static inline V LoadU(const float* p) { return _mm512_loadu_ps(p); }
  static inline V Bcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline void StoreU(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline void Stream(float* p, V v) { _mm512_stream_ps(p, v); }
  static inline Mask TailMask(int valid) { return static_cast<Mask>((1u << valid) - 1u); }
  static inline V MaskLoad(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static inline void MaskStore(float* p, Mask m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  // m = cand where cand > m, or cand is the window's first NaN (and w = k there): one step of a
  // first-maximum search in which a NaN is the maximum, as it propagates through max-pool.
  static inline void MaxStep(V& m, V& w, V cand, V k) {
    const __mmask16 g =
        _mm512_cmp_ps_mask(cand, m, _CMP_NLE_UQ) & _mm512_cmp_ps_mask(m, m, _CMP_ORD_Q);
    m = _mm512_mask_blend_ps(g, m, cand);
    w = _mm512_mask_blend_ps(g, w, k);
  }
  static inline void StoreBytes(uint8_t* p, V w, int valid) {  // the first `valid` lanes
    _mm512_mask_cvtepi32_storeu_epi8(p, TailMask(valid), _mm512_cvttps_epi32(w));
  }
  static inline V Set1(float v) { return _mm512_set1_ps(v); }
  // dp[f] where code[f] == k, else 0, for the first `valid` lanes.
  static inline V Unpool(const uint8_t* code, const float* dp, int k, int valid) {
    __m128i raw;
    if (valid == 16) {
      raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(code));
    } else {
      alignas(16) uint8_t tmp[16] = {};
      std::memcpy(tmp, code, valid);
      raw = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
    }
    const __mmask16 hit =
        _mm512_cmpeq_epi32_mask(_mm512_cvtepu8_epi32(raw), _mm512_set1_epi32(k)) & TailMask(valid);
    return _mm512_maskz_loadu_ps(hit, dp);
  }
};
#else
struct Simd {
  using V = __m256;
  using Mask = __m256i;
  static constexpr int kLanes = 8;
  static constexpr int kRegs = 16;
  static inline V Zero() { return _mm256_setzero_ps(); }
  static inline V Load(const float* p) { return _mm256_load_ps(p); }  // aligned
  static inline V LoadU(const float* p) { return _mm256_loadu_ps(p); }
  static inline V Bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static inline V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline void StoreU(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline void Stream(float* p, V v) { _mm256_stream_ps(p, v); }
  static inline Mask TailMask(int valid) {  // first `valid` lanes (1..8) on
    alignas(32) static const int32_t kBits[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                  0,  0,  0,  0,  0,  0,  0,  0};
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kBits + 8 - valid));
  }
  static inline V MaskLoad(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static inline void MaskStore(float* p, Mask m, V v) { _mm256_maskstore_ps(p, m, v); }
  static inline void MaxStep(V& m, V& w, V cand, V k) {
    const __m256 g = _mm256_and_ps(_mm256_cmp_ps(cand, m, _CMP_NLE_UQ),
                                   _mm256_cmp_ps(m, m, _CMP_ORD_Q));
    m = _mm256_blendv_ps(m, cand, g);
    w = _mm256_blendv_ps(w, k, g);
  }
  static inline void StoreBytes(uint8_t* p, V w, int valid) {
    const __m256i i = _mm256_cvttps_epi32(w);
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    const __m128i i8 = _mm_packus_epi16(i16, i16);
    if (valid == 8) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(p), i8);
    } else {
      alignas(16) uint8_t tmp[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), i8);
      std::memcpy(p, tmp, valid);
    }
  }
  static inline V Set1(float v) { return _mm256_set1_ps(v); }
  static inline V Unpool(const uint8_t* code, const float* dp, int k, int valid) {
    alignas(16) uint8_t tmp[16] = {};
    std::memcpy(tmp, code, valid);
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(tmp)));
    __m256i hit = _mm256_cmpeq_epi32(c, _mm256_set1_epi32(k));
    hit = _mm256_and_si256(hit, TailMask(valid));
    return _mm256_maskload_ps(dp, hit);
  }
};
#endif
constexpr int L = Simd::kLanes;
constexpr int64_t kAlign = int64_t{4} * L;  // bytes of one vector
using V = Simd::V;

// The largest register tile (pixels, or r values) of any block, and a pointer aligned for Load.
constexpr int kMaxMr = Simd::kRegs == 32 ? 12 : 6;
inline float* AlignUp(float* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  return p + ((kAlign - static_cast<int64_t>(a % kAlign)) % kAlign) / int64_t{sizeof(float)};
}

#if FER_JAX_BF16
// ---------------------------------------------------------------------------------------------
// bfloat16 operands. vdpbf16ps multiplies the two bfloat16 words of each 32-bit lane of its
// operands and adds both products to that lane's float32 sum, so each operand holds pairs along
// the reduction: the forward conv pairs neighbouring r (channels of one kernel row), the kernel
// gradient neighbouring output pixels. A pair broadcast to all lanes (one 32-bit load) meets a
// vector of 16 output channels' pairs.
using Bh = __m512bh;
constexpr int kPairLanes = 2 * L;  // bfloat16 words per vector

inline uint16_t* AlignUp(uint16_t* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  return p + ((kAlign - static_cast<int64_t>(a % kAlign)) % kAlign) / int64_t{sizeof(uint16_t)};
}

// src[0 .. n) rounded to bfloat16 (to nearest even).
inline void ToBf16(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  }
  if (i < n) {
    const __mmask16 m = Simd::TailMask(static_cast<int>(n - i));
    _mm256_mask_storeu_epi16(dst + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i)));
  }
}

// 32 words lo[0], hi[0], lo[1], hi[1], ...: 16 lanes of (lo, hi) pairs, rounded to bfloat16.
inline __m512i PairBf16(V lo, V hi) {
  alignas(64) static const uint16_t kInterleave[32] = {
      0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  return _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// dst[m] = (src[m], src[m + stride]) for m < n, the partner 0 where m + stride >= n: 32-bit
// pairs of bfloat16 (n pairs, 2n words).
inline void PairWithStride(const float* src, int64_t n, int64_t stride, uint16_t* dst) {
  for (int64_t m = 0; m < n; m += L) {
    const int valid = static_cast<int>(std::min<int64_t>(L, n - m));
    const int64_t hi_valid = std::clamp<int64_t>(n - stride - m, 0, valid);
    const V lo = Simd::MaskLoad(src + m, Simd::TailMask(valid));
    const V hi = hi_valid > 0 ? Simd::MaskLoad(src + m + stride, Simd::TailMask(static_cast<int>(hi_valid)))
                              : Simd::Zero();
    const __m512i pairs = PairBf16(lo, hi);
    if (valid == L) {
      _mm512_storeu_si512(dst + 2 * m, pairs);
    } else {
      _mm512_mask_storeu_epi16(dst + 2 * m, (__mmask32)((uint64_t{1} << (2 * valid)) - 1), pairs);
    }
  }
}

inline Bh LoadBh(const uint16_t* p) { return (Bh)_mm512_load_si512(p); }  // aligned
inline Bh BcastPair(const void* p) {  // one 32-bit pair to every lane
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return (Bh)_mm512_set1_epi32(v);
}
#endif  // FER_JAX_BF16

// Calls f.template operator()<MR>() for the runtime mr in [1, MRMAX] (a tile's remainder).
template <int MRMAX, typename F>
inline void DispatchMr(int mr, F&& f) {
  static_assert(MRMAX >= 1 && MRMAX <= 12, "");
  switch (mr) {
#define FER_CASE(k) \
  case k:           \
    if constexpr (MRMAX >= k) f.template operator()<k>(); \
    break;
    FER_CASE(12) FER_CASE(11) FER_CASE(10) FER_CASE(9) FER_CASE(8) FER_CASE(7)
    FER_CASE(6) FER_CASE(5) FER_CASE(4) FER_CASE(3) FER_CASE(2) FER_CASE(1)
#undef FER_CASE
    default: break;
  }
}

// DispatchMr with a second compile-time argument: whether the last vector is partial
// (tail < L); calls f.template operator()<MR, TAIL>().
template <int MRMAX, typename F>
inline void DispatchMrTail(int mr, int tail, F&& f) {
  if (tail == L) {
    DispatchMr<MRMAX>(mr, [&]<int MR>() { f.template operator()<MR, false>(); });
  } else {
    DispatchMr<MRMAX>(mr, [&]<int MR>() { f.template operator()<MR, true>(); });
  }
}

// A channel block: NV vectors (NV*L channels, the last with `tail` valid lanes), tiled with
// `mr` pixels (forward) or r values (kernel gradient). Chosen so MR*NV accumulators + NV
// operand vectors + a broadcast fit the register file.
struct Block {
  int64_t f0;      // first channel
  int nv;          // vectors (packed panel width nv*L)
  int tail;        // valid lanes of the last vector (1..L)
  int mr;          // pixels or r values per register tile
  int64_t width;   // channels (<= nv*L)
  int64_t offset;  // panel offset in a packed buffer
};

// tiny_reduction (c == 1): on AVX2, 3 pixels x 4 vectors with kernel operands from memory
// (12 accumulators + 4 vectors would not fit 16 registers), or 4 x 3 where `three` allows it.
std::vector<Block> ChannelBlocks(int64_t o, bool tiny_reduction, bool three) {
  std::vector<Block> blocks;
  for (int64_t f0 = 0; f0 < o;) {
    const int64_t rem = o - f0;
    Block b{};
    b.f0 = f0;
    if (Simd::kRegs == 32) {  // AVX-512: 6 x 4, 8 x 3, 12 x 2 or 12 x 1 vectors
      b.nv = static_cast<int>(std::min<int64_t>(4, CeilDiv(rem, L)));
      b.mr = b.nv == 4 ? 6 : b.nv == 3 ? 8 : 12;
    } else if (tiny_reduction && (rem >= 4 * L || (three && rem >= 3 * L))) {
      b.nv = rem >= 4 * L ? 4 : 3;
      b.mr = b.nv == 4 ? 3 : 4;
    } else {  // AVX2: 6 x 2 or 6 x 1 vectors
      b.nv = rem > L ? 2 : 1;
      b.mr = 6;
    }
    b.width = std::min<int64_t>(rem, int64_t{L} * b.nv);
    b.tail = static_cast<int>(b.width - int64_t{L} * (b.nv - 1));
    blocks.push_back(b);
    f0 += b.width;
  }
  return blocks;
}

// ---------------------------------------------------------------------------------------------
// Forward.

// Stores a register tile: acc[t][v] to yp[t] + v*L (the last vector with `tail` lanes), or
// with streaming stores (aligned, full vectors).
template <int MR, int NV>
inline void StoreTile(const V (&acc)[MR][NV], float* const* yp, int tail, bool stream) {
  if (stream) {
    FER_UNROLL
    for (int t = 0; t < MR; ++t)
      FER_UNROLL
      for (int v = 0; v < NV; ++v) Simd::Stream(yp[t] + L * v, acc[t][v]);
  } else if (tail == L) {
    FER_UNROLL
    for (int t = 0; t < MR; ++t)
      FER_UNROLL
      for (int v = 0; v < NV; ++v) Simd::StoreU(yp[t] + L * v, acc[t][v]);
  } else {
    const Simd::Mask m = Simd::TailMask(tail);
    FER_UNROLL
    for (int t = 0; t < MR; ++t) {
      FER_UNROLL
      for (int v = 0; v < NV - 1; ++v) Simd::StoreU(yp[t] + L * v, acc[t][v]);
      Simd::MaskStore(yp[t] + L * (NV - 1), m, acc[t][NV - 1]);
    }
  }
}

// acc[t][v] = sum_{i<kh, r<run} x_t[i*xrs + r] * panel[(i*run + r)*NV*L + v*L .. +L]
// then stored to y_t + v*L (the last vector with `tail` lanes).
// KH, RUN: compile-time kh and run when nonzero (the fully unrolled 3x3, c == 1 case).
template <int MR, int NV, int KH, int RUN>
inline void FwdTile(const float* const* xp, int64_t xrs, int64_t kh_rt, int64_t run_rt,
                    const float* __restrict panel, float* const* yp, int tail, bool stream) {
  V acc[MR][NV];
  FER_UNROLL
  for (int t = 0; t < MR; ++t)
    FER_UNROLL
    for (int v = 0; v < NV; ++v) acc[t][v] = Simd::Zero();
  const float* xs[MR];
  FER_UNROLL
  for (int t = 0; t < MR; ++t) xs[t] = xp[t];
  const int64_t kh = KH ? KH : kh_rt;
  const int64_t run = RUN ? RUN : run_rt;
  const float* bp = panel;
  for (int64_t i = 0; i < kh; ++i) {
    const int64_t base = i * xrs;
    for (int64_t r = 0; r < run; ++r) {
      if constexpr (MR * NV + NV + 1 <= Simd::kRegs) {  // kernel row in registers
        V bv[NV];
        FER_UNROLL
        for (int v = 0; v < NV; ++v) bv[v] = Simd::Load(bp + L * v);
        FER_UNROLL
        for (int t = 0; t < MR; ++t) {
          const V a = Simd::Bcast(xs[t] + base + r);
          FER_UNROLL
          for (int v = 0; v < NV; ++v) acc[t][v] = Simd::Fma(a, bv[v], acc[t][v]);
        }
      } else {  // too few registers: FMAs with memory operands
        FER_UNROLL
        for (int t = 0; t < MR; ++t) {
          const V a = Simd::Bcast(xs[t] + base + r);
          FER_UNROLL
          for (int v = 0; v < NV; ++v) acc[t][v] = Simd::Fma(a, Simd::Load(bp + L * v), acc[t][v]);
        }
      }
      bp += L * NV;
    }
  }
  StoreTile<MR, NV>(acc, yp, tail, stream);
}

#if FER_JAX_BF16
// FwdTile on bfloat16 pairs: x (bfloat16, the same layout as the float32 input) and the panel
// hold (r, r + 1) pairs for even r; run is even.
template <int MR, int NV>
inline void FwdTileBf16(const uint16_t* const* xp, int64_t xrs, int64_t kh, int64_t run,
                        const uint16_t* __restrict panel, float* const* yp, int tail, bool stream) {
  V acc[MR][NV];
  FER_UNROLL
  for (int t = 0; t < MR; ++t)
    FER_UNROLL
    for (int v = 0; v < NV; ++v) acc[t][v] = Simd::Zero();
  const uint16_t* bp = panel;
  for (int64_t i = 0; i < kh; ++i) {
    const int64_t base = i * xrs;
    for (int64_t r = 0; r < run; r += 2) {
      Bh bv[NV];
      FER_UNROLL
      for (int v = 0; v < NV; ++v) bv[v] = LoadBh(bp + kPairLanes * v);
      FER_UNROLL
      for (int t = 0; t < MR; ++t) {
        const Bh a = BcastPair(xp[t] + base + r);
        FER_UNROLL
        for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], a, bv[v]);
      }
      bp += kPairLanes * NV;
    }
  }
  StoreTile<MR, NV>(acc, yp, tail, stream);
}

template <int NV, int MRMAX>
inline void FwdTileBf16Mr(int mr, const uint16_t* const* xp, int64_t xrs, int64_t kh, int64_t run,
                          const uint16_t* panel, float* const* yp, int tail, bool stream) {
  DispatchMr<MRMAX>(mr, [&]<int MR>() {
    FwdTileBf16<MR, NV>(xp, xrs, kh, run, panel, yp, tail, stream);
  });
}
#endif  // FER_JAX_BF16


template <int NV, int MRMAX, int KH, int RUN>
inline void FwdTileMr(int mr, const float* const* xp, int64_t xrs, int64_t kh, int64_t run,
                      const float* panel, float* const* yp, int tail, bool stream) {
  DispatchMr<MRMAX>(mr, [&]<int MR>() {
    FwdTile<MR, NV, KH, RUN>(xp, xrs, kh, run, panel, yp, tail, stream);
  });
}

#if FER_JAX_BF16
inline void FwdTileBf16Nv(const Block& blk, int mr, const uint16_t* const* xp, int64_t xrs,
                          int64_t kh, int64_t run, const uint16_t* panel, float* const* yp,
                          bool stream) {
  switch (blk.nv) {
    case 4: FwdTileBf16Mr<4, 6>(mr, xp, xrs, kh, run, panel, yp, blk.tail, stream); break;
    case 3: FwdTileBf16Mr<3, 8>(mr, xp, xrs, kh, run, panel, yp, blk.tail, stream); break;
    case 2: FwdTileBf16Mr<2, kMaxMr>(mr, xp, xrs, kh, run, panel, yp, blk.tail, stream); break;
    default: FwdTileBf16Mr<1, kMaxMr>(mr, xp, xrs, kh, run, panel, yp, blk.tail, stream); break;
  }
}
#endif

template <int KH, int RUN>
inline void FwdTileNv(const Block& blk, int mr, const float* const* xp, int64_t xrs, int64_t kh,
                      int64_t run, const float* panel, float* const* yp, bool stream) {
  switch (blk.nv) {
    case 4: FwdTileMr<4, (Simd::kRegs == 32 ? 6 : 3), KH, RUN>(mr, xp, xrs, kh, run, panel, yp, blk.tail, stream); break;
    case 3: FwdTileMr<3, (Simd::kRegs == 32 ? 8 : 4), KH, RUN>(mr, xp, xrs, kh, run, panel, yp, blk.tail, stream); break;
    case 2: FwdTileMr<2, kMaxMr, KH, RUN>(mr, xp, xrs, kh, run, panel, yp, blk.tail, stream); break;
    default: FwdTileMr<1, kMaxMr, KH, RUN>(mr, xp, xrs, kh, run, panel, yp, blk.tail, stream); break;
  }
}

// The forward conv with its kernel packed once: any set of output pixels (Pixels), or whole
// output rows of one image (Rows, used by the fused conv + pool). With bf16 (and an even run),
// x is rounded to bfloat16 once, in parallel, and the kernel packed as bfloat16 pairs.
class RowConv {
 public:
  RowConv(const ConvShape& s, const float* x, const float* k, bool bf16,
          const ParallelFor& parallel_for)
      : s_(s), x_(x), run_(s.kw * s.c), kdepth_(s.kh * s.kw * s.c), xrs_(s.w * s.c),
        small33_(s.kh == 3 && s.kw * s.c == 3),
        bf16_(FER_JAX_BF16 && bf16 && (s.kw * s.c) % 2 == 0) {
    blocks_ = ChannelBlocks(s.o, kdepth_ <= 32, /*three=*/true);
    int64_t offset = 0;
    for (Block& b : blocks_) {
      b.offset = offset;
      offset += kdepth_ * L * b.nv;
    }
#if FER_JAX_BF16
    if (bf16_) {
      // panel words [(i*run + r)/2 * 2W + 2f' + (r & 1)] = k[(i*run + r)*o + f0 + f'] (r even:
      // the pair (r, r + 1) of channel f'), zero padded; the same offsets, counted in words.
      bstorage_.resize(offset + 2 * kPairLanes);
      bpacked_ = AlignUp(bstorage_.data());
      for (const Block& b : blocks_) {
        uint16_t* dst = bpacked_ + b.offset;
        for (int64_t row = 0; row < kdepth_; row += 2, dst += 2 * L * b.nv) {
          for (int v = 0; v < b.nv; ++v) {
            const int valid = static_cast<int>(std::min<int64_t>(L, b.width - int64_t{L} * v));
            const float* src = k + row * s.o + b.f0 + int64_t{L} * v;
            const V lo = Simd::MaskLoad(src, Simd::TailMask(valid));
            const V hi = Simd::MaskLoad(src + s.o, Simd::TailMask(valid));
            _mm512_store_si512(dst + kPairLanes * v, PairBf16(lo, hi));
          }
        }
      }
      const int64_t n = s.n * s.h * s.w * s.c, block = int64_t{1} << 16;
      xb_.resize(static_cast<size_t>(n + kPairLanes));
      parallel_for(CeilDiv(n, block), [&](int64_t bi) {
        const int64_t e0 = bi * block;
        ToBf16(x + e0, std::min(block, n - e0), xb_.data() + e0);
      });
      return;
    }
#else
    (void)parallel_for;
#endif
    // Pack the kernel: panel[(i*run + r)*W + f'] = k[(i*run + r)*o + f0 + f'], zero padded.
    storage_.resize(offset + 2 * L);
    packed_ = AlignUp(storage_.data());
    for (const Block& b : blocks_) {
      const int64_t W = int64_t{L} * b.nv;
      float* dst = packed_ + b.offset;
      for (int64_t row = 0; row < kdepth_; ++row) {
        const float* src = k + row * s.o + b.f0;
        int64_t f = 0;
        for (; f < b.width; ++f) dst[row * W + f] = src[f];
        for (; f < W; ++f) dst[row * W + f] = 0.0f;
      }
    }
  }

  int64_t kdepth() const { return kdepth_; }

  // yptr[t][0 .. o) = the conv at the output pixel whose receptive field starts at xptr[t].
  void Pixels(const float* const* xptr, float* const* yptr, int64_t cnt, bool stream) const {
#if FER_JAX_BF16
    if (bf16_) {
      for (const Block& blk : blocks_) {
        const uint16_t* panel = bpacked_ + blk.offset;
        float* yp[kMaxMr];
        const uint16_t* xp[kMaxMr];
        for (int64_t t0 = 0; t0 < cnt; t0 += blk.mr) {
          const int mr = static_cast<int>(std::min<int64_t>(blk.mr, cnt - t0));
          for (int t = 0; t < mr; ++t) {
            yp[t] = yptr[t0 + t] + blk.f0;
            xp[t] = xb_.data() + (xptr[t0 + t] - x_);
          }
          FwdTileBf16Nv(blk, mr, xp, xrs_, s_.kh, run_, panel, yp, stream);
        }
      }
      return;
    }
#endif
    for (const Block& blk : blocks_) {
      const float* panel = packed_ + blk.offset;
      float* yp[kMaxMr];
      for (int64_t t0 = 0; t0 < cnt; t0 += blk.mr) {
        const int mr = static_cast<int>(std::min<int64_t>(blk.mr, cnt - t0));
        for (int t = 0; t < mr; ++t) yp[t] = yptr[t0 + t] + blk.f0;
        if (small33_) {
          FwdTileNv<3, 3>(blk, mr, xptr + t0, xrs_, s_.kh, run_, panel, yp, stream);
        } else {
          FwdTileNv<0, 0>(blk, mr, xptr + t0, xrs_, s_.kh, run_, panel, yp, stream);
        }
      }
    }
  }

  // Output rows [p, p + nrows) of image b into out, dense (nrows, ow, o).
  void Rows(int64_t b, int64_t p, int64_t nrows, float* out) const {
    const int64_t ow = s_.ow(), total = nrows * ow;
    const float* xptr[kFwdMaxChunk];
    float* yptr[kFwdMaxChunk];
    for (int64_t t0 = 0; t0 < total; t0 += kFwdMaxChunk) {
      const int64_t cnt = std::min(kFwdMaxChunk, total - t0);
      for (int64_t t = 0; t < cnt; ++t) {
        const int64_t r = (t0 + t) / ow, q = (t0 + t) % ow;
        xptr[t] = x_ + ((b * s_.h + p + r) * s_.w + q) * s_.c;
        yptr[t] = out + (t0 + t) * s_.o;
      }
      Pixels(xptr, yptr, cnt, /*stream=*/false);
    }
  }

 private:
  const ConvShape s_;
  const float* x_;
  const int64_t run_, kdepth_, xrs_;
  const bool small33_, bf16_;
  std::vector<Block> blocks_;
  std::vector<float> storage_;
  float* packed_ = nullptr;
#if FER_JAX_BF16
  std::vector<uint16_t> bstorage_, xb_;  // the packed bfloat16 kernel; x as bfloat16
  uint16_t* bpacked_ = nullptr;
#endif
};

void ConvForwardImpl(const ConvShape& s, const float* x, const float* k, float* y,
                     const ParallelFor& parallel_for, bool bf16) {
  const int64_t oh = s.oh(), ow = s.ow(), o = s.o, c = s.c;
  const int64_t npix = s.n * oh * ow;
  const RowConv conv(s, x, k, bf16, parallel_for);

  // Items: chunks of ~96..192 consecutive pixels (a multiple of 12).
  const int64_t chunk =
      std::max<int64_t>(12, std::min<int64_t>(kFwdMaxChunk, CeilDiv(npix, 64) / 12 * 12 + 12));
  const int64_t items = CeilDiv(npix, chunk);
  // Streaming (non-temporal) stores for a large output of a cheap conv: the output cannot stay
  // in cache anyway, and they save the read-for-ownership of every output line.
  const bool stream = conv.kdepth() <= kStreamMaxDepth && npix * o * 4 >= kStreamBytes &&
                      o % L == 0 && reinterpret_cast<uintptr_t>(y) % kAlign == 0;
  auto body = [&](int64_t item) {
    const int64_t m0 = item * chunk, m1 = std::min(npix, m0 + chunk);
    const int64_t cnt = m1 - m0;
    const float* xptr[kFwdMaxChunk];
    float* yptr[kFwdMaxChunk];
    {
      int64_t b = m0 / (oh * ow), rem = m0 % (oh * ow);
      int64_t p = rem / ow, q = rem % ow;
      for (int64_t t = 0; t < cnt; ++t) {
        xptr[t] = x + ((b * s.h + p) * s.w + q) * c;
        yptr[t] = y + (m0 + t) * o;
        if (++q == ow) {
          q = 0;
          if (++p == oh) {
            p = 0;
            ++b;
          }
        }
      }
    }
    conv.Pixels(xptr, yptr, cnt, stream);
    if (stream) _mm_sfence();  // order the streaming stores before the completion signal
  };
  if (items == 1) {
    body(0);
  } else {
    parallel_for(items, body);
  }
}

// pooled[Q, f] = the max of the 2x2 window at columns 2Q, 2Q + 1 of conv rows r0 and r1 (each
// (2 pw, o), dense); code[Q, f] = 2 di + dj of the window's first maximum in row-major order (a
// later element replaces it only when strictly greater, as XLA's max-pool gradient chooses, or
// when it is the window's first NaN: a NaN anywhere in the window is the pooled value, as
// through nn.max_pool).
void PoolRowPair(const float* r0, const float* r1, int64_t pw, int64_t o, float* pooled,
                 uint8_t* code) {
  const V k1 = Simd::Set1(1.0f), k2 = Simd::Set1(2.0f), k3 = Simd::Set1(3.0f);
  for (int64_t q = 0; q < pw; ++q) {
    const float* a = r0 + 2 * q * o;
    const float* c = r1 + 2 * q * o;
    for (int64_t f = 0; f < o; f += L) {
      const int valid = static_cast<int>(std::min<int64_t>(L, o - f));
      const Simd::Mask mask = Simd::TailMask(valid);
      V m = Simd::MaskLoad(a + f, mask), w = Simd::Zero();
      Simd::MaxStep(m, w, Simd::MaskLoad(a + o + f, mask), k1);
      Simd::MaxStep(m, w, Simd::MaskLoad(c + f, mask), k2);
      Simd::MaxStep(m, w, Simd::MaskLoad(c + o + f, mask), k3);
      Simd::MaskStore(pooled + q * o + f, mask, m);
      Simd::StoreBytes(code + q * o + f, w, valid);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel gradient.

// Loads (store = false) or stores a kernel-gradient register tile acc[t][v] at dkt[t*ldk + Lv],
// the last vector masked by m where TAIL.
template <int MR, int NV, bool TAIL>
inline void DkAccess(V (&acc)[MR][NV], float* dkt, int64_t ldk, Simd::Mask m, bool store) {
  FER_UNROLL
  for (int t = 0; t < MR; ++t) {
    FER_UNROLL
    for (int v = 0; v < NV; ++v) {
      float* p = dkt + t * ldk + L * v;
      if (store) {
        if (TAIL && v == NV - 1) {
          Simd::MaskStore(p, m, acc[t][v]);
        } else {
          Simd::StoreU(p, acc[t][v]);
        }
      } else {
        acc[t][v] = (TAIL && v == NV - 1) ? Simd::MaskLoad(p, m) : Simd::LoadU(p);
      }
    }
  }
}

// acc[t][v] += sum over rows p < nrows, q < ow of xrows[p][off + q*c + t] * dyp[(p*ow + q)*NV*L + Lv ..]
// with acc loaded from / stored to dkt[t*ldk + Lv ..]; dyp is a packed (pixel, NV*L) panel.
// xrows[p]: the input row under output row p (rows may come from several images).
// TAIL: the last vector of dk has `tail` valid lanes.
template <int MR, int NV, bool TAIL>
inline void DkTile(const float* const* xrows, int64_t off, int64_t c,
                   const float* __restrict dyp, int64_t nrows, int64_t ow, float* dkt,
                   int64_t ldk, int tail) {
  V acc[MR][NV];
  const Simd::Mask m = Simd::TailMask(TAIL ? tail : L);
  DkAccess<MR, NV, TAIL>(acc, dkt, ldk, m, /*store=*/false);
  const float* dr = dyp;
  for (int64_t p = 0; p < nrows; ++p) {
    const float* __restrict xr = xrows[p] + off;
    for (int64_t q = 0; q < ow; ++q) {
      if constexpr (MR * NV + NV + 1 <= Simd::kRegs) {  // dy vectors in registers
        V bv[NV];
        FER_UNROLL
        for (int v = 0; v < NV; ++v) bv[v] = Simd::Load(dr + L * v);
        FER_UNROLL
        for (int t = 0; t < MR; ++t) {
          const V a = Simd::Bcast(xr + t);
          FER_UNROLL
          for (int v = 0; v < NV; ++v) acc[t][v] = Simd::Fma(a, bv[v], acc[t][v]);
        }
      } else {  // too few registers: FMAs with memory operands
        FER_UNROLL
        for (int t = 0; t < MR; ++t) {
          const V a = Simd::Bcast(xr + t);
          FER_UNROLL
          for (int v = 0; v < NV; ++v) acc[t][v] = Simd::Fma(a, Simd::Load(dr + L * v), acc[t][v]);
        }
      }
      xr += c;
      dr += L * NV;
    }
  }
  DkAccess<MR, NV, TAIL>(acc, dkt, ldk, m, /*store=*/true);
}

template <int NV, int MRMAX>
inline void DkTileMr(int mr, const float* const* xrows, int64_t off, int64_t c, const float* dyp,
                     int64_t nrows, int64_t ow, float* dkt, int64_t ldk, int tail) {
  DispatchMrTail<MRMAX>(mr, tail, [&]<int MR, bool TAIL>() {
    DkTile<MR, NV, TAIL>(xrows, off, c, dyp, nrows, ow, dkt, ldk, tail);
  });
}

#if FER_JAX_BF16
// DkTile on bfloat16 pairs of neighbouring output pixels (q, q + 1) of each row: zrows[p][m] is
// the pair (x[m], x[m + c]) under output row p, dyp the pairs (dy[q, f], dy[q + 1, f]) of
// npairs = ceil(ow / 2) pixel pairs per row (the last partner 0 when ow is odd).
template <int MR, int NV, bool TAIL>
inline void DkTileBf16(const uint32_t* const* zrows, int64_t off, int64_t c,
                       const uint16_t* __restrict dyp, int64_t nrows, int64_t npairs, float* dkt,
                       int64_t ldk, int tail) {
  V acc[MR][NV];
  const Simd::Mask m = Simd::TailMask(TAIL ? tail : L);
  DkAccess<MR, NV, TAIL>(acc, dkt, ldk, m, /*store=*/false);
  const uint16_t* dr = dyp;
  for (int64_t p = 0; p < nrows; ++p) {
    const uint32_t* __restrict zr = zrows[p] + off;
    for (int64_t j = 0; j < npairs; ++j) {
      Bh bv[NV];
      FER_UNROLL
      for (int v = 0; v < NV; ++v) bv[v] = LoadBh(dr + kPairLanes * v);
      FER_UNROLL
      for (int t = 0; t < MR; ++t) {
        const Bh a = BcastPair(zr + t);
        FER_UNROLL
        for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], a, bv[v]);
      }
      zr += 2 * c;
      dr += kPairLanes * NV;
    }
  }
  DkAccess<MR, NV, TAIL>(acc, dkt, ldk, m, /*store=*/true);
}

template <int NV, int MRMAX>
inline void DkTileBf16Mr(int mr, const uint32_t* const* zrows, int64_t off, int64_t c,
                         const uint16_t* dyp, int64_t nrows, int64_t npairs, float* dkt,
                         int64_t ldk, int tail) {
  DispatchMrTail<MRMAX>(mr, tail, [&]<int MR, bool TAIL>() {
    DkTileBf16<MR, NV, TAIL>(zrows, off, c, dyp, nrows, npairs, dkt, ldk, tail);
  });
}
#endif  // FER_JAX_BF16

// Packs dy[b, p, q, blk's channels] into d (nv vectors, zero padded).
inline void PackOutputGrad(const OutputGrad& g, const ConvShape& s, int64_t b, int64_t p,
                           int64_t q, const Block& blk, float* d) {
  const bool dense = g.dy != nullptr;
  const int64_t i = (dense ? g.DenseIndex(s, b, p, q) : g.PooledIndex(s, b, p, q)) + blk.f0;
  const int k = OutputGrad::Position(p, q);
  for (int v = 0; v < blk.nv; ++v) {
    const int valid = static_cast<int>(std::min<int64_t>(L, blk.width - int64_t{L} * v));
    const int64_t f = i + int64_t{L} * v;
    const V val = dense ? Simd::MaskLoad(g.dy + f, Simd::TailMask(valid))
                        : Simd::Unpool(g.code + f, g.d_pooled + f, k, valid);
    Simd::StoreU(d + L * v, val);
  }
}

void ConvKernelGradImpl(const ConvShape& s, const float* x, const OutputGrad& g, float* dk,
                        const ParallelFor& parallel_for, bool bf16) {
  const int64_t oh = s.oh(), ow = s.ow(), o = s.o, c = s.c;
  const int64_t run = s.kw * c, kdepth = s.kh * run, len = kdepth * o;
  const int64_t xrs = s.w * c;
  const float* dy = g.dy;

  std::vector<Block> blocks = ChannelBlocks(o, run <= 3, /*three=*/false);
  int64_t pw = 0;  // packed floats per pixel
  for (Block& b : blocks) {
    b.offset = pw;
    pw += int64_t{L} * b.nv;
  }

  // Chunks of ~kDkChunkPixels output pixels of one image's rows or, where two or more images
  // fit, ~kDkImageChunkPixels of whole images (a small image alone would load and store its dk
  // tiles for too few pixels); items are fixed runs of consecutive chunks, independent of the
  // thread count.
  const int64_t target_rows = RowsPerChunk(ow, kDkChunkPixels);
  const int64_t images = target_rows >= 2 * oh ? RowsPerChunk(ow, kDkImageChunkPixels) / oh : 1;
  const int64_t rows = images > 1 ? images * oh : std::min<int64_t>(oh, target_rows);
  const int64_t chunks_per_image = images > 1 ? 1 : CeilDiv(oh, rows);
  const int64_t nchunks = images > 1 ? CeilDiv(s.n, images) : s.n * chunks_per_image;
  const double flops = 2.0 * s.n * oh * ow * kdepth * o;
  const int64_t max_items = std::max<int64_t>(1, static_cast<int64_t>(flops / 4e6));
  const int64_t mem_items = std::max<int64_t>(1, kDkPartialBytes / (len * int64_t{sizeof(float)}));
  const int64_t items = std::min<int64_t>({nchunks, kDkMaxItems, max_items, mem_items});
  std::vector<float> parts(static_cast<size_t>(items * len));
  // One full-width block of dense dy: the packed panel would be dy itself (aligned loads need
  // aligned dy).
  const bool use_bf16 = FER_JAX_BF16 && bf16;
  const bool direct = !use_bf16 && dy && blocks.size() == 1 && pw == o &&
                      reinterpret_cast<uintptr_t>(dy) % kAlign == 0;
#if FER_JAX_BF16
  // bfloat16: per chunk, dy's pixel pairs per block ((row, pair, nv*L) panels of word pairs) and
  // the pairs (x[m], x[m + c]) of the input rows under the chunk, each image's rows once.
  const int64_t npairs = CeilDiv(ow, 2);
  const int64_t zlen = (rows + std::max<int64_t>(images, 1) * (s.kh - 1)) * xrs;
#else
  (void)bf16;
#endif

  auto body = [&](int64_t item) {
    const int64_t c0 = nchunks * item / items, c1 = nchunks * (item + 1) / items;
    float* part = parts.data() + item * len;
    std::memset(part, 0, sizeof(float) * len);
    // Packed dy chunk: per block, a (pixel, nv*L) panel, zero padded.
    std::vector<float> pack_storage(static_cast<size_t>(rows * ow * pw + 2 * L));
    float* pack = AlignUp(pack_storage.data());
    std::vector<const float*> xrows(static_cast<size_t>(rows));
#if FER_JAX_BF16
    std::vector<uint16_t> bpack_storage(use_bf16 ? static_cast<size_t>(rows * npairs * 2 * pw + 2 * kPairLanes) : 0);
    uint16_t* bpack = use_bf16 ? AlignUp(bpack_storage.data()) : nullptr;
    std::vector<uint32_t> zpack_storage(use_bf16 ? static_cast<size_t>(zlen + L) : 0);
    uint32_t* zpack = zpack_storage.data();
    std::vector<const uint32_t*> zrows(use_bf16 ? static_cast<size_t>(rows) : 0);
#endif
    for (int64_t ci = c0; ci < c1; ++ci) {
      // Output rows g0 .. g0 + nrows of the (n * oh) rows of the whole batch.
      const int64_t g0 = images > 1 ? ci * images * oh : (ci / chunks_per_image) * oh +
                                                             (ci % chunks_per_image) * rows;
      const int64_t nrows = images > 1 ? std::min(rows, s.n * oh - g0)
                                       : std::min(rows, oh - (ci % chunks_per_image) * rows);
      const int64_t npx = nrows * ow;
      for (int64_t r = 0; r < nrows; ++r) {
        const int64_t b = (g0 + r) / oh, p = (g0 + r) % oh;
        xrows[r] = x + (b * s.h + p) * xrs;
      }
      const float* dyb = direct ? dy + g0 * ow * o : nullptr;
      for (int64_t px = 0; px < npx && !direct; ++px) {  // sequential over dy
        const int64_t grow = g0 + px / ow;
        for (const Block& blk : blocks) {
          PackOutputGrad(g, s, grow / oh, grow % oh, px % ow, blk,
                         pack + blk.offset * npx + px * int64_t{L} * blk.nv);
        }
      }
#if FER_JAX_BF16
      if (use_bf16) {
        for (const Block& blk : blocks) {
          const int64_t W = int64_t{L} * blk.nv;
          const float* src = pack + blk.offset * npx;
          uint16_t* dst = bpack + blk.offset * 2 * nrows * npairs;
          for (int64_t p = 0; p < nrows; ++p) {
            for (int64_t j = 0; j < npairs; ++j, dst += 2 * W) {
              const float* lo = src + (p * ow + 2 * j) * W;
              const bool hi = 2 * j + 1 < ow;
              for (int v = 0; v < blk.nv; ++v) {
                const V a = Simd::Load(lo + L * v), b = hi ? Simd::Load(lo + W + L * v) : Simd::Zero();
                _mm512_store_si512(dst + kPairLanes * v, PairBf16(a, b));
              }
            }
          }
        }
        uint32_t* zdst = zpack;
        for (int64_t r = 0; r < nrows;) {  // one segment of rows per image
          const int64_t b = (g0 + r) / oh, pa = (g0 + r) % oh;
          int64_t r1 = r + 1;
          while (r1 < nrows && (g0 + r1) / oh == b) ++r1;
          const int64_t seg = ((g0 + r1 - 1) % oh - pa + s.kh) * xrs;
          PairWithStride(x + (b * s.h + pa) * xrs, seg, c, reinterpret_cast<uint16_t*>(zdst));
          for (; r < r1; ++r) zrows[r] = zdst + ((g0 + r) % oh - pa) * xrs;
          zdst += seg;
        }
        const uint32_t* const* zr = zrows.data();
        for (const Block& blk : blocks) {
          const uint16_t* dyp = bpack + blk.offset * 2 * nrows * npairs;
          for (int64_t i = 0; i < s.kh; ++i) {
            float* dki = part + i * run * o + blk.f0;
            for (int64_t r0 = 0; r0 < run; r0 += blk.mr) {
              const int mr = static_cast<int>(std::min<int64_t>(blk.mr, run - r0));
              const int64_t off = i * xrs + r0;
              switch (blk.nv) {
                case 4: DkTileBf16Mr<4, 6>(mr, zr, off, c, dyp, nrows, npairs, dki + r0 * o, o, blk.tail); break;
                case 3: DkTileBf16Mr<3, 8>(mr, zr, off, c, dyp, nrows, npairs, dki + r0 * o, o, blk.tail); break;
                case 2: DkTileBf16Mr<2, kMaxMr>(mr, zr, off, c, dyp, nrows, npairs, dki + r0 * o, o, blk.tail); break;
                default: DkTileBf16Mr<1, kMaxMr>(mr, zr, off, c, dyp, nrows, npairs, dki + r0 * o, o, blk.tail); break;
              }
            }
          }
        }
        continue;
      }
#endif
      const float* const* xr = xrows.data();
      for (const Block& blk : blocks) {
        const float* dyp = direct ? dyb : pack + blk.offset * npx;
        for (int64_t i = 0; i < s.kh; ++i) {
          float* dki = part + i * run * o + blk.f0;
          for (int64_t r0 = 0; r0 < run; r0 += blk.mr) {
            const int mr = static_cast<int>(std::min<int64_t>(blk.mr, run - r0));
            const int64_t off = i * xrs + r0;
            switch (blk.nv) {
              case 4: DkTileMr<4, (Simd::kRegs == 32 ? 6 : 3)>(mr, xr, off, c, dyp, nrows, ow, dki + r0 * o, o, blk.tail); break;
              case 3: if constexpr (Simd::kRegs == 32) DkTileMr<3, 8>(mr, xr, off, c, dyp, nrows, ow, dki + r0 * o, o, blk.tail); break;
              case 2: DkTileMr<2, kMaxMr>(mr, xr, off, c, dyp, nrows, ow, dki + r0 * o, o, blk.tail); break;
              default: DkTileMr<1, kMaxMr>(mr, xr, off, c, dyp, nrows, ow, dki + r0 * o, o, blk.tail); break;
            }
          }
        }
      }
    }
  };
  if (items == 1) {
    body(0);
  } else {
    parallel_for(items, body);
  }
  ReducePartials(parts.data(), items, len, dk, parallel_for);
}

#else  // portable fallback ----------------------------------------------------------------------
// The same register tiling in plain C++ (MR pixels or r values x NR channels), written for the
// compiler's auto-vectoriser (SSE2, NEON, ...).

// GCC would vectorise the r loop below (contiguous x) with shuffles; the l loops are the ones
// to vectorise (straight-line SLP over the unrolled tile).
#if defined(__GNUC__) && !defined(__clang__)
#define FER_NO_LOOP_VECTORIZE __attribute__((optimize("no-tree-loop-vectorize")))
#else
#define FER_NO_LOOP_VECTORIZE
#endif

// y0[t*o + l] = sum_{i, r} x0[i*xrs + t*c + r] * kf[(i*run + r)*o + l], t < MR, l < NR.
template <int MR, int NR>
FER_NO_LOOP_VECTORIZE inline void FbFwdTile(const float* x0, int64_t xrs, int64_t c, int64_t kh, int64_t run,
                      const float* kf, int64_t o, float* y0) {
  float acc[MR][NR];
  FER_UNROLL
  for (int t = 0; t < MR; ++t)
    FER_UNROLL
    for (int l = 0; l < NR; ++l) acc[t][l] = 0.0f;
  for (int64_t i = 0; i < kh; ++i) {
    const float* xi = x0 + i * xrs;
    const float* ki = kf + i * run * o;
    for (int64_t r = 0; r < run; ++r) {
      float bv[NR];
      FER_UNROLL
      for (int l = 0; l < NR; ++l) bv[l] = ki[r * o + l];
      FER_UNROLL
      for (int t = 0; t < MR; ++t) {
        const float a = xi[t * c + r];
        FER_UNROLL
        for (int l = 0; l < NR; ++l) acc[t][l] += a * bv[l];
      }
    }
  }
  FER_UNROLL
  for (int t = 0; t < MR; ++t)
    FER_UNROLL
    for (int l = 0; l < NR; ++l) y0[t * o + l] = acc[t][l];
}

template <int NR>
inline void FbFwdTileMr(int mr, const float* x0, int64_t xrs, int64_t c, int64_t kh,
                        int64_t run, const float* kf, int64_t o, float* y0) {
  switch (mr) {
    case 4: FbFwdTile<4, NR>(x0, xrs, c, kh, run, kf, o, y0); break;
    case 3: FbFwdTile<3, NR>(x0, xrs, c, kh, run, kf, o, y0); break;
    case 2: FbFwdTile<2, NR>(x0, xrs, c, kh, run, kf, o, y0); break;
    default: FbFwdTile<1, NR>(x0, xrs, c, kh, run, kf, o, y0); break;
  }
}

// Output rows [p, p + nrows) of image b (the SIMD path's RowConv, without packing).
class RowConv {
 public:
  RowConv(const ConvShape& s, const float* x, const float* k, bool /*bf16*/, const ParallelFor&)
      : s_(s), x_(x), k_(k) {}

  void Rows(int64_t b, int64_t p, int64_t nrows, float* out) const {
    const int64_t ow = s_.ow(), o = s_.o, c = s_.c, run = s_.kw * c, xrs = s_.w * c;
    for (int64_t r = 0; r < nrows; ++r) {
      const float* xrow = x_ + (b * s_.h + p + r) * xrs;
      float* yrow = out + r * ow * o;
      int64_t f0 = 0;
      for (; f0 + 8 <= o; f0 += 8) {
        for (int64_t q = 0; q < ow; q += 4) {
          const int mr = static_cast<int>(std::min<int64_t>(4, ow - q));
          FbFwdTileMr<8>(mr, xrow + q * c, xrs, c, s_.kh, run, k_ + f0, o, yrow + q * o + f0);
        }
      }
      for (; f0 < o; ++f0) {
        for (int64_t q = 0; q < ow; q += 4) {
          const int mr = static_cast<int>(std::min<int64_t>(4, ow - q));
          FbFwdTileMr<1>(mr, xrow + q * c, xrs, c, s_.kh, run, k_ + f0, o, yrow + q * o + f0);
        }
      }
    }
  }

 private:
  const ConvShape s_;
  const float* x_;
  const float* k_;
};

void ConvForwardImpl(const ConvShape& s, const float* x, const float* k, float* y,
                     const ParallelFor& parallel_for, bool bf16) {
  const RowConv conv(s, x, k, bf16, parallel_for);
  const int64_t oh = s.oh(), row_floats = s.ow() * s.o;
  parallel_for(s.n * oh, [&](int64_t row) { conv.Rows(row / oh, row % oh, 1, y + row * row_floats); });
}

// dkt[t*o + l] += sum_{q < ow} x0[q*c + t] * d0[q*o + l], t < MR, l < NR.
template <int MR, int NR>
inline void FbDkTile(const float* x0, int64_t c, const float* d0, int64_t o, int64_t ow,
                     float* dkt) {
  float acc[MR][NR];
  FER_UNROLL
  for (int t = 0; t < MR; ++t)
    FER_UNROLL
    for (int l = 0; l < NR; ++l) acc[t][l] = dkt[t * o + l];
  for (int64_t q = 0; q < ow; ++q) {
    float bv[NR];
    FER_UNROLL
    for (int l = 0; l < NR; ++l) bv[l] = d0[q * o + l];
    FER_UNROLL
    for (int t = 0; t < MR; ++t) {
      const float a = x0[q * c + t];
      FER_UNROLL
      for (int l = 0; l < NR; ++l) acc[t][l] += a * bv[l];
    }
  }
  FER_UNROLL
  for (int t = 0; t < MR; ++t)
    FER_UNROLL
    for (int l = 0; l < NR; ++l) dkt[t * o + l] = acc[t][l];
}

template <int NR>
inline void FbDkTileMr(int mr, const float* x0, int64_t c, const float* d0, int64_t o,
                       int64_t ow, float* dkt) {
  switch (mr) {
    case 4: FbDkTile<4, NR>(x0, c, d0, o, ow, dkt); break;
    case 3: FbDkTile<3, NR>(x0, c, d0, o, ow, dkt); break;
    case 2: FbDkTile<2, NR>(x0, c, d0, o, ow, dkt); break;
    default: FbDkTile<1, NR>(x0, c, d0, o, ow, dkt); break;
  }
}

void ConvKernelGradImpl(const ConvShape& s, const float* x, const OutputGrad& g, float* dk,
                        const ParallelFor& parallel_for, bool bf16) {
  const int64_t oh = s.oh(), ow = s.ow(), o = s.o, c = s.c;
  const int64_t run = s.kw * c, kdepth = s.kh * run, len = kdepth * o;
  const int64_t xrs = s.w * c;
  const int64_t nrows = s.n * oh;
  const int64_t mem_items = std::max<int64_t>(1, kDkPartialBytes / (len * int64_t{sizeof(float)}));
  const int64_t items = std::min<int64_t>({nrows, kDkMaxItems, mem_items});
  std::vector<float> parts(static_cast<size_t>(items * len));
  auto body = [&](int64_t item) {
    const int64_t row0 = nrows * item / items, row1 = nrows * (item + 1) / items;
    float* part = parts.data() + item * len;
    std::memset(part, 0, sizeof(float) * len);
    for (int64_t row = row0; row < row1; ++row) {  // one output row
      const int64_t b = row / oh, p = row % oh;
      const float* drow = g.dy ? g.dy + row * ow * o : nullptr;
      thread_local std::vector<float> expanded;
      if (!drow) {  // the pooled gradient, expanded to this dy row
        expanded.resize(static_cast<size_t>(ow * o));
        for (int64_t q = 0; q < ow; ++q) g.Scalar(s, b, p, q, 0, o, expanded.data() + q * o);
        drow = expanded.data();
      }
      for (int64_t i = 0; i < s.kh; ++i) {
        const float* xrow = x + (b * s.h + p + i) * xrs;
        float* pi = part + i * run * o;
        for (int64_t r0 = 0; r0 < run; r0 += 4) {
          const int mr = static_cast<int>(std::min<int64_t>(4, run - r0));
          int64_t f0 = 0;
          for (; f0 + 8 <= o; f0 += 8) FbDkTileMr<8>(mr, xrow + r0, c, drow + f0, o, ow, pi + r0 * o + f0);
          for (; f0 < o; ++f0) FbDkTileMr<1>(mr, xrow + r0, c, drow + f0, o, ow, pi + r0 * o + f0);
        }
      }
    }
  };
  parallel_for(items, body);
  ReducePartials(parts.data(), items, len, dk, parallel_for);
}

// The SIMD path's PoolRowPair, in plain C++.
void PoolRowPair(const float* __restrict r0, const float* __restrict r1, int64_t pw, int64_t o,
                 float* __restrict pooled, uint8_t* __restrict code) {
  for (int64_t q = 0; q < pw; ++q) {
    const float* a = r0 + 2 * q * o;
    const float* b = a + o;
    const float* c = r1 + 2 * q * o;
    const float* d = c + o;
    float* pq = pooled + q * o;
    uint8_t* cq = code + q * o;
    for (int64_t f = 0; f < o; ++f) {
      float m = a[f];
      uint8_t w = 0;
      // Take v when it is greater, or when it is the first NaN (!(v <= m) holds for a NaN v;
      // m == m keeps an earlier NaN).
      const auto step = [&](float v, uint8_t k) {
        if (!(v <= m) && m == m) {
          m = v;
          w = k;
        }
      };
      step(b[f], 1);
      step(c[f], 2);
      step(d[f], 3);
      pq[f] = m;
      cq[f] = w;
    }
  }
}

#endif  // FER_JAX_SIMD

void ConvPoolForwardImpl(const ConvShape& s, const float* x, const float* k, float* pooled,
                         uint8_t* code, const ParallelFor& parallel_for, bool bf16) {
  const int64_t ow = s.ow(), o = s.o, ph = s.oh() / 2, pw = ow / 2;
  const RowConv conv(s, x, k, bf16, parallel_for);
  // One item per pooled row: its two conv rows go to a per-thread scratch that stays in cache.
  parallel_for(s.n * ph, [&](int64_t item) {
    thread_local std::vector<float> scratch;
    scratch.resize(static_cast<size_t>(2 * ow * o));
    conv.Rows(item / ph, 2 * (item % ph), 2, scratch.data());
    PoolRowPair(scratch.data(), scratch.data() + ow * o, pw, o, pooled + item * pw * o,
                code + item * pw * o);
  });
}

}  // namespace

void ConvForward(const ConvShape& s, const float* x, const float* k, float* y,
                 const ParallelFor& parallel_for, bool bf16) {
  if (s.n <= 0 || s.o <= 0 || s.oh() <= 0 || s.ow() <= 0) return;
  if (s.c <= 0 || s.kh <= 0 || s.kw <= 0) {
    std::memset(y, 0, sizeof(float) * s.n * s.oh() * s.ow() * s.o);
    return;
  }
  ConvForwardImpl(s, x, k, y, parallel_for, bf16);
}

void ConvPoolForward(const ConvShape& s, const float* x, const float* k, float* pooled,
                     uint8_t* code, const ParallelFor& parallel_for, bool bf16) {
  const int64_t len = s.n * (s.oh() / 2) * (s.ow() / 2) * s.o;
  if (len <= 0) return;
  if (s.c <= 0 || s.kh <= 0 || s.kw <= 0) {  // an empty reduction: every conv output is 0
    std::memset(pooled, 0, sizeof(float) * len);
    std::memset(code, 0, len);
    return;
  }
  ConvPoolForwardImpl(s, x, k, pooled, code, parallel_for, bf16);
}

namespace {
void KernelGrad(const ConvShape& s, const float* x, const OutputGrad& g, float* dk,
                const ParallelFor& parallel_for, bool bf16) {
  const int64_t len = s.kh * s.kw * s.c * s.o;
  if (len <= 0) return;
  if (s.n <= 0 || s.oh() <= 0 || s.ow() <= 0) {
    std::memset(dk, 0, sizeof(float) * len);
    return;
  }
  ConvKernelGradImpl(s, x, g, dk, parallel_for, bf16);
}
}  // namespace

void ConvKernelGrad(const ConvShape& s, const float* x, const float* dy, float* dk,
                    const ParallelFor& parallel_for, bool bf16) {
  OutputGrad g;
  g.dy = dy;
  KernelGrad(s, x, g, dk, parallel_for, bf16);
}

void ConvKernelGradPooled(const ConvShape& s, const float* x, const float* d_pooled,
                          const uint8_t* code, float* dk, const ParallelFor& parallel_for,
                          bool bf16) {
  OutputGrad g;
  g.d_pooled = d_pooled;
  g.code = code;
  KernelGrad(s, x, g, dk, parallel_for, bf16);
}

bool Bf16Products() { return FER_JAX_BF16; }

}  // namespace fer_jax

// Which kernels this build holds (fer_jax.native.isa()): the -march target decides.
extern "C" const char* FerJaxNativeIsa() {
  return FER_JAX_AVX512 ? "avx512" : FER_JAX_SIMD ? "avx2" : "portable";
}

// Whether the build holds the bfloat16 products (fer_jax.native.bf16_products()).
extern "C" int FerJaxNativeBf16() { return fer_jax::Bf16Products() ? 1 : 0; }
