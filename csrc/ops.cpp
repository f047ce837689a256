// The one registration point of the native extension svq_fast._C: op schemas (TORCH_LIBRARY), their CPU
// kernels (TORCH_LIBRARY_IMPL) and the (empty) Python module whose import runs the registrations.
// Python reaches the ops through svq_fast._ext.native_ops(), i.e. torch.ops.svq_fast.*.

#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace svq_fast {
// csrc/vq_cpu.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> vq_forward_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                              int64_t block_n, int64_t block_k);
void vq_forward_out_cpu(const at::Tensor& z, const at::Tensor& codebook, at::Tensor& indices, at::Tensor& min_dist,
                        at::Tensor& z_q, int64_t block_n, int64_t block_k);
void vq_backward_out_cpu(const std::optional<at::Tensor>& grad_zq, const at::Tensor& z, const at::Tensor& codebook,
                         const at::Tensor& indices, double coef_z, double coef_e,
                         const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_codebook);
std::tuple<at::Tensor, at::Tensor> vq_backward_cpu(const std::optional<at::Tensor>& grad_zq, const at::Tensor& z,
                                                   const at::Tensor& codebook, const at::Tensor& indices,
                                                   double coef_z, double coef_e, bool need_grad_z,
                                                   bool need_grad_e);
// >>> semantic_conv (csrc/semantic_conv_cpu.cpp) >>>
at::Tensor semantic_conv_forward_cpu(const at::Tensor& labels, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, int64_t ignore_index);
std::tuple<at::Tensor, at::Tensor> semantic_conv_backward_cpu(const at::Tensor& grad_out, const at::Tensor& labels,
                                                              const at::Tensor& weight, int64_t ignore_index,
                                                              bool need_weight, bool need_bias,
                                                              int64_t num_partitions);
// <<< semantic_conv <<<
}  // namespace svq_fast

TORCH_LIBRARY(svq_fast, m) {
  // z (N, D), codebook (K, D), same dtype -> (indices (N,) int64, min_dist (N,) fp32|fp64, z_q (N, D) dtype of z)
  m.def("vq_forward(Tensor z, Tensor codebook, int block_n=256, int block_k=1024) -> (Tensor, Tensor, Tensor)");
  // -> (grad_z (N, D) or empty, grad_codebook (K, D) or empty)
  m.def(
      "vq_backward(Tensor? grad_zq, Tensor z, Tensor codebook, Tensor indices, float coef_z, float coef_e, "
      "bool need_grad_z, bool need_grad_e) -> (Tensor, Tensor)");
  // out= variants (contiguous outputs of the right shape/dtype); a None grad output is not computed
  m.def(
      "vq_forward_out(Tensor z, Tensor codebook, Tensor(a!) indices, Tensor(b!) min_dist, Tensor(c!) z_q, "
      "int block_n=256, int block_k=1024) -> ()");
  m.def(
      "vq_backward_out(Tensor? grad_zq, Tensor z, Tensor codebook, Tensor indices, float coef_z, float coef_e, "
      "Tensor(a!)? grad_z, Tensor(b!)? grad_codebook) -> ()");
  // >>> semantic_conv >>>
  // labels (B, H, W) int64, weight (Cout, C, k, k), bias (Cout,) -> (B, Cout, H, W) dtype of weight
  m.def("semantic_conv_forward(Tensor labels, Tensor weight, Tensor? bias, int ignore_index) -> Tensor");
  // -> (grad_weight (Cout, C, k, k) or empty, grad_bias (Cout,) or empty); num_partitions=0: thread count
  m.def(
      "semantic_conv_backward(Tensor grad_out, Tensor labels, Tensor weight, int ignore_index, bool need_weight, "
      "bool need_bias, int num_partitions=0) -> (Tensor, Tensor)");
  // <<< semantic_conv <<<
}

TORCH_LIBRARY_IMPL(svq_fast, CPU, m) {
  m.impl("vq_forward", &svq_fast::vq_forward_cpu);
  m.impl("vq_backward", &svq_fast::vq_backward_cpu);
  m.impl("vq_forward_out", &svq_fast::vq_forward_out_cpu);
  m.impl("vq_backward_out", &svq_fast::vq_backward_out_cpu);
  // >>> semantic_conv >>>
  m.impl("semantic_conv_forward", &svq_fast::semantic_conv_forward_cpu);
  m.impl("semantic_conv_backward", &svq_fast::semantic_conv_backward_cpu);
  // <<< semantic_conv <<<
}

static struct PyModuleDef svq_fast_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "svq_fast native CPU ops, registered as torch.ops.svq_fast.*", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&svq_fast_c_module); }
