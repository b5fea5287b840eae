// CUDA kernels of the fastblock extension (see fastblock.h for what each computes) and the CUDA registration.
//
// fp32 accumulation for fp16/bf16/fp32 data, fp64 for fp64. Reductions are deterministic: every partial is owned by
// one block (or warp) that reduces in a fixed order (per-thread strided partials, then a fixed shared-memory tree or
// shuffle order), and partials are combined in a fixed order; split counts depend on the shape only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fastblock.h"

namespace fastblock {
namespace {

#define FASTBLOCK_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n, int threads = kThreads) {
  return std::min<int64_t>((n + threads - 1) / threads, int64_t(1) << 16);
}

// Fixed-order block sum of one value per thread (blockDim.x == kThreads).
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int offset = kThreads / 2; offset > 0; offset >>= 1) {
    if (threadIdx.x < offset) shared[threadIdx.x] += shared[threadIdx.x + offset];
    __syncthreads();
  }
  acc_t total = shared[0];
  __syncthreads();
  return total;
}

template <typename data_t, typename acc_t>
__global__ void mix_kernel(const acc_t* __restrict__ gates, const data_t* __restrict__ w,
                           const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, data_t* __restrict__ out,
                           int64_t s, int64_t k, int64_t f, int64_t inner) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < s * f; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / f, j = i - n * f;
    acc_t v = 0;
    for (int64_t kk = 0; kk < k; ++kk) v += gates[n * k + kk] * static_cast<acc_t>(w[kk * f + j]);
    if (scale) v *= scale[j / inner];
    if (shift) v += shift[j / inner];
    out[i] = static_cast<data_t>(v);
  }
}

// Per-channel reductions over N*H*W are split over the GPU: a (channel, split) grid of blocks, each reducing a fixed
// range of the channel's elements, then one finalize per channel adding the splits in order. The split count
// depends on the shape only (deterministic results), enough to give a 100+ SM GPU a few blocks each even for 64
// channels.
constexpr int64_t kElemsPerSplit = int64_t(kThreads) * 16;
constexpr int64_t kMaxSplits = 64;

int64_t splits_for(int64_t count) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxSplits, (count + kElemsPerSplit - 1) / kElemsPerSplit));
}

// The element range [lo, hi) of split `split` of `splits` over `count` elements.
__device__ inline void split_range(int64_t count, int64_t splits, int64_t split, int64_t& lo, int64_t& hi) {
  const int64_t per = (count + splits - 1) / splits;
  lo = split * per;
  hi = lo + per < count ? lo + per : count;
}

// Stage 1 of the batch statistics: per (channel, split) the element count, mean and sum of squared deviations of
// its range (two passes over the range: no cancellation).
template <typename data_t, typename acc_t>
__global__ void bn_stats_partial_kernel(const data_t* __restrict__ z, acc_t* __restrict__ part_mean,
                                        acc_t* __restrict__ part_m2, int64_t n, int64_t c, int64_t hw,
                                        int64_t splits) {
  __shared__ acc_t shared[kThreads];
  const int64_t ch = blockIdx.x, split = blockIdx.y;
  int64_t lo, hi;
  split_range(n * hw, splits, split, lo, hi);
  acc_t sum = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const int64_t s = i / hw, j = i - s * hw;
    sum += static_cast<acc_t>(z[(s * c + ch) * hw + j]);
  }
  const int64_t len = hi > lo ? hi - lo : 0;
  const acc_t mu = len ? block_sum(sum, shared) / acc_t(len) : acc_t(0);
  acc_t m2 = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const int64_t s = i / hw, j = i - s * hw;
    const acc_t d = static_cast<acc_t>(z[(s * c + ch) * hw + j]) - mu;
    m2 += d * d;
  }
  m2 = len ? block_sum(m2, shared) : acc_t(0);
  if (threadIdx.x == 0) {
    part_mean[ch * splits + split] = mu;
    part_m2[ch * splits + split] = m2;
  }
}

