// Cluster-gated top-k router and the routing metadata the grouped GEMMs consume.
//
// Router: one warp per token. The warp reads the gate of the token's own cluster (no per-token
// copy of the gate), accumulates the E logits in fp32 with 16-byte loads, then softmax, top-k
// (ties to the lower expert id) and renormalisation in registers.
// Metadata: a stable counting sort of the token-slots by expert in three launches with no
// atomics on global memory and no host sync: per-block histograms, a per-expert prefix over
// blocks, then each slot's rank inside its block (warp match + popcount) and the scatter.
#include <cmath>

#include "common.cuh"
#include "gavamoe_cuda.h"

namespace gavamoe {
namespace {

using detail::kFullMask;
using detail::kWarp;

constexpr int kTokensPerBlock = 8;                     // one warp each
constexpr int kLogitsPerLane = kMaxExperts / kWarp;    // expert e lives in lane e % 32, slot e / 32
constexpr int kSlotBlock = 256;                        // token-slots per block = threads per block

// Selection keys: a NaN probability still lets the row pick k distinct experts (lowest ids);
// experts past E rank below every real one, experts already picked below those.
constexpr float kKeyNaN = -1.0f;
constexpr float kKeyPadding = -2.0f;
constexpr float kKeyPicked = -3.0f;

// The better of two candidates: larger key, then lower expert id.
__device__ __forceinline__ bool better(float key_a, int id_a, float key_b, int id_b) {
  return key_a > key_b || (key_a == key_b && id_a < id_b);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kTokensPerBlock * kWarp) route_fwd_kernel(
    const T* __restrict__ x,                            // hidden: [T, H]
    const T* __restrict__ w,                            // gate_weight: [C, E, H]
    const void* __restrict__ cluster_ids, bool ids_int64,  // [T]
    float* __restrict__ logits,                         // out: [T, E]
    float* __restrict__ topk_w, int64_t* __restrict__ topk_i,  // out: [T, K]
    int64_t num_tokens, int C, int E, int64_t H, int K, bool normalize) {
  // logits[t,e] = sum_h W[c_t,e,h] x[t,h];  p = softmax(logits[t]);  ids = top-k of p (ties: lower e);
  // w = p[ids] (/ sum w if normalize).  One warp = one token, all E experts.
  const int lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + threadIdx.x / kWarp;
  if (t >= num_tokens) return;  // whole warps leave together
  const int64_t c = detail::load_index(cluster_ids, ids_int64, t);
  const bool valid = c >= 0 && c < C;
  const T* xt = x + t * H;
  const T* wc = w + (valid ? c : 0) * static_cast<int64_t>(E) * H;

  float logit[kLogitsPerLane];  // [E / 32] per lane
#pragma unroll
  for (int j = 0; j < kLogitsPerLane; ++j) {
    logit[j] = -INFINITY;
    for (int el = 0; el < kWarp; ++el) {
      const int e = j * kWarp + el;
      if (e >= E) break;  // uniform over the warp
      const T* we = wc + static_cast<int64_t>(e) * H;
      float acc = 0.0f;
      for (int64_t h = static_cast<int64_t>(lane) * VEC; h < H; h += kWarp * VEC) {
        float xv[VEC], wv[VEC];
        detail::load_as_float<T, VEC>(xt + h, xv);
        detail::load_as_float<T, VEC>(we + h, wv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc = fmaf(xv[v], wv[v], acc);
      }
      acc = detail::group_sum(acc);
      if (lane == el) logit[j] = valid ? acc : NAN;
    }
  }

  float row_max = -INFINITY;
#pragma unroll
  for (int j = 0; j < kLogitsPerLane; ++j) {
    const int e = j * kWarp + lane;
    if (e < E) {
      logits[t * E + e] = logit[j];
      row_max = fmaxf(row_max, logit[j]);
    }
  }
  row_max = detail::group_max(row_max);
  float prob[kLogitsPerLane];
  float row_sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kLogitsPerLane; ++j) {
    prob[j] = j * kWarp + lane < E ? expf(logit[j] - row_max) : 0.0f;
    row_sum += prob[j];
  }
  row_sum = detail::group_sum(row_sum);  // NaN when any logit is NaN: the whole row becomes NaN
  float key[kLogitsPerLane];
#pragma unroll
  for (int j = 0; j < kLogitsPerLane; ++j) {
    prob[j] /= row_sum;
    key[j] = j * kWarp + lane < E ? (prob[j] == prob[j] ? prob[j] : kKeyNaN) : kKeyPadding;
  }

  float pick_w[kMaxTopK];
  int pick_i[kMaxTopK];
  float picked_sum = 0.0f;
#pragma unroll
  for (int r = 0; r < kMaxTopK; ++r) {
    if (r >= K) break;
    // this lane's best, then the warp's best (key, id, prob) by butterfly exchange
    float best_key = key[0], best_p = prob[0];
    int best_id = lane;
#pragma unroll
    for (int j = 1; j < kLogitsPerLane; ++j) {
      if (better(key[j], j * kWarp + lane, best_key, best_id)) {
        best_key = key[j];
        best_id = j * kWarp + lane;
        best_p = prob[j];
      }
    }
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const float other_key = __shfl_xor_sync(kFullMask, best_key, offset);
      const int other_id = __shfl_xor_sync(kFullMask, best_id, offset);
      const float other_p = __shfl_xor_sync(kFullMask, best_p, offset);
      if (better(other_key, other_id, best_key, best_id)) {
        best_key = other_key;
        best_id = other_id;
        best_p = other_p;
      }
    }
#pragma unroll
    for (int j = 0; j < kLogitsPerLane; ++j) {
      if (j * kWarp + lane == best_id) key[j] = kKeyPicked;
    }
    pick_w[r] = best_p;
    pick_i[r] = best_id;
    picked_sum += best_p;
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kMaxTopK; ++r) {
      if (r >= K) break;
      topk_w[t * K + r] = normalize ? pick_w[r] / picked_sum : pick_w[r];
      topk_i[t * K + r] = pick_i[r];
    }
  }
}

