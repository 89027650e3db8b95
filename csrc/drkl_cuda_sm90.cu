// Single-pass CUDA kernel for sm_90: a row stays on chip. A thread-block cluster shares
// the row: each CTA copies its slice of the student and teacher logits from global memory
// into its shared memory once (16-byte vector loads), the CTAs exchange their partial tail
// statistics through distributed shared memory (merged in rank order in every CTA, so the
// result is deterministic), and the gradient pass reads the slice back from shared memory.
// Student and teacher are read once and the gradient written once: 6 bytes per element in
// bf16. Clusters of up to 16 CTAs with <= 200 KiB of logits each hold a bf16 row of up to
// 800k tokens; larger rows use the two-pass kernel. Compiled to an empty body below sm_90.
#include <cooperative_groups.h>

#include "drkl_cuda_common.cuh"

namespace cg = cooperative_groups;

namespace drkl {
namespace {

constexpr int kClusterBlock = 512;
constexpr int64_t kMinVocab = 4096;  // below, the two-pass kernel's second read hits L2 anyway
constexpr size_t kSliceBudget = 200 * 1024;

template <int DIV, int PIV, typename TS, typename TT>
__global__ void __launch_bounds__(kClusterBlock) single_pass_kernel(const drkl_args a, const bool vec,
                                                                    const int64_t slice) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ Part part_scratch[kClusterBlock / 32];
  __shared__ Closure<float> closure_scratch[kClusterBlock / 32];
  __shared__ Part cta_part;
  __shared__ Closure<float> cta_closure;
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int VEC = kVec<TS>;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank()), ranks = static_cast<int>(cluster.num_blocks());
  const int64_t row = blockIdx.x / ranks, V = a.vocab;
  const int64_t lo = rank * slice, hi = lo + slice < V ? lo + slice : V, n = hi > lo ? hi - lo : 0;
  TS* zs = reinterpret_cast<TS*>(smem);
  TT* us = reinterpret_cast<TT*>(smem + slice * sizeof(TS));
  const RowPtrs<TS, TT> p(a, row);
  const float inv = static_cast<float>(a.inv_tau), gamma = static_cast<float>(a.gamma);
  const Label label = read_label<PIV>(a, row, p);  // before any gradient is written
  if (!label.counted) {  // every CTA of the cluster sees the same label: none touches another's memory
    if (rank == 0 && threadIdx.x == 0) static_cast<float*>(a.loss)[row] = 0.f;
    if (p.g)
      for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) p.g[j] = from_f<TS>(0.f);
    return;
  }

  // Copy the slice into shared memory, folding it into this CTA's partial statistics.
  Part part{Tail<float>::empty(), Best<float>::none()};
  const int64_t v_end = lo + (vec ? n / VEC * VEC : 0);
  for (int64_t base = lo + int64_t(threadIdx.x) * VEC; base < v_end; base += int64_t(blockDim.x) * VEC) {
    constexpr int kTeacherWords = VEC * sizeof(TT) / 16;
    *reinterpret_cast<uint4*>(zs + (base - lo)) = __ldg(reinterpret_cast<const uint4*>(p.z + base));
#pragma unroll
    for (int w = 0; w < kTeacherWords; ++w)
      reinterpret_cast<uint4*>(us + (base - lo))[w] = __ldg(reinterpret_cast<const uint4*>(p.u + base) + w);
    float zc[VEC], uc[VEC];
    load_vec<VEC>(zs + (base - lo), zc);
    load_vec<VEC>(us + (base - lo), uc);
    take_chunk<DIV, PIV>(part.st, part.best, zc, uc, VEC, base, label.pivot, inv);
  }
  for (int64_t j = v_end + threadIdx.x; j < hi; j += blockDim.x) {
    zs[j - lo] = p.z[j];
    us[j - lo] = p.u[j];
    float zc[1] = {to_f(zs[j - lo])}, uc[1] = {to_f(us[j - lo])};
    take_chunk<DIV, PIV>(part.st, part.best, zc, uc, 1, j, label.pivot, inv);
  }
  block_merge<DIV, PIV>(part, part_scratch, inv);
  if (threadIdx.x == 0) cta_part = part;
  cluster.sync();
  part = *cluster.map_shared_rank(&cta_part, 0);
  for (int other = 1; other < ranks; ++other) merge_into<DIV, PIV>(part, *cluster.map_shared_rank(&cta_part, other), inv);

  const bool held = PIV != kLabel;  // the pivot is the running argmax held out of the sums
  const int64_t t = held ? part.best.idx : label.pivot;
  const Row<float> r = finalize<DIV>(part.st, held ? part.best.z : label.z_t, held ? part.best.u : label.u_t, inv, gamma);
  if (rank == 0 && threadIdx.x == 0) static_cast<float*>(a.loss)[row] = r.loss + label.poison;
  if (p.g) {
    // The gradient of the slice, from shared memory.
    const float scale = inv * (a.mean_scale ? *static_cast<const float*>(a.mean_scale) : 1.f);
    Closure<float> c = Closure<float>::empty();
    for (int64_t base = lo + int64_t(threadIdx.x) * VEC; base < v_end; base += int64_t(blockDim.x) * VEC) {
      float zc[VEC], uc[VEC], gc[VEC];
      load_vec<VEC>(zs + (base - lo), zc);
      load_vec<VEC>(us + (base - lo), uc);
      gradient_chunk<DIV>(r, t, label.poison, inv, scale, base, zc, uc, gc, c);
      store_vec<VEC>(p.g + base, gc);
    }
    for (int64_t j = v_end + threadIdx.x; j < hi; j += blockDim.x) {
      float zc[1] = {to_f(zs[j - lo])}, uc[1] = {to_f(us[j - lo])}, gc[1];
      gradient_chunk<DIV>(r, t, label.poison, inv, scale, j, zc, uc, gc, c);
      p.g[j] = from_f<TS>(gc[0]);
    }
    block_merge(c, closure_scratch);
    if (threadIdx.x == 0) cta_closure = c;
    cluster.sync();
    c = *cluster.map_shared_rank(&cta_closure, 0);
    for (int other = 1; other < ranks; ++other) c.merge(*cluster.map_shared_rank(&cta_closure, other));
    if (threadIdx.x == 0 && c.top >= lo && c.top < hi && student_tail_prob<DIV>(r, c.top_z, inv) >= 0.5f)
      p.g[c.top] = from_f<TS>(-c.others * scale);
  }
  cluster.sync();  // no CTA leaves while another may still read its shared memory
