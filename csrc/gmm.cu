// Diagonal Gaussian-mixture log-responsibilities, forward.
//
// Direct form (z - mu)^2 / var accumulated in fp32: no (N, K, D) tensor in memory and no
// cancellation (the expanded z^2/var - 2 z mu/var + mu^2/var form loses the digits at D = 128).
// A block owns a tile of rows and walks the components in tiles, the dimensions in chunks staged
// through shared memory; each thread keeps an RM x RK register tile of Mahalanobis sums. The
// log-sum-exp over components is online across component tiles, reduced over the TC threads that
// share a row (consecutive lanes of one warp), so K is unbounded.
#include <cmath>

#include "common.cuh"
#include "gavamoe_cuda.h"

namespace gavamoe {
namespace {

constexpr int kThreads = 256;

// TR x TC threads; each owns RM rows (ty + TR i) and RK components (tx + TC j) of a
// (TR RM) x (TC RK) tile; DC dimensions per shared-memory chunk.
template <int TC, int RM, int RK, int DC>
struct Tile {
  static constexpr int kTC = TC, kTR = kThreads / TC, kRM = RM, kRK = RK, kDC = DC;
  static constexpr int kRows = kTR * RM;
  static constexpr int kComps = TC * RK;
};

template <typename T, typename Cfg>
__global__ void __launch_bounds__(kThreads) gmm_log_prob_fwd_kernel(
    const T* __restrict__ z,                                // [N, D]
    const float* __restrict__ mu, const float* __restrict__ inv_var,  // [K, D] each
    const float* __restrict__ log_const,                    // log_pi - 0.5 (D log 2pi + sum_d logvar): [K]
    float* __restrict__ log_gamma,                          // out: [N, K]
    float* __restrict__ log_norm,                           // out: [N]
    int64_t N, int K, int D) {
  // log p[n,c] = const[c] - 0.5 * sum_d (z[n,d] - mu[c,d])^2 * inv_var[c,d];
  // log_norm[n] = logsumexp_c log p[n,c];  log_gamma[n,c] = log p[n,c] - log_norm[n].
  // Rows with no finite log p (fp32 overflow of the sums, z near 1e20) are computed again with the
  // differences scaled by 2^-62: log_norm stays -inf and log_gamma = 2^124 (L - max L) with
  // L = 2^-124 log p, the float64 answer cast to fp32. Every log_pi = -inf gives NaN (0/0).
  constexpr int TC = Cfg::kTC, TR = Cfg::kTR, RM = Cfg::kRM, RK = Cfg::kRK, DC = Cfg::kDC;
  constexpr int ROWS = Cfg::kRows, COMPS = Cfg::kComps;
  __shared__ float zs[DC][ROWS + 1];  // [DC, ROWS], padded against bank conflicts on the transposed store
  __shared__ float ms[DC][COMPS + 1];
  __shared__ float vs[DC][COMPS + 1];
  const int tx = threadIdx.x % TC;
  const int ty = threadIdx.x / TC;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const bool one_tile = K <= COMPS;  // log p stays in registers; no second pass over log_gamma

  float acc[RM][RK];  // [RM, RK] Mahalanobis sums, then log p
  // acc = sum_d ((z - mu) * scale)^2 inv_var over the component tile starting at k0
  auto mahalanobis = [&](int k0, float scale) {
#pragma unroll
    for (int i = 0; i < RM; ++i) {
#pragma unroll
      for (int j = 0; j < RK; ++j) acc[i][j] = 0.0f;
    }
    for (int d0 = 0; d0 < D; d0 += DC) {
      __syncthreads();  // the previous chunk has been read by every thread
      for (int idx = threadIdx.x; idx < ROWS * DC; idx += kThreads) {  // consecutive threads along d
        const int r = idx / DC, d = idx % DC;
        const int64_t row = row0 + r;
        zs[d][r] = row < N && d0 + d < D ? detail::to_float(z[row * D + d0 + d]) : 0.0f;
      }
      for (int idx = threadIdx.x; idx < COMPS * DC; idx += kThreads) {
        const int c = idx / DC, d = idx % DC;
        const bool in = k0 + c < K && d0 + d < D;
        const int64_t off = static_cast<int64_t>(k0 + c) * D + d0 + d;
        ms[d][c] = in ? mu[off] : 0.0f;
        vs[d][c] = in ? inv_var[off] : 0.0f;
      }
      __syncthreads();
      const int dn = min(DC, D - d0);
      for (int d = 0; d < dn; ++d) {
        float zr[RM], m[RK], v[RK];
#pragma unroll
        for (int i = 0; i < RM; ++i) zr[i] = zs[d][ty + TR * i];
#pragma unroll
        for (int j = 0; j < RK; ++j) {
          m[j] = ms[d][tx + TC * j];
          v[j] = vs[d][tx + TC * j];
        }
#pragma unroll
        for (int i = 0; i < RM; ++i) {
#pragma unroll
          for (int j = 0; j < RK; ++j) {
            const float diff = (zr[i] - m[j]) * scale;
            acc[i][j] = fmaf(diff * diff, v[j], acc[i][j]);
          }
        }
      }
    }
  };

  // row i of the tile: acc -> const * const_scale - acc / 2 (-inf past K); returns the row's max
  // over the whole component tile (every thread of the row group calls it)
  auto to_log_p = [&](int k0, float const_scale, int i) {
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < RK; ++j) {
      const int c = k0 + tx + TC * j;
      acc[i][j] = c < K ? log_const[c] * const_scale - 0.5f * acc[i][j] : -INFINITY;
      tile_max = fmaxf(tile_max, acc[i][j]);
    }
    return detail::group_max<TC>(tile_max);
  };

