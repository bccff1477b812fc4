// Launchers of the CUDA kernels, callable without ATen: raw device pointers, sizes and a stream.
// The kernels (router.cu, gmm.cu) include only this header and CUDA's own, so `make cuda-check`
// compiles them with nvcc alone; bindings.cpp is the only file that sees torch.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace gavamoe {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The router keeps a token's E logits and its k picks in registers: one warp per token,
// up to kMaxExperts / 32 logits per lane.
constexpr int kMaxExperts = 256;
constexpr int kMaxTopK = 8;

// logits [T, E] fp32; topk_weights [T, k] fp32; topk_ids [T, k] int64.
// hidden [T, H] and gate_weight [C, E, H] contiguous, in `dtype`; cluster_ids [T] int32 or int64.
// A cluster id outside [0, C) gives that token NaN logits and weights (no out-of-bounds read).
cudaError_t launch_route_fwd(const void* hidden, const void* gate_weight, DType dtype,
                             const void* cluster_ids, bool ids_int64,
                             int64_t num_tokens, int num_clusters, int num_experts, int64_t hidden_size,
                             int top_k, bool normalize,
                             float* logits, float* topk_weights, int64_t* topk_ids, cudaStream_t stream);

// int32 elements of scratch that launch_routing_metadata needs for n token-slots and E experts.
int64_t routing_metadata_workspace(int64_t num_slots, int num_experts);

// Stable counting sort of the n = T * k token-slots by expert, three launches, no host sync:
// sorted_slots [n], slot_pos [n] (its inverse), counts [E]; all int32. topk_ids holds the
// expert of each slot (int32 or int64) in [0, E); E <= kMaxExperts.
cudaError_t launch_routing_metadata(const void* topk_ids, bool ids_int64, int64_t num_slots, int num_experts,
                                    int32_t* workspace, int32_t* sorted_slots, int32_t* slot_pos,
                                    int32_t* counts, cudaStream_t stream);

// log_gamma [N, K] and log_norm [N] fp32 from z [N, D] (contiguous, in `dtype`) and the
// prepared fp32 parameters: mu [K, D], inv_var = exp(-logvar) [K, D],
// log_const = log_pi - 0.5 (D log 2pi + sum_d logvar) [K].
cudaError_t launch_gmm_log_prob_fwd(const void* z, DType dtype, const float* mu, const float* inv_var,
                                    const float* log_const, int64_t num_rows, int num_components, int dim,
                                    float* log_gamma, float* log_norm, cudaStream_t stream);

}  // namespace gavamoe