template <typename T>
cudaError_t route_fwd_typed(const void* hidden, const void* gate_weight, const void* cluster_ids, bool ids_int64,
                            int64_t num_tokens, int C, int E, int64_t H, int K, bool normalize, float* logits,
                            float* topk_w, int64_t* topk_i, cudaStream_t stream) {
  const T* x = static_cast<const T*>(hidden);
  const T* w = static_cast<const T*>(gate_weight);
  const dim3 grid(static_cast<unsigned>(detail::ceil_div(num_tokens, kTokensPerBlock)));
  const dim3 block(kTokensPerBlock * kWarp);
  constexpr int kVec = 16 / sizeof(T);  // one 16-byte load per lane
  if (H % kVec == 0 && detail::aligned16(x) && detail::aligned16(w)) {
    route_fwd_kernel<T, kVec><<<grid, block, 0, stream>>>(x, w, cluster_ids, ids_int64, logits, topk_w, topk_i,
                                                           num_tokens, C, E, H, K, normalize);
  } else {
    route_fwd_kernel<T, 1><<<grid, block, 0, stream>>>(x, w, cluster_ids, ids_int64, logits, topk_w, topk_i,
                                                       num_tokens, C, E, H, K, normalize);
  }
  return cudaGetLastError();
}

__global__ void __launch_bounds__(kSlotBlock) slot_block_hist_kernel(
    const void* __restrict__ ids, bool ids_int64,  // expert of each slot: [n]
    int32_t* __restrict__ block_counts,             // out: [NB, E]
    int64_t n, int E) {
  // block_counts[b, e] = #{s in block b : ids[s] = e}
  __shared__ int32_t hist[kMaxExperts];
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kSlotBlock + threadIdx.x;
  if (s < n) {
    const int64_t e = detail::load_index(ids, ids_int64, s);
    if (e >= 0 && e < E) atomicAdd(&hist[e], 1);  // shared-memory counts: order-free, exact
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) block_counts[static_cast<int64_t>(blockIdx.x) * E + e] = hist[e];
}

__global__ void __launch_bounds__(kSlotBlock) slot_block_prefix_kernel(
    const int32_t* __restrict__ block_counts,  // [NB, E]
    int32_t* __restrict__ block_offsets,       // out: [NB, E], exclusive prefix over blocks
    int32_t* __restrict__ counts,              // out: [E]
    int64_t num_blocks, int E) {
  // block_offsets[b, e] = sum_{b' < b} block_counts[b', e];  counts[e] = total.  Grid: (E,).
  const int e = blockIdx.x;
  int running = 0;
  for (int64_t b0 = 0; b0 < num_blocks; b0 += kSlotBlock) {
    const int64_t b = b0 + threadIdx.x;
    const int value = b < num_blocks ? block_counts[b * E + e] : 0;
    int total;
    const int before = detail::block_exclusive_scan<kSlotBlock>(value, &total);
    if (b < num_blocks) block_offsets[b * E + e] = running + before;
    running += total;
  }
  if (threadIdx.x == 0) counts[e] = running;
}

