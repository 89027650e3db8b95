// CPU kernels: the algorithm of the GPU kernels (drkl_math.h), rows in parallel with OpenMP,
// chunks of 512 tokens per step so the exp loops vectorise. Every student/teacher pair of
// {float32, bfloat16, float16} (and float64 with float64) is read as it is, converted per chunk.
// Three phases (drkl_launch.h): FUSED makes two passes over each row (the statistics, then the
// gradient when asked for); PARTIAL makes the first and writes the record; FINISH reads the merged
// record and makes the second.
#include <string.h>

#include "drkl_launch.h"
#include "drkl_math.h"

namespace {

using namespace drkl;

static_assert(kWidth == DRKL_RECORD_WIDTH, "the record layout of drkl_math.h and drkl_launch.h");

struct bf16_t {
  uint16_t bits;
};
using f16_t = _Float16;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(f16_t v) { return static_cast<float>(v); }
inline float to_acc(bf16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
inline T from_acc(typename AccOf<T>::type v);
template <>
inline float from_acc<float>(float v) { return v; }
template <>
inline double from_acc<double>(double v) { return v; }
template <>
inline f16_t from_acc<f16_t>(float v) { return static_cast<f16_t>(v); }
template <>
inline bf16_t from_acc<bf16_t>(float v) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);
  if (v != v) return {static_cast<uint16_t>((bits >> 16) | 0x40)};
  bits += 0x7fff + ((bits >> 16) & 1);
  return {static_cast<uint16_t>(bits >> 16)};
}

constexpr int kChunk = 512;

// n raw logits as A, and their transformed values.
template <typename T, typename A>
inline void load(const T* p, int n, const Xform<A>& xf, A* raw, A* out) {
  for (int i = 0; i < n; ++i) raw[i] = to_acc(p[i]);
  if (xf.capped) {
    for (int i = 0; i < n; ++i) out[i] = xf.cap * tanh_(raw[i] * xf.scale * xf.inv_cap);
  } else {
    for (int i = 0; i < n; ++i) out[i] = raw[i] * xf.scale;
  }
}

template <typename A>
struct Sides {
  Xform<A> s, t;
};

template <int DIV, int PIV, typename TS, typename TT>
void row_run(const drkl_args& a, const Sides<typename AccOf<TS>::type>& xf, int64_t row) {
  using A = typename AccOf<TS>::type;
  const int64_t V = a.vocab, start0 = a.vocab_start;
  const TS* z = static_cast<const TS*>(a.student) + row * a.student_stride;
  const TT* u = static_cast<const TT*>(a.teacher) + row * a.teacher_stride;
  TS* g = a.grad ? static_cast<TS*>(a.grad) + row * a.grad_stride : nullptr;
  A* rec = a.record ? static_cast<A*>(a.record) + row * kWidth : nullptr;
  A* loss = static_cast<A*>(a.loss);
  A* entropy = static_cast<A*>(a.entropy);
  const A inv = static_cast<A>(a.inv_tau), gamma = static_cast<A>(a.gamma);

  int64_t label = -1;
  A poison = 0;  // NaN for a label outside [0, vocab_total): never read out of bounds, never silent
  if (a.target) {
    label = a.target_is_int64 ? static_cast<const int64_t*>(a.target)[row] : static_cast<const int32_t*>(a.target)[row];
    if (label == a.ignore_index) {
      if (a.phase == DRKL_PARTIAL) {
        to_record(Tail<A>::empty(), Token<A>::none(), rec);
        return;
      }
      loss[row] = 0;
      if (entropy) entropy[row] = 0;
      if (g)
        for (int64_t j = 0; j < V; ++j) g[j] = from_acc<TS>(A(0));
      return;
    }
    poison = label >= 0 && label < a.vocab_total ? A(0) : static_cast<A>(NAN);
  }

  A zr[kChunk], ur[kChunk], zc[kChunk], uc[kChunk];
  Tail<A> st = Tail<A>::empty();
  Token<A> piv = Token<A>::none();
  if (a.phase == DRKL_FINISH) {
    from_record(rec, st, piv);
  } else {
    // Pass 1: the statistics of the tokens other than the pivot.
    for (int64_t start = 0; start < V; start += kChunk) {
      const int n = static_cast<int>(V - start < kChunk ? V - start : kChunk);
      load(z + start, n, xf.s, zr, zc);
      load(u + start, n, xf.t, ur, uc);
      take_chunk<DIV, PIV>(st, piv, zc, uc, n, start0 + start, PIV == kLabel ? label : -1, inv);
    }
    if (PIV == kLabel && label >= start0 && label < start0 + V) {
      const int64_t j = label - start0;
      piv = {label, xf.s.apply(to_acc(z[j])), xf.t.apply(to_acc(u[j]))};
    }
    if (a.phase == DRKL_PARTIAL) {
      to_record(st, piv, rec);
      return;
    }
  }
  const Row<A> r = finalize<DIV>(st, piv.z, piv.u, inv, gamma);
  loss[row] = r.loss + poison;
  if (entropy) entropy[row] = r.entropy + poison;
  if (!g) return;

  // Pass 2: the gradient, times 1/tau, the mean's scale and the transform's derivative.
  const A mean = a.mean_scale ? *static_cast<const A*>(a.mean_scale) : A(1);
  const Grad<A> gr = gradient_of<DIV>(r, inv, inv * mean * (xf.s.capped ? A(1) : xf.s.scale));
  const int64_t t = piv.idx - start0;  // the pivot's place in the slice (any value when outside)
  A gc[kChunk];
  for (int64_t start = 0; start < V; start += kChunk) {
    const int n = static_cast<int>(V - start < kChunk ? V - start : kChunk);
    load(z + start, n, xf.s, zr, zc);
    load(u + start, n, xf.t, ur, uc);
    for (int i = 0; i < n; ++i) gc[i] = grad_at<DIV>(gr, zc[i], uc[i]);
    if (t >= start && t < start + n) gc[t - start] = gr.g_t;
    if (xf.s.capped) {
      for (int i = 0; i < n; ++i) g[start + i] = from_acc<TS>((gc[i] + poison) * xf.s.deriv(zr[i]));
    } else {
      for (int i = 0; i < n; ++i) g[start + i] = from_acc<TS>(gc[i] + poison);
    }
  }
}

