// CUDA kernels, two passes over each row (any GPU from sm_80): the online tail statistics,
// then the gradient. 16-byte vector loads when every row is 16-byte aligned, warp-shuffle
// plus shared-memory reductions, one block per row, or one warp per row (16 rows per block)
// when V is small. Traffic per element, bf16, loss + gradient: 2 x (2 + 2) read + 2 written
// = 10 bytes. The divergence and the pivot are template parameters of one kernel.
// Also the extern "C" entry points; on sm_90 large rows go to the single-pass cluster kernel
// of drkl_cuda_sm90.cu.
#include <stdlib.h>

#include "drkl_cuda_common.cuh"

namespace drkl {
namespace {

constexpr int kBlock = 512;
constexpr int64_t kWarpRowMaxV = 2048;  // at or below: one warp per row

template <int DIV, int PIV, typename TS, typename TT>
__global__ void __launch_bounds__(kBlock) two_pass_kernel(const drkl_args a, const bool vec) {
  __shared__ Part part_scratch[kBlock / 32];
  __shared__ Closure<float> closure_scratch[kBlock / 32];
  constexpr int VEC = kVec<TS>;
  const bool warp_rows = a.vocab <= kWarpRowMaxV;
  const int row_threads = warp_rows ? 32 : blockDim.x;
  const int lane = threadIdx.x % row_threads;
  const int64_t row = warp_rows ? int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32 : int64_t(blockIdx.x);
  if (row >= a.rows) return;  // whole warps, in warp-per-row mode only
  const int64_t V = a.vocab;
  const RowPtrs<TS, TT> p(a, row);
  const float inv = static_cast<float>(a.inv_tau), gamma = static_cast<float>(a.gamma);
  const Label label = read_label<PIV>(a, row, p);  // before any gradient is written
  if (!label.counted) {
    if (lane == 0) static_cast<float*>(a.loss)[row] = 0.f;
    if (p.g)
      for (int64_t j = lane; j < V; j += row_threads) p.g[j] = from_f<TS>(0.f);
    return;
  }

  // Pass 1: tail statistics around the pivot.
  Part part{Tail<float>::empty(), Best<float>::none()};
  const int64_t v_end = vec ? V / VEC * VEC : 0;
  for (int64_t base = int64_t(lane) * VEC; base < v_end; base += int64_t(row_threads) * VEC) {
    float zc[VEC], uc[VEC];
    load_vec<VEC>(p.z + base, zc);
    load_vec<VEC>(p.u + base, uc);
    take_chunk<DIV, PIV>(part.st, part.best, zc, uc, VEC, base, label.pivot, inv);
  }
  for (int64_t j = v_end + lane; j < V; j += row_threads) {
    float zc[1] = {to_f(p.z[j])}, uc[1] = {to_f(p.u[j])};
    take_chunk<DIV, PIV>(part.st, part.best, zc, uc, 1, j, label.pivot, inv);
  }
  if (warp_rows)
    warp_merge<DIV, PIV>(part, inv);
  else
    block_merge<DIV, PIV>(part, part_scratch, inv);
  const bool held = PIV != kLabel;  // the pivot is the running argmax held out of the sums
  const int64_t t = held ? part.best.idx : label.pivot;
  const Row<float> r = finalize<DIV>(part.st, held ? part.best.z : label.z_t, held ? part.best.u : label.u_t, inv, gamma);
  if (lane == 0) static_cast<float*>(a.loss)[row] = r.loss + label.poison;
  if (!p.g) return;

  // Pass 2: the gradient, then the zero-sum closure of a dominant tail token.
  const float scale = inv * (a.mean_scale ? *static_cast<const float*>(a.mean_scale) : 1.f);
  Closure<float> c = Closure<float>::empty();
  for (int64_t base = int64_t(lane) * VEC; base < v_end; base += int64_t(row_threads) * VEC) {
    float zc[VEC], uc[VEC], gc[VEC];
    load_vec<VEC>(p.z + base, zc);
    load_vec<VEC>(p.u + base, uc);
    gradient_chunk<DIV>(r, t, label.poison, inv, scale, base, zc, uc, gc, c);
    store_vec<VEC>(p.g + base, gc);
  }
  for (int64_t j = v_end + lane; j < V; j += row_threads) {
    float zc[1] = {to_f(p.z[j])}, uc[1] = {to_f(p.u[j])}, gc[1];
    gradient_chunk<DIV>(r, t, label.poison, inv, scale, j, zc, uc, gc, c);
    p.g[j] = from_f<TS>(gc[0]);
  }
  if (warp_rows) {
    warp_merge(c);
    __syncwarp();  // the lanes' stores land before the closure overwrites one of them
  } else {
    block_merge(c, closure_scratch);
  }
  if (lane == 0 && c.top >= 0 && student_tail_prob<DIV>(r, c.top_z, inv) >= 0.5f)
    p.g[c.top] = from_f<TS>(-c.others * scale);
}

template <typename T>
__global__ void __launch_bounds__(256) scale_kernel(const drkl_scale_args a, const bool vec) {
  constexpr int VEC = kVec<T>;
  const int64_t row = blockIdx.x;
  const float w = static_cast<const float*>(a.weight)[row * a.weight_stride];
  if (w == 1.f) return;
  T* g = static_cast<T*>(a.grad) + row * a.grad_stride;
  const int64_t v_end = vec ? a.vocab / VEC * VEC : 0;
  for (int64_t base = int64_t(threadIdx.x) * VEC; base < v_end; base += int64_t(blockDim.x) * VEC) {
    float gc[VEC];
    load_vec<VEC>(g + base, gc);
#pragma unroll
    for (int k = 0; k < VEC; ++k) gc[k] *= w;
    store_vec<VEC>(g + base, gc);
  }
  for (int64_t j = v_end + threadIdx.x; j < a.vocab; j += blockDim.x) g[j] = from_f<T>(to_f(g[j]) * w);
}

template <typename TS, typename TT>
int two_pass(const drkl_args& a, bool vec, cudaStream_t stream) {
  const bool warp_rows = a.vocab <= kWarpRowMaxV;
  const dim3 grid(static_cast<unsigned>(warp_rows ? (a.rows + kBlock / 32 - 1) / (kBlock / 32) : a.rows));
  switch (a.divergence * 3 + a.pivot) {
    case kDRKL * 3 + kLabel: two_pass_kernel<kDRKL, kLabel, TS, TT><<<grid, kBlock, 0, stream>>>(a, vec); break;
    case kDRKL * 3 + kTeacherArgmax:
      two_pass_kernel<kDRKL, kTeacherArgmax, TS, TT><<<grid, kBlock, 0, stream>>>(a, vec);
      break;
    case kRKL * 3 + kStudentArgmax:
      two_pass_kernel<kRKL, kStudentArgmax, TS, TT><<<grid, kBlock, 0, stream>>>(a, vec);
      break;
    case kFKL * 3 + kTeacherArgmax:
      two_pass_kernel<kFKL, kTeacherArgmax, TS, TT><<<grid, kBlock, 0, stream>>>(a, vec);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

bool aligned(const void* p, int64_t stride_elems, size_t elem) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (stride_elems * static_cast<int64_t>(elem)) % 16 == 0;
}

size_t dtype_size(int dtype) { return dtype == DRKL_F32 ? 4 : 2; }

}  // namespace

int launch_two_pass(const drkl_args& a, bool vec, cudaStream_t stream) {
  const int s = a.student_dtype, t = a.teacher_dtype;
  if (s == DRKL_F32 && t == DRKL_F32) return two_pass<float, float>(a, vec, stream);
  if (s == DRKL_BF16 && t == DRKL_BF16) return two_pass<__nv_bfloat16, __nv_bfloat16>(a, vec, stream);
  if (s == DRKL_F16 && t == DRKL_F16) return two_pass<__half, __half>(a, vec, stream);
  if (s == DRKL_BF16 && t == DRKL_F32) return two_pass<__nv_bfloat16, float>(a, vec, stream);
  if (s == DRKL_F16 && t == DRKL_F32) return two_pass<__half, float>(a, vec, stream);
  return cudaErrorInvalidValue;
}

}  // namespace drkl

extern "C" int drkl_cuda_forward(const drkl_args* a, void* stream) {
  using namespace drkl;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const size_t zs = dtype_size(a->student_dtype), us = dtype_size(a->teacher_dtype);
  const bool vec = aligned(a->student, a->student_stride, zs) && aligned(a->teacher, a->teacher_stride, us) &&
                   (a->grad == nullptr || aligned(a->grad, a->grad_stride, zs));
  if (a->cuda_passes != 2) {
    bool launched = false;
    const int err = launch_single_pass_sm90(*a, vec, s, &launched);
    if (launched || err != 0) return err;
  }
  return launch_two_pass(*a, vec, s);
}

extern "C" int drkl_cuda_scale_grad(const drkl_scale_args* a, void* stream) {
  using namespace drkl;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool vec = aligned(a->grad, a->grad_stride, dtype_size(a->dtype));
  const dim3 grid(static_cast<unsigned>(a->rows));
  switch (a->dtype) {
    case DRKL_F32: scale_kernel<float><<<grid, 256, 0, s>>>(*a, vec); break;
    case DRKL_BF16: scale_kernel<__nv_bfloat16><<<grid, 256, 0, s>>>(*a, vec); break;
    case DRKL_F16: scale_kernel<__half><<<grid, 256, 0, s>>>(*a, vec); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
