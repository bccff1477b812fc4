// pybind11 bindings of the CUDA kernels: the only file that sees torch. Each function checks its
// inputs (ValueError), allocates the outputs, and launches on the current stream without a host
// sync; a failed launch raises RuntimeError with CUDA's message.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <tuple>

#include "gavamoe_cuda.h"

namespace {

using torch::Tensor;

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", t.device());
}

void check_rank(const Tensor& t, const char* name, int64_t ndim, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == ndim, name, " must have shape ", shape, " (", ndim, "-D), got shape ", t.sizes());
}

gavamoe::DType float_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return gavamoe::DType::kFloat32;
    case at::kHalf:
      return gavamoe::DType::kFloat16;
    case at::kBFloat16:
      return gavamoe::DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, name, " must have dtype float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

bool index_is_int64(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
                    " must have dtype int32 or int64, got ", t.scalar_type());
  return t.scalar_type() == at::kLong;
}

void check_same_device(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "gavamoe_kernels._C.", what, ": CUDA error: ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor, Tensor> route(const Tensor& hidden, const Tensor& gate_weight, const Tensor& cluster_ids,
                                         int64_t top_k, bool normalize) {
  check_rank(hidden, "hidden", 2, "(T, H)");
  check_rank(gate_weight, "gate_weight", 3, "(C, E, H)");
  check_rank(cluster_ids, "cluster_ids", 1, "(T,)");
  check_cuda(hidden, "hidden");
  check_same_device(gate_weight, "gate_weight", hidden, "hidden");
  check_same_device(cluster_ids, "cluster_ids", hidden, "hidden");
  const auto dtype = float_dtype(hidden, "hidden");
  TORCH_CHECK_VALUE(gate_weight.scalar_type() == hidden.scalar_type(), "gate_weight has dtype ",
                    gate_weight.scalar_type(), " but hidden has dtype ", hidden.scalar_type());
  const bool ids_int64 = index_is_int64(cluster_ids, "cluster_ids");
  const int64_t T = hidden.size(0), H = hidden.size(1);
  const int64_t C = gate_weight.size(0), E = gate_weight.size(1);
  TORCH_CHECK_VALUE(gate_weight.size(2) == H, "gate_weight must have shape (C, E, H) with H = hidden.shape[1] = ", H,
                    ", got shape ", gate_weight.sizes());
  TORCH_CHECK_VALUE(cluster_ids.size(0) == T, "cluster_ids must have shape (T,) with T = hidden.shape[0] = ", T,
                    ", got shape ", cluster_ids.sizes());
  TORCH_CHECK_VALUE(C >= 1 && E >= 1 && E <= gavamoe::kMaxExperts, "gate_weight must have shape (C, E, H) with C >= 1 "
                    "and 1 <= E <= ", gavamoe::kMaxExperts, ", got shape ", gate_weight.sizes());
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= E && top_k <= gavamoe::kMaxTopK, "top_k must be in [1, min(E, ",
                    gavamoe::kMaxTopK, ")] with E = ", E, ", got ", top_k);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const Tensor x = hidden.contiguous(), w = gate_weight.contiguous(), ids = cluster_ids.contiguous();
  const auto f32 = hidden.options().dtype(at::kFloat);
  Tensor logits = torch::empty({T, E}, f32);
  Tensor weights = torch::empty({T, top_k}, f32);
  Tensor topk_ids = torch::empty({T, top_k}, hidden.options().dtype(at::kLong));
  check_launch(gavamoe::launch_route_fwd(x.data_ptr(), w.data_ptr(), dtype, ids.data_ptr(), ids_int64, T,
                                         static_cast<int>(C), static_cast<int>(E), H, static_cast<int>(top_k),
                                         normalize, logits.data_ptr<float>(), weights.data_ptr<float>(),
                                         topk_ids.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()),
               "route");
  return {weights, topk_ids, logits};
}

