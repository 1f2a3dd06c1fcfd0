// A driver for fer_jax/native/conv_kernels.cc built with AddressSanitizer and UBSan
// (tests/test_native.py): random shapes, every entry point, exact-size heap buffers (so a read
// or write one float past an edge is caught), serial and on three threads; the results are
// compared with a naive double-precision reference. Every other pair of cases asks for the
// bfloat16 products: the inputs are multiples of 1/8 in [-1, 1], exact in bfloat16, so the
// same reference holds. Prints "ok <cases>" or exits non-zero.
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "conv_kernels.h"

namespace {

using fer_jax::ConvShape;
using fer_jax::ParallelFor;

void Serial(int64_t n, const std::function<void(int64_t)>& body) {
  for (int64_t i = 0; i < n; ++i) body(i);
}

void ThreeThreads(int64_t n, const std::function<void(int64_t)>& body) {
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t i; (i = next.fetch_add(1)) < n;) body(i);
  };
  std::thread a(work), b(work);
  work();
  a.join();
  b.join();
}

bool Close(const float* got, const std::vector<double>& want, const char* what,
           const ConvShape& s) {
  double scale = 1e-12;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(std::fabs(got[i] - want[i]) <= 1e-4 * scale)) {
      std::printf("%s differs at %zu: %g vs %g (n %ld h %ld w %ld c %ld kh %ld kw %ld o %ld)\n",
                  what, i, got[i], want[i], (long)s.n, (long)s.h, (long)s.w, (long)s.c,
                  (long)s.kh, (long)s.kw, (long)s.o);
      return false;
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 200;
  std::mt19937 gen(argc > 2 ? std::atoi(argv[2]) : 0);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen); };
  const int channels[] = {1, 3, 7, 8, 9, 16, 17, 24, 32, 33, 64};
  const int sizes[] = {5, 7, 9, 11, 12, 14, 22, 24, 44};
  for (int it = 0; it < cases; ++it) {
    ConvShape s;
    s.n = pick(1, 5);
    s.kh = pick(1, 3);
    s.kw = pick(1, 3);
    s.h = s.kh + pick(0, 12);
    s.w = s.kw + pick(0, 12);
    if (it % 2 == 0) {  // the zoo's 'SAME' 3x3 convs: small images, several per chunk
      s.kh = s.kw = 3;
      s.h = s.w = sizes[pick(0, 8)] + 2;
    }
    s.c = channels[pick(0, 10)];
    s.o = channels[pick(0, 10)];
    const int64_t oh = s.oh(), ow = s.ow();
    const int64_t nx = s.n * s.h * s.w * s.c, nk = s.kh * s.kw * s.c * s.o;
    const int64_t ny = s.n * oh * ow * s.o;
    auto x = std::make_unique<float[]>(nx);
    auto k = std::make_unique<float[]>(nk);
    auto y = std::make_unique<float[]>(ny);
    auto dk = std::make_unique<float[]>(nk);
    auto g = std::make_unique<float[]>(ny);
    for (int64_t i = 0; i < nx; ++i) x[i] = static_cast<float>(pick(-8, 8)) / 8;
    for (int64_t i = 0; i < nk; ++i) k[i] = static_cast<float>(pick(-8, 8)) / 8;
    for (int64_t i = 0; i < ny; ++i) g[i] = static_cast<float>(pick(-8, 8)) / 8;
    const ParallelFor pf = (it % 3 == 0) ? ParallelFor(Serial) : ParallelFor(ThreeThreads);
    const bool bf16 = (it / 2) % 2 == 1;

    std::vector<double> y_ref(ny, 0.0), dk_ref(nk, 0.0);
    auto X = [&](int64_t b, int64_t p, int64_t q, int64_t ch) {
      return static_cast<double>(x[((b * s.h + p) * s.w + q) * s.c + ch]);
    };
    for (int64_t b = 0; b < s.n; ++b)
      for (int64_t p = 0; p < oh; ++p)
        for (int64_t q = 0; q < ow; ++q)
          for (int64_t f = 0; f < s.o; ++f) {
            double acc = 0;
            for (int64_t i = 0; i < s.kh; ++i)
              for (int64_t j = 0; j < s.kw; ++j)
                for (int64_t ch = 0; ch < s.c; ++ch)
                  acc += X(b, p + i, q + j, ch) * k[((i * s.kw + j) * s.c + ch) * s.o + f];
            y_ref[((b * oh + p) * ow + q) * s.o + f] = acc;
          }
    fer_jax::ConvForward(s, x.get(), k.get(), y.get(), pf, bf16);
    if (!Close(y.get(), y_ref, "ConvForward", s)) return 1;

    // Kernel gradient with dy = g.
    for (int64_t b = 0; b < s.n; ++b)
      for (int64_t p = 0; p < oh; ++p)
        for (int64_t q = 0; q < ow; ++q)
          for (int64_t i = 0; i < s.kh; ++i)
            for (int64_t j = 0; j < s.kw; ++j)
              for (int64_t ch = 0; ch < s.c; ++ch)
                for (int64_t f = 0; f < s.o; ++f)
                  dk_ref[((i * s.kw + j) * s.c + ch) * s.o + f] +=
                    X(b, p + i, q + j, ch) * g[((b * oh + p) * ow + q) * s.o + f];
    fer_jax::ConvKernelGrad(s, x.get(), g.get(), dk.get(), pf, bf16);
    if (!Close(dk.get(), dk_ref, "ConvKernelGrad", s)) return 1;

    if (oh % 2 == 0 && ow % 2 == 0) {
      const int64_t np = s.n * (oh / 2) * (ow / 2) * s.o;
      auto pooled = std::make_unique<float[]>(np);
      auto code = std::make_unique<uint8_t[]>(np);
      fer_jax::ConvPoolForward(s, x.get(), k.get(), pooled.get(), code.get(), pf, bf16);
      // Each pooled value is its window's maximum and its code points at it; the pooled kernel
      // gradient equals the dense one on dy = pooled at the winners, else 0 (with bf16 both
      // round the same values).
      double scale = 1e-12;
      for (double v : y_ref) scale = std::max(scale, std::fabs(v));
      std::vector<float> dy(ny, 0.0f);
      for (int64_t b = 0; b < s.n; ++b)
        for (int64_t p = 0; p < oh / 2; ++p)
          for (int64_t q = 0; q < ow / 2; ++q)
            for (int64_t f = 0; f < s.o; ++f) {
              const int64_t i = ((b * (oh / 2) + p) * (ow / 2) + q) * s.o + f;
              double best = -INFINITY;
              for (int64_t a = 0; a < 4; ++a) {
                const int64_t pa = 2 * p + a / 2, qa = 2 * q + a % 2;
                best = std::max(best, y_ref[((b * oh + pa) * ow + qa) * s.o + f]);
              }
              const int64_t pp = 2 * p + code[i] / 2, qq = 2 * q + code[i] % 2;
              const int64_t yi = ((b * oh + pp) * ow + qq) * s.o + f;
              if (code[i] > 3 || std::fabs(pooled[i] - best) > 1e-4 * scale ||
                  std::fabs(y_ref[yi] - best) > 1e-4 * scale) {
                std::printf("ConvPoolForward: pooled value %ld is not its window's maximum, or "
                            "its code does not point at it\n", (long)i);
                return 1;
              }
              dy[yi] = pooled[i];
            }
      auto dk_dense = std::make_unique<float[]>(nk);
      fer_jax::ConvKernelGrad(s, x.get(), dy.data(), dk_dense.get(), pf, bf16);
      fer_jax::ConvKernelGradPooled(s, x.get(), pooled.get(), code.get(), dk.get(), pf, bf16);
      std::vector<double> want(dk_dense.get(), dk_dense.get() + nk);
      if (!Close(dk.get(), want, "ConvKernelGradPooled", s)) return 1;
    }
  }
  std::printf("ok %d\n", cases);
  return 0;
}