// Stage 2, one thread per channel: the splits merged in order (Chan et al.'s pairwise update), then finalize and
// the running-statistics update.
template <typename acc_t, typename stat_t>
__global__ void bn_stats_finalize_kernel(const acc_t* __restrict__ part_mean, const acc_t* __restrict__ part_m2,
                                         acc_t* __restrict__ mean, acc_t* __restrict__ invstd,
                                         stat_t* __restrict__ running_mean, stat_t* __restrict__ running_var,
                                         int64_t c, int64_t count, int64_t splits, acc_t momentum, acc_t eps) {
  const int64_t ch = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (ch >= c) return;
  acc_t mu = 0, m2 = 0, seen = 0;
  for (int64_t split = 0; split < splits; ++split) {
    int64_t lo, hi;
    split_range(count, splits, split, lo, hi);
    if (hi <= lo) continue;
    const acc_t len = acc_t(hi - lo), total = seen + len;
    const acc_t delta = part_mean[ch * splits + split] - mu;
    mu += delta * (len / total);
    m2 += part_m2[ch * splits + split] + delta * delta * (seen * len / total);
    seen = total;
  }
  mean[ch] = mu;
  invstd[ch] = acc_t(1) / sqrt(m2 / acc_t(count) + eps);
  if (running_mean) {
    const acc_t unbiased = m2 / acc_t(count - 1);
    running_mean[ch] = static_cast<stat_t>((acc_t(1) - momentum) * static_cast<acc_t>(running_mean[ch]) + momentum * mu);
    running_var[ch] = static_cast<stat_t>((acc_t(1) - momentum) * static_cast<acc_t>(running_var[ch]) + momentum * unbiased);
  }
}

// The activation after BatchNorm on u = xhat * gamma + beta, and its backward grad(u, dy) = dy * act'(u); the
// kernels take one as a template argument (with_activation picks it, as on CPU).
struct ReluAct {
  template <typename T>
  __device__ static T one(T u) {
    return u < T(0) ? T(0) : u;  // NaN propagates, as in torch.relu
  }
  template <typename T>
  __device__ static T grad(T u, T dy) {
    return u <= T(0) ? T(0) : dy;  // torch's ReLU mask is "not <= 0": a NaN passes the gradient
  }
};

// GELU(u) = u * Phi(u), exact (erf) as F.gelu's default; its derivative Phi(u) + u * phi(u) as torch writes it.
struct GeluAct {
  template <typename T>
  __device__ static T one(T u) {
    return u * T(0.5) * (T(1) + erf(u * T(kSqrtHalf)));
  }
  template <typename T>
  __device__ static T grad(T u, T dy) {
    const T cdf = T(0.5) * (T(1) + erf(u * T(kSqrtHalf)));
    const T pdf = exp(T(-0.5) * u * u) * T(kInvSqrt2Pi);
    return dy * (cdf + u * pdf);
  }
};

template <typename Act, typename data_t, typename acc_t>
__global__ void bn_act_apply_kernel(const data_t* __restrict__ z, const acc_t* __restrict__ mean,
                                     const acc_t* __restrict__ invstd, const acc_t* __restrict__ gamma,
                                     const acc_t* __restrict__ beta, data_t* __restrict__ y, int64_t numel, int64_t c,
                                     int64_t hw) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ch = (i / hw) % c;
    const acc_t scale = invstd[ch] * gamma[ch];
    const acc_t v = static_cast<acc_t>(z[i]) * scale + (beta[ch] - mean[ch] * scale);
    y[i] = static_cast<data_t>(Act::one(v));
  }
}

// Stage 1 of the backward reductions, per (channel, split): sums of g and g * xhat over the split's range.
template <typename Act, typename data_t, typename acc_t>
__global__ void bn_act_bwd_reduce_kernel(const data_t* __restrict__ dy, const data_t* __restrict__ z,
                                          const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                          const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                                          acc_t* __restrict__ part_g, acc_t* __restrict__ part_gx, int64_t n, int64_t c,
                                          int64_t hw, int64_t splits) {
  __shared__ acc_t shared[kThreads];
  const int64_t ch = blockIdx.x, split = blockIdx.y;
  int64_t lo, hi;
  split_range(n * hw, splits, split, lo, hi);
  acc_t s1 = 0, s2 = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const int64_t s = i / hw, j = i - s * hw;
    const int64_t idx = (s * c + ch) * hw + j;
    const acc_t xhat = (static_cast<acc_t>(z[idx]) - mean[ch]) * invstd[ch];
    const acc_t g = Act::grad(xhat * gamma[ch] + beta[ch], static_cast<acc_t>(dy[idx]));
    s1 += g;
    s2 += g * xhat;
  }
  s1 = block_sum(s1, shared);
  s2 = block_sum(s2, shared);
  if (threadIdx.x == 0) {
    part_g[ch * splits + split] = s1;
    part_gx[ch * splits + split] = s2;
  }
}