__global__ void __launch_bounds__(kSlotBlock) slot_scatter_kernel(
    const void* __restrict__ ids, bool ids_int64,                                   // [n]
    const int32_t* __restrict__ block_offsets, const int32_t* __restrict__ counts,  // [NB, E], [E]
    int32_t* __restrict__ sorted_slots, int32_t* __restrict__ slot_pos,             // out: [n] each
    int64_t n, int E) {
  // pos(s) = start[e_s] + block_offsets[b, e_s] + #{s' < s in block b : e_s' = e_s};
  // sorted_slots[pos(s)] = s;  slot_pos[s] = pos(s).  Stable: equal experts keep slot order.
  constexpr int kWarps = kSlotBlock / kWarp;
  __shared__ int32_t start[kMaxExperts];
  __shared__ int32_t warp_counts[kWarps][kMaxExperts];  // slots of expert e in each warp
  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  int total;
  const int before = detail::block_exclusive_scan<kSlotBlock>(tid < E ? counts[tid] : 0, &total);
  if (tid < E) start[tid] = before;
  for (int i = tid; i < kWarps * kMaxExperts; i += kSlotBlock) (&warp_counts[0][0])[i] = 0;
  __syncthreads();

  const int64_t s = static_cast<int64_t>(blockIdx.x) * kSlotBlock + tid;
  const int64_t e64 = s < n ? detail::load_index(ids, ids_int64, s) : -1;
  const bool ok = e64 >= 0 && e64 < E;
  const int e = ok ? static_cast<int>(e64) : -1;
  const unsigned peers = __match_any_sync(kFullMask, e);  // lanes of this warp with the same expert
  const unsigned lower = peers & ((1u << lane) - 1u);
  if (ok && lower == 0) warp_counts[warp][e] = __popc(peers);
  __syncthreads();
  if (ok) {
    int rank = __popc(lower);
    for (int w = 0; w < warp; ++w) rank += warp_counts[w][e];
    const int pos = start[e] + block_offsets[static_cast<int64_t>(blockIdx.x) * E + e] + rank;
    sorted_slots[pos] = static_cast<int32_t>(s);
    slot_pos[s] = pos;
  }
}

}  // namespace

cudaError_t launch_route_fwd(const void* hidden, const void* gate_weight, DType dtype, const void* cluster_ids,
                             bool ids_int64, int64_t num_tokens, int num_clusters, int num_experts,
                             int64_t hidden_size, int top_k, bool normalize, float* logits, float* topk_weights,
                             int64_t* topk_ids, cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kMaxExperts || top_k < 1 || top_k > kMaxTopK || top_k > num_experts) {
    return cudaErrorInvalidValue;
  }
  if (num_tokens == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return route_fwd_typed<float>(hidden, gate_weight, cluster_ids, ids_int64, num_tokens, num_clusters,
                                    num_experts, hidden_size, top_k, normalize, logits, topk_weights, topk_ids,
                                    stream);
    case DType::kFloat16:
      return route_fwd_typed<__half>(hidden, gate_weight, cluster_ids, ids_int64, num_tokens, num_clusters,
                                     num_experts, hidden_size, top_k, normalize, logits, topk_weights, topk_ids,
                                     stream);
    case DType::kBFloat16:
      return route_fwd_typed<__nv_bfloat16>(hidden, gate_weight, cluster_ids, ids_int64, num_tokens, num_clusters,
                                            num_experts, hidden_size, top_k, normalize, logits, topk_weights,
                                            topk_ids, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t routing_metadata_workspace(int64_t num_slots, int num_experts) {
  return 2 * detail::ceil_div(num_slots, kSlotBlock) * num_experts;
}

cudaError_t launch_routing_metadata(const void* topk_ids, bool ids_int64, int64_t num_slots, int num_experts,
                                    int32_t* workspace, int32_t* sorted_slots, int32_t* slot_pos, int32_t* counts,
                                    cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kMaxExperts) return cudaErrorInvalidValue;
  if (num_slots == 0) return cudaMemsetAsync(counts, 0, sizeof(int32_t) * num_experts, stream);
  const int64_t num_blocks = detail::ceil_div(num_slots, kSlotBlock);
  int32_t* block_counts = workspace;                              // [NB, E]
  int32_t* block_offsets = workspace + num_blocks * num_experts;  // [NB, E]
  const dim3 grid(static_cast<unsigned>(num_blocks));
  slot_block_hist_kernel<<<grid, kSlotBlock, 0, stream>>>(topk_ids, ids_int64, block_counts, num_slots,
                                                          num_experts);
  slot_block_prefix_kernel<<<num_experts, kSlotBlock, 0, stream>>>(block_counts, block_offsets, counts, num_blocks,
                                                                   num_experts);
  slot_scatter_kernel<<<grid, kSlotBlock, 0, stream>>>(topk_ids, ids_int64, block_offsets, counts, sorted_slots,
                                                       slot_pos, num_slots, num_experts);
  return cudaGetLastError();
}

}  // namespace gavamoe