std::tuple<Tensor, Tensor, Tensor> routing_metadata(const Tensor& topk_ids, int64_t num_experts) {
  check_cuda(topk_ids, "topk_ids");
  const bool ids_int64 = index_is_int64(topk_ids, "topk_ids");
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= gavamoe::kMaxExperts, "num_experts must be in [1, ",
                    gavamoe::kMaxExperts, "], got ", num_experts);
  const int64_t n = topk_ids.numel();
  TORCH_CHECK_VALUE(n < (int64_t{1} << 31), "topk_ids has ", n, " token-slots, more than the int32 slot index holds");
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const Tensor ids = topk_ids.contiguous();
  const auto i32 = topk_ids.options().dtype(at::kInt);
  Tensor sorted_slots = torch::empty({n}, i32);
  Tensor slot_pos = torch::empty({n}, i32);
  Tensor counts = torch::empty({num_experts}, i32);
  Tensor workspace = torch::empty({gavamoe::routing_metadata_workspace(n, static_cast<int>(num_experts))}, i32);
  check_launch(gavamoe::launch_routing_metadata(ids.data_ptr(), ids_int64, n, static_cast<int>(num_experts),
                                                workspace.data_ptr<int32_t>(), sorted_slots.data_ptr<int32_t>(),
                                                slot_pos.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
                                                c10::cuda::getCurrentCUDAStream()),
               "routing_metadata");
  return {sorted_slots, slot_pos, counts};
}

std::tuple<Tensor, Tensor> gmm_log_prob(const Tensor& z, const Tensor& mu, const Tensor& inv_var,
                                        const Tensor& log_const) {
  check_rank(z, "z", 2, "(N, D)");
  check_rank(mu, "mu", 2, "(K, D)");
  check_rank(inv_var, "inv_var", 2, "(K, D)");
  check_rank(log_const, "log_const", 1, "(K,)");
  check_cuda(z, "z");
  check_same_device(mu, "mu", z, "z");
  check_same_device(inv_var, "inv_var", z, "z");
  check_same_device(log_const, "log_const", z, "z");
  const auto dtype = float_dtype(z, "z");
  const int64_t N = z.size(0), D = z.size(1), K = mu.size(0);
  TORCH_CHECK_VALUE(K >= 1 && D >= 1, "need at least one component and one dimension, got K = ", K, ", D = ", D);
  TORCH_CHECK_VALUE(mu.size(1) == D, "mu must have shape (K, D) with D = z.shape[1] = ", D, ", got shape ", mu.sizes());
  TORCH_CHECK_VALUE(inv_var.sizes() == mu.sizes(), "inv_var must have shape ", mu.sizes(), ", got shape ",
                    inv_var.sizes());
  TORCH_CHECK_VALUE(log_const.size(0) == K, "log_const must have shape (K,) = (", K, ",), got shape ",
                    log_const.sizes());
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{mu, "mu"}, {inv_var, "inv_var"},
                                {log_const, "log_const"}}) {
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, name, " must be float32 (prepared in fp32), got ",
                      t.scalar_type());
  }
  TORCH_CHECK_VALUE(K <= INT32_MAX && D <= INT32_MAX, "K and D must fit in int32");
  const c10::cuda::CUDAGuard guard(z.device());
  const Tensor zc = z.contiguous(), m = mu.contiguous(), iv = inv_var.contiguous(), cst = log_const.contiguous();
  const auto f32 = z.options().dtype(at::kFloat);
  Tensor log_gamma = torch::empty({N, K}, f32);
  Tensor log_norm = torch::empty({N}, f32);
  check_launch(gavamoe::launch_gmm_log_prob_fwd(zc.data_ptr(), dtype, m.data_ptr<float>(), iv.data_ptr<float>(),
                                                cst.data_ptr<float>(), N, static_cast<int>(K), static_cast<int>(D),
                                                log_gamma.data_ptr<float>(), log_norm.data_ptr<float>(),
                                                c10::cuda::getCurrentCUDAStream()),
               "gmm_log_prob");
  return {log_gamma, log_norm};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gavamoe CUDA kernels: cluster-gated router, routing metadata, Gaussian-mixture log-responsibilities";
  m.attr("MAX_EXPERTS") = gavamoe::kMaxExperts;
  m.attr("MAX_TOP_K") = gavamoe::kMaxTopK;
  m.def("route", &route, "(topk_weights [T,k] fp32, topk_ids [T,k] int64, logits [T,E] fp32)", py::arg("hidden"),
        py::arg("gate_weight"), py::arg("cluster_ids"), py::arg("top_k"), py::arg("normalize"));
  m.def("routing_metadata", &routing_metadata, "(sorted_slots [n], slot_pos [n], counts [E]) int32",
        py::arg("topk_ids"), py::arg("num_experts"));
  m.def("gmm_log_prob", &gmm_log_prob, "(log_gamma [N,K] fp32, log_norm [N] fp32)", py::arg("z"), py::arg("mu"),
        py::arg("inv_var"), py::arg("log_const"));
}