// Stage 2, one thread per channel: the splits added in order.
template <typename acc_t>
__global__ void sum_splits_kernel(const acc_t* __restrict__ part_g, const acc_t* __restrict__ part_gx,
                                  acc_t* __restrict__ sum_g, acc_t* __restrict__ sum_gx, int64_t c, int64_t splits) {
  const int64_t ch = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (ch >= c) return;
  acc_t s1 = 0, s2 = 0;
  for (int64_t split = 0; split < splits; ++split) {
    s1 += part_g[ch * splits + split];
    s2 += part_gx[ch * splits + split];
  }
  sum_g[ch] = s1;
  sum_gx[ch] = s2;
}

// One warp per (n, c) plane (kThreads / 32 planes per block): dz and the plane's sum, reduced across the warp in a
// fixed shuffle order. (A block per plane left most threads idle on small maps: 16 of 256 busy at 4x4.)
constexpr int kWarp = 32;

template <typename Act, typename data_t, typename acc_t>
__global__ void bn_act_bwd_dz_kernel(const data_t* __restrict__ dy, const data_t* __restrict__ z,
                                      const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                      const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                                      const acc_t* __restrict__ sum_g, const acc_t* __restrict__ sum_gx,
                                      bool batch_stats, acc_t inv_count, data_t* __restrict__ dz,
                                      acc_t* __restrict__ dz_sum, int64_t planes, int64_t c, int64_t hw) {
  const int64_t plane = blockIdx.x * int64_t(kThreads / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (plane >= planes) return;  // a whole warp leaves together: the shuffles below stay full-warp
  const int64_t ch = plane % c;
  const acc_t k_scale = gamma[ch] * invstd[ch];
  const acc_t mean_g = batch_stats ? sum_g[ch] * inv_count : acc_t(0);
  const acc_t mean_gx = batch_stats ? sum_gx[ch] * inv_count : acc_t(0);
  acc_t total = 0;
  for (int64_t j = lane; j < hw; j += kWarp) {
    const int64_t idx = plane * hw + j;
    const acc_t xhat = (static_cast<acc_t>(z[idx]) - mean[ch]) * invstd[ch];
    const acc_t g = Act::grad(xhat * gamma[ch] + beta[ch], static_cast<acc_t>(dy[idx]));
    // eval mode: no 0 * xhat term (a NaN z must not reach dz through it)
    const data_t v = static_cast<data_t>(batch_stats ? k_scale * (g - mean_g - xhat * mean_gx) : k_scale * g);
    dz[idx] = v;
    total += static_cast<acc_t>(v);
  }
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) total += __shfl_down_sync(0xffffffffu, total, offset);
  if (lane == 0) dz_sum[plane] = total;
}

// dw[k, f] += sum_n a[n, k] g[n, f]: one thread per column f, K accumulators in registers.
template <typename data_t, typename acc_t>
__global__ void fold_dw_kernel(const acc_t* __restrict__ gates, const data_t* __restrict__ g, acc_t* __restrict__ dw,
                               int64_t s, int64_t k, int64_t f) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < f; j += int64_t(gridDim.x) * blockDim.x) {
    acc_t acc[kMaxConvs];
    for (int kk = 0; kk < kMaxConvs; ++kk) acc[kk] = 0;
    for (int64_t n = 0; n < s; ++n) {
      const acc_t gv = static_cast<acc_t>(g[n * f + j]);
      for (int64_t kk = 0; kk < k; ++kk) acc[kk] += gates[n * k + kk] * gv;
    }
    for (int64_t kk = 0; kk < k; ++kk) dw[kk * f + j] += acc[kk];
  }
}

