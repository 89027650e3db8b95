// CUDA kernels, two passes over each row (any GPU from sm_80), and the extern "C" entry points.
// One block of 512 threads per row, or one warp per row (16 rows per block) when V <= 2048; each
// thread works its tiles of drkl_partition.h: pass 1 folds the statistics (warp butterflies, then one
// warp merges the warps as a tree), one thread finishes the row, pass 2 writes the gradient. All three
// phases: FUSED (both passes), PARTIAL (pass 1, the record), FINISH (pass 2 from the merged record).
// Traffic per token, bf16, loss + gradient: 2 x (2 + 2) read + 2 written = 10 bytes.
// FUSED calls with a gradient go to the single-pass cluster kernel of drkl_cuda_sm90.cu where it is
// built for the GPU and a cluster holds the row (6 bytes per token).
#include "drkl_cuda_common.cuh"

namespace drkl {
namespace {

constexpr int kBlock = 512;
constexpr int64_t kWarpRowMaxV = 2048;  // at or below: one warp per row
constexpr int64_t kMaxGrid = 0x7fffffff;

template <int DIV, int PIV, typename TS, typename TT>
__global__ void __launch_bounds__(kBlock) two_pass_kernel(const drkl_args a, const int64_t row0) {
  constexpr int Q = Widths<sizeof(TS), sizeof(TT)>::Q;
  __shared__ Part scratch[kBlock / 32];
  __shared__ Grad<float> grads[kBlock / 32];
  __shared__ int32_t pivots[kBlock / 32];
  const bool warp_rows = a.vocab <= kWarpRowMaxV;
  const int T = warp_rows ? 32 : kBlock, t = threadIdx.x % T, slot = warp_rows ? threadIdx.x / 32 : 0;
  const int64_t row = row0 + (warp_rows ? int64_t(blockIdx.x) * (kBlock / 32) + threadIdx.x / 32 : int64_t(blockIdx.x));
  if (row >= a.rows) return;  // whole warps, in warp-per-row mode only
  const int32_t V = static_cast<int32_t>(a.vocab);
  const GlobalSrc<TS, TT> src{static_cast<const TS*>(a.student) + row * a.student_stride,
                              static_cast<const TT*>(a.teacher) + row * a.teacher_stride};
  const GlobalDst<TS> dst{a.grad ? static_cast<TS*>(a.grad) + row * a.grad_stride : nullptr};
  const RowLabel rl = row_label<PIV>(a, row);
  if (rl.ignored) {
    if (t == 0) ignored_outputs(a, row);
    if (dst.g && a.phase != DRKL_PARTIAL)
      for (int32_t j = t; j < V; j += T) dst.scalar(j, 0.f);
    return;
  }
  int32_t head;
  const Span s = row_span<sizeof(TS), sizeof(TT)>(V, T, reinterpret_cast<uintptr_t>(src.z),
                                                   reinterpret_cast<uintptr_t>(src.u),
                                                   reinterpret_cast<uintptr_t>(dst.g), head);

  Part part = Part::empty();
  if (a.phase != DRKL_FINISH) {
    stats_of<DIV, PIV, Q>(part, src, s, t, head, rl.ctx);
    if (warp_rows)
      butterfly<DIV, PIV>(part, 32, rl.ctx.inv_tau);
    else
      block_merge<DIV, PIV>(part, scratch, rl.ctx.inv_tau);
  }
  if (t == 0) {
    Grad<float> g;
    int32_t piv = -1;
    if (!row_outputs<DIV>(a, row, rl, part, g, piv, true)) piv = -2;  // PARTIAL: no pass 2
    grads[slot] = g;
    pivots[slot] = piv;
  }
  if (warp_rows)
    __syncwarp();
  else
    __syncthreads();
  const int32_t piv = pivots[slot];
  if (piv == -2 || !dst.g) return;
  if (rl.poison != 0.f) {  // NaN: a label outside the vocabulary
    for (int32_t j = t; j < V; j += T) dst.scalar(j, NAN);
    return;
  }
  grad_of<DIV, Q>(grads[slot], src, dst, s, t, head, piv, rl.ctx);
}

// grad[row] *= w[row]: plain loads, since the kernel writes what it reads.
template <typename T>
__global__ void __launch_bounds__(256) scale_kernel(const drkl_scale_args a, const int64_t row0) {
  constexpr int Q = 16 / sizeof(T);
  const int64_t row = row0 + blockIdx.x;
  const float w = static_cast<const float*>(a.weight)[row * a.weight_stride];
  if (w == 1.f) return;
  T* g = static_cast<T*>(a.grad) + row * a.grad_stride;
  const int64_t V = a.vocab;
  const int64_t head0 = reinterpret_cast<uintptr_t>(g) % 16 / sizeof(T);
  const int64_t head = head0 == 0 ? 0 : (Q - head0 < V ? Q - head0 : V);
  const int64_t v_end = head + (V - head) / Q * Q;
  if (threadIdx.x < head) g[threadIdx.x] = from_f<T>(to_f(g[threadIdx.x]) * w);
  for (int64_t base = head + int64_t(threadIdx.x) * Q; base < v_end; base += int64_t(blockDim.x) * Q) {
    float v[Q];
    load_elems<Q, false>(g + base, v);
#pragma unroll
    for (int k = 0; k < Q; ++k) v[k] *= w;
    store_elems<Q>(g + base, v);
  }
  for (int64_t j = v_end + threadIdx.x; j < V; j += blockDim.x) g[j] = from_f<T>(to_f(g[j]) * w);
}

template <int DIV, int PIV, typename TS, typename TT>
int launch(const drkl_args& a, cudaStream_t stream) {
  const int64_t rows_per_block = a.vocab <= kWarpRowMaxV ? kBlock / 32 : 1;
  const int64_t rows_per_launch = kMaxGrid * rows_per_block;  // grids past 2^31 - 1 blocks: several launches
  for (int64_t row0 = 0; row0 < a.rows; row0 += rows_per_launch) {
    const int64_t rows = a.rows - row0 < rows_per_launch ? a.rows - row0 : rows_per_launch;
    const dim3 grid(static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block));
    two_pass_kernel<DIV, PIV, TS, TT><<<grid, kBlock, 0, stream>>>(a, row0);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename TS, typename TT>
int route(const drkl_args& a, cudaStream_t stream) {
  if constexpr (!pair_built<TS, TT>()) {
    return cudaErrorInvalidValue;
  } else {
    switch (a.divergence * 3 + a.pivot) {
      case kDRKL * 3 + kLabel: return launch<kDRKL, kLabel, TS, TT>(a, stream);
      case kDRKL * 3 + kTeacherArgmax: return launch<kDRKL, kTeacherArgmax, TS, TT>(a, stream);
      case kRKL * 3 + kStudentArgmax: return launch<kRKL, kStudentArgmax, TS, TT>(a, stream);
      case kFKL * 3 + kTeacherArgmax: return launch<kFKL, kTeacherArgmax, TS, TT>(a, stream);
      default: return cudaErrorInvalidValue;
    }
  }
}

template <typename TS>
int route_teacher(const drkl_args& a, cudaStream_t stream) {
  switch (a.teacher_dtype) {
    case DRKL_F32: return route<TS, float>(a, stream);
    case DRKL_BF16: return route<TS, __nv_bfloat16>(a, stream);
    case DRKL_F16: return route<TS, __half>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int launch_two_pass(const drkl_args& a, cudaStream_t stream) {
  switch (a.student_dtype) {
    case DRKL_F32: return route_teacher<float>(a, stream);
    case DRKL_BF16: return route_teacher<__nv_bfloat16>(a, stream);
    case DRKL_F16: return route_teacher<__half>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace drkl

extern "C" int drkl_cuda_forward(const drkl_args* a, void* stream) {
  using namespace drkl;
  if (a->vocab > (int64_t(1) << 30)) return cudaErrorInvalidValue;  // row positions are 32-bit
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a->cuda_passes != 2 && a->phase == DRKL_FUSED && a->grad != nullptr) {
    bool launched = false;
    const int err = launch_single_pass_sm90(*a, s, &launched);
    if (launched || err != 0) return err;
  }
  return launch_two_pass(*a, s);
}

extern "C" int drkl_cuda_scale_grad(const drkl_scale_args* a, void* stream) {
  using namespace drkl;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  for (int64_t row0 = 0; row0 < a->rows; row0 += kMaxGrid) {
    const dim3 grid(static_cast<unsigned>(a->rows - row0 < kMaxGrid ? a->rows - row0 : kMaxGrid));
    switch (a->dtype) {
      case DRKL_F32: scale_kernel<float><<<grid, 256, 0, s>>>(*a, row0); break;
      case DRKL_BF16: scale_kernel<__nv_bfloat16><<<grid, 256, 0, s>>>(*a, row0); break;
      case DRKL_F16: scale_kernel<__half><<<grid, 256, 0, s>>>(*a, row0); break;
      default: return cudaErrorInvalidValue;
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}
