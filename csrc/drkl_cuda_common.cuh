// Device helpers shared by the CUDA kernels: dtype conversion, 16-byte vector loads and
// stores, and the reductions of per-thread row state across a warp, a block or a cluster.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "drkl_launch.h"
#include "drkl_math.h"

namespace drkl {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

// Elements of the student dtype per 16-byte vector: every vector load reads 16 bytes of the
// student and as many elements (16 or 32 bytes) of the teacher.
template <typename TS>
constexpr int kVec = 16 / sizeof(TS);

// Load N consecutive elements at a 16-byte aligned address as floats.
template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  constexpr int kWords = N * sizeof(T) / 16;
  static_assert(kWords >= 1 && kWords * 16 == N * sizeof(T), "vector of whole 16-byte words");
#pragma unroll
  for (int w = 0; w < kWords; ++w) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + w);
    const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 16 / int(sizeof(T)); ++i) out[w * (16 / sizeof(T)) + i] = to_f(elems[i]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  static_assert(N * sizeof(T) == 16, "one 16-byte word");
  uint4 raw;
  T* elems = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < N; ++i) elems[i] = from_f<T>(in[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ float shfl(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
__device__ __forceinline__ int64_t shfl(int64_t v, int mask) {
  return static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(v), mask));
}

// The state of one thread's share of a row: tail statistics and the held-out best.
struct Part {
  Tail<float> st;
  Best<float> best;
};

template <int DIV, int PIV>
__device__ __forceinline__ void merge_into(Part& p, const Part& o, float inv_tau) {
  merge_parts<DIV, PIV>(p.st, p.best, o.st, o.best, inv_tau);
}

// Butterfly over a warp: every lane ends with the merge of all 32 (symmetric merges: same bits).
template <int DIV, int PIV>
__device__ __forceinline__ void warp_merge(Part& p, float inv_tau) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) {
    Part o;
    o.st = {shfl(p.st.m_x, mask), shfl(p.st.s_x, mask), shfl(p.st.m_y, mask), shfl(p.st.s_y, mask),
            shfl(p.st.acc, mask)};
    o.best = {shfl(p.best.idx, mask), shfl(p.best.key, mask), shfl(p.best.z, mask), shfl(p.best.u, mask)};
    merge_into<DIV, PIV>(p, o, inv_tau);
  }
}

// Over all warps of a block (one row per block): every thread ends with the same merge,
// taken over the warps in order. `scratch` holds one Part per warp.
template <int DIV, int PIV>
__device__ __forceinline__ void block_merge(Part& p, Part* scratch, float inv_tau) {
  warp_merge<DIV, PIV>(p, inv_tau);
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) scratch[warp] = p;
  __syncthreads();
  p = scratch[0];
  for (int w = 1; w < warps; ++w) merge_into<DIV, PIV>(p, scratch[w], inv_tau);
  __syncthreads();  // scratch is reused
}

__device__ __forceinline__ void warp_merge(Closure<float>& c) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) {
    const Closure<float> o{shfl(c.others, mask), shfl(c.top_z, mask), shfl(c.top_g, mask), shfl(c.top, mask)};
    c.merge(o);
  }
}

__device__ __forceinline__ void block_merge(Closure<float>& c, Closure<float>* scratch) {
  warp_merge(c);
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) scratch[warp] = c;
  __syncthreads();
  c = scratch[0];
  for (int w = 1; w < warps; ++w) c.merge(scratch[w]);
  __syncthreads();
}

// The gradient of N consecutive tokens from base: the pivot's own value at t, NaN poison for a
// bad label, each token shown to the closure, then scaled for storage.
template <int DIV, int N>
__device__ __forceinline__ void gradient_chunk(const Row<float>& r, int64_t t, float poison, float inv_tau,
                                               float scale, int64_t base, const float (&zc)[N],
                                               const float (&uc)[N], float (&gc)[N], Closure<float>& c) {
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const int64_t j = base + k;
    gc[k] = (j == t ? r.g_t : grad_at<DIV>(r, zc[k], uc[k], inv_tau)) + poison;
    c.see(j, j == t ? -INFINITY : zc[k], gc[k]);
    gc[k] *= scale;
  }
}

// Pointers of one row.
template <typename TS, typename TT>
struct RowPtrs {
  const TS* z;
  const TT* u;
  TS* g;
  __device__ RowPtrs(const drkl_args& a, int64_t row)
      : z(static_cast<const TS*>(a.student) + row * a.student_stride),
        u(static_cast<const TT*>(a.teacher) + row * a.teacher_stride),
        g(a.grad ? static_cast<TS*>(a.grad) + row * a.grad_stride : nullptr) {}
};

// The label of a row, whether it counts, NaN poison for a label outside [0, V), and for
// PIV == kLabel the label's logits, read first: an in-place gradient overwrites them later.
struct Label {
  bool counted;
  int64_t pivot;  // the label for PIV == kLabel (0 when out of range), else -1
  float poison, z_t, u_t;
};

template <int PIV, typename TS, typename TT>
__device__ __forceinline__ Label read_label(const drkl_args& a, int64_t row, const RowPtrs<TS, TT>& p) {
  Label l{true, -1, 0.f, -INFINITY, -INFINITY};
  if (a.target == nullptr) return l;
  const int64_t label = a.target_is_int64 ? static_cast<const int64_t*>(a.target)[row]
                                          : static_cast<const int32_t*>(a.target)[row];
  l.counted = label != a.ignore_index;
  const bool in_range = label >= 0 && label < a.vocab;
  l.poison = in_range ? 0.f : NAN;
  if (PIV == kLabel && l.counted) {
    l.pivot = in_range ? label : 0;
    l.z_t = to_f(p.z[l.pivot]);
    l.u_t = to_f(p.u[l.pivot]);
  }
  return l;
}

// Launchers implemented per file.
int launch_two_pass(const drkl_args& a, bool vec, cudaStream_t stream);
int launch_single_pass_sm90(const drkl_args& a, bool vec, cudaStream_t stream, bool* launched);

}  // namespace drkl