template <int DIV, int PIV, typename TS, typename TT>
int run(const drkl_args& a) {
  using A = typename AccOf<TS>::type;
  const Sides<A> xf{Xform<A>::make(a.student_scale, a.student_softcap), Xform<A>::make(a.teacher_scale, a.teacher_softcap)};
#pragma omp parallel for schedule(static) num_threads(a.num_threads > 0 ? a.num_threads : 1)
  for (int64_t row = 0; row < a.rows; ++row) row_run<DIV, PIV, TS, TT>(a, xf, row);
  return 0;
}

template <typename TS, typename TT>
int route(const drkl_args& a) {
  switch (a.divergence * 3 + a.pivot) {
    case kDRKL * 3 + kLabel: return run<kDRKL, kLabel, TS, TT>(a);
    case kDRKL * 3 + kTeacherArgmax: return run<kDRKL, kTeacherArgmax, TS, TT>(a);
    case kRKL * 3 + kStudentArgmax: return run<kRKL, kStudentArgmax, TS, TT>(a);
    case kFKL * 3 + kTeacherArgmax: return run<kFKL, kTeacherArgmax, TS, TT>(a);
    default: return -1;
  }
}

template <typename TS>
int route_teacher(const drkl_args& a) {
  switch (a.teacher_dtype) {
    case DRKL_F32: return route<TS, float>(a);
    case DRKL_BF16: return route<TS, bf16_t>(a);
    case DRKL_F16: return route<TS, f16_t>(a);
    default: return -1;
  }
}

template <typename T>
int scale_rows(const drkl_scale_args& a) {
  using A = typename AccOf<T>::type;
#pragma omp parallel for schedule(static) num_threads(a.num_threads > 0 ? a.num_threads : 1)
  for (int64_t row = 0; row < a.rows; ++row) {
    const A w = static_cast<const A*>(a.weight)[row * a.weight_stride];
    if (w == A(1)) continue;
    T* g = static_cast<T*>(a.grad) + row * a.grad_stride;
    for (int64_t j = 0; j < a.vocab; ++j) g[j] = from_acc<T>(to_acc(g[j]) * w);
  }
  return 0;
}

}  // namespace

extern "C" int drkl_cpu_forward(const drkl_args* a) {
  switch (a->student_dtype) {
    case DRKL_F32: return route_teacher<float>(*a);
    case DRKL_BF16: return route_teacher<bf16_t>(*a);
    case DRKL_F16: return route_teacher<f16_t>(*a);
    case DRKL_F64: return a->teacher_dtype == DRKL_F64 ? route<double, double>(*a) : -1;
    default: return -1;
  }
}

extern "C" int drkl_cpu_scale_grad(const drkl_scale_args* a) {
  switch (a->dtype) {
    case DRKL_F32: return scale_rows<float>(*a);
    case DRKL_BF16: return scale_rows<bf16_t>(*a);
    case DRKL_F16: return scale_rows<f16_t>(*a);
    case DRKL_F64: return scale_rows<double>(*a);
    default: return -1;
  }
}
