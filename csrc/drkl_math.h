// The per-row maths of drkl_kernels, shared by the CUDA and the CPU kernels.
//
// A row of student logits z and teacher logits u (length V, temperature tau) is
// split around a pivot token t (the label for DRKL, the student's argmax for RKL,
// the teacher's for FKL). Let x be the side that weights the expectation (the
// student for RKL and DRKL, the teacher for FKL) and y the other. Over j != t, in
// raw-logit units with running maxima m_x, m_y (shift 0 while a side is empty):
//
//   S_x = sum_j exp((x_j - m_x)/tau)      S_y likewise
//   A   = sum_j exp((x_j - m_x)/tau) * ((x_j - m_x) - (y_j - m_y))/tau
//
// so the tail KL is N = KL(xh || yh) = A/S_x + log(S_y/S_x). With a = Ls'_x - x_t,
// b = Ls'_y - y_t: log x_t = -softplus(a), log(1 - x_t) = -softplus(-a), and
//
//   DRKL = B + gamma N,   RKL = B + (1 - q_t) N,   FKL = B + (1 - p_t) N
//
// with B = x_t d_t + (1 - x_t) d_n the binary KL (d_t = log(x_t/y_t),
// d_n = log((1-x_t)/(1-y_t))). Gradient with respect to z, times tau:
//
//   RKL, DRKL:  g_t = c (- q_t (1-q_t) N for RKL), c = q_t (1-q_t) (d_t - d_n)
//               g_j = qh_j (w (d_j - N) - g_t),  w = gamma or 1 - q_t
//   FKL:        g_t = q_t - p_t,  g_j = (1-q_t) qh_j - (1-p_t) ph_j
//
// Rows of the gradient sum to zero; where one student token holds at least half of
// the tail its entry (which cancels) is taken as minus the sum of the others.
// Nothing here forms 1 - q_t or subtracts two log S terms, so confident, flat and
// huge-logit rows stay exact in float32. This mirrors drkl_kernels/reference.py and
// drkl_kernels/triton_kernels.py line for line.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define DRKL_HD __host__ __device__ __forceinline__
#else
#define DRKL_HD inline
#endif

// Vectorised reductions on the CPU (OpenMP simd); plain loops on the GPU.
#if defined(__CUDA_ARCH__) || !defined(_OPENMP)
#define DRKL_SIMD_SUM(...)
#define DRKL_SIMD_MAX(...)
#else
#define DRKL_PRAGMA(x) _Pragma(#x)
#define DRKL_SIMD_SUM(...) DRKL_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#define DRKL_SIMD_MAX(...) DRKL_PRAGMA(omp simd reduction(max : __VA_ARGS__))
#endif