#endif
}

template <int DIV, int PIV, typename TS, typename TT>
int launch(const drkl_args& a, bool vec, cudaStream_t stream, bool* launched) {
  constexpr int VEC = kVec<TS>;
  auto kernel = single_pass_kernel<DIV, PIV, TS, TT>;
  const size_t per_token = sizeof(TS) + sizeof(TT);
  for (int ranks = 1; ranks <= 16; ranks *= 2) {
    const int64_t slice = ((a.vocab + ranks - 1) / ranks + VEC - 1) / VEC * VEC;
    const size_t smem = static_cast<size_t>(slice) * per_token;
    if (smem > kSliceBudget) continue;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err == cudaSuccess && ranks > 8) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) return err;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>(a.rows * ranks));
    config.blockDim = dim3(kClusterBlock);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute;
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = static_cast<unsigned>(ranks);
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess || clusters == 0) {
      (void)cudaGetLastError();  // this cluster shape does not fit the GPU: leave it to the two-pass kernel
      return cudaSuccess;
    }
    *launched = true;
    return cudaLaunchKernelEx(&config, kernel, a, vec, slice);
  }
  return cudaSuccess;
}

template <typename TS, typename TT>
int route(const drkl_args& a, bool vec, cudaStream_t stream, bool* launched) {
  switch (a.divergence * 3 + a.pivot) {
    case kDRKL * 3 + kLabel: return launch<kDRKL, kLabel, TS, TT>(a, vec, stream, launched);
    case kDRKL * 3 + kTeacherArgmax: return launch<kDRKL, kTeacherArgmax, TS, TT>(a, vec, stream, launched);
    case kRKL * 3 + kStudentArgmax: return launch<kRKL, kStudentArgmax, TS, TT>(a, vec, stream, launched);
    case kFKL * 3 + kTeacherArgmax: return launch<kFKL, kTeacherArgmax, TS, TT>(a, vec, stream, launched);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// Launches the single-pass kernel when the GPU is sm_90+, the row is large enough and a
// cluster shape fits; otherwise sets *launched = false and leaves the row to the caller.
int launch_single_pass_sm90(const drkl_args& a, bool vec, cudaStream_t stream, bool* launched) {
  *launched = false;
  if (a.vocab < kMinVocab && a.cuda_passes != 1) return cudaSuccess;
  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  if (major < 9) return cudaSuccess;
  const int s = a.student_dtype, t = a.teacher_dtype;
  if (s == DRKL_F32 && t == DRKL_F32) return route<float, float>(a, vec, stream, launched);
  if (s == DRKL_BF16 && t == DRKL_BF16) return route<__nv_bfloat16, __nv_bfloat16>(a, vec, stream, launched);
  if (s == DRKL_F16 && t == DRKL_F16) return route<__half, __half>(a, vec, stream, launched);
  if (s == DRKL_BF16 && t == DRKL_F32) return route<__nv_bfloat16, float>(a, vec, stream, launched);
  if (s == DRKL_F16 && t == DRKL_F32) return route<__half, float>(a, vec, stream, launched);
  return cudaErrorInvalidValue;
}

}  // namespace drkl