// dgates[n, k] = sum_f w[k, f] g[n, f]: one block per sample.
template <typename data_t, typename acc_t>
__global__ void fold_da_kernel(const data_t* __restrict__ g, const data_t* __restrict__ w, acc_t* __restrict__ da,
                               int64_t da_row, int64_t k, int64_t f) {
  __shared__ acc_t shared[kThreads];
  const int64_t n = blockIdx.x;
  acc_t acc[kMaxConvs];
  for (int kk = 0; kk < kMaxConvs; ++kk) acc[kk] = 0;
  for (int64_t j = threadIdx.x; j < f; j += kThreads) {
    const acc_t gv = static_cast<acc_t>(g[n * f + j]);
    for (int64_t kk = 0; kk < k; ++kk) acc[kk] += static_cast<acc_t>(w[kk * f + j]) * gv;
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    const acc_t total = block_sum(acc[kk], shared);
    if (threadIdx.x == 0) da[n * da_row + kk] = total;
  }
}

template <typename data_t, typename acc_t>
__global__ void expand_gated_kernel(const data_t* __restrict__ x, const acc_t* __restrict__ gates,
                                    data_t* __restrict__ out, int64_t n, int64_t k, int64_t len) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n * k * len;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / len, j = i - t * len, s = t / k;
    out[i] = static_cast<data_t>(gates[t] * static_cast<acc_t>(x[s * len + j]));
  }
}

// One block per sample: dx row and the K gate gradients.
template <typename data_t, typename acc_t>
__global__ void reduce_gated_kernel(const data_t* __restrict__ x, const data_t* __restrict__ g,
                                    const acc_t* __restrict__ gates, data_t* __restrict__ dx,
                                    acc_t* __restrict__ dgates, int64_t k, int64_t len) {
  __shared__ acc_t shared[kThreads];
  const int64_t s = blockIdx.x;
  acc_t acc[kMaxConvs];
  for (int kk = 0; kk < kMaxConvs; ++kk) acc[kk] = 0;
  for (int64_t j = threadIdx.x; j < len; j += kThreads) {
    const acc_t xv = static_cast<acc_t>(x[s * len + j]);
    acc_t d = 0;
    for (int64_t kk = 0; kk < k; ++kk) {
      const acc_t gv = static_cast<acc_t>(g[(s * k + kk) * len + j]);
      d += gates[s * k + kk] * gv;
      acc[kk] += gv * xv;
    }
    dx[s * len + j] = static_cast<data_t>(d);
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    const acc_t total = block_sum(acc[kk], shared);
    if (threadIdx.x == 0) dgates[s * k + kk] = total;
  }
}

template <typename T>
const T* opt_ptr(const at::Tensor* t) {
  return t ? t->data_ptr<T>() : nullptr;
}