  float run_max[RM], run_sum[RM];
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    run_max[i] = -INFINITY;
    run_sum[i] = 0.0f;
  }
  for (int k0 = 0; k0 < K; k0 += COMPS) {
    mahalanobis(k0, 1.0f);
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int64_t row = row0 + ty + TR * i;
      const float new_max = fmaxf(run_max[i], to_log_p(k0, 1.0f, i));
      float tile_sum = 0.0f;
#pragma unroll
      for (int j = 0; j < RK; ++j) {
        // exp(-inf - -inf) would be NaN: an impossible component adds nothing; a NaN still propagates
        tile_sum += acc[i][j] == -INFINITY ? 0.0f : expf(acc[i][j] - new_max);
      }
      tile_sum = detail::group_sum<TC>(tile_sum);
      // nothing finite seen yet: run_sum is 0, or NaN that must survive
      const float rescale = run_max[i] == -INFINITY ? 1.0f : expf(run_max[i] - new_max);
      run_sum[i] = run_sum[i] * rescale + tile_sum;
      run_max[i] = new_max;
      if (!one_tile && row < N) {
#pragma unroll
        for (int j = 0; j < RK; ++j) {
          const int c = k0 + tx + TC * j;
          if (c < K) log_gamma[row * K + c] = acc[i][j];
        }
      }
    }
  }

  // rows with no finite log p: overflowed in fp32 (rescued below) or every log_pi = -inf (NaN)
  bool lost[RM];
  bool any_lost = false;
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int64_t row = row0 + ty + TR * i;
    lost[i] = run_max[i] == -INFINITY && row < N;
    any_lost |= lost[i];
    if (row >= N || lost[i]) continue;
    const float lse = run_max[i] + logf(run_sum[i]);
    if (tx == 0) log_norm[row] = lse;
    if (one_tile) {
#pragma unroll
      for (int j = 0; j < RK; ++j) {
        const int c = tx + TC * j;
        if (c < K) log_gamma[row * K + c] = acc[i][j] - lse;
      }
    } else {
      // the unnormalised log p of this row was written by this same thread above
      for (int k0 = 0; k0 < K; k0 += COMPS) {
#pragma unroll
        for (int j = 0; j < RK; ++j) {
          const int c = k0 + tx + TC * j;
          if (c < K) log_gamma[row * K + c] -= lse;
        }
      }
    }
  }
  if (!__syncthreads_or(any_lost)) return;

  // the rescue pass: L = 2^-124 log p from sums scaled by 2^-124, then 2^124 (L - max L)
  float lost_max[RM];
