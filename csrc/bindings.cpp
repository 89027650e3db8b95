// torch + pybind11 binding of the kernels: drkl_kernels._C.
// Re-checks what the kernels rely on (the Python validation stays the first line),
// then hands raw pointers to the C launchers of drkl_cpu.cpp and drkl_cuda*.cu.
// Only the headers it uses: the tensor, the thread count, pybind11 with torch's tensor casters.
// <torch/extension.h> (all of libtorch's C++ API) tripled this file's compile: 36 s against 11 s
// here, in the ahead-of-time build and in every just-in-time build.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#ifdef DRKL_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "drkl_launch.h"

namespace {

int32_t dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DRKL_F32;
    case at::kBFloat16: return DRKL_BF16;
    case at::kHalf: return DRKL_F16;
    case at::kDouble: return DRKL_F64;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
  }
  return -1;
}

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be [rows, V], got ", t.dim(), " dims");
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(t.size(1) == 0 || t.stride(1) == 1, name, " must have a unit stride along V");
}

at::ScalarType acc_type(const at::Tensor& student) {
  return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether two [rows, V] views share any byte (their address ranges overlap).
bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto span = [](const at::Tensor& t) {
    const auto lo = reinterpret_cast<uintptr_t>(t.data_ptr());
    return std::make_pair(lo, lo + ((t.size(0) - 1) * t.stride(0) + t.size(1)) * t.element_size());
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

void forward(const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& target,
             const c10::optional<at::Tensor>& loss, const c10::optional<at::Tensor>& entropy,
             const c10::optional<at::Tensor>& grad, const c10::optional<at::Tensor>& record,
             const c10::optional<at::Tensor>& mean_scale, int64_t divergence, int64_t pivot, int64_t phase,
             double inv_tau, double gamma, double student_scale, double student_softcap, double teacher_scale,
             double teacher_softcap, int64_t ignore_index, int64_t vocab_start, int64_t vocab_total,
             int64_t cuda_passes) {
  check_rows(student, "student_logits", student);
  check_rows(teacher, "teacher_logits", student);
  const int32_t s_dtype = dtype_code(student, "student_logits"), t_dtype = dtype_code(teacher, "teacher_logits");
  TORCH_CHECK_TYPE((s_dtype == DRKL_F64) == (t_dtype == DRKL_F64),
                   "float64 logits must be float64 on both sides, got ", student.scalar_type(), " and ",
                   teacher.scalar_type());
  TORCH_CHECK_VALUE(phase >= DRKL_FUSED && phase <= DRKL_FINISH, "unknown phase ", phase);
  const auto acc = acc_type(student);
  const auto check_row_values = [&](const c10::optional<at::Tensor>& t, const char* name) {
    if (!t) return (void*)nullptr;
    TORCH_CHECK_VALUE(t->is_contiguous() && t->numel() == student.size(0) && t->device() == student.device() &&
                          t->scalar_type() == acc,
                      name, " must be a contiguous [rows] ", acc, " tensor on the logits' device");
    return t->data_ptr();
  };
  drkl_args a{};
  a.loss = check_row_values(loss, "loss");
  a.entropy = check_row_values(entropy, "entropy");
  TORCH_CHECK_VALUE(phase == DRKL_PARTIAL || loss.has_value(), "loss is required");
  if (target) {
    TORCH_CHECK_TYPE(target->scalar_type() == at::kLong || target->scalar_type() == at::kInt,
                     "target must be int64 or int32, got ", target->scalar_type());
    TORCH_CHECK_VALUE(target->dim() == 1 && target->size(0) == student.size(0) && target->is_contiguous() &&
                          target->device() == student.device(),
                      "target must be a contiguous [rows] tensor on the logits' device");
    a.target = target->data_ptr();
    a.target_is_int64 = target->scalar_type() == at::kLong;
  }
  if (grad) {
    check_rows(*grad, "grad", student);
    TORCH_CHECK_TYPE(grad->scalar_type() == student.scalar_type(), "grad must have the student's dtype");
    TORCH_CHECK_VALUE(grad->size(0) <= 1 || grad->stride(0) >= grad->size(1),
                      "grad's rows overlap (row stride ", grad->stride(0), " < V = ", grad->size(1), ")");
    TORCH_CHECK_VALUE(!overlaps(*grad, teacher), "grad must not share memory with teacher_logits");
    const bool in_place = grad->data_ptr() == student.data_ptr() && grad->strides() == student.strides();
    TORCH_CHECK_VALUE(in_place || !overlaps(*grad, student),
                      "grad must be student_logits itself (in place) or not share memory with it");
    a.grad = grad->data_ptr();
    a.grad_stride = grad->stride(0);
  }
  if (record) {
    TORCH_CHECK_VALUE(record->is_contiguous() && record->dim() == 2 && record->size(0) == student.size(0) &&
                          record->size(1) == DRKL_RECORD_WIDTH && record->scalar_type() == acc &&
                          record->device() == student.device(),
                      "record must be a contiguous [rows, ", DRKL_RECORD_WIDTH, "] ", acc,
                      " tensor on the logits' device");
    a.record = record->data_ptr();
  }
  TORCH_CHECK_VALUE(phase == DRKL_FUSED || record.has_value(), "record is required by the partial and finish phases");
  if (mean_scale) {
    TORCH_CHECK_VALUE(mean_scale->numel() == 1 && mean_scale->scalar_type() == acc &&
                          mean_scale->device() == student.device(),
                      "mean_scale must be one ", acc, " element on the logits' device");
    a.mean_scale = mean_scale->data_ptr();
  }
  TORCH_CHECK_VALUE(divergence >= 0 && divergence <= 2 && pivot >= 0 && pivot <= 2, "unknown divergence or pivot");
  TORCH_CHECK_VALUE(vocab_start >= 0 && vocab_start + student.size(1) <= vocab_total,
                    "the slice [", vocab_start, ", ", vocab_start + student.size(1), ") is not inside [0, ",
                    vocab_total, ")");
  a.student = student.data_ptr();
  a.teacher = teacher.data_ptr();
  a.rows = student.size(0);
  a.vocab = student.size(1);
  a.vocab_start = vocab_start;
  a.vocab_total = vocab_total;
  a.student_stride = student.stride(0);
  a.teacher_stride = teacher.stride(0);
  a.student_dtype = s_dtype;
  a.teacher_dtype = t_dtype;
  a.divergence = static_cast<int32_t>(divergence);
  a.pivot = static_cast<int32_t>(pivot);
  a.phase = static_cast<int32_t>(phase);
  a.inv_tau = inv_tau;
  a.gamma = gamma;
  a.student_scale = student_scale;
  a.student_softcap = student_softcap;
  a.teacher_scale = teacher_scale;
  a.teacher_softcap = teacher_softcap;
  a.ignore_index = ignore_index;
  a.num_threads = at::get_num_threads();
  a.cuda_passes = static_cast<int32_t>(cuda_passes);
  if (a.rows == 0) return;
  if (student.is_cuda()) {
#ifdef DRKL_WITH_CUDA
    TORCH_CHECK_TYPE(s_dtype != DRKL_F64, "the cuda backend takes float32, bfloat16 or float16 logits");
    const c10::cuda::CUDAGuard guard(student.device());
    const int err = drkl_cuda_forward(&a, at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == 0, "drkl cuda kernel failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
#else
    TORCH_CHECK_VALUE(false, "drkl_kernels._C was built without CUDA");
#endif
  } else {
    TORCH_CHECK_VALUE(student.device().is_cpu(), "unsupported device ", student.device());
    TORCH_CHECK(drkl_cpu_forward(&a) == 0, "unsupported dtype or divergence combination");
  }
}

void scale_grad(at::Tensor& grad, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(grad.dim() == 2 && (grad.size(1) == 0 || grad.stride(1) == 1), "grad must be [rows, V]");
  TORCH_CHECK_VALUE(weight.scalar_type() == acc_type(grad) && weight.device() == grad.device() &&
                        (weight.dim() == 0 || (weight.dim() == 1 && weight.size(0) == grad.size(0))),
                    "weight must be a scalar or [rows] ", acc_type(grad), " tensor on grad's device");
  drkl_scale_args a{grad.data_ptr(), weight.data_ptr(), grad.size(0), grad.size(1), grad.stride(0),
                    weight.dim() == 0 ? 0 : weight.stride(0), dtype_code(grad, "grad"), at::get_num_threads()};
  if (a.rows == 0 || a.vocab == 0) return;
  if (grad.is_cuda()) {
#ifdef DRKL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(grad.device());
    const int err = drkl_cuda_scale_grad(&a, at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == 0, "drkl cuda kernel failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
#else
    TORCH_CHECK_VALUE(false, "drkl_kernels._C was built without CUDA");
#endif
  } else {
    TORCH_CHECK(drkl_cpu_scale_grad(&a) == 0, "unsupported dtype");
  }
}

bool with_cuda() {
#ifdef DRKL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "drkl_kernels compiled kernels (CPU, and CUDA when built with it)";
  m.def("forward", &forward,
        "One call of the kernels (drkl_launch.h): per-row losses, entropies and the reduction-scaled gradient "
        "(phase 0, fused), the records of a vocabulary slice (1), or the slice's outputs from merged records (2)",
        py::arg("student"), py::arg("teacher"), py::arg("target"), py::arg("loss"), py::arg("entropy"),
        py::arg("grad"), py::arg("record"), py::arg("mean_scale"), py::arg("divergence"), py::arg("pivot"),
        py::arg("phase"), py::arg("inv_tau"), py::arg("gamma"), py::arg("student_scale"),
        py::arg("student_softcap"), py::arg("teacher_scale"), py::arg("teacher_softcap"), py::arg("ignore_index"),
        py::arg("vocab_start"), py::arg("vocab_total"), py::arg("cuda_passes") = 0);
  m.def("scale_grad", &scale_grad, "grad *= weight per row, in place; weight 1 rows untouched", py::arg("grad"),
        py::arg("weight"));
  m.def("with_cuda", &with_cuda, "Whether the CUDA kernels were compiled in");
}
