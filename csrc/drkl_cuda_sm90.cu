// Single-pass CUDA kernel for sm_90 (FUSED calls with a gradient): a row stays on chip. A cluster of
// `ranks` CTAs (256 threads each, two CTAs per SM) shares the row, one span of drkl_partition.h per
// CTA. Thread 0 issues bulk asynchronous copies (cp.async.bulk, completing on an mbarrier per stage)
// of the CTA's span of student and teacher into its shared memory: the whole span is in flight at
// once (up to kSliceBudget per CTA). The threads fold each stage as it lands (plain shared loads),
// merge (warp butterflies, then one warp over the warps), then one warp of every CTA merges the
// CTAs' parts through distributed shared memory as a tree of the same shape in every CTA (the same
// bits everywhere), finishes the row, and the gradient pass reads the span back from shared memory.
// Student and teacher are read once and the gradient written once: 6 bytes per token in bf16.
// Rows whose student, teacher and gradient rows are not aligned alike are read token by token.
// Built as a trap below sm_90; the launcher checks the kernel's own PTX and binary versions.
#include <cooperative_groups.h>

#include <mutex>
#include <vector>

#include "drkl_cuda_common.cuh"

namespace cg = cooperative_groups;

namespace drkl {
namespace {

constexpr int kClusterBlock = 256;
constexpr int kStages = 4;                  // stages of tiles per span (an mbarrier each), plus the pieces
constexpr int64_t kMinVocab = 4096;         // below, the two-pass kernel's second read hits L2 anyway
constexpr size_t kSliceBudget = 104 * 1024;  // two CTAs per SM: 2 x (104 KiB + static + 1 KiB) <= 228 KiB
constexpr int64_t kMaxGrid = 0x7fffffff;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

__device__ __forceinline__ void wait_stage(uint64_t* bar) {
  asm volatile(
      "{\n .reg .pred done;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], 0;\n"
      " @!done bra WAIT_%=;\n}" ::"r"(smem_addr(bar))
      : "memory");
}

// The span's tiles, staged: stage k holds tiles [k per, (k + 1) per) (per a power of two, so that
// finding a tile's stage costs a mask and a shift), the last stage the pieces too.
struct Stages {
  int32_t per, shift, count;
  __device__ Stages(const Span& s) {
    const int32_t tiles = s.tiles();
    per = 1;
    shift = 0;
    while (per * kStages < tiles) {
      per *= 2;
      ++shift;
    }
    count = (tiles + per - 1) / per + (s.nv > s.pieces_lo() ? 1 : 0);
  }
  __device__ int32_t begin(const Span& s, int32_t k) const { return k * per * s.tile_tokens(); }
  __device__ int32_t end(const Span& s, int32_t k) const {
    const int32_t e = (k + 1) * per * s.tile_tokens();
    return k == count - 1 || e > s.nv ? s.nv : e;
  }
};

// The CTA's span in shared memory (pieces; plain loads), its scalars in global memory.
template <typename TS, typename TT>
struct SharedSrc {
  const TS* zs;
  const TT* us;
  GlobalSrc<TS, TT> row;
  int32_t lo;
  uint64_t* bars;
  Stages stages;
  template <int Q>
  __device__ __forceinline__ void piece(int32_t pos, float* zo, float* uo) const {
    load_elems<Q, false>(zs + (pos - lo), zo);
    load_elems<Q, false>(us + (pos - lo), uo);
  }
  __device__ __forceinline__ void scalar(int32_t pos, float& zo, float& uo) const { row.scalar(pos, zo, uo); }
  __device__ __forceinline__ void wait_tile(int32_t i) const {
    if ((i & (stages.per - 1)) == 0) wait_stage(bars + (i >> stages.shift));
  }
  __device__ __forceinline__ void wait_all() const {
    for (int32_t k = 0; k < stages.count; ++k) wait_stage(bars + k);
  }
};

template <int DIV, int PIV, typename TS, typename TT>
__global__ void __launch_bounds__(kClusterBlock, 2) single_pass_kernel(const drkl_args a, const int64_t row0,
                                                                        const int32_t alloc) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int Q = Widths<sizeof(TS), sizeof(TT)>::Q;
  __shared__ Part scratch[kClusterBlock / 32];
  __shared__ Part cta_part;
  __shared__ Grad<float> grad_s;
  __shared__ int32_t piv_s;
  __shared__ alignas(8) uint64_t bars[kStages + 1];  // (at most kStages of tiles: per >= tiles / kStages)
  extern __shared__ __align__(16) unsigned char smem[];
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank()), ranks = static_cast<int>(cluster.num_blocks());
  const int t = threadIdx.x;
  const int64_t row = row0 + blockIdx.x / ranks;
  const int32_t V = static_cast<int32_t>(a.vocab);
  const GlobalSrc<TS, TT> gsrc{static_cast<const TS*>(a.student) + row * a.student_stride,
                               static_cast<const TT*>(a.teacher) + row * a.teacher_stride};
  const GlobalDst<TS> dst{static_cast<TS*>(a.grad) + row * a.grad_stride};
  const RowLabel rl = row_label<PIV>(a, row);
  int32_t my_head;
  const Span s = rank_span<sizeof(TS), sizeof(TT)>(V, kClusterBlock, rank, ranks, reinterpret_cast<uintptr_t>(gsrc.z),
                                                    reinterpret_cast<uintptr_t>(gsrc.u),
                                                    reinterpret_cast<uintptr_t>(dst.g), my_head);
  const int32_t lo = s.lo, n = s.n;
  if (rl.ignored) {  // every CTA of the cluster sees the same label: none touches another's memory
    if (rank == 0 && t == 0) ignored_outputs(a, row);
    for (int32_t j = t; j < my_head; j += kClusterBlock) dst.scalar(j, 0.f);
    for (int32_t j = lo + t; j < lo + n; j += kClusterBlock) dst.scalar(j, 0.f);
    return;
  }

