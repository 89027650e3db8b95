// The per-row maths of drkl_kernels, shared by the CUDA and the CPU kernels: the C++ form of
// drkl_kernels/record.py (the record of a vocabulary slice and its merge) and of the finish in
// drkl_kernels/reference.py, which the Triton kernel mirrors too.
//
// Each side's logits are transformed on load (Xform: scale, then cap * tanh(x / cap)); values are
// then in logit units and the temperature only scales differences (inv_tau = 1 / tau). A row is
// split around a pivot token t (the label for DRKL, the student's argmax for RKL, the teacher's for
// FKL and for DRKL without a label). x is the side that weights the expectation (the student for
// RKL and DRKL, the teacher for FKL), y the other. Over j != t, with running maxima m_x, m_y:
//
//   S_x = sum_j e_j,  e_j = exp((x_j - m_x)/tau)          S_y likewise
//   N   = KL(xh || yh) = E_xh[d] + log(S_y/S_x),  d_j = ((x_j - m_x) - (y_j - m_y))/tau
//
// For RKL and DRKL the student's top token k (first index of max x_j, j != t) is held out of the
// x sums, and the accumulator is relative to it: ACC = sum_{j != t,k} e_j (d_j - d_k), so that
// d_k - N = -ACC/S_x and d_j - N = (d_j - d_k) + (d_k - N) never cancel when k dominates the tail
// (d_j - d_k = ((x_j - x_k) - (y_j - y_k))/tau from raw differences). FKL keeps
// ACC = sum_j e_j d_j and needs no top. With a = Ls'_x - x_t, b = Ls'_y - y_t:
// log x_t = -softplus(a), log(1 - x_t) = -softplus(-a), and
//
//   DRKL = B + gamma N,   RKL = B + (1 - q_t) N,   FKL = B + (1 - p_t) N
//
// with B = x_t d_t + (1 - x_t) d_n the binary KL (d_t = log(x_t/y_t), d_n = log((1-x_t)/(1-y_t))).
// The student's entropy H(q) = q_t softplus(a_q) + (1 - q_t) (softplus(-a_q) + log S_q - ENT/S_q),
// ENT = sum e_j (s_j - m_s)/tau over the student's terms. Gradient with respect to the transformed
// z, times tau (then times the transform's derivative):
//
//   RKL, DRKL:  g_t = q_t (1-q_t) (d_t - d_n) (RKL: less q_t (1-q_t) N, as (d_t - d_k) + (d_k - N))
//               g_j = qh_j (w (d_j - N) - g_t),  w = gamma or 1 - q_t   (the top's included)
//   FKL:        g_t = q_t - p_t,  g_j = (1-q_t) qh_j - (1-p_t) ph_j
//
// Nothing here forms 1 - q_t or subtracts two log S terms, so confident, flat and huge-logit rows
// stay exact in float32; every gradient row sums to zero without a second reduction.
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
// Loops over a chunk: unrolled on the GPU (their length is a constant there once inlined, and a
// register array indexed at run time would go to local memory).
#if defined(__CUDA_ARCH__)
#define DRKL_UNROLL _Pragma("unroll")
#else
#define DRKL_UNROLL
#endif

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
// The record's fields (drkl_kernels/record.py's Field): one row of a slice's statistics.
enum Field : int { kMX = 0, kSX, kMY, kSY, kAcc, kEnt, kTop, kTopY, kPiv, kPivZ, kPivU, kWidth };

template <int DIV>
constexpr bool kHasTop = DIV != kFKL;  // RKL and DRKL hold the student's top token out of the x sums

template <typename A>
DRKL_HD A neg_inf() {
  return static_cast<A>(-INFINITY);
}

// e^r for |r| <= ln(2) / 2: the degree-6 polynomial of the CPU's ex and ex2 (<= 1 ulp).
DRKL_HD float exp_reduced(float r) {
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  return fmaf(p * r, r, r) + 1.0f;
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
  const float p = exp_reduced(r);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  const float y = p * scale;
  return x != x ? x : (x < -87.33654f ? 0.0f : (x > 88.72283f ? INFINITY : y));
#endif
}
DRKL_HD double ex(double x) { return exp(x); }

constexpr double kLog2e = 1.4426950408889634074;

