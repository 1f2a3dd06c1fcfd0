// XLA FFI handlers around the direct convolution kernels (conv_kernels.h), so a jitted JAX
// program can call them on the CPU backend with XLA's own intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <string>

#include "conv_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// body(i) for i in [0, n) on the caller's thread plus up to num_threads - 1 pool threads.
// Items are claimed from a shared counter, so the caller alone can finish all of them: no
// deadlock when every pool thread is busy (this handler may itself run on one). An exception
// from body (e.g. std::bad_alloc) must not escape on a pool thread, where it would terminate
// the process: the first one is kept, the remaining items are skipped, and it is rethrown
// on the caller's thread once every item is accounted for.
class PoolParallelFor {
 public:
  explicit PoolParallelFor(ffi::ThreadPool& pool) : pool_(pool) {}

  void operator()(int64_t n, const std::function<void(int64_t)>& body) const {
    const int64_t helpers = std::min<int64_t>(pool_.num_threads(), n) - 1;
    if (helpers <= 0) {
      for (int64_t i = 0; i < n; ++i) body(i);
      return;
    }
    struct State {
      std::atomic<int64_t> next{0};
      std::atomic<int64_t> done{0};
      std::atomic<bool> failed{false};
      std::exception_ptr error;  // written once, by the thread that set `failed`
      std::mutex mu;
      std::condition_variable cv;
    };
    auto state = std::make_shared<State>();
    // A helper that starts late finds next >= n and never touches `body`.
    auto work = [state, n, &body]() {
      for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
        if (!state->failed.load(std::memory_order_relaxed)) {
          try {
            body(i);
          } catch (...) {
            if (!state->failed.exchange(true)) state->error = std::current_exception();
          }
        }
        if (state->done.fetch_add(1) + 1 == n) {
          std::lock_guard<std::mutex> lock(state->mu);
          state->cv.notify_all();
        }
      }
    };
    for (int64_t t = 0; t < helpers; ++t) pool_.Schedule([work]() { work(); });
    work();
    std::unique_lock<std::mutex> lock(state->mu);
    state->cv.wait(lock, [&] { return state->done.load() == n; });
    if (state->error) std::rethrow_exception(state->error);
  }

 private:
  ffi::ThreadPool& pool_;
};

using Dims = ffi::AnyBuffer::Dimensions;

ffi::Error Invalid(const char* op, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string(op) + ": " + what);
}

// The conv's shape from x (n, h, w, c) and the kernel's (kh, kw, c, o) dimensions.
ffi::Error ConvShapeOf(Dims xd, Dims kd, const char* op, fer_jax::ConvShape* s) {
  if (xd.size() != 4 || kd.size() != 4) return Invalid(op, "x and the kernel must have rank 4");
  *s = fer_jax::ConvShape{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3]};
  if (kd[2] != s->c || s->kh > s->h || s->kw > s->w) return Invalid(op, "kernel does not fit x");
  return ffi::Error::Success();
}

// d must be (n, oh / f, ow / f, o): the conv output (f = 1) or its 2x2 pool (f = 2, oh and ow
// even).
ffi::Error CheckOutputDims(Dims d, const fer_jax::ConvShape& s, int64_t f, const char* op,
                           const char* what) {
  if (f == 2 && (s.oh() % 2 || s.ow() % 2)) return Invalid(op, "the conv output must be even");
  if (d.size() != 4 || d[0] != s.n || d[1] != s.oh() / f || d[2] != s.ow() / f || d[3] != s.o) {
    return Invalid(op, std::string("wrong shape of ") + what);
  }
  return ffi::Error::Success();
}

#define FER_RETURN_IF_ERROR(expr)            \
  if (auto e = (expr); e.failure()) return e

// Runs a kernel; no C++ exception may cross the FFI boundary (XLA would terminate), so one
// becomes an error of the call (an out-of-memory one for std::bad_alloc).
template <typename F>
ffi::Error Guarded(const char* op, F&& kernel) {
  try {
    kernel();
    return ffi::Error::Success();
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      std::string(op) + ": out of memory for the kernel's scratch buffers");
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string(op) + ": " + e.what());
  } catch (...) {
    return ffi::Error::Internal(std::string(op) + ": unknown C++ exception");
  }
}

