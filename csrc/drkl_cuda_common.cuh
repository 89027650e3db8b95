// Device pieces shared by the CUDA kernels: dtype conversion, the loads and stores of drkl_partition.h's
// pieces (16 bytes of the wider side per thread, contiguous across a warp), and the reductions of the
// per-thread Parts across a warp and a block. Loads: the student with plain (coherent) loads, since
// the gradient may be written into it; the teacher through the read-only path (ld.global.nc), which
// the binding guarantees no output aliases.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "drkl_launch.h"
#include "drkl_partition.h"

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

// Two floats rounded and packed into one word (one F2FP instruction for the 16-bit types).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (sizeof(T) == 2) {
    T lo = from_f<T>(a), hi = from_f<T>(b);
    uint16_t l, h;
    memcpy(&l, &lo, 2);
    memcpy(&h, &hi, 2);
    return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
  } else {
    return __float_as_uint(a);
  }
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  uint32_t w;
  memcpy(&w, &v, 4);
  return w;
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const __half2 v = __floats2half2_rn(a, b);
  uint32_t w;
  memcpy(&w, &v, 4);
  return w;
}

// A vector of BYTES bytes.
template <int BYTES>
struct VecOf;
template <>
struct VecOf<16> {
  using type = uint4;
};
template <>
struct VecOf<8> {
  using type = uint2;
};
template <>
struct VecOf<4> {
  using type = uint32_t;
};

// N consecutive elements at p (aligned to their size) as floats; NC: through the read-only path.
template <int N, bool NC, typename T>
__device__ __forceinline__ void load_elems(const T* p, float* out) {
  using V = typename VecOf<N * sizeof(T)>::type;
  V raw;
  if constexpr (NC)
    raw = __ldg(reinterpret_cast<const V*>(p));
  else
    raw = *reinterpret_cast<const V*>(p);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // a bfloat16 is the top half of its float
    uint32_t words[N / 2];
    memcpy(words, &raw, sizeof raw);
#pragma unroll
    for (int w = 0; w < N / 2; ++w) {
      out[2 * w] = __uint_as_float(words[w] << 16);
      out[2 * w + 1] = __uint_as_float(words[w] & 0xffff0000u);
    }
  } else {
    T elems[N];
    memcpy(elems, &raw, sizeof raw);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_f(elems[i]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_elems(T* p, const float* in) {
  using V = typename VecOf<N * sizeof(T)>::type;
  uint32_t words[sizeof(V) / 4];
#pragma unroll
  for (int w = 0; w < int(sizeof(V) / 4); ++w) {
    if constexpr (sizeof(T) == 4)
      words[w] = __float_as_uint(in[w]);
    else
      words[w] = pack2<T>(in[2 * w], in[2 * w + 1]);
  }
  V raw;
  memcpy(&raw, words, sizeof raw);
  *reinterpret_cast<V*>(p) = raw;
}

template <typename T>
__device__ __forceinline__ float load_nc(const T* p) {
  return to_f(__ldg(p));
}

// A row's logits in global memory (drkl_partition.h's Src).
template <typename TS, typename TT>
struct GlobalSrc {
  const TS* z;
  const TT* u;
  template <int Q>
  __device__ __forceinline__ void piece(int32_t pos, float* zo, float* uo) const {
    load_elems<Q, false>(z + pos, zo);
    load_elems<Q, true>(u + pos, uo);
  }
  __device__ __forceinline__ void scalar(int32_t pos, float& zo, float& uo) const {
    zo = to_f(z[pos]);
    uo = load_nc(u + pos);
  }
  __device__ __forceinline__ void wait_tile(int32_t) const {}
  __device__ __forceinline__ void wait_all() const {}
};

// A row's gradient in global memory (drkl_partition.h's Dst).
template <typename TS>
struct GlobalDst {
  TS* g;
  template <int Q>
  __device__ __forceinline__ void piece(int32_t pos, const float* v) const {
    store_elems<Q>(g + pos, v);
  }
  __device__ __forceinline__ void scalar(int32_t pos, float v) const { g[pos] = from_f<TS>(v); }
};

template <typename T>
__device__ __forceinline__ T shfl(T v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}
__device__ __forceinline__ int64_t shfl(int64_t v, int mask) {
  return static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(v), mask));
}

__device__ __forceinline__ Part shfl(const Part& p, int mask) {
  Part o;
  o.st = {shfl(p.st.m_x, mask), shfl(p.st.s_x, mask), shfl(p.st.m_y, mask), shfl(p.st.s_y, mask),
          shfl(p.st.acc, mask), shfl(p.st.ent, mask), shfl(p.st.top_y, mask), shfl(p.st.top, mask)};
  o.piv = {shfl(p.piv.idx, mask), shfl(p.piv.z, mask), shfl(p.piv.u, mask)};
  return o;
}

// Butterfly over groups of `width` lanes (a power of two up to 32): every lane of a group ends with
// the merge of the group, bit for bit the same (merges are symmetric). All 32 lanes take part.
template <int DIV, int PIV>
__device__ __forceinline__ void butterfly(Part& p, int width, float inv_tau) {
  for (int mask = width / 2; mask > 0; mask >>= 1) merge_into<DIV, PIV>(p, shfl(p, mask), inv_tau);
}

__device__ __forceinline__ int pow2_at_least(int n) {
  int w = 1;
  while (w < n) w *= 2;
  return w;
}

// The merge of a block's threads (one row per block), left in warp 0 (every lane of it alike):
// butterflies in every warp, then warp 0 merges the warps' results as a tree.
template <int DIV, int PIV>
__device__ __forceinline__ void block_merge(Part& p, Part* scratch, float inv_tau) {
  butterfly<DIV, PIV>(p, 32, inv_tau);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) scratch[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < warps ? scratch[lane] : Part::empty();
    butterfly<DIV, PIV>(p, pow2_at_least(warps), inv_tau);
  }
}

// The (student, teacher) dtype pairs a build instantiates: bit 3 * student + teacher (drkl_dtype
// codes) of DRKL_CUDA_DTYPE_PAIRS, all nine unless it is defined; a pair left out is never
// instantiated and its launch returns cudaErrorInvalidValue. The extension always builds all nine;
// the test suite optimises a few pairs per session (tests/cuda_build.py: about 1.4 CPU seconds per
// kernel and GPU architecture) after a front-end check of all of them.
#ifndef DRKL_CUDA_DTYPE_PAIRS
#define DRKL_CUDA_DTYPE_PAIRS 0x1ff
#endif
template <typename T>
constexpr int dtype_code() {
  return std::is_same_v<T, float> ? DRKL_F32 : std::is_same_v<T, __nv_bfloat16> ? DRKL_BF16 : DRKL_F16;
}
template <typename TS, typename TT>
constexpr bool pair_built() {
  return (DRKL_CUDA_DTYPE_PAIRS >> (3 * dtype_code<TS>() + dtype_code<TT>())) & 1;
}

// Launchers implemented per file; each returns a cudaError_t.
int launch_two_pass(const drkl_args& a, cudaStream_t stream);
// The single-pass cluster kernel when it is built for this GPU and a cluster holds the row;
// *launched says whether it ran.
int launch_single_pass_sm90(const drkl_args& a, cudaStream_t stream, bool* launched);

}  // namespace drkl