// 2^x for float, the exponential of the per-token loops (their arguments carry log2(e) / tau,
// folded into one constant by log2_scale): on the GPU one MUFU.EX2 (ex2.approx.ftz, relative
// error below 2^-22; it flushes results below 2^-126 to 0); on the CPU 2^r = e^(r ln 2)
// through the polynomial of ex, with gradual underflow down to 2^-149 (x < -150 gives 0, -inf
// gives 0, NaN stays NaN): a gradient element q_j * f_j of a normal size whose q_j is subnormal
// (huge logits: q_j ~ 1e-40, |f_j| ~ 1e3) is kept, which SPEC §6 asks of every value float32 holds.
DRKL_HD float ex2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  const float xc = x < -150.0f ? -150.0f : (x > 128.0f ? 128.0f : x);
  const float n = rintf(xc);
  const float r = (xc - n) * 0.693147180559945309f;  // |r| <= ln(2) / 2; xc - n is exact
  const float p = exp_reduced(r);
  const int32_t ni = static_cast<int32_t>(n), n1 = ni / 2;  // 2^n as two normal factors, one rounding
  const int32_t b1 = (n1 + 127) << 23, b2 = (ni - n1 + 127) << 23;
  float s1, s2;
  memcpy(&s1, &b1, sizeof s1);
  memcpy(&s2, &b2, sizeof s2);
  const float y = p * s1 * s2;
  return x != x ? x : (x < -150.0f ? 0.0f : (x >= 128.0f ? INFINITY : y));
#endif
}
DRKL_HD double ex2(double x) { return exp2(x); }

// The constant of the per-token exponentials: exp(v / tau) = ex2(v * log2_scale(1 / tau)).
template <typename A>
DRKL_HD A log2_scale(A inv_tau) {
  return inv_tau * static_cast<A>(kLog2e);
}

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

