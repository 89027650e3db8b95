// The host model of the CUDA kernels (csrc/drkl_cuda.cu, csrc/drkl_cuda_sm90.cu), compiled for the
// CPU from the kernels' own headers: the spans of drkl_partition.h (heads, tiles, pieces, scalars,
// the cluster ranks' slices), every thread's two loops (stats_of, grad_of), the warp butterflies and
// the block and cluster trees (run lane by lane, in lockstep, with the merges of drkl_math.h), and
// the row-level steps (row_label, row_outputs). It writes what the kernels write, through drkl_args.
//
// What it cannot follow: the GPU's ex2.approx (it runs drkl_math.h's host exp2, the CPU kernels'),
// tanhf (host: tanh_), the bulk copies and mbarrier waits of the single-pass kernel (they decide when
// a tile is in shared memory, not what is folded or in which order: the model reads the same values
// from the rows), and the scheduling of threads (no result depends on it: every thread's fold order
// and every tree's shape is fixed by the code modelled here).
#include <string.h>

#include <vector>

#include "drkl_partition.h"

using namespace drkl;

namespace {

struct bf16_t {
  uint16_t bits;
};
using f16_t = _Float16;

inline float to_f(float v) { return v; }
inline float to_f(f16_t v) { return static_cast<float>(v); }
inline float to_f(bf16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
inline T from_f(float v);
template <>
inline float from_f<float>(float v) { return v; }
template <>
inline f16_t from_f<f16_t>(float v) { return static_cast<f16_t>(v); }
template <>
inline bf16_t from_f<bf16_t>(float v) {  // round to nearest even, as __float2bfloat16_rn
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);
  if (v != v) return {static_cast<uint16_t>((bits >> 16) | 0x40)};
  bits += 0x7fff + ((bits >> 16) & 1);
  return {static_cast<uint16_t>(bits >> 16)};
}

template <typename TS, typename TT>
struct HostSrc {
  const TS* z;
  const TT* u;
  template <int Q>
  void piece(int32_t pos, float* zo, float* uo) const {
    for (int q = 0; q < Q; ++q) {
      zo[q] = to_f(z[pos + q]);
      uo[q] = to_f(u[pos + q]);
    }
  }
  void scalar(int32_t pos, float& zo, float& uo) const {
    zo = to_f(z[pos]);
    uo = to_f(u[pos]);
  }
  void wait_tile(int32_t) const {}
  void wait_all() const {}
};

template <typename TS>
struct HostDst {
  TS* g;
  template <int Q>
  void piece(int32_t pos, const float* v) const {
    for (int q = 0; q < Q; ++q) g[pos + q] = from_f<TS>(v[q]);
  }
  void scalar(int32_t pos, float v) const { g[pos] = from_f<TS>(v); }
};

bool same_bits(const Part& a, const Part& b) {
  const auto eq = [](const auto& x, const auto& y) { return memcmp(&x, &y, sizeof x) == 0; };
  return eq(a.st.m_x, b.st.m_x) && eq(a.st.s_x, b.st.s_x) && eq(a.st.m_y, b.st.m_y) && eq(a.st.s_y, b.st.s_y) &&
         eq(a.st.acc, b.st.acc) && eq(a.st.ent, b.st.ent) && eq(a.st.top_y, b.st.top_y) && eq(a.st.top, b.st.top) &&
         eq(a.piv.idx, b.piv.idx) && eq(a.piv.z, b.piv.z) && eq(a.piv.u, b.piv.u);
}

int pow2_at_least(int n) {
  int w = 1;
  while (w < n) w *= 2;
  return w;
}

}  // namespace

extern "C" {

// The shape of the model's launch, and what it saw.
typedef struct {
  int32_t kernel;   // 2: the two-pass kernel (one row per `threads` threads), 1: the single-pass kernel
  int32_t threads;  // threads per row (two-pass: 32 for warp rows, else the block) or per CTA
  int32_t ranks;    // single-pass: CTAs per cluster
  int32_t unused;
  int64_t merges;     // out: lane merges run (butterflies and trees)
  int64_t mismatches;  // out: lanes left with other bits than their group's first lane
} drkl_model_shape;
}

