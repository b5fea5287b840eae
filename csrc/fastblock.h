// fastblock C++/CUDA extension: shared declarations.
//
// The op is device-generic (fastblock_ops.cpp): it mixes the K kernels per sample, runs ONE grouped
// convolution through ATen (oneDNN on CPU, cuDNN on CUDA) and does everything else in the small kernels
// below, implemented once for CPU (fastblock_cpu.cpp, at::parallel_for) and once for CUDA (fastblock_cuda.cu).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastblock {

constexpr int64_t kMaxConvs = 16;  // K is held in registers / stack arrays by the kernels

// The activation after BatchNorm (the ops' `activation` argument): ReLU, or the exact (erf) GELU of F.gelu.
constexpr int64_t kActRelu = 0, kActGelu = 1;
constexpr double kSqrtHalf = 0.70710678118654752440, kInvSqrt2Pi = 0.39894228040143267794;  // GELU's constants

// Calls f(Gelu{}) or f(Relu{}) for an activation code: the CPU and CUDA kernels each pass their own functors (host
// Vectorized code / device code) and take the one they get as a template argument.
template <typename Relu, typename Gelu, typename F>
void with_activation(int64_t activation, const F& f) {
  if (activation == kActGelu) {
    f(Gelu{});
  } else {
    f(Relu{});
  }
}

// Conventions: big tensors are NCHW-contiguous (or, where channels_last says so, channels-last) in the data dtype ("scalar"); small per-channel / per-sample
// tensors are in the statistics dtype ("acc": float32, or float64 for float64 data).
struct DeviceKernels {
  // out[n, f] = (sum_k gates[n, k] * w[k, f]) * scale[f / inner] + shift[f / inner]
  // gates [S, K] acc, w [K, F] scalar, out [S, F] scalar; scale/shift [F / inner] acc, optional.
  void (*mix)(const at::Tensor& gates, const at::Tensor& w, const at::Tensor* scale, const at::Tensor* shift,
              int64_t inner, at::Tensor& out);
  // Per-channel batch mean / invstd of z [N, C, HW]; running stats updated in place (unbiased variance)
  // when given. Fused: finalize + running-stat update happen in the same kernel.
  void (*bn_stats)(const at::Tensor& z, at::Tensor& mean, at::Tensor& invstd, at::Tensor* running_mean,
                   at::Tensor* running_var, double momentum, double eps);
  // y = act(u), u = (z - mean) * invstd * gamma + beta, act = ReLU or GELU (kActRelu / kActGelu)
  void (*bn_act_apply)(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
                       const at::Tensor& gamma, const at::Tensor& beta, int64_t activation, at::Tensor& y);
  // sum_g[c] = sum g, sum_gx[c] = sum g * xhat, with g = dy * act'(u) (ReLU: dy * [u > 0])
  void (*bn_act_bwd_reduce)(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean,
                            const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                            int64_t activation, at::Tensor& sum_g, at::Tensor& sum_gx);
  // dz = gamma * invstd * (g - [batch_stats] (sum_g + xhat * sum_gx) / count), plus dz_sum[n, c] = sum_hw dz
  void (*bn_act_bwd_dz)(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean,
                        const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                        int64_t activation, const at::Tensor& sum_g, const at::Tensor& sum_gx, bool batch_stats,
                        at::Tensor& dz, at::Tensor& dz_sum);
  // dw[k, f] += sum_n gates[n, k] * g[n, f]   and   dgates[n, k] = sum_f w[k, f] * g[n, f]
  // gates [S, K] acc, g [S, F] scalar, w [K, F] scalar (same dtype as g), dw [K, F] acc, dgates [S, K] acc.
  void (*fold_weight_grad)(const at::Tensor& gates, const at::Tensor& g, const at::Tensor& w, at::Tensor& dw,
                           at::Tensor& dgates);
  // K-fold concatenation schedule: out[n, k, c, :] = gates[n, k] * x[n, c, :]   (x [N, C, HW] -> out [N, K*C, HW])
  void (*expand_gated)(const at::Tensor& x, const at::Tensor& gates, at::Tensor& out);
  // and its backward: dx[n, c, :] = sum_k gates[n, k] * g[n, k, c, :],  dgates[n, k] = <x[n], g[n, k]>
  // (CPU: an undefined dx computes dgates alone -- an ungated K=1 Block's dx is g itself)
  void (*reduce_gated)(const at::Tensor& x, const at::Tensor& g, const at::Tensor& gates, at::Tensor& dx,
                       at::Tensor& dgates);
  // The big-tensor kernels above also take channels-last tensors (then x, z, dy, dz, y, the concatenated input
  // and its gradient all are channels-last): the op keeps channels-last inputs channels-last end to end.
  bool channels_last;
};

const DeviceKernels& cpu_kernels();

// While a PoolScope lives on a thread and the opt-in pool is on, that thread's CPU allocations of 64 KiB and
// more (its own, ATen's and oneDNN's) come from a cache of freed blocks instead of fresh mmaps (cpu_pool.cpp).
class PoolScope {
 public:
  PoolScope();
  ~PoolScope();
  PoolScope(const PoolScope&) = delete;
  PoolScope& operator=(const PoolScope&) = delete;

 private:
  bool active_;
};
// The pool's state: {cached bytes, pooled blocks in use, hits, misses, limit in bytes}; its cached blocks
// returned to the system; its limit (> 0 installs it on first use, 0 turns it off).
std::vector<int64_t> cpu_pool_stats();
// A scope opened from Python on the calling thread (no-op while the pool is off); exit closes the innermost one.
void cpu_pool_enter();
void cpu_pool_exit();
void cpu_pool_empty_cache();
void cpu_pool_set_limit(int64_t bytes);
#ifdef FASTBLOCK_WITH_CUDA
const DeviceKernels& cuda_kernels();
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const DeviceKernels& kern, const at::Tensor& x, const at::Tensor& gates, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool use_batch_stats, double momentum, double eps, int64_t stride, int64_t pad_h, int64_t pad_w,
    bool save_for_backward, int64_t activation, bool pool, int64_t schedule);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const DeviceKernels& kern, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gates,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd, bool use_batch_stats, int64_t stride,
    int64_t pad_h, int64_t pad_w, int64_t activation, bool pool, int64_t schedule, bool need_dx = true,
    bool need_dgates = true);

// 2x2 / stride-2 max-pooling of CPU tensors (max_pool_cpu.cpp): (output, uint8 window position of each maximum --
// an empty tensor without with_argmax) and the input gradient from the output gradient and those positions.
std::tuple<at::Tensor, at::Tensor> max_pool2x2_forward_cpu(const at::Tensor& x, bool with_argmax);
at::Tensor max_pool2x2_backward_cpu(const at::Tensor& grad_out, const at::Tensor& argmax, int64_t height,
                                    int64_t width);

// The `schedule` argument of the ops: the shape rule picks (kScheduleAuto), or a forced one (tests).
constexpr int64_t kScheduleAuto = -1, kScheduleMix = 0, kScheduleConcat = 1;

}  // namespace fastblock