#pragma unroll
  for (int i = 0; i < RM; ++i) lost_max[i] = -INFINITY;
  for (int k0 = 0; k0 < K; k0 += COMPS) {
    mahalanobis(k0, 0x1p-62f);
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int64_t row = row0 + ty + TR * i;
      lost_max[i] = fmaxf(lost_max[i], to_log_p(k0, 0x1p-124f, i));
      if (!lost[i]) continue;
#pragma unroll
      for (int j = 0; j < RK; ++j) {
        const int c = k0 + tx + TC * j;
        if (c < K) log_gamma[row * K + c] = acc[i][j];
      }
    }
  }
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int64_t row = row0 + ty + TR * i;
    if (!lost[i]) continue;
    if (tx == 0) log_norm[row] = -INFINITY;
    for (int k0 = 0; k0 < K; k0 += COMPS) {
#pragma unroll
      for (int j = 0; j < RK; ++j) {
        const int c = k0 + tx + TC * j;
        // 2^124 back in two finite steps (2^128 is not an fp32 number): 0 stays 0, the rest -> -inf
        if (c < K) log_gamma[row * K + c] = (log_gamma[row * K + c] - lost_max[i]) * 0x1p62f * 0x1p62f;
      }
    }
  }
}

template <typename T, typename Cfg>
cudaError_t launch_tile(const void* z, const float* mu, const float* inv_var, const float* log_const, int64_t N, int K,
                        int D, float* log_gamma, float* log_norm, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(detail::ceil_div(N, Cfg::kRows)));
  gmm_log_prob_fwd_kernel<T, Cfg><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(z), mu, inv_var, log_const,
                                                                 log_gamma, log_norm, N, K, D);
  return cudaGetLastError();
}

// Few components: more rows per block so every thread still holds a 4 x 4 (or 2 x 4) tile.
template <typename T>
cudaError_t launch_typed(const void* z, const float* mu, const float* inv_var, const float* log_const, int64_t N,
                         int K, int D, float* log_gamma, float* log_norm, cudaStream_t stream) {
  if (K <= 4) return launch_tile<T, Tile<1, 2, 4, 16>>(z, mu, inv_var, log_const, N, K, D, log_gamma, log_norm, stream);
  if (K <= 8) return launch_tile<T, Tile<2, 4, 4, 16>>(z, mu, inv_var, log_const, N, K, D, log_gamma, log_norm, stream);
  if (K <= 16) return launch_tile<T, Tile<4, 4, 4, 32>>(z, mu, inv_var, log_const, N, K, D, log_gamma, log_norm, stream);
  if (K <= 32) return launch_tile<T, Tile<8, 4, 4, 32>>(z, mu, inv_var, log_const, N, K, D, log_gamma, log_norm, stream);
  return launch_tile<T, Tile<16, 4, 4, 32>>(z, mu, inv_var, log_const, N, K, D, log_gamma, log_norm, stream);
}

}  // namespace

cudaError_t launch_gmm_log_prob_fwd(const void* z, DType dtype, const float* mu, const float* inv_var,
                                    const float* log_const, int64_t num_rows, int num_components, int dim,
                                    float* log_gamma, float* log_norm, cudaStream_t stream) {
  if (num_components < 1 || dim < 1) return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed<float>(z, mu, inv_var, log_const, num_rows, num_components, dim, log_gamma, log_norm,
                                 stream);
    case DType::kFloat16:
      return launch_typed<__half>(z, mu, inv_var, log_const, num_rows, num_components, dim, log_gamma, log_norm,
                                  stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(z, mu, inv_var, log_const, num_rows, num_components, dim, log_gamma,
                                         log_norm, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gavamoe