namespace drkl {

enum Divergence : int { kFKL = 0, kRKL = 1, kDRKL = 2 };
enum Pivot : int { kLabel = 0, kTeacherArgmax = 1, kStudentArgmax = 2 };

template <typename A>
DRKL_HD A neg_inf() {
  return static_cast<A>(-INFINITY);
}

// exp for float: libdevice on the GPU; on the CPU a branch-free Cody-Waite reduction
// with a degree-6 polynomial (<= 1 ulp on the normal range, results below it flush
// to 0 as on the GPU), which compilers vectorise where expf would stay a call.
DRKL_HD float ex(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float xc = x < -87.33654f ? -87.33654f : (x > 88.72283f ? 88.72283f : x);  // (fminf would not vectorise)
  const float n = rintf(xc * 1.44269504088896341f);
  float r = fmaf(n, -0.693359375f, xc);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  p = fmaf(p * r, r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  const float y = p * scale;
  return x != x ? x : (x < -87.33654f ? 0.0f : (x > 88.72283f ? INFINITY : y));
#endif
}
DRKL_HD double ex(double x) { return exp(x); }

template <typename A>
DRKL_HD A log1p_(A x) {
  return log1p(x);
}

template <typename A>
DRKL_HD A softplus(A x) {  // log(1 + exp(x)), exact in both tails
  return fmax(x, A(0)) + log1p_(static_cast<A>(exp(-fabs(x))));
}

template <typename A>
DRKL_HD A weighted(A a, A d) {  // a * d with a == 0 terms exactly 0 (never NaN from -inf; NaN stays)
  return a == A(0) ? A(0) : a * d;
}

// exp(x) - 1 for |x| <= 1/2 in float (Taylor to x^8: relative error < 3e-8), vectorisable.
template <typename A>
DRKL_HD A expm1_small(A x) {
  A p = A(1) + x / A(8);
  p = A(1) + x / A(7) * p;
  p = A(1) + x / A(6) * p;
  p = A(1) + x / A(5) * p;
  p = A(1) + x / A(4) * p;
  p = A(1) + x / A(3) * p;
  p = A(1) + x / A(2) * p;
  return x * p;
}

DRKL_HD double expm1_small(double x) { return expm1(x); }  // float64 wants more than 8 terms

template <typename A>
DRKL_HD A exp_diff(A x, A y, A log_ratio) {  // y - x given log(y / x), without cancellation
  return fabs(log_ratio) < A(0.5) ? x * expm1_small(log_ratio) : y - x;
}

template <typename A>
DRKL_HD A shift_of(A m) {  // the shift of a side: its max, or 0 while it has no mass
  return m == neg_inf<A>() ? A(0) : m;
}

// Online state over the tokens other than the pivot.
template <typename A>
struct Tail {
  A m_x, s_x, m_y, s_y, acc;
  DRKL_HD static Tail empty() { return {neg_inf<A>(), A(0), neg_inf<A>(), A(0), A(0)}; }
};

// Re-reference the state to maxima at least (mx, my).
template <typename A>
DRKL_HD void raise_max(Tail<A>& st, A mx, A my, A inv_tau) {
  mx = fmax(st.m_x, mx);
  my = fmax(st.m_y, my);
  const A sx = shift_of(mx), sy = shift_of(my);
  const A ax = ex((st.m_x - sx) * inv_tau), ay = ex((st.m_y - sy) * inv_tau);
  const A moved = ((shift_of(st.m_x) - sx) - (shift_of(st.m_y) - sy)) * inv_tau;
  st.acc = ax * (st.acc + st.s_x * moved);
  st.s_x *= ax;
  st.s_y *= ay;
  st.m_x = mx;
  st.m_y = my;
}

// Fold n tokens: one rescale for the chunk, then one exp per token and side.
template <typename A>
DRKL_HD void fold(Tail<A>& st, const A* x, const A* y, int n, A inv_tau) {
  A cmx = neg_inf<A>(), cmy = neg_inf<A>();
  DRKL_SIMD_MAX(cmx, cmy)
  for (int i = 0; i < n; ++i) {
    cmx = x[i] > cmx ? x[i] : cmx;
    cmy = y[i] > cmy ? y[i] : cmy;
  }
  raise_max(st, cmx, cmy, inv_tau);
  const A sx = shift_of(st.m_x), sy = shift_of(st.m_y);
  A s_x = 0, s_y = 0, acc = 0;
  DRKL_SIMD_SUM(s_x, s_y, acc)
  for (int i = 0; i < n; ++i) {
    const A dx = (x[i] - sx) * inv_tau, dy = (y[i] - sy) * inv_tau;
    const A e = ex(dx);
    s_x += e;
    s_y += ex(dy);
    acc += weighted(e, dx - dy);
  }
  st.s_x += s_x;
  st.s_y += s_y;
  st.acc += acc;
}

// Combine two partial states (parallel reductions).
template <typename A>
DRKL_HD Tail<A> merge(Tail<A> a, Tail<A> b, A inv_tau) {
  const A mx = fmax(a.m_x, b.m_x), my = fmax(a.m_y, b.m_y);
  raise_max(a, mx, my, inv_tau);
  raise_max(b, mx, my, inv_tau);
  return {mx, a.s_x + b.s_x, my, a.s_y + b.s_y, a.acc + b.acc};
}

// The state of a single token (x, y): for folding a token held aside back into a state.
template <typename A>
DRKL_HD Tail<A> single(A x, A y) {
  if (x == neg_inf<A>()) return {neg_inf<A>(), A(0), y, y == neg_inf<A>() ? A(0) : A(1), A(0)};
  return {x, A(1), y, y == neg_inf<A>() ? A(0) : A(1), y == neg_inf<A>() ? static_cast<A>(INFINITY) : A(0)};
}

// A running argmax held out of the sums (first index wins ties, like torch.argmax).
template <typename A>
struct Best {
  int64_t idx;  // -1: none yet
  A key, z, u;
  DRKL_HD static Best none() { return {-1, neg_inf<A>(), neg_inf<A>(), neg_inf<A>()}; }
  DRKL_HD bool beaten_by(A other_key, int64_t other_idx) const {
    return idx < 0 || other_key > key || (other_key == key && other_idx < idx);
  }
};

// Fold one chunk of raw logits (tokens start .. start + n - 1) into the state, leaving the
// pivot out: the label's slot is masked, or a running argmax keeps its best out of the sums
// and puts the previous best into the new best's slot when it is overtaken (no extra pass).
template <int DIV, int PIV, typename A>
DRKL_HD void take_chunk(Tail<A>& st, Best<A>& best, A* zc, A* uc, int n, int64_t start, int64_t label, A inv_tau) {
  // Selects rather than indexing by a runtime slot, so GPU registers never spill to the stack.
  if (PIV == kLabel) {
    for (int i = 0; i < n; ++i) {
      const bool hit = start + i == label;
      zc[i] = hit ? neg_inf<A>() : zc[i];
      uc[i] = hit ? neg_inf<A>() : uc[i];
    }
  } else {
    const A* key = PIV == kStudentArgmax ? zc : uc;
    int j = 0;
    A k = key[0], z = zc[0], u = uc[0];
    for (int i = 1; i < n; ++i)
      if (key[i] > k) {
        j = i;
        k = key[i];
        z = zc[i];
        u = uc[i];
      }
    if (best.beaten_by(k, start + j)) {
      const Best<A> old = best;
      best = {start + j, k, z, u};
      for (int i = 0; i < n; ++i) {
        zc[i] = i == j ? old.z : zc[i];
        uc[i] = i == j ? old.u : uc[i];
      }
    }
  }
  fold(st, DIV == kFKL ? uc : zc, DIV == kFKL ? zc : uc, n, inv_tau);
}

// Combine the (state, held-out best) of two disjoint parts of a row. Symmetric in its two
// arguments, bit for bit, so butterfly reductions leave every lane with the same result.
template <int DIV, int PIV, typename A>
DRKL_HD void merge_parts(Tail<A>& st, Best<A>& best, const Tail<A>& other_st, const Best<A>& other_best, A inv_tau) {
  st = merge(st, other_st, inv_tau);
  if (PIV == kLabel) return;
  Best<A> loser = other_best;
  if (best.beaten_by(other_best.key, other_best.idx)) {
    loser = best;
    best = other_best;
  }
  if (loser.idx >= 0)
    st = merge(st, DIV == kFKL ? single(loser.u, loser.z) : single(loser.z, loser.u), inv_tau);
}

// The gradient pass's bookkeeping for the zero-sum closure: the most probable non-pivot
// student token so far (largest z, first index) with its gradient, and the sum of the
// gradient over every other token seen. The closure is -others: the top's own (cancelling)
// value never enters the sum. merge() is symmetric, for parallel reductions.
template <typename A>
struct Closure {
  A others, top_z, top_g;
  int64_t top;  // -1: none yet
  DRKL_HD static Closure empty() { return {A(0), neg_inf<A>(), A(0), -1}; }
  DRKL_HD void merge(const Closure& o) {
    const bool take = o.top >= 0 && (top < 0 || o.top_z > top_z || (o.top_z == top_z && o.top < top));
    const A loser_g = take ? (top >= 0 ? top_g : A(0)) : (o.top >= 0 ? o.top_g : A(0));
    others = others + o.others + loser_g;
    if (take) {
      top = o.top;
      top_z = o.top_z;
      top_g = o.top_g;
    }
  }
  // One token; tokens must come in increasing index order (strict > keeps the first of equal z).
  DRKL_HD void see(int64_t j, A z, A g) {
    if (z > top_z) {
      others += top >= 0 ? top_g : A(0);
      top = j;
      top_z = z;
      top_g = g;
    } else {
      others += g;
    }
  }
};

// Everything the gradient pass needs, per row.
template <typename A>
struct Row {
  A loss, g_t, w, mean_d, rho, px_n, py_n, shift_x, shift_y, log_sx, log_sy;
};

// d_t = softplus(b) - softplus(a), d_n = softplus(-b) - softplus(-a), given gap = b - a.
// The max(., 0) parts cancel into +-gap when a and b share a sign, so d_t - d_n = gap.
template <typename A>
DRKL_HD void binary_log_ratios(A a, A b, A gap, A& d_t, A& d_n) {
  const A tails = log1p_(static_cast<A>(exp(-fabs(b)))) - log1p_(static_cast<A>(exp(-fabs(a))));
  d_t = ((a > 0 && b > 0) ? gap : fmax(b, A(0)) - fmax(a, A(0))) + tails;
  d_n = ((a < 0 && b < 0) ? -gap : fmax(-b, A(0)) - fmax(-a, A(0))) + tails;
}

// From the tail state and the pivot's raw logits: the loss and the gradient constants.
template <int DIV, typename A>
DRKL_HD Row<A> finalize(const Tail<A>& st, A z_t, A u_t, A inv_tau, A gamma) {
  const A x_t = DIV == kFKL ? u_t : z_t, y_t = DIV == kFKL ? z_t : u_t;
  Row<A> r;
  const A log_sx = log(st.s_x), log_sy = log(st.s_y), ratio = log(st.s_y / st.s_x);
  r.mean_d = st.acc / st.s_x;
  const A tail = st.s_x == A(0) ? A(0) : r.mean_d + ratio;  // N
  const A a = (st.m_x - x_t) * inv_tau + log_sx;          // Ls'_x - x_t / tau
  const A b = (st.m_y - y_t) * inv_tau + log_sy;
  const A gap = ((st.m_y - y_t) - (st.m_x - x_t)) * inv_tau + ratio;  // b - a
  A d_t, d_n;
  binary_log_ratios(a, b, gap, d_t, d_n);
  const A px_t = exp(-softplus(a));
  r.px_n = exp(-softplus(-a));
  r.w = DIV == kDRKL ? gamma : r.px_n;
  r.loss = weighted(px_t, d_t) + weighted(r.px_n, d_n) + r.w * tail;
  if (DIV == kFKL) {
    const A py_t = exp(-softplus(b));
    r.py_n = exp(-softplus(-b));
    r.g_t = px_t + py_t < A(1) ? exp_diff(px_t, py_t, -d_t) : -exp_diff(r.px_n, r.py_n, -d_n);
    r.rho = log(st.s_x / st.s_y) - d_n;
  } else {
    r.py_n = A(0);
    r.rho = A(0);
    r.g_t = weighted(px_t * r.px_n, gap);
    if (DIV == kRKL) r.g_t -= px_t * r.px_n * tail;
  }
  r.shift_x = st.s_x == A(0) ? A(0) : st.m_x;
  r.shift_y = st.s_y == A(0) ? A(0) : st.m_y;
  r.log_sx = st.s_x == A(0) ? A(0) : log_sx;
  r.log_sy = st.s_y == A(0) ? A(0) : log_sy;
  return r;
}

// tau * dL/dz_j for a token other than the pivot.
template <int DIV, typename A>
DRKL_HD A grad_at(const Row<A>& r, A z, A u, A inv_tau) {
  if (DIV == kFKL) {
    const A dx = (u - r.shift_x) * inv_tau, dy = (z - r.shift_y) * inv_tau;
    const A ph = ex(dx - r.log_sx);
    return exp_diff(r.px_n * ph, r.py_n * ex(dy - r.log_sy), r.rho - (dx - dy));
  }
  const A dx = (z - r.shift_x) * inv_tau, dy = (u - r.shift_y) * inv_tau;
  return weighted(ex(dx - r.log_sx), r.w * ((dx - dy) - r.mean_d) - r.g_t);
}

// Probability of a non-pivot student token within the student's tail.
template <int DIV, typename A>
DRKL_HD A student_tail_prob(const Row<A>& r, A z, A inv_tau) {
  return DIV == kFKL ? ex((z - r.shift_y) * inv_tau - r.log_sy) : ex((z - r.shift_x) * inv_tau - r.log_sx);
}

}  // namespace drkl