// Every handler takes a bool attribute bf16: products of bfloat16-rounded operands where the
// build has them (conv_kernels.h).

// x (n, h, w, c), k (kh, kw, c, o) -> y (n, h - kh + 1, w - kw + 1, o)
ffi::Error ConvForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> y, bool bf16) {
  fer_jax::ConvShape s;
  FER_RETURN_IF_ERROR(ConvShapeOf(x.dimensions(), k.dimensions(), "conv", &s));
  FER_RETURN_IF_ERROR(CheckOutputDims(y->dimensions(), s, 1, "conv", "the output"));
  return Guarded("conv", [&] {
    fer_jax::ConvForward(s, x.typed_data(), k.typed_data(), y->typed_data(),
                         PoolParallelFor(pool), bf16);
  });
}

// x (n, h, w, c), k (kh, kw, c, o) -> pooled, code (n, oh/2, ow/2, o); oh, ow even
ffi::Error ConvPoolForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> pooled,
                               ffi::ResultBuffer<ffi::U8> code, bool bf16) {
  fer_jax::ConvShape s;
  FER_RETURN_IF_ERROR(ConvShapeOf(x.dimensions(), k.dimensions(), "conv_pool", &s));
  FER_RETURN_IF_ERROR(CheckOutputDims(pooled->dimensions(), s, 2, "conv_pool", "pooled"));
  FER_RETURN_IF_ERROR(CheckOutputDims(code->dimensions(), s, 2, "conv_pool", "code"));
  return Guarded("conv_pool", [&] {
    fer_jax::ConvPoolForward(s, x.typed_data(), k.typed_data(), pooled->typed_data(),
                             code->typed_data(), PoolParallelFor(pool), bf16);
  });
}

// x (n, h, w, c), dy (n, oh, ow, o) -> dk (kh, kw, c, o)
ffi::Error ConvKernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk,
                              bool bf16) {
  fer_jax::ConvShape s;
  FER_RETURN_IF_ERROR(ConvShapeOf(x.dimensions(), dk->dimensions(), "conv kernel grad", &s));
  FER_RETURN_IF_ERROR(CheckOutputDims(dy.dimensions(), s, 1, "conv kernel grad", "dy"));
  return Guarded("conv kernel grad", [&] {
    fer_jax::ConvKernelGrad(s, x.typed_data(), dy.typed_data(), dk->typed_data(),
                            PoolParallelFor(pool), bf16);
  });
}

// x (n, h, w, c), d_pooled and code (n, oh/2, ow/2, o) -> dk (kh, kw, c, o); oh, ow even
ffi::Error ConvKernelGradPooledImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                    ffi::Buffer<ffi::F32> d_pooled, ffi::Buffer<ffi::U8> code,
                                    ffi::ResultBuffer<ffi::F32> dk, bool bf16) {
  const char* op = "pooled conv kernel grad";
  fer_jax::ConvShape s;
  FER_RETURN_IF_ERROR(ConvShapeOf(x.dimensions(), dk->dimensions(), op, &s));
  FER_RETURN_IF_ERROR(CheckOutputDims(d_pooled.dimensions(), s, 2, op, "d_pooled"));
  FER_RETURN_IF_ERROR(CheckOutputDims(code.dimensions(), s, 2, op, "code"));
  return Guarded(op, [&] {
    fer_jax::ConvKernelGradPooled(s, x.typed_data(), d_pooled.typed_data(), code.typed_data(),
                                  dk->typed_data(), PoolParallelFor(pool), bf16);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FerJaxConvKernelGradPooled, ConvKernelGradPooledImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FerJaxConvForward, ConvForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FerJaxConvPoolForward, ConvPoolForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<bool>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FerJaxConvKernelGrad, ConvKernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("bf16"));