template <typename A>
DRKL_HD A add_weighted(A sum, A a, A d) {  // sum + weighted(a, d): one multiply-add and a select
  return a == A(0) ? sum : a * d + sum;
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

// max(a, b) ignoring a NaN b: FMNMX on the GPU, a select the CPU vectorises.
DRKL_HD float max_(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fmaxf(a, b);
#else
  return b > a ? b : a;
#endif
}
DRKL_HD double max_(double a, double b) { return b > a ? b : a; }

template <typename A>
DRKL_HD A shift_of(A m) {  // the shift of a side: its max, or 0 while it has no mass
  return m == neg_inf<A>() ? A(0) : m;
}

// tanh to about float32 rounding: libdevice on the GPU; on the CPU, for w = |y| below 0.9,
// w + w s P(s) with s = w^2 and P the weighted minimax fit of (tanh(w) - w) / (w s) of degree 6
// (1.1e-9 relative; the Triton kernels use the same), above it 1 - 2e / (1 + e), e = exp(-2w)
// <= 0.17; with the sign of y. (A soft cap multiplies tanh's error by cap / tau in the exponent:
// 50 / 0.5 turns 3 ulp into 1.4e-5 of the gradient.)
DRKL_HD float tanh_(float y) {
#if defined(__CUDA_ARCH__)
  return tanhf(y);
#else
  const float w = fabsf(y), s = w * w;
  float p = fmaf(-0.0004554526707857623f, s, 0.0025826473316389043f);
  p = fmaf(p, s, -0.008264520989701804f);
  p = fmaf(p, s, 0.0216635297149987f);
  p = fmaf(p, s, -0.05392929789632227f);
  p = fmaf(p, s, 0.1333297821297786f);
  p = fmaf(p, s, -0.33333322261005444f);
  const float e = ex(-2.0f * w);
  return copysignf(w < 0.9f ? fmaf(w, s * p, w) : 1.0f - 2.0f * e / (1.0f + e), y);
#endif
}
DRKL_HD double tanh_(double y) { return tanh(y); }

// 1 - tanh(y)^2 = 4 e / (1 + e)^2 with e = exp(-2|y|): no cancellation where tanh saturates.
template <typename A>
DRKL_HD A sech2(A y) {
  const A e = ex(A(-2) * fabs(y));
  return A(4) * e / ((A(1) + e) * (A(1) + e));
}

// One side's logit transform (SPEC §4): x -> scale x, then cap tanh(x / cap) when capped.
template <typename A>
struct Xform {
  A scale, cap, inv_cap;
  bool capped;
  DRKL_HD static Xform make(double scale, double softcap) {
    return {static_cast<A>(scale), static_cast<A>(softcap), softcap > 0 ? static_cast<A>(1.0 / softcap) : A(0),
            softcap > 0};
  }
  DRKL_HD A apply(A x) const { return capped ? cap * tanh_(x * scale * inv_cap) : x * scale; }
  DRKL_HD A deriv(A x) const { return capped ? scale * sech2(x * scale * inv_cap) : scale; }
};

// A token: its global index (-1: none) and both transformed logits.
template <typename A>
struct Token {
  int64_t idx;
  A z, u;
  DRKL_HD static Token none() { return {-1, neg_inf<A>(), neg_inf<A>()}; }
};

// Whether token a (key, index) beats token b: a real one over none, the larger key, ties to the
// smaller index (torch.argmax's first index).
template <typename A>
DRKL_HD bool first(A key_a, int64_t idx_a, A key_b, int64_t idx_b) {
  return idx_a >= 0 && (idx_b < 0 || key_a > key_b || (key_a == key_b && idx_a < idx_b));
}

// The running statistics of the tokens other than the pivot (the record less the pivot).
template <typename A>
struct Tail {
  A m_x, s_x, m_y, s_y, acc, ent, top_y;
  int64_t top;  // RKL, DRKL: the student's top token k (x_k = m_x), -1 while none
  DRKL_HD static Tail empty() { return {neg_inf<A>(), A(0), neg_inf<A>(), A(0), A(0), A(0), A(0), -1}; }
};

// Raise the maxima of a state: both sides for FKL; only y for RKL and DRKL, whose x maximum is the
// top and changes through merge() only (ACC, relative to the top, does not move with m_y).
template <int DIV, typename A>
DRKL_HD void raise_max(Tail<A>& st, A mx, A my, A inv_tau) {
  const A l2 = log2_scale(inv_tau);
  my = fmax(st.m_y, my);
  const A sy = shift_of(my);
  const A ay = ex2((st.m_y - sy) * l2), moved_y = (shift_of(st.m_y) - sy) * inv_tau;
  if (!kHasTop<DIV>) {
    mx = fmax(st.m_x, mx);
    const A sx = shift_of(mx);
    const A ax = ex2((st.m_x - sx) * l2), moved_x = (shift_of(st.m_x) - sx) * inv_tau;
    st.acc = ax * (st.acc + st.s_x * (moved_x - moved_y));
    st.ent = ay * (st.ent + st.s_y * moved_y);  // FKL's student is y
    st.s_x *= ax;
    st.m_x = mx;
  }
  st.s_y *= ay;
  st.m_y = my;
}

// Add n tokens to a state whose maxima already bound them (x_i <= m_x, y_i <= m_y). Per token:
// two subtractions, two exponentials (ex2), the sums; ACC and ENT are summed in logit units and
// scaled by 1/tau once per call.
template <int DIV, typename A>
DRKL_HD void accumulate(Tail<A>& st, const A* x, const A* y, int n, A inv_tau) {
  const A l2 = log2_scale(inv_tau);
  const A sx = shift_of(st.m_x), sy = shift_of(st.m_y), ref_y = kHasTop<DIV> ? st.top_y : sy;
  A s_x = 0, s_y = 0, acc = 0, ent = 0;
  DRKL_SIMD_SUM(s_x, s_y, acc, ent)
  DRKL_UNROLL
  for (int i = 0; i < n; ++i) {
    const A dx = x[i] - sx, dy = y[i] - sy;
    const A e = ex2(dx * l2), f = ex2(dy * l2);
    s_x += e;
    s_y += f;
    acc = add_weighted(acc, e, dx - (y[i] - ref_y));
    ent = kHasTop<DIV> ? add_weighted(ent, e, dx) : add_weighted(ent, f, dy);
  }
  st.s_x += s_x;
  st.s_y += s_y;
  st.acc += acc * inv_tau;
  st.ent += ent * inv_tau;
}

DRKL_HD uint64_t bits_of(float v) {
  uint32_t b;
  memcpy(&b, &v, sizeof b);
  return b;
}
DRKL_HD uint64_t bits_of(double v) {
  uint64_t b;
  memcpy(&b, &v, sizeof b);
  return b;
}

// A total order on states by their bits. Merges take their operands in this order (or in the
// order of their tops), never in argument order: merge(a, b) and merge(b, a) then run the same
// operations on the same values, so they agree bit for bit even where a compiler fuses a multiply
// into an add (the GPU's does by default).
template <typename A>
DRKL_HD bool bits_before(const Tail<A>& a, const Tail<A>& b) {
  const A fa[7] = {a.m_x, a.s_x, a.m_y, a.s_y, a.acc, a.ent, a.top_y};
  const A fb[7] = {b.m_x, b.s_x, b.m_y, b.s_y, b.acc, b.ent, b.top_y};
  DRKL_UNROLL
  for (int i = 0; i < 7; ++i)
    if (bits_of(fa[i]) != bits_of(fb[i])) return bits_of(fa[i]) < bits_of(fb[i]);
  return a.top < b.top;
}

// Combine two disjoint parts of a row (steps 2 and 3 of record.py's merge). Symmetric in its
// arguments, bit for bit (bits_before), so butterfly reductions leave every lane with the same result.
template <int DIV, typename A>
DRKL_HD Tail<A> merge(const Tail<A>& a, const Tail<A>& b, A inv_tau) {
  if (!kHasTop<DIV>) {
    const bool a_first = bits_before(a, b);
    Tail<A> ra = a_first ? a : b, rb = a_first ? b : a;
    const A mx = fmax(ra.m_x, rb.m_x), my = fmax(ra.m_y, rb.m_y);
    raise_max<DIV>(ra, mx, my, inv_tau);
    raise_max<DIV>(rb, mx, my, inv_tau);
    return {mx, ra.s_x + rb.s_x, my, ra.s_y + rb.s_y, ra.acc + rb.acc, ra.ent + rb.ent, A(0), -1};
  }
  // The winner's top stays; the loser's x terms, its top's included, move to the winner's top.
  const bool a_wins = first(a.m_x, a.top, b.m_x, b.top) || (a.top == b.top && bits_before(a, b));
  const Tail<A> w = a_wins ? a : b, l = a_wins ? b : a;  // values, not references: GPU registers
  const A my = fmax(w.m_y, l.m_y), sy = shift_of(my);
  const A x_k = shift_of(w.m_x), terms = l.s_x + (l.top >= 0 ? A(1) : A(0));
  const A moved = (l.m_x - x_k) * inv_tau, scale = ex2((l.m_x - x_k) * log2_scale(inv_tau));
  const A delta = ((l.m_x - x_k) - (l.top_y - w.top_y)) * inv_tau;
  Tail<A> out = w;
  out.m_y = my;
  const A l2 = log2_scale(inv_tau);
  out.s_y = ex2((w.m_y - sy) * l2) * w.s_y + ex2((l.m_y - sy) * l2) * l.s_y;
  out.s_x = w.s_x + scale * terms;
  out.acc = w.acc + weighted(scale, l.acc + weighted(terms, delta));
  out.ent = w.ent + weighted(scale, l.ent + weighted(terms, moved));
  return out;
}

// The state of one token (record.py's token()): for folding a token held aside into a state.
template <int DIV, typename A>
DRKL_HD Tail<A> single(const Token<A>& t, A inv_tau) {
  const A x = DIV == kFKL ? t.u : t.z, y = DIV == kFKL ? t.z : t.u;
  const A s_y = y > neg_inf<A>() ? A(1) : A(0);
  if (kHasTop<DIV>) {
    if (t.idx >= 0 && x > neg_inf<A>()) return {x, A(0), y, s_y, A(0), A(0), y, t.idx};
    return {neg_inf<A>(), A(0), y, s_y, A(0), A(0), A(0), -1};
  }
  const A s_x = x > neg_inf<A>() ? A(1) : A(0);
  return {x, s_x, y, s_y, weighted(s_x, ((x - shift_of(x)) - (y - shift_of(y))) * inv_tau), A(0), A(0), -1};
}

// The maxima of n tokens of each side (NaN ignored).
template <typename A>
DRKL_HD void chunk_max(const A* x, const A* y, int n, A& cmx, A& cmy) {
  cmx = neg_inf<A>();
  cmy = neg_inf<A>();
  DRKL_SIMD_MAX(cmx, cmy)
  DRKL_UNROLL
  for (int i = 0; i < n; ++i) {
    cmx = max_(cmx, x[i]);
    cmy = max_(cmy, y[i]);
  }
}

// Whether a chunk of tokens with maxima cmx, cmy (the label not among them) leaves the held-out
// tokens as they are: it beats neither the top nor the argmax pivot, so it only raises the maxima
// and joins the sums (raise_max, accumulate), exactly as take_chunk would fold it.
template <int DIV, int PIV, typename A>
DRKL_HD bool keeps_held(const Tail<A>& st, const Token<A>& best, A cmx, A cmy) {
  if (kHasTop<DIV> && cmx > neg_inf<A>() && cmx >= st.m_x) return false;
  if (PIV == kLabel) return true;
  const bool key_is_x = (PIV == kStudentArgmax) == (DIV != kFKL);
  return best.idx >= 0 && (key_is_x ? cmx : cmy) < (PIV == kStudentArgmax ? best.z : best.u);
}

// Fold n tokens (global ids start ..) into the state. For RKL and DRKL a chunk whose max beats the
// top brings a new top: the chunk's state is formed around it and merged (the old top joins the sums).
// x is overwritten (the new top's slot is held out).
template <int DIV, typename A>
DRKL_HD void fold(Tail<A>& st, A* x, const A* y, int n, int64_t start, A inv_tau) {
  A cmx, cmy;
  chunk_max(x, y, n, cmx, cmy);
  if (kHasTop<DIV> && cmx > neg_inf<A>() && cmx >= st.m_x) {
    int j = 0;
    A top_y = y[0];
    DRKL_UNROLL
    for (int i = n - 1; i >= 0; --i)  // selects, not a runtime index: GPU registers never spill
      if (x[i] == cmx) {
        j = i;
        top_y = y[i];
      }
    if (!first(cmx, start + j, st.m_x, st.top)) {  // a tie with an earlier top: the chunk joins the sums
      raise_max<DIV>(st, cmx, cmy, inv_tau);
      accumulate<DIV>(st, x, y, n, inv_tau);
      return;
    }
    DRKL_UNROLL
    for (int i = 0; i < n; ++i) x[i] = i == j ? neg_inf<A>() : x[i];
    Tail<A> c = {cmx, A(0), cmy, A(0), A(0), A(0), top_y, start + j};
    accumulate<DIV>(c, x, y, n, inv_tau);
    st = merge<DIV>(st, c, inv_tau);
    return;
  }
  raise_max<DIV>(st, cmx, cmy, inv_tau);
  accumulate<DIV>(st, x, y, n, inv_tau);
}

// Fold one chunk of transformed logits (tokens start .. start + n - 1) into the state, leaving the
// pivot out: the label's slot is masked (tested once per chunk), or a running argmax keeps its best
// out of the sums; an overtaken best joins them as a single token. A chunk that changes no held
// token (keeps_held, the common case) is summed directly. zc and uc are overwritten.
template <int DIV, int PIV, typename A>
DRKL_HD void take_chunk(Tail<A>& st, Token<A>& best, A* zc, A* uc, int n, int64_t start, int64_t label,
                        A inv_tau) {
  A* x = DIV == kFKL ? uc : zc;
  A* y = DIV == kFKL ? zc : uc;
  if (PIV == kLabel && label >= start && label - start < n) {
    const int64_t j = label - start;
    DRKL_UNROLL
    for (int i = 0; i < n; ++i) {  // selects: no runtime index into registers
      zc[i] = i == j ? neg_inf<A>() : zc[i];
      uc[i] = i == j ? neg_inf<A>() : uc[i];
    }
  }
  A cmx, cmy;
  chunk_max(x, y, n, cmx, cmy);
  if (keeps_held<DIV, PIV>(st, best, cmx, cmy)) {
    raise_max<DIV>(st, cmx, cmy, inv_tau);
    accumulate<DIV>(st, x, y, n, inv_tau);
    return;
  }
  if (PIV != kLabel) {
    const A* key = PIV == kStudentArgmax ? zc : uc;
    int j = 0;
    A k = key[0], z = zc[0], u = uc[0];
    DRKL_UNROLL
    for (int i = 1; i < n; ++i)
      if (key[i] > k) {
        j = i;
        k = key[i];
        z = zc[i];
        u = uc[i];
      }
    if (first(k, start + j, PIV == kStudentArgmax ? best.z : best.u, best.idx)) {
      const Token<A> old = best;
      best = {start + j, z, u};
      DRKL_UNROLL
      for (int i = 0; i < n; ++i) {
        zc[i] = i == j ? neg_inf<A>() : zc[i];
        uc[i] = i == j ? neg_inf<A>() : uc[i];
      }
      fold<DIV>(st, x, y, n, start, inv_tau);
      if (old.idx >= 0) st = merge<DIV>(st, single<DIV>(old, inv_tau), inv_tau);
      return;
    }
  }
  fold<DIV>(st, x, y, n, start, inv_tau);
}

// Combine the (state, pivot) of two disjoint parts of a row; symmetric, bit for bit. A label pivot
// is held by at most one part (its holder's token wins); an argmax pivot is contested, the loser
// joining the sums as a single token.
template <int DIV, int PIV, typename A>
DRKL_HD void merge_parts(Tail<A>& st, Token<A>& best, const Tail<A>& other_st, const Token<A>& other_best,
                         A inv_tau) {
  st = merge<DIV>(st, other_st, inv_tau);
  if (PIV == kLabel) {
    if (best.idx < 0) best = other_best;
    return;
  }
  const bool mine = first(PIV == kStudentArgmax ? best.z : best.u, best.idx,
                          PIV == kStudentArgmax ? other_best.z : other_best.u, other_best.idx);
  const Token<A> loser = mine ? other_best : best;
  if (!mine) best = other_best;
  if (loser.idx >= 0) st = merge<DIV>(st, single<DIV>(loser, inv_tau), inv_tau);
}

// The record of a slice: its state and its pivot (the label's holder, or the held-out argmax).
template <typename A>
DRKL_HD void to_record(const Tail<A>& st, const Token<A>& piv, A* out) {
  out[kMX] = st.m_x;
  out[kSX] = st.s_x;
  out[kMY] = st.m_y;
  out[kSY] = st.s_y;
  out[kAcc] = st.acc;
  out[kEnt] = st.ent;
  out[kTop] = static_cast<A>(st.top);
  out[kTopY] = st.top >= 0 ? st.top_y : A(0);
  out[kPiv] = static_cast<A>(piv.idx);
  out[kPivZ] = piv.idx >= 0 ? piv.z : A(0);
  out[kPivU] = piv.idx >= 0 ? piv.u : A(0);
}

template <typename A>
DRKL_HD void from_record(const A* in, Tail<A>& st, Token<A>& piv) {
  st = {in[kMX], in[kSX], in[kMY], in[kSY], in[kAcc], in[kEnt], in[kTopY], static_cast<int64_t>(in[kTop])};
  piv = {static_cast<int64_t>(in[kPiv]), in[kPivZ], in[kPivU]};
}

// Everything the gradient pass needs, per row, and the row's loss and entropy.
template <typename A>
struct Row {
  A loss, entropy, g_t, w, k, rho, px_n, py_n, shift_x, shift_y, log_sx, log_sy, ref_y;
};

// d_t = softplus(b) - softplus(a), d_n = softplus(-b) - softplus(-a), given gap = b - a.
// The max(., 0) parts cancel into +-gap when a and b share a sign, so d_t - d_n = gap.
template <typename A>
DRKL_HD void binary_log_ratios(A a, A b, A gap, A& d_t, A& d_n) {
  const A tails = log1p_(static_cast<A>(exp(-fabs(b)))) - log1p_(static_cast<A>(exp(-fabs(a))));
  d_t = ((a > 0 && b > 0) ? gap : fmax(b, A(0)) - fmax(a, A(0))) + tails;
  d_n = ((a < 0 && b < 0) ? -gap : fmax(-b, A(0)) - fmax(-a, A(0))) + tails;
}

// From the whole row's state and the pivot's transformed logits: loss, entropy, gradient constants.
template <int DIV, typename A>
DRKL_HD Row<A> finalize(const Tail<A>& st, A z_t, A u_t, A inv_tau, A gamma) {
  const A x_t = DIV == kFKL ? u_t : z_t, y_t = DIV == kFKL ? z_t : u_t;
  const bool has_k = kHasTop<DIV> && st.top >= 0;
  const A s_x = st.s_x + (has_k ? A(1) : A(0));   // the top back in: e_k = 1
  const A dk_n = has_k ? -st.acc / s_x : A(0);      // d_k - N (RKL, DRKL)
  const A mean_d = kHasTop<DIV> ? (has_k ? (shift_of(st.m_y) - st.top_y) * inv_tau - dk_n : A(0)) : st.acc / s_x;
  const A log_sx = log(s_x), log_sy = log(st.s_y), ratio = log(st.s_y / s_x);
  const A tail = s_x == A(0) ? A(0) : mean_d + ratio;  // N
  const A a = (st.m_x - x_t) * inv_tau + log_sx;      // Ls'_x - x_t / tau
  const A b = (st.m_y - y_t) * inv_tau + log_sy;
  A gap = ((st.m_y - y_t) - (st.m_x - x_t)) * inv_tau + ratio;  // b - a
  A d_t, d_n;
  binary_log_ratios(a, b, gap, d_t, d_n);
  const A px_t = exp(-softplus(a));
  Row<A> r;
  r.px_n = exp(-softplus(-a));
  r.w = DIV == kDRKL ? gamma : r.px_n;
  r.loss = weighted(px_t, d_t) + weighted(r.px_n, d_n) + r.w * tail;
  {  // H(q): the student is x for RKL and DRKL, y for FKL
    const A a_q = DIV == kFKL ? b : a, s_q = DIV == kFKL ? st.s_y : s_x;
    const A h_tail = s_q == A(0) ? A(0) : log(s_q) - st.ent / s_q;
    const A q_t = exp(-softplus(a_q)), q_n = exp(-softplus(-a_q));
    r.entropy = weighted(q_t, softplus(a_q)) + weighted(q_n, softplus(-a_q) + h_tail);
  }
  r.shift_x = s_x == A(0) ? A(0) : st.m_x;
  r.shift_y = st.s_y == A(0) ? A(0) : st.m_y;
  r.log_sx = s_x == A(0) ? A(0) : log_sx;
  r.log_sy = st.s_y == A(0) ? A(0) : log_sy;
  if (DIV == kFKL) {
    const A py_t = exp(-softplus(b));
    r.py_n = exp(-softplus(-b));
    r.g_t = px_t + py_t < A(1) ? exp_diff(px_t, py_t, -d_t) : -exp_diff(r.px_n, r.py_n, -d_n);
    r.rho = log(s_x / st.s_y) - d_n;
    r.k = A(0);
    r.ref_y = A(0);
  } else {
    if (DIV == kRKL && has_k) gap = ((x_t - st.m_x) - (y_t - st.top_y)) * inv_tau + dk_n;  // gap - N
    r.g_t = weighted(px_t * r.px_n, gap);
    r.k = r.w * dk_n - r.g_t;
    r.ref_y = has_k ? st.top_y : A(0);
    r.py_n = A(0);
    r.rho = A(0);
  }
  return r;
}

// The per-token constants of the gradient, everything scaled by mult (1/tau, the reduction's
// scale and, without a soft cap, the student's logit scale): grad_at gives the stored value.
template <typename A>
struct Grad {
  A l2, inv_tau, shift_x, shift_y, lsx2, lsy2, ref_y, w, k, g_t, px_n, py_n, rho;
};

template <int DIV, typename A>
DRKL_HD Grad<A> gradient_of(const Row<A>& r, A inv_tau, A mult) {
  const A log2e = static_cast<A>(kLog2e);
  Grad<A> g;
  g.l2 = log2_scale(inv_tau);
  g.inv_tau = inv_tau;
  g.shift_x = r.shift_x;
  g.shift_y = r.shift_y;
  g.lsx2 = r.log_sx * log2e;
  g.lsy2 = r.log_sy * log2e;
  g.ref_y = r.ref_y;
  g.w = r.w * inv_tau * mult;  // RKL, DRKL: g_j = e_j (w (d_j - d_k) + k), d in logit units
  g.k = r.k * mult;
  g.g_t = r.g_t * mult;
  g.px_n = r.px_n * mult;  // FKL
  g.py_n = r.py_n * mult;
  g.rho = r.rho;
  return g;
}

// The gradient at a token other than the pivot (transformed logits z, u), scaled as gradient_of
// says. RKL, DRKL: one fused multiply-add and one ex2 for qh_j, three additions, one multiply-add.
template <int DIV, typename A>
DRKL_HD A grad_at(const Grad<A>& g, A z, A u) {
  if (DIV == kFKL) {
    const A dx = u - g.shift_x, dy = z - g.shift_y;
    const A ph = ex2(dx * g.l2 - g.lsx2), qh = ex2(dy * g.l2 - g.lsy2);
    return exp_diff(g.px_n * ph, g.py_n * qh, g.rho - (dx - dy) * g.inv_tau);
  }
  const A dx = z - g.shift_x;
  return weighted(ex2(dx * g.l2 - g.lsx2), g.w * (dx - (u - g.ref_y)) + g.k);
}

}  // namespace drkl
