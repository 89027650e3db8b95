// How the CUDA kernels cut a row among threads, blocks and cluster ranks, each thread's two loops,
// and the row-level steps around them. Host-and-device code without CUDA intrinsics: the kernels
// (drkl_cuda*.cu) compile it for the GPU with their loads, stores and reductions, and the host model
// of the kernels (tests/cuda_model.cpp) compiles the very same loops for the CPU.
//
// A span of a row, [lo, lo + n) with lo where both sides are 16-byte aligned, is worked by T threads:
//   tiles    [0, tiles T 16):  16 tokens per thread per tile, as P pieces of Q tokens (16 bytes of the
//            wider side); thread t's piece p of tile i starts at i T 16 + p T Q + t Q, so every piece
//            load is contiguous across a warp (coalesced in global memory, conflict-free in shared);
//   pieces   [tiles T 16, nv): piece k to thread k mod T;
//   scalars  [nv, n): token nv + t + k T to thread t (fewer than 8 of them, or a whole row whose
//            student, teacher and gradient rows are not aligned alike: then n = V, nv = 0).
// The row's head [0, h) before its first aligned position goes to threads t < h of the first span.
// Per tile, the label and the held-out tokens are tested once: a tile that holds the label or beats
// the top or the argmax pivot (rare) is folded piece by piece through take_chunk; any other one only
// raises the maxima and joins the sums. The gradient loop is a pure map (grad_at) but for the pivot.
#pragma once

#include "drkl_launch.h"
#include "drkl_math.h"