  TS* zs = reinterpret_cast<TS*>(smem);
  TT* us = reinterpret_cast<TT*>(smem + static_cast<size_t>(alloc) * sizeof(TS));
  const SharedSrc<TS, TT> src{zs, us, gsrc, lo, bars, Stages(s)};
  if (t == 0) {
    for (int32_t k = 0; k < src.stages.count; ++k)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bars + k)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (t == 0) {
    for (int32_t k = 0; k < src.stages.count; ++k) {
      const int32_t b = src.stages.begin(s, k), e = src.stages.end(s, k);
      const uint32_t zb = static_cast<uint32_t>(e - b) * sizeof(TS), ub = static_cast<uint32_t>(e - b) * sizeof(TT);
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bars + k)), "r"(zb + ub)
                   : "memory");
      bulk_copy(zs + b, gsrc.z + lo + b, zb, bars + k);
      bulk_copy(us + b, gsrc.u + lo + b, ub, bars + k);
    }
  }

  const float inv = rl.ctx.inv_tau;
  Part part = Part::empty();
  stats_of<DIV, PIV, Q>(part, src, s, t, my_head, rl.ctx);
  block_merge<DIV, PIV>(part, scratch, inv);
  if (t == 0) cta_part = part;
  cluster.sync();
  if (t < 32) {  // warp 0: the CTAs' parts, lane r holding rank r's, merged as a tree
    Part p = t < ranks ? *cluster.map_shared_rank(&cta_part, t) : Part::empty();
    butterfly<DIV, PIV>(p, pow2_at_least(ranks), inv);
    if (t == 0) {
      Grad<float> g;
      int32_t piv = -1;
      row_outputs<DIV>(a, row, rl, p, g, piv, rank == 0);
      grad_s = g;
      piv_s = piv;
    }
  }
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");  // done reading the others' memory
  __syncthreads();
  if (rl.poison != 0.f) {  // NaN: a label outside the vocabulary
    for (int32_t j = t; j < my_head; j += kClusterBlock) dst.scalar(j, NAN);
    for (int32_t j = lo + t; j < lo + n; j += kClusterBlock) dst.scalar(j, NAN);
  } else {
    grad_of<DIV, Q>(grad_s, src, dst, s, t, my_head, piv_s, rl.ctx);
  }
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");  // no CTA leaves while read
#else
  __trap();  // compiled for an older GPU: never launched (the launcher checks the kernel's version)
#endif
}

// What the host learned about a kernel on a device, asked once.
struct KernelInfo {
  int device;
  const void* fn;
  bool usable;        // built for sm_90 (its own PTX and binary versions)
  size_t smem_set;    // the dynamic shared memory it may use
  int nonportable;    // cluster sizes above 8: 0 not asked, 1 allowed, -1 refused
  size_t fits[5];     // per cluster size 1, 2, 4, 8, 16: the most shared memory known to fit
  size_t fails[5];    // and the least known not to (0: none)
};

std::mutex info_mutex;
std::vector<KernelInfo> infos;