namespace {

// Butterflies over groups of `width` lanes of a warp, in lockstep as shuffles run; then every lane of
// a group must hold its group's first lane's bits.
template <int DIV, int PIV>
void butterfly(Part* lanes, int width, float inv, drkl_model_shape& shape) {
  for (int mask = width / 2; mask > 0; mask >>= 1) {
    Part before[32];
    for (int l = 0; l < 32; ++l) before[l] = lanes[l];
    for (int l = 0; l < 32; ++l) merge_into<DIV, PIV>(lanes[l], before[l ^ mask], inv);
    shape.merges += 32;
  }
  for (int l = 0; l < 32; ++l) shape.mismatches += !same_bits(lanes[l], lanes[l - l % width]);
}

// drkl_cuda_common.cuh's block_merge: butterflies in every warp, warp 0 over the warps' lane 0.
template <int DIV, int PIV>
Part block_merge(std::vector<Part>& parts, float inv, drkl_model_shape& shape) {
  const int T = static_cast<int>(parts.size()), warps = T / 32;
  std::vector<Part> scratch(warps);
  for (int w = 0; w < warps; ++w) {
    butterfly<DIV, PIV>(&parts[w * 32], 32, inv, shape);
    scratch[w] = parts[w * 32];
  }
  Part lanes[32];
  for (int l = 0; l < 32; ++l) lanes[l] = l < warps ? scratch[l] : Part::empty();
  butterfly<DIV, PIV>(lanes, pow2_at_least(warps), inv, shape);
  return lanes[0];
}

template <int DIV, int PIV, typename TS, typename TT>
void model_row(const drkl_args& a, int64_t row, drkl_model_shape& shape) {
  constexpr int Q = Widths<sizeof(TS), sizeof(TT)>::Q;
  const int32_t V = static_cast<int32_t>(a.vocab), T = shape.threads;
  const HostSrc<TS, TT> src{static_cast<const TS*>(a.student) + row * a.student_stride,
                            static_cast<const TT*>(a.teacher) + row * a.teacher_stride};
  const HostDst<TS> dst{a.grad ? static_cast<TS*>(a.grad) + row * a.grad_stride : nullptr};
  const uintptr_t zb = reinterpret_cast<uintptr_t>(src.z), ub = reinterpret_cast<uintptr_t>(src.u),
                  gb = reinterpret_cast<uintptr_t>(dst.g);
  const RowLabel rl = row_label<PIV>(a, row);
  if (rl.ignored) {
    ignored_outputs(a, row);
    if (dst.g && a.phase != DRKL_PARTIAL)
      for (int32_t j = 0; j < V; ++j) dst.scalar(j, 0.f);
    return;
  }
  const int ranks = shape.kernel == 1 ? shape.ranks : 1;
  std::vector<Span> spans(ranks);
  std::vector<int32_t> heads(ranks);
  for (int r = 0; r < ranks; ++r)
    spans[r] = shape.kernel == 1 ? rank_span<sizeof(TS), sizeof(TT)>(V, T, r, ranks, zb, ub, gb, heads[r])
                                 : row_span<sizeof(TS), sizeof(TT)>(V, T, zb, ub, gb, heads[r]);
  Part merged = Part::empty();
  if (a.phase != DRKL_FINISH) {
    std::vector<Part> ctas(ranks);
    for (int r = 0; r < ranks; ++r) {
      std::vector<Part> parts(T, Part::empty());
      for (int t = 0; t < T; ++t) stats_of<DIV, PIV, Q>(parts[t], src, spans[r], t, heads[r], rl.ctx);
      if (T == 32) {  // warp rows: one butterfly
        butterfly<DIV, PIV>(parts.data(), 32, rl.ctx.inv_tau, shape);
        ctas[r] = parts[0];
      } else {
        ctas[r] = block_merge<DIV, PIV>(parts, rl.ctx.inv_tau, shape);
      }
    }
    merged = ctas[0];
    if (shape.kernel == 1) {  // warp 0 of every CTA: lane r holds rank r's part
      for (int r = 0; r < ranks; ++r) {
        Part lanes[32];
        for (int l = 0; l < 32; ++l) lanes[l] = l < ranks ? ctas[l] : Part::empty();
        butterfly<DIV, PIV>(lanes, pow2_at_least(ranks), rl.ctx.inv_tau, shape);
        if (r == 0)
          merged = lanes[0];
        else
          shape.mismatches += !same_bits(lanes[0], merged);  // every CTA ends with the same bits
      }
    }
  }
  Grad<float> g;
  int32_t piv = -1;
  if (!row_outputs<DIV>(a, row, rl, merged, g, piv, true) || !dst.g) return;
  for (int r = 0; r < ranks; ++r)
    for (int t = 0; t < T; ++t) {
      if (rl.poison != 0.f) {
        for (int32_t j = t; j < heads[r]; j += T) dst.scalar(j, NAN);
        for (int32_t j = spans[r].lo + t; j < spans[r].lo + spans[r].n; j += T) dst.scalar(j, NAN);
      } else {
        grad_of<DIV, Q>(g, src, dst, spans[r], t, heads[r], piv, rl.ctx);
      }
    }
}

template <int DIV, int PIV, typename TS, typename TT>
int model(const drkl_args& a, drkl_model_shape& shape) {
  for (int64_t row = 0; row < a.rows; ++row) model_row<DIV, PIV, TS, TT>(a, row, shape);
  return 0;
}

template <typename TS, typename TT>
int route(const drkl_args& a, drkl_model_shape& shape) {
  switch (a.divergence * 3 + a.pivot) {
    case kDRKL * 3 + kLabel: return model<kDRKL, kLabel, TS, TT>(a, shape);
    case kDRKL * 3 + kTeacherArgmax: return model<kDRKL, kTeacherArgmax, TS, TT>(a, shape);
    case kRKL * 3 + kStudentArgmax: return model<kRKL, kStudentArgmax, TS, TT>(a, shape);
    case kFKL * 3 + kTeacherArgmax: return model<kFKL, kTeacherArgmax, TS, TT>(a, shape);
    default: return -1;
  }
}

template <typename TS>
int route_teacher(const drkl_args& a, drkl_model_shape& shape) {
  switch (a.teacher_dtype) {
    case DRKL_F32: return route<TS, float>(a, shape);
    case DRKL_BF16: return route<TS, bf16_t>(a, shape);
    case DRKL_F16: return route<TS, f16_t>(a, shape);
    default: return -1;
  }
}

}  // namespace

