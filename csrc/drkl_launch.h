// The C interface between the kernels (pure C++/CUDA, no torch) and the torch binding.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum drkl_dtype { DRKL_F32 = 0, DRKL_BF16 = 1, DRKL_F16 = 2, DRKL_F64 = 3 };

// What one call computes (drkl_kernels/record.py): the single-device loss in one launch, the record
// of a vocabulary slice, or the loss and the slice's gradient from the merged records of whole rows.
enum drkl_phase { DRKL_FUSED = 0, DRKL_PARTIAL = 1, DRKL_FINISH = 2 };

#define DRKL_RECORD_WIDTH 11

// One call. Floating outputs and inputs other than the logits (loss, entropy, record, mean_scale,
// scale_grad's weight) are double for float64 logits, float otherwise.
typedef struct {
  const void* student;      // [rows, V], row stride student_stride elements, unit column stride
  const void* teacher;      // [rows, V], any of the logit dtypes
  const void* target;       // [rows] int64 or int32 global token ids, or NULL (no label)
  void* loss;               // [rows] out (FUSED, FINISH)
  void* entropy;            // [rows] out, or NULL (FUSED, FINISH)
  void* grad;               // [rows, V] out in the student dtype (may alias student), or NULL (FUSED, FINISH)
  void* record;             // [rows, DRKL_RECORD_WIDTH]: out (PARTIAL), in (FINISH)
  const void* mean_scale;   // 1 element: 1 / the "mean" divisor, or NULL
  int64_t rows, vocab, student_stride, teacher_stride, grad_stride;
  int64_t vocab_start, vocab_total;  // the logits are [vocab_start, vocab_start + vocab) of rows of vocab_total
  int32_t student_dtype, teacher_dtype, target_is_int64;
  int32_t divergence, pivot, phase;  // drkl::Divergence, drkl::Pivot, drkl_phase
  double inv_tau, gamma;
  double student_scale, student_softcap, teacher_scale, teacher_softcap;  // softcap 0: none
  int64_t ignore_index;
  int32_t num_threads;        // CPU: threads over rows
  int32_t cuda_passes;        // CUDA: 0 pick, 1 single pass (sm_90 cluster kernel) where it fits, 2 two passes
} drkl_args;

// grad[row] *= w[row * w_stride] (w_stride 0: one scalar); rows whose weight is exactly 1 are untouched.
typedef struct {
  void* grad;
  const void* weight;
  int64_t rows, vocab, grad_stride, weight_stride;
  int32_t dtype, num_threads;
} drkl_scale_args;

// Return 0 on success, else an error code (CPU: -1 for an unsupported combination; CUDA: cudaError_t).
int drkl_cpu_forward(const drkl_args* args);
int drkl_cpu_scale_grad(const drkl_scale_args* args);
int drkl_cuda_forward(const drkl_args* args, void* stream);
int drkl_cuda_scale_grad(const drkl_scale_args* args, void* stream);

#ifdef __cplusplus
}
#endif