namespace drkl {

constexpr int kTileTokens = 16;  // tokens per thread per tile

// Widths for student elements of SS bytes and teacher elements of ST bytes.
template <int SS, int ST>
struct Widths {
  static constexpr int kWide = SS > ST ? SS : ST, kNarrow = SS < ST ? SS : ST;
  static constexpr int Q = 16 / kWide;         // tokens per piece
  static constexpr int kAlign = 16 / kNarrow;  // both sides are 16-byte aligned every kAlign tokens
};

// The first position of a row at which the student, teacher and gradient rows (byte addresses z, u,
// g; g = 0: none) are all 16-byte aligned, every kAlign tokens from there; -1 when there is none
// (rows offset differently: the row is then read token by token).
template <int SS, int ST>
DRKL_HD int32_t aligned_head(uintptr_t z, uintptr_t u, uintptr_t g) {
  constexpr int kAlign = Widths<SS, ST>::kAlign;
  const uintptr_t narrow = SS <= ST ? z / SS : u / ST;
  const uintptr_t p = (kAlign - narrow % kAlign) % kAlign;
  const bool ok = (z + p * SS) % 16 == 0 && (u + p * ST) % 16 == 0 && (g == 0 || (g + p * SS) % 16 == 0);
  return ok ? static_cast<int32_t>(p) : -1;
}

struct Span {
  int32_t lo, n, nv, T;
  DRKL_HD int32_t tile_tokens() const { return T * kTileTokens; }
  DRKL_HD int32_t tiles() const { return nv / tile_tokens(); }
  DRKL_HD int32_t pieces_lo() const { return tiles() * tile_tokens(); }
};

// The tile of span s in which thread t holds row position pos, or -1.
template <int Q>
DRKL_HD int32_t tile_of(const Span& s, int32_t t, int32_t pos) {
  const int32_t off = pos - s.lo;
  if (pos < 0 || off < 0 || off >= s.pieces_lo()) return -1;
  const int32_t w = off % s.tile_tokens();
  return (w % (s.T * Q)) / Q == t ? off / s.tile_tokens() : -1;
}

// What every thread of a row knows.
struct Ctx {
  int64_t start;      // the global id of row position 0 (vocab_start)
  int64_t label_id;   // the label when this slice holds it (PIV == kLabel), else -1
  int32_t label_pos;  // its position in the row, else -1
  float inv_tau;
  Xform<float> xs, xt;
  bool plain;  // no transform on either side
};

// One thread's (and after the merges a block's, a cluster's) share of a row.
struct Part {
  Tail<float> st;
  Token<float> piv;
  DRKL_HD static Part empty() { return {Tail<float>::empty(), Token<float>::none()}; }
};

template <int DIV, int PIV>
DRKL_HD void merge_into(Part& p, const Part& o, float inv_tau) {
  merge_parts<DIV, PIV>(p.st, p.piv, o.st, o.piv, inv_tau);
}

template <int N>
DRKL_HD void transform(const Ctx& c, float* z, float* u) {
  DRKL_UNROLL
  for (int i = 0; i < N; ++i) {
    z[i] = c.xs.apply(z[i]);
    u[i] = c.xt.apply(u[i]);
  }
}

// Fold n contiguous tokens (row positions pos ..) through take_chunk, keeping the label's token.
template <int DIV, int PIV, int N>
DRKL_HD void take_piece(Part& part, float* z, float* u, int32_t pos, const Ctx& c) {
  const int64_t start = c.start + pos;
  if (PIV == kLabel && c.label_pos >= pos && c.label_pos - pos < N)
    DRKL_UNROLL
    for (int i = 0; i < N; ++i)  // selects, not a runtime index: registers never spill
      if (pos + i == c.label_pos) part.piv = {c.label_id, z[i], u[i]};
  take_chunk<DIV, PIV>(part.st, part.piv, z, u, N, start, c.label_id, c.inv_tau);
}

// Pass 1 of thread t: the statistics of its tokens of span s (and of the head [0, head)).
// src.piece<Q>(pos, z, u) and src.scalar(pos, z, u) read raw logits as floats; src.wait_tile(i) and
// src.wait_all() wait for asynchronous copies (tile i's, all of them) where there are any.
template <int DIV, int PIV, int Q, class Src>
DRKL_HD void stats_of(Part& part, const Src& src, const Span& s, int32_t t, int32_t head, const Ctx& c) {
  constexpr int P = kTileTokens / Q;
  if (t < head) {
    float z[1], u[1];
    src.scalar(t, z[0], u[0]);
    if (!c.plain) transform<1>(c, z, u);
    take_piece<DIV, PIV, 1>(part, z, u, t, c);
  }
  const int32_t hit = PIV == kLabel ? tile_of<Q>(s, t, c.label_pos) : -1;
  const int32_t tiles = s.tiles(), stride = s.T * Q;
  for (int32_t i = 0; i < tiles; ++i) {
    src.wait_tile(i);
    const int32_t p0 = s.lo + i * s.tile_tokens() + t * Q;
    float z[kTileTokens], u[kTileTokens];
    DRKL_UNROLL
    for (int p = 0; p < P; ++p) src.template piece<Q>(p0 + p * stride, z + p * Q, u + p * Q);
    if (!c.plain) transform<kTileTokens>(c, z, u);
    const float* x = DIV == kFKL ? u : z;
    const float* y = DIV == kFKL ? z : u;
    float cmx, cmy;
    chunk_max(x, y, kTileTokens, cmx, cmy);
    if (i != hit && keeps_held<DIV, PIV>(part.st, part.piv, cmx, cmy)) {
      raise_max<DIV>(part.st, cmx, cmy, c.inv_tau);
      accumulate<DIV>(part.st, x, y, kTileTokens, c.inv_tau);
    } else {
      DRKL_UNROLL
      for (int p = 0; p < P; ++p) take_piece<DIV, PIV, Q>(part, z + p * Q, u + p * Q, p0 + p * stride, c);
    }
  }
  src.wait_all();
  for (int32_t pos = s.lo + s.pieces_lo() + t * Q; pos < s.lo + s.nv; pos += stride) {
    float z[Q], u[Q];
    src.template piece<Q>(pos, z, u);
    if (!c.plain) transform<Q>(c, z, u);
    take_piece<DIV, PIV, Q>(part, z, u, pos, c);
  }
  for (int32_t pos = s.lo + s.nv + t; pos < s.lo + s.n; pos += s.T) {
    float z[1], u[1];
    src.scalar(pos, z[0], u[0]);
    if (!c.plain) transform<1>(c, z, u);
    take_piece<DIV, PIV, 1>(part, z, u, pos, c);
  }
}

// The gradient of n tokens at row positions pos (+ stride after each Q): the pivot's own value at
// row position piv, times the student transform's derivative when it is capped.
template <int DIV, int N, int Q>
DRKL_HD void grad_values(const Grad<float>& g, const Ctx& c, float* z, float* u, int32_t pos, int32_t stride,
                         bool holds_pivot, int32_t piv, float* out) {
  float zr[N];
  if (!c.plain) {
    DRKL_UNROLL
    for (int i = 0; i < N; ++i) zr[i] = z[i];
    transform<N>(c, z, u);
  }
  DRKL_UNROLL
  for (int i = 0; i < N; ++i) out[i] = grad_at<DIV>(g, z[i], u[i]);
  if (holds_pivot)
    DRKL_UNROLL
    for (int i = 0; i < N; ++i)
      if (pos + (i / Q) * stride + i % Q == piv) out[i] = g.g_t;
  if (c.xs.capped)
    DRKL_UNROLL
    for (int i = 0; i < N; ++i) out[i] *= c.xs.deriv(zr[i]);
}

// Pass 2 of thread t: the gradient of its tokens; dst.piece<Q>(pos, g) and dst.scalar(pos, g) store.
template <int DIV, int Q, class Src, class Dst>
DRKL_HD void grad_of(const Grad<float> g, const Src& src, const Dst& dst, const Span& s, int32_t t, int32_t head,
                     int32_t piv, const Ctx& c) {
  constexpr int P = kTileTokens / Q;
  if (t < head) {
    float z[1], u[1], out[1];
    src.scalar(t, z[0], u[0]);
    grad_values<DIV, 1, 1>(g, c, z, u, t, 0, t == piv, piv, out);
    dst.scalar(t, out[0]);
  }
  const int32_t hit = tile_of<Q>(s, t, piv);
  const int32_t tiles = s.tiles(), stride = s.T * Q;
  for (int32_t i = 0; i < tiles; ++i) {
    const int32_t p0 = s.lo + i * s.tile_tokens() + t * Q;
    float z[kTileTokens], u[kTileTokens], out[kTileTokens];
    DRKL_UNROLL
    for (int p = 0; p < P; ++p) src.template piece<Q>(p0 + p * stride, z + p * Q, u + p * Q);
    grad_values<DIV, kTileTokens, Q>(g, c, z, u, p0, stride, i == hit, piv, out);
    DRKL_UNROLL
    for (int p = 0; p < P; ++p) dst.template piece<Q>(p0 + p * stride, out + p * Q);
  }
  for (int32_t pos = s.lo + s.pieces_lo() + t * Q; pos < s.lo + s.nv; pos += stride) {
    float z[Q], u[Q], out[Q];
    src.template piece<Q>(pos, z, u);
    grad_values<DIV, Q, Q>(g, c, z, u, pos, 0, piv >= pos && piv - pos < Q, piv, out);
    dst.template piece<Q>(pos, out);
  }
  for (int32_t pos = s.lo + s.nv + t; pos < s.lo + s.n; pos += s.T) {
    float z[1], u[1], out[1];
    src.scalar(pos, z[0], u[0]);
    grad_values<DIV, 1, 1>(g, c, z, u, pos, 0, pos == piv, piv, out);
    dst.scalar(pos, out[0]);
  }
}

// The label of a row: whether it counts, NaN poison for one outside [0, vocab_total), and the
// context of its threads.
struct RowLabel {
  bool ignored;
  float poison;
  Ctx ctx;
};

template <int PIV>
DRKL_HD RowLabel row_label(const drkl_args& a, int64_t row) {
  RowLabel r{false, 0.f, {}};
  r.ctx.start = a.vocab_start;
  r.ctx.label_id = -1;
  r.ctx.label_pos = -1;
  r.ctx.inv_tau = static_cast<float>(a.inv_tau);
  r.ctx.xs = Xform<float>::make(a.student_scale, a.student_softcap);
  r.ctx.xt = Xform<float>::make(a.teacher_scale, a.teacher_softcap);
  r.ctx.plain = a.student_scale == 1.0 && a.teacher_scale == 1.0 && a.student_softcap <= 0 && a.teacher_softcap <= 0;
  if (a.target == nullptr) return r;
  const int64_t label = a.target_is_int64 ? static_cast<const int64_t*>(a.target)[row]
                                          : static_cast<const int32_t*>(a.target)[row];
  r.ignored = label == a.ignore_index;
  r.poison = label >= 0 && label < a.vocab_total ? 0.f : NAN;
  if (PIV == kLabel && label >= a.vocab_start && label < a.vocab_start + a.vocab) {
    r.ctx.label_id = label;
    r.ctx.label_pos = static_cast<int32_t>(label - a.vocab_start);
  }
  return r;
}

// The outputs of an ignored row (one thread): loss and entropy 0, or an empty record.
DRKL_HD void ignored_outputs(const drkl_args& a, int64_t row) {
  if (a.phase == DRKL_PARTIAL) {
    to_record(Tail<float>::empty(), Token<float>::none(), static_cast<float*>(a.record) + row * kWidth);
    return;
  }
  static_cast<float*>(a.loss)[row] = 0.f;
  if (a.entropy) static_cast<float*>(a.entropy)[row] = 0.f;
}

// After the merges (one thread): the record (PARTIAL: returns false), or the loss and entropy, and
// the gradient's constants and the pivot's row position (-1 outside the slice). Outputs are written
// only when `write` (one rank of a cluster).
template <int DIV>
DRKL_HD bool row_outputs(const drkl_args& a, int64_t row, const RowLabel& rl, Part part, Grad<float>& g,
                         int32_t& piv, bool write) {
  float* rec = a.record ? static_cast<float*>(a.record) + row * kWidth : nullptr;
  if (a.phase == DRKL_PARTIAL) {
    if (write) to_record(part.st, part.piv, rec);
    return false;
  }
  if (a.phase == DRKL_FINISH) from_record(rec, part.st, part.piv);
  const float inv = rl.ctx.inv_tau;
  const Row<float> r = finalize<DIV>(part.st, part.piv.z, part.piv.u, inv, static_cast<float>(a.gamma));
  if (write) {
    static_cast<float*>(a.loss)[row] = r.loss + rl.poison;
    if (a.entropy) static_cast<float*>(a.entropy)[row] = r.entropy + rl.poison;
  }
  const float mean = a.mean_scale ? *static_cast<const float*>(a.mean_scale) : 1.f;
  g = gradient_of<DIV>(r, inv, inv * mean * (rl.ctx.xs.capped ? 1.f : rl.ctx.xs.scale));
  const int64_t local = part.piv.idx - a.vocab_start;
  piv = part.piv.idx >= 0 && local >= 0 && local < a.vocab ? static_cast<int32_t>(local) : -1;
  return true;
}

// The tokens per rank when `ranks` CTAs share `vocab` tokens: a multiple of kAlign.
template <int kAlign>
DRKL_HD int32_t rank_len(int64_t vocab, int32_t ranks) {
  const int64_t per = (vocab + ranks - 1) / ranks;
  return static_cast<int32_t>((per + kAlign - 1) / kAlign * kAlign);
}

// The two-pass kernel's span of a row of V tokens (byte addresses z, u, g of its rows; g = 0: no
// gradient) for T threads, and its head.
template <int SS, int ST>
DRKL_HD Span row_span(int32_t V, int32_t T, uintptr_t z, uintptr_t u, uintptr_t g, int32_t& head) {
  constexpr int Q = Widths<SS, ST>::Q;
  head = aligned_head<SS, ST>(z, u, g);
  if (head < 0) {  // not aligned alike: token by token
    head = 0;
    return {0, V, 0, T};
  }
  head = head < V ? head : V;
  return {head, V - head, (V - head) / Q * Q, T};
}

// The single-pass kernel's span of rank r of `ranks` CTAs of T threads: rank r starts at
// h + r len (len = rank_len, a multiple of kAlign, so every span starts aligned) and holds its
// span's pieces in shared memory (nv, a multiple of kAlign: whole 16-byte words of both sides for
// the bulk copies); rank 0 also takes the head h (head: h for rank 0, else 0).
template <int SS, int ST>
DRKL_HD Span rank_span(int32_t V, int32_t T, int32_t rank, int32_t ranks, uintptr_t z, uintptr_t u, uintptr_t g,
                       int32_t& head) {
  constexpr int kAlign = Widths<SS, ST>::kAlign;
  int32_t h = aligned_head<SS, ST>(z, u, g);
  const bool aligned = h >= 0;
  h = aligned ? (h < V ? h : V) : 0;
  const int32_t len = rank_len<kAlign>(V - h, ranks), lo = h + rank * len;
  const int32_t n = V - lo < 0 ? 0 : (V - lo < len ? V - lo : len);
  head = rank == 0 ? h : 0;
  return {lo, n, aligned ? n / kAlign * kAlign : 0, T};
}

}  // namespace drkl