// One call of the modelled kernel; 0 on success, -1 for an unsupported combination or shape.
extern "C" int drkl_model_forward(const drkl_args* a, drkl_model_shape* shape) {
  if (shape->threads % 32 || shape->threads < 32 || shape->threads > 1024 || shape->ranks < 1 || shape->ranks > 16 ||
      (shape->kernel == 1 && (a->phase != DRKL_FUSED || a->grad == nullptr)))
    return -1;
  switch (a->student_dtype) {
    case DRKL_F32: return route_teacher<float>(*a, *shape);
    case DRKL_BF16: return route_teacher<bf16_t>(*a, *shape);
    case DRKL_F16: return route_teacher<f16_t>(*a, *shape);
    default: return -1;
  }
}

namespace {

// The worst shared-memory bank conflict of a warp's piece loads in the single-pass kernel (each side
// of a tile's piece p, lanes t = 0..31 at span offset p T Q + t Q): the number of distinct 4-byte
// words one bank serves in one phase of the request (16-byte loads: 8 lanes a phase, 8-byte: 16).
template <int SS, int ST>
int bank_conflicts() {
  constexpr int Q = Widths<SS, ST>::Q, T = 256;
  int worst = 0;
  for (int side = 0; side < 2; ++side) {
    const int elem = side == 0 ? SS : ST, bytes = Q * elem, lanes_per_phase = 128 / bytes;
    for (int p = 0; p < kTileTokens / Q; ++p)
      for (int phase = 0; phase < 32 / lanes_per_phase; ++phase) {
        std::vector<std::vector<int>> words(32);
        for (int l = phase * lanes_per_phase; l < (phase + 1) * lanes_per_phase; ++l) {
          const int offset = (p * T * Q + l * Q) * elem;
          for (int w = offset / 4; w < (offset + bytes) / 4; ++w) {
            std::vector<int>& bank = words[w % 32];
            bool seen = false;
            for (int x : bank) seen |= x == w;
            if (!seen) bank.push_back(w);
          }
        }
        for (const auto& bank : words) worst = static_cast<int>(bank.size()) > worst ? static_cast<int>(bank.size()) : worst;
      }
  }
  return worst;
}

}  // namespace

extern "C" int drkl_model_bank_conflicts(int32_t student_bytes, int32_t teacher_bytes) {
  switch (student_bytes * 8 + teacher_bytes) {
    case 4 * 8 + 4: return bank_conflicts<4, 4>();
    case 4 * 8 + 2: return bank_conflicts<4, 2>();
    case 2 * 8 + 4: return bank_conflicts<2, 4>();
    case 2 * 8 + 2: return bank_conflicts<2, 2>();
    default: return -1;
  }
}

extern "C" int64_t drkl_model_args_size(void) { return sizeof(drkl_args); }