void mix_cuda(const at::Tensor& gates, const at::Tensor& w, const at::Tensor* scale, const at::Tensor* shift,
              int64_t inner, at::Tensor& out) {
  const int64_t s = gates.size(0), k = gates.size(1), f = w.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  FASTBLOCK_DISPATCH(w.scalar_type(), "fastblock_mix_cuda", [&] {
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    mix_kernel<data_t, acc_t><<<blocks_for(s * f), kThreads, 0, stream>>>(
        gates.data_ptr<acc_t>(), w.data_ptr<data_t>(), opt_ptr<acc_t>(scale), opt_ptr<acc_t>(shift),
        out.data_ptr<data_t>(), s, k, f, inner);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void bn_stats_cuda(const at::Tensor& z, at::Tensor& mean, at::Tensor& invstd, at::Tensor* running_mean,
                   at::Tensor* running_var, double momentum, double eps) {
  const int64_t n = z.size(0), c = z.size(1), hw = z.size(2) * z.size(3), splits = splits_for(n * hw);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto part_mean = at::empty({c, splits}, mean.options()), part_m2 = at::empty({c, splits}, mean.options());
  FASTBLOCK_DISPATCH(z.scalar_type(), "fastblock_bn_stats_cuda", [&] {
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    bn_stats_partial_kernel<data_t, acc_t><<<dim3(c, splits), kThreads, 0, stream>>>(
        z.data_ptr<data_t>(), part_mean.data_ptr<acc_t>(), part_m2.data_ptr<acc_t>(), n, c, hw, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto stat_type = running_mean ? running_mean->scalar_type() : mean.scalar_type();
    FASTBLOCK_DISPATCH(stat_type, "fastblock_bn_stats_cuda_running", [&] {
      using stat_t = scalar_t;
      bn_stats_finalize_kernel<acc_t, stat_t><<<blocks_for(c), kThreads, 0, stream>>>(
          part_mean.data_ptr<acc_t>(), part_m2.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
          running_mean ? running_mean->data_ptr<stat_t>() : nullptr,
          running_var ? running_var->data_ptr<stat_t>() : nullptr, c, n * hw, splits, acc_t(momentum), acc_t(eps));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void bn_act_apply_cuda(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
                       const at::Tensor& gamma, const at::Tensor& beta, int64_t activation, at::Tensor& y) {
  const int64_t c = z.size(1), hw = z.size(2) * z.size(3);
  auto stream = c10::cuda::getCurrentCUDAStream();
  with_activation<ReluAct, GeluAct>(activation, [&](auto act) {
    using Act = decltype(act);
    FASTBLOCK_DISPATCH(z.scalar_type(), "fastblock_bn_apply_cuda", [&] {
      using data_t = scalar_t;
      using acc_t = at::opmath_type<data_t>;
      bn_act_apply_kernel<Act, data_t, acc_t><<<blocks_for(z.numel()), kThreads, 0, stream>>>(
          z.data_ptr<data_t>(), mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), gamma.data_ptr<acc_t>(),
          beta.data_ptr<acc_t>(), y.data_ptr<data_t>(), z.numel(), c, hw);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void bn_act_bwd_reduce_cuda(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean,
                            const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                            int64_t activation, at::Tensor& sum_g, at::Tensor& sum_gx) {
  const int64_t n = z.size(0), c = z.size(1), hw = z.size(2) * z.size(3), splits = splits_for(n * hw);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto part_g = at::empty({c, splits}, sum_g.options()), part_gx = at::empty({c, splits}, sum_g.options());
  with_activation<ReluAct, GeluAct>(activation, [&](auto act) {
    using Act = decltype(act);
    FASTBLOCK_DISPATCH(z.scalar_type(), "fastblock_bn_bwd_reduce_cuda", [&] {
      using data_t = scalar_t;
      using acc_t = at::opmath_type<data_t>;
      bn_act_bwd_reduce_kernel<Act, data_t, acc_t><<<dim3(c, splits), kThreads, 0, stream>>>(
          dy.data_ptr<data_t>(), z.data_ptr<data_t>(), mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
          gamma.data_ptr<acc_t>(), beta.data_ptr<acc_t>(), part_g.data_ptr<acc_t>(), part_gx.data_ptr<acc_t>(), n,
          c, hw, splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_splits_kernel<acc_t><<<blocks_for(c), kThreads, 0, stream>>>(
          part_g.data_ptr<acc_t>(), part_gx.data_ptr<acc_t>(), sum_g.data_ptr<acc_t>(), sum_gx.data_ptr<acc_t>(), c,
          splits);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void bn_act_bwd_dz_cuda(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
                        const at::Tensor& gamma, const at::Tensor& beta, int64_t activation, const at::Tensor& sum_g,
                        const at::Tensor& sum_gx, bool batch_stats, at::Tensor& dz, at::Tensor& dz_sum) {
  const int64_t n = z.size(0), c = z.size(1), hw = z.size(2) * z.size(3);
  auto stream = c10::cuda::getCurrentCUDAStream();
  with_activation<ReluAct, GeluAct>(activation, [&](auto act) {
    using Act = decltype(act);
    FASTBLOCK_DISPATCH(z.scalar_type(), "fastblock_bn_bwd_dz_cuda", [&] {
      using data_t = scalar_t;
      using acc_t = at::opmath_type<data_t>;
      constexpr int64_t planes_per_block = kThreads / kWarp;
      bn_act_bwd_dz_kernel<Act, data_t, acc_t>
          <<<(n * c + planes_per_block - 1) / planes_per_block, kThreads, 0, stream>>>(
              dy.data_ptr<data_t>(), z.data_ptr<data_t>(), mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
              gamma.data_ptr<acc_t>(), beta.data_ptr<acc_t>(), sum_g.data_ptr<acc_t>(), sum_gx.data_ptr<acc_t>(),
              batch_stats, acc_t(1.0 / (double(n) * double(hw))), dz.data_ptr<data_t>(), dz_sum.data_ptr<acc_t>(),
              n * c, c, hw);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fold_weight_grad_cuda(const at::Tensor& gates, const at::Tensor& g, const at::Tensor& w, at::Tensor& dw,
                           at::Tensor& dgates) {
  const int64_t s = g.size(0), f = g.size(1), k = gates.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  FASTBLOCK_DISPATCH(g.scalar_type(), "fastblock_fold_cuda", [&] {
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    fold_dw_kernel<data_t, acc_t><<<blocks_for(f), kThreads, 0, stream>>>(gates.data_ptr<acc_t>(),
                                                                         g.data_ptr<data_t>(), dw.data_ptr<acc_t>(),
                                                                         s, k, f);
    fold_da_kernel<data_t, acc_t><<<s, kThreads, 0, stream>>>(g.data_ptr<data_t>(), w.data_ptr<data_t>(),
                                                               dgates.data_ptr<acc_t>(), dgates.stride(0), k, f);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void expand_gated_cuda(const at::Tensor& x, const at::Tensor& gates, at::Tensor& out) {
  const int64_t n = x.size(0), k = gates.size(1), len = x.size(1) * x.size(2) * x.size(3);
  auto stream = c10::cuda::getCurrentCUDAStream();
  FASTBLOCK_DISPATCH(x.scalar_type(), "fastblock_expand_gated_cuda", [&] {
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    expand_gated_kernel<data_t, acc_t><<<blocks_for(n * k * len), kThreads, 0, stream>>>(
        x.data_ptr<data_t>(), gates.data_ptr<acc_t>(), out.data_ptr<data_t>(), n, k, len);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void reduce_gated_cuda(const at::Tensor& x, const at::Tensor& g, const at::Tensor& gates, at::Tensor& dx,
                       at::Tensor& dgates) {
  const int64_t n = x.size(0), k = gates.size(1), len = x.size(1) * x.size(2) * x.size(3);
  auto stream = c10::cuda::getCurrentCUDAStream();
  FASTBLOCK_DISPATCH(x.scalar_type(), "fastblock_reduce_gated_cuda", [&] {
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    reduce_gated_kernel<data_t, acc_t><<<n, kThreads, 0, stream>>>(
        x.data_ptr<data_t>(), g.data_ptr<data_t>(), gates.data_ptr<acc_t>(), dx.data_ptr<data_t>(),
        dgates.data_ptr<acc_t>(), k, len);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& x, const at::Tensor& gates, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool use_batch_stats, double momentum, double eps, int64_t stride,
    int64_t pad_h, int64_t pad_w, bool save_for_backward, int64_t activation, bool pool, int64_t schedule) {
  const c10::cuda::CUDAGuard guard(x.device());
  return forward_impl(cuda_kernels(), x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                      use_batch_stats, momentum, eps, stride, pad_h, pad_w, save_for_backward, activation, pool,
                      schedule);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gates, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& z,
    const at::Tensor& mean, const at::Tensor& invstd, bool use_batch_stats, int64_t stride, int64_t pad_h,
    int64_t pad_w, int64_t activation, bool pool, int64_t schedule, bool need_dx, bool need_dgates) {
  const c10::cuda::CUDAGuard guard(x.device());
  return backward_impl(cuda_kernels(), dy, x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd,
                       use_batch_stats, stride, pad_h, pad_w, activation, pool, schedule, need_dx, need_dgates);
}

}  // namespace

const DeviceKernels& cuda_kernels() {
  static const DeviceKernels kernels{mix_cuda,          bn_stats_cuda,         bn_act_apply_cuda,
                                     bn_act_bwd_reduce_cuda, bn_act_bwd_dz_cuda, fold_weight_grad_cuda,
                                     expand_gated_cuda, reduce_gated_cuda,  /*channels_last=*/false};
  return kernels;
}

}  // namespace fastblock

TORCH_LIBRARY_IMPL(fastblock_ext, CUDA, m) {
  m.impl("forward", &fastblock::forward_cuda);
  m.impl("backward", &fastblock::backward_cuda);
}
