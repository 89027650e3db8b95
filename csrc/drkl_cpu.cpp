// CPU kernels: the algorithm of the GPU kernels (drkl_math.h), rows in parallel with
// OpenMP, chunks of 512 tokens per step so the exp loops vectorise. Two passes over a
// row: the online tail statistics, then the gradient (when asked for).
#include <string.h>

#include "drkl_launch.h"
#include "drkl_math.h"

namespace {

using namespace drkl;

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

template <int DIV, int PIV, typename TS, typename TT>
void row_forward(const drkl_args& a, int64_t row) {
  using A = typename AccOf<TS>::type;
  const int64_t V = a.vocab;
  const TS* z = static_cast<const TS*>(a.student) + row * a.student_stride;
  const TT* u = static_cast<const TT*>(a.teacher) + row * a.teacher_stride;
  TS* g = a.grad ? static_cast<TS*>(a.grad) + row * a.grad_stride : nullptr;
  A* loss = static_cast<A*>(a.loss);
  const A inv = static_cast<A>(a.inv_tau), gamma = static_cast<A>(a.gamma);

  int64_t t = -1;
  A poison = 0;  // NaN for a label outside [0, V): never read out of bounds, never silent
  if (a.target) {
    const int64_t label = a.target_is_int64 ? static_cast<const int64_t*>(a.target)[row]
                                            : static_cast<const int32_t*>(a.target)[row];
    if (label == a.ignore_index) {
      loss[row] = 0;
      if (g)
        for (int64_t j = 0; j < V; ++j) g[j] = from_acc<TS>(A(0));
      return;
    }
    const bool in_range = label >= 0 && label < V;
    poison = in_range ? A(0) : static_cast<A>(NAN);
    if (PIV == kLabel) t = in_range ? label : 0;
  }

  // Pass 1: tail statistics around the pivot.
  Tail<A> st = Tail<A>::empty();
  Best<A> best = Best<A>::none();
  A zc[kChunk], uc[kChunk];
  for (int64_t start = 0; start < V; start += kChunk) {
    const int n = static_cast<int>(V - start < kChunk ? V - start : kChunk);
    for (int i = 0; i < n; ++i) {
      zc[i] = to_acc(z[start + i]);
      uc[i] = to_acc(u[start + i]);
    }
    take_chunk<DIV, PIV>(st, best, zc, uc, n, start, t, inv);
  }
  A z_t, u_t;
  if (PIV == kLabel) {
    z_t = to_acc(z[t]);
    u_t = to_acc(u[t]);
  } else {
    t = best.idx;
    z_t = best.z;
    u_t = best.u;
  }
  const Row<A> r = finalize<DIV>(st, z_t, u_t, inv, gamma);
  loss[row] = r.loss + poison;
  if (!g) return;

  // Pass 2: the gradient, then the zero-sum closure of a dominant tail token.
  const A scale = inv * (a.mean_scale ? *static_cast<const A*>(a.mean_scale) : A(1));
  Closure<A> closure = Closure<A>::empty();
  A gc[kChunk];
  for (int64_t start = 0; start < V; start += kChunk) {
    const int n = static_cast<int>(V - start < kChunk ? V - start : kChunk);
    for (int i = 0; i < n; ++i) {
      zc[i] = to_acc(z[start + i]);
      uc[i] = to_acc(u[start + i]);
    }
    for (int i = 0; i < n; ++i) gc[i] = grad_at<DIV>(r, zc[i], uc[i], inv) + poison;
    if (t >= start && t < start + n) {  // the pivot: its own gradient, and no part in the top search
      gc[t - start] = r.g_t + poison;
      zc[t - start] = neg_inf<A>();
    }
    // The chunk's top (largest z, first index) and the sum of the rest, merged into the closure.
    A top_z = neg_inf<A>();
    DRKL_SIMD_MAX(top_z)
    for (int i = 0; i < n; ++i) top_z = zc[i] > top_z ? zc[i] : top_z;
    int j = 0;
    while (j < n && !(zc[j] == top_z)) ++j;
    if (!(top_z > neg_inf<A>()) || j == n) j = -1;
    A rest = 0;
    DRKL_SIMD_SUM(rest)
    for (int i = 0; i < n; ++i) rest += i == j ? A(0) : gc[i];
    closure.merge({rest, top_z, j >= 0 ? gc[j] : A(0), j >= 0 ? start + j : -1});
    for (int i = 0; i < n; ++i) g[start + i] = from_acc<TS>(gc[i] * scale);
  }
  if (closure.top >= 0 && student_tail_prob<DIV>(r, closure.top_z, inv) >= A(0.5))
    g[closure.top] = from_acc<TS>(-closure.others * scale);
}

template <int DIV, int PIV, typename TS, typename TT>
int run(const drkl_args& a) {
#pragma omp parallel for schedule(static) num_threads(a.num_threads > 0 ? a.num_threads : 1)
  for (int64_t row = 0; row < a.rows; ++row) row_forward<DIV, PIV, TS, TT>(a, row);
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
  const int s = a->student_dtype, t = a->teacher_dtype;
  if (s == DRKL_F32 && t == DRKL_F32) return route<float, float>(*a);
  if (s == DRKL_BF16 && t == DRKL_BF16) return route<bf16_t, bf16_t>(*a);
  if (s == DRKL_F16 && t == DRKL_F16) return route<f16_t, f16_t>(*a);
  if (s == DRKL_BF16 && t == DRKL_F32) return route<bf16_t, float>(*a);
  if (s == DRKL_F16 && t == DRKL_F32) return route<f16_t, float>(*a);
  if (s == DRKL_F64 && t == DRKL_F64) return route<double, double>(*a);
  return -1;
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
