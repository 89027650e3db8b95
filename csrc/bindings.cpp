// torch + pybind11 binding of the kernels: drkl_kernels._C.
// Re-checks what the kernels rely on (the Python validation stays the first line),
// then hands raw pointers to the C launchers of drkl_cpu.cpp and drkl_cuda*.cu.
#include <torch/extension.h>

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

void forward(const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& target,
             at::Tensor& loss, const c10::optional<at::Tensor>& grad, const c10::optional<at::Tensor>& mean_scale,
             int64_t divergence, int64_t pivot, double inv_tau, double gamma, int64_t ignore_index,
             int64_t cuda_passes) {
  check_rows(student, "student_logits", student);
  check_rows(teacher, "teacher_logits", student);
  const int32_t s_dtype = dtype_code(student, "student_logits"), t_dtype = dtype_code(teacher, "teacher_logits");
  TORCH_CHECK_TYPE(t_dtype == s_dtype || t_dtype == DRKL_F32,
                   "teacher_logits must have the student's dtype or float32, got ", teacher.scalar_type());
  TORCH_CHECK_VALUE(loss.is_contiguous() && loss.numel() == student.size(0) && loss.device() == student.device() &&
                        loss.scalar_type() == acc_type(student),
                    "loss must be a contiguous [rows] ", acc_type(student), " tensor on the logits' device");
  drkl_args a{};
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
    a.grad = grad->data_ptr();
    a.grad_stride = grad->stride(0);
  }
  if (mean_scale) {
    TORCH_CHECK_VALUE(mean_scale->numel() == 1 && mean_scale->scalar_type() == acc_type(student) &&
                          mean_scale->device() == student.device(),
                      "mean_scale must be one ", acc_type(student), " element on the logits' device");
    a.mean_scale = mean_scale->data_ptr();
  }
  TORCH_CHECK_VALUE(divergence >= 0 && divergence <= 2 && pivot >= 0 && pivot <= 2, "unknown divergence or pivot");
  a.student = student.data_ptr();
  a.teacher = teacher.data_ptr();
  a.loss = loss.data_ptr();
  a.rows = student.size(0);
  a.vocab = student.size(1);
  a.student_stride = student.stride(0);
  a.teacher_stride = teacher.stride(0);
  a.student_dtype = s_dtype;
  a.teacher_dtype = t_dtype;
  a.divergence = static_cast<int32_t>(divergence);
  a.pivot = static_cast<int32_t>(pivot);
  a.inv_tau = inv_tau;
  a.gamma = gamma;
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
  m.def("forward", &forward, "Per-row losses and, if grad is given, the reduction-scaled gradient",
        py::arg("student"), py::arg("teacher"), py::arg("target"), py::arg("loss"), py::arg("grad"),
        py::arg("mean_scale"), py::arg("divergence"), py::arg("pivot"), py::arg("inv_tau"), py::arg("gamma"),
        py::arg("ignore_index"), py::arg("cuda_passes") = 0);
  m.def("scale_grad", &scale_grad, "grad *= weight per row, in place; weight 1 rows untouched", py::arg("grad"),
        py::arg("weight"));
  m.def("with_cuda", &with_cuda, "Whether the CUDA kernels were compiled in");
}