KernelInfo& info_of(int device, const void* fn) {
  for (KernelInfo& k : infos)
    if (k.device == device && k.fn == fn) return k;
  KernelInfo k{device, fn, false, 0, 0, {0, 0, 0, 0, 0}, {0, 0, 0, 0, 0}};
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, fn) == cudaSuccess) k.usable = attr.ptxVersion >= 90 && attr.binaryVersion >= 90;
  (void)cudaGetLastError();
  infos.push_back(k);
  return infos.back();
}

template <int DIV, int PIV, typename TS, typename TT>
int launch(const drkl_args& a, cudaStream_t stream, bool* launched) {
  using W = Widths<sizeof(TS), sizeof(TT)>;
  auto kernel = single_pass_kernel<DIV, PIV, TS, TT>;
  const void* fn = reinterpret_cast<const void*>(kernel);
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const std::lock_guard<std::mutex> lock(info_mutex);
  KernelInfo& k = info_of(device, fn);
  if (!k.usable) return cudaSuccess;
  for (int slot = 0, ranks = 1; ranks <= 16; ++slot, ranks *= 2) {
    const int32_t alloc = rank_len<W::kAlign>(a.vocab, ranks);
    const size_t smem = static_cast<size_t>(alloc) * (sizeof(TS) + sizeof(TT));
    if (smem > kSliceBudget || (k.fails[slot] && smem >= k.fails[slot])) continue;
    if (ranks > 8 && k.nonportable == 0)
      k.nonportable = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess ? 1 : -1;
    if (ranks > 8 && k.nonportable < 0) break;
    if (smem > k.smem_set) {
      if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) != cudaSuccess ||
          cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100) != cudaSuccess)
        break;
      k.smem_set = smem;
    }
    cudaLaunchConfig_t config = {};
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
    const int64_t rows_per_launch = kMaxGrid / ranks;  // grids past 2^31 - 1 blocks: several launches
    config.gridDim = dim3(static_cast<unsigned>((a.rows < rows_per_launch ? a.rows : rows_per_launch) * ranks));
    if (smem > k.fits[slot]) {
      int clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess || clusters == 0) {
        (void)cudaGetLastError();
        k.fails[slot] = k.fails[slot] && k.fails[slot] < smem ? k.fails[slot] : smem;
        continue;
      }
      k.fits[slot] = smem;
    }
    *launched = true;
    for (int64_t row0 = 0; row0 < a.rows; row0 += rows_per_launch) {
      const int64_t rows = a.rows - row0 < rows_per_launch ? a.rows - row0 : rows_per_launch;
      config.gridDim = dim3(static_cast<unsigned>(rows * ranks));
      err = cudaLaunchKernelEx(&config, kernel, a, row0, alloc);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  (void)cudaGetLastError();  // no cluster shape fits: the two-pass kernel takes the call
  return cudaSuccess;
}

template <typename TS, typename TT>
int route(const drkl_args& a, cudaStream_t stream, bool* launched) {
  if constexpr (!pair_built<TS, TT>()) {
    return cudaErrorInvalidValue;
  } else {
    switch (a.divergence * 3 + a.pivot) {
      case kDRKL * 3 + kLabel: return launch<kDRKL, kLabel, TS, TT>(a, stream, launched);
      case kDRKL * 3 + kTeacherArgmax: return launch<kDRKL, kTeacherArgmax, TS, TT>(a, stream, launched);
      case kRKL * 3 + kStudentArgmax: return launch<kRKL, kStudentArgmax, TS, TT>(a, stream, launched);
      case kFKL * 3 + kTeacherArgmax: return launch<kFKL, kTeacherArgmax, TS, TT>(a, stream, launched);
      default: return cudaErrorInvalidValue;
    }
  }
}

template <typename TS>
int route_teacher(const drkl_args& a, cudaStream_t stream, bool* launched) {
  switch (a.teacher_dtype) {
    case DRKL_F32: return route<TS, float>(a, stream, launched);
    case DRKL_BF16: return route<TS, __nv_bfloat16>(a, stream, launched);
    case DRKL_F16: return route<TS, __half>(a, stream, launched);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int launch_single_pass_sm90(const drkl_args& a, cudaStream_t stream, bool* launched) {
  *launched = false;
  if (a.vocab < kMinVocab && a.cuda_passes != 1) return cudaSuccess;
  switch (a.student_dtype) {
    case DRKL_F32: return route_teacher<float>(a, stream, launched);
    case DRKL_BF16: return route_teacher<__nv_bfloat16>(a, stream, launched);
    case DRKL_F16: return route_teacher<__half>(a, stream, launched);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace drkl
