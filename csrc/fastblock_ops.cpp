// fastblock_ext::forward / fastblock_ext::backward: schemas, input checks, and the device-generic algorithm.
//
//   z[n] = conv(x[n], sum_k a[n,k] W_k) + sum_k a[n,k] b_k        (one grouped convolution, groups = samples)
//   y    = act(BN(z))  or, with pool,  act(BN(maxpool2x2(z)))       (act: ReLU or GELU)
//
// Memory (per call): the mixed kernels W_n [S, Cout, Cin, kh, kw] and, in backward, the per-sample weight
// gradient G_n of the same size, are only ever held for a chunk of S samples, with S chosen so that one such
// buffer stays under chunk_bytes(); besides that, forward keeps z (saved for backward) and y, backward dz and dx.
// Layout: where the device's kernels take channels-last tensors (CPU), a channels-last input runs channels-last end
// to end with the concatenation schedule (oneDNN's channels-last convolutions, with AMX for bf16, are several times
// faster than its NCHW or grouped ones: bench/RESULTS.md), and y and the saved z are channels-last. Otherwise
// (CUDA, or the mixing schedule forced) it is computed in NCHW (the grouped reshape needs it), y and dx returned
// channels-last and the saved z kept NCHW on CUDA. Running statistics may be any view: a non-contiguous one is
// updated through a copy.
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>

#include "fastblock.h"

// Each kernel call runs in a named torch.profiler scope ("fastblock_ext::<kernel>").
#define FASTBLOCK_PROFILE(name) RECORD_FUNCTION("fastblock_ext::" name, std::vector<c10::IValue>())

namespace fastblock {
namespace {

// Target size of one chunk's mixed kernels (and, in backward, its per-sample weight gradients): CPU 16 MiB (the
// fastest budget measured, bench/RESULTS.md), CUDA 256 MiB (a memory bound only). FASTBLOCK_EXT_CHUNK_BYTES
// overrides it (tests use a tiny value to exercise the multi-chunk path).
int64_t chunk_bytes(const at::Device& device) {
  if (const char* env = std::getenv("FASTBLOCK_EXT_CHUNK_BYTES")) {
    const long long v = std::atoll(env);
    if (v > 0) return v;
  }
  return device.is_cpu() ? int64_t(16) << 20 : int64_t(256) << 20;
}

at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_activation(int64_t activation) {
  TORCH_CHECK(activation == kActRelu || activation == kActGelu, "fastblock: activation must be ", kActRelu,
              " (ReLU) or ", kActGelu, " (GELU), got ", activation);
}

void check_common(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& bn_weight, const at::Tensor& bn_bias, int64_t stride, int64_t pad_h,
                  int64_t pad_w) {
  TORCH_CHECK(x.dim() == 4, "fastblock: x must be 4-D [N, Cin, H, W], got ", x.sizes());
  TORCH_CHECK(gates.dim() == 2, "fastblock: gates must be 2-D [N, K], got ", gates.sizes());
  TORCH_CHECK(weight.dim() == 5, "fastblock: weight must be 5-D [K, Cout, Cin, kh, kw], got ", weight.sizes());
  const int64_t n = x.size(0), cin = x.size(1), k = weight.size(0), cout = weight.size(1);
  TORCH_CHECK(n > 0, "fastblock: empty batch, x ", x.sizes());
  TORCH_CHECK(gates.size(0) == n && gates.size(1) == k, "fastblock: gates ", gates.sizes(), " must be [N=", n,
              ", K=", k, "]");
  TORCH_CHECK(k >= 1 && k <= kMaxConvs, "fastblock: K must be in [1, ", kMaxConvs, "], got ", k);
  TORCH_CHECK(weight.size(2) == cin, "fastblock: weight ", weight.sizes(), " expects Cin=", weight.size(2),
              " but x has ", cin);
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == k && bias.size(1) == cout, "fastblock: bias must be [K, Cout], got ",
              bias.sizes());
  TORCH_CHECK(bn_weight.dim() == 1 && bn_weight.size(0) == cout && bn_bias.dim() == 1 && bn_bias.size(0) == cout,
              "fastblock: bn_weight/bn_bias must be [Cout=", cout, "]");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "fastblock: unsupported dtype ", dt);
  TORCH_CHECK(gates.scalar_type() == dt && weight.scalar_type() == dt && bias.scalar_type() == dt,
              "fastblock: x, gates, weight and bias must share one dtype");
  for (const at::Tensor* t : {&gates, &weight, &bias, &bn_weight, &bn_bias}) {
    TORCH_CHECK(t->device() == x.device(), "fastblock: all tensors must be on ", x.device(), ", found one on ",
                t->device());
  }
  TORCH_CHECK(stride >= 1 && pad_h >= 0 && pad_w >= 0, "fastblock: need stride >= 1 and padding >= 0");
  TORCH_CHECK((x.size(2) + 2 * pad_h - weight.size(3)) / stride + 1 >= 1 &&
                  (x.size(3) + 2 * pad_w - weight.size(4)) / stride + 1 >= 1,
              "fastblock: input too small for the kernel");
}

// Samples per chunk: as many as fit the chunk budget (at least one), evened out over the chunks needed.
// Also bounded so the chunk's grouped convolution has fewer than 2**31 elements in its input and its output
// (``activation_elems``: the larger of one sample's Cin*H*W and Cout*Ho*Wo): convolution libraries index in 32 bits.
int64_t samples_per_chunk(int64_t n, int64_t per_sample_elems, int64_t elem_size, int64_t activation_elems,
                          const at::Device& device) {
  const int64_t per_sample = std::max<int64_t>(1, per_sample_elems * elem_size);
  const int64_t index_bound = std::max<int64_t>(1, (int64_t(1) << 31) - 1) / std::max<int64_t>(1, activation_elems);
  const int64_t fit = std::max<int64_t>(
      1, std::min<int64_t>({n, chunk_bytes(device) / per_sample, index_bound}));
  const int64_t chunks = (n + fit - 1) / fit;
  return (n + chunks - 1) / chunks;
}

// Two exact schedules for sum_k a_k conv(x, W_k):
//   mix    -- per-sample kernels W_n = sum_k a[n,k] W_k and one grouped convolution (groups = samples): the
//             FLOPs of one convolution, plus N * Cout*Cin*kh*kw mixed-kernel elements written and read;
//   concat -- conv([a_1 x .. a_K x], [W_1 .. W_K]): one ordinary convolution over K*Cin channels; K times the
//             FLOPs, plus a K-fold copy of x, but no per-sample kernels.
// Mixing saves (K-1) convolutions, 2*Ho*Wo FLOPs per kernel element each, so it wins once (K-1)*Ho*Wo is large
// enough, whatever the channel counts: the CPU crossover measured ~144 (bench/RESULTS.md; unmeasured on CUDA).
// K=1 always concatenates: one ordinary convolution of a[n]*x[n], no per-sample kernels.
// A channels-last computation (compute_layout) always concatenates.
bool use_concat(int64_t schedule, int64_t k, int64_t ho, int64_t wo, at::MemoryFormat layout) {
  TORCH_CHECK(schedule >= kScheduleAuto && schedule <= kScheduleConcat, "fastblock: unknown schedule ", schedule);
  if (layout == at::MemoryFormat::ChannelsLast) return true;
  if (schedule != kScheduleAuto) return schedule == kScheduleConcat;
  return (k - 1) * ho * wo < 144;
}

// The memory format the op computes in: channels-last where the kernels take it and the input is stored
// channels-last (a strided view that merely resembles it is computed in NCHW), always with the concatenation
// schedule, unless the mixing schedule is forced; else NCHW.
at::MemoryFormat compute_layout(const DeviceKernels& kern, const at::Tensor& x, int64_t schedule) {
  const bool rows = kern.channels_last && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() &&
                    schedule != kScheduleMix;
  return rows ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Whether every element of a small CPU tensor (gates, biases) equals v. Checked on CPU only: there it costs
// microseconds, and it lets an ungated K=1 Block (gates all one, no bias: a plain conv + BN + ReLU) skip a copy of
// its input and a pass over its output; on a GPU the answer would cost a device synchronisation.
bool cpu_all_equal(const at::Tensor& t, double v) {
  return t.device().is_cpu() && t.numel() > 0 && at::all(t == v).item<bool>();
}

// The concatenation schedule's input [a_1 x .. a_K x]: x itself when K=1 and every gate is 1.
at::Tensor gated_input(const DeviceKernels& kern, const at::Tensor& xc, const at::Tensor& gates_acc) {
  const int64_t n = xc.size(0), cin = xc.size(1), k = gates_acc.size(1);
  if (k == 1 && cpu_all_equal(gates_acc, 1.0)) return xc;
  auto x_cat = at::empty({n, k * cin, xc.size(2), xc.size(3)}, xc.options().memory_format(xc.suggest_memory_format()));
  { FASTBLOCK_PROFILE("expand_gated"); kern.expand_gated(xc, gates_acc, x_cat); }
  return x_cat;
}

// The concatenation schedule's kernels [Cout, K*Cin, kh, kw] (W_k side by side along the input channels), a
// transposed copy of weight [K, Cout, Cin, kh, kw].
at::Tensor concat_kernels(const at::Tensor& weight) {
  return weight.transpose(0, 1).reshape({weight.size(1), weight.size(0) * weight.size(2), weight.size(3),
                                         weight.size(4)});
}

// z = sum_k a[n,k] (conv(x, W_k) + b_k), optionally followed by a per-channel affine (eval-mode BN folding).
at::Tensor gated_conv(const DeviceKernels& kern, const at::Tensor& xc, const at::Tensor& gates_acc,
                      const at::Tensor& weight, const at::Tensor& bias, const at::Tensor* scale,
                      const at::Tensor* shift, int64_t stride, int64_t pad_h, int64_t pad_w, bool concat) {
  const int64_t n = xc.size(0), cin = xc.size(1), h = xc.size(2), w = xc.size(3);
  const int64_t k = weight.size(0), cout = weight.size(1), kh = weight.size(3), kw = weight.size(4);
  const int64_t per_out = cin * kh * kw, f = cout * per_out;
  const auto w_flat = weight.contiguous().view({k, f});
  const auto b_flat = bias.contiguous();
  if (concat) {
    const auto layout = xc.suggest_memory_format();
    const auto x_cat = gated_input(kern, xc, gates_acc);
    auto w_cat = concat_kernels(weight);
    if (scale) w_cat = w_cat * scale->to(weight.scalar_type()).view({cout, 1, 1, 1});
    auto z = at::convolution(x_cat, w_cat, c10::nullopt, {stride, stride}, {pad_h, pad_w}, {1, 1}, false, {0, 0}, 1);
    if (!shift && cpu_all_equal(bias, 0.0)) return z.contiguous(layout);  // nothing to add
    auto b_mix = at::empty({n, cout}, bias.options());
    { FASTBLOCK_PROFILE("mix"); kern.mix(gates_acc, b_flat, scale, shift, 1, b_mix); }
    return z.contiguous(layout).add_(b_mix.view({n, cout, 1, 1}));
  }
  const int64_t ho = (h + 2 * pad_h - kh) / stride + 1, wo = (w + 2 * pad_w - kw) / stride + 1;
  const int64_t activation_elems = std::max(cin * h * w, cout * ho * wo);
  const int64_t chunk = samples_per_chunk(n, f, weight.element_size(), activation_elems, xc.device());
  std::vector<at::Tensor> pieces;
  for (int64_t n0 = 0; n0 < n; n0 += chunk) {
    const int64_t s = std::min(chunk, n - n0);
    auto g_chunk = gates_acc.narrow(0, n0, s);
    auto w_mix = at::empty({s, f}, weight.options());
    { FASTBLOCK_PROFILE("mix"); kern.mix(g_chunk, w_flat, scale, nullptr, per_out, w_mix); }
    auto b_mix = at::empty({s, cout}, bias.options());
    { FASTBLOCK_PROFILE("mix"); kern.mix(g_chunk, b_flat, scale, shift, 1, b_mix); }
    auto out = at::convolution(xc.narrow(0, n0, s).reshape({1, s * cin, h, w}), w_mix.view({s * cout, cin, kh, kw}),
                               b_mix.view({s * cout}), {stride, stride}, {pad_h, pad_w}, {1, 1}, false, {0, 0}, s);
    pieces.push_back(out.view({s, cout, ho, wo}));
  }
  return pieces.size() == 1 ? pieces[0].contiguous() : at::cat(pieces, 0);
}

// CPU weight gradients of small outputs (Ho*Wo <= kGemmWeightGradMaxPixels) as one matrix product,
//   dW[o, c, i, j] = sum_{n,p,q} dz[n, o, p, q] * x_padded[n, c, p*stride + i, q*stride + j]
//                  = dz^T [Cout, N*Ho*Wo] x patches [N*Ho*Wo, kh*kw*Cin],
// with the patches gathered channels-last, a chunk of samples at a time (samples_per_chunk: chunk_bytes() of
// patches at most), summed in the statistics dtype. oneDNN's weight-gradient kernels parallelise badly over so few
// output pixels (a 256->256 backward at 3x3, batch 2000, bf16 on an AMX CPU: 319 ms against 133 ms with the input
// gradient from oneDNN and the weight gradient this way; at 7x7 and 15x15 oneDNN is faster: bench/RESULTS.md).
constexpr int64_t kGemmWeightGradMaxPixels = 16;

bool use_gemm_weight_grad(const at::Tensor& x, int64_t ho, int64_t wo) {
  return x.device().is_cpu() && ho * wo <= kGemmWeightGradMaxPixels;
}

at::Tensor weight_grad_gemm(const at::Tensor& dz, const at::Tensor& x, int64_t kh, int64_t kw, int64_t stride,
                            int64_t pad_h, int64_t pad_w, at::ScalarType acc_dtype) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t cout = dz.size(1), ho = dz.size(2), wo = dz.size(3);
  const int64_t patch_elems = ho * wo * kh * kw * c;  // one sample's patches
  const int64_t chunk = samples_per_chunk(n, patch_elems, x.element_size(), patch_elems, x.device());
  at::Tensor dw;
  for (int64_t n0 = 0; n0 < n; n0 += chunk) {
    const int64_t s = std::min(chunk, n - n0);
    auto padded = (pad_h || pad_w) ? at::zeros({s, h + 2 * pad_h, w + 2 * pad_w, c}, x.options())
                                   : at::empty({s, h, w, c}, x.options());
    padded.narrow(1, pad_h, h).narrow(2, pad_w, w).copy_(x.narrow(0, n0, s).permute({0, 2, 3, 1}));
    const auto st = padded.strides();
    const auto patches =
        padded.as_strided({s, ho, wo, kh, kw, c}, {st[0], st[1] * stride, st[2] * stride, st[1], st[2], st[3]})
            .reshape({s * ho * wo, kh * kw * c});
    const auto dz_rows = dz.narrow(0, n0, s).permute({0, 2, 3, 1}).reshape({s * ho * wo, cout});
    auto part = dz_rows.t().mm(patches);
    if (dw.defined()) {
      dw.add_(part);
    } else {
      dw = part.to(acc_dtype);
    }
  }
  return dw.view({cout, kh, kw, c}).permute({0, 3, 1, 2});  // [Cout, Cin, kh, kw]
}

// Convolution part of the backward: dx, dW (acc dtype, [K, F]) and the conv part of da, for either schedule.
// Without need_dx, dx stays undefined (the convolution's input gradient is not computed where nothing else needs
// it); without need_dgates, the concatenation schedule leaves dgates unwritten.
void gated_conv_backward(const DeviceKernels& kern, const at::Tensor& dz, const at::Tensor& xc,
                         const at::Tensor& gates_acc, const at::Tensor& weight, int64_t stride, int64_t pad_h,
                         int64_t pad_w, bool concat, bool need_dx, bool need_dgates, at::Tensor& dx,
                         at::Tensor& dw_acc, at::Tensor& dgates) {
  const int64_t n = xc.size(0), cin = xc.size(1), h = xc.size(2), w = xc.size(3);
  const int64_t k = weight.size(0), cout = weight.size(1), kh = weight.size(3), kw = weight.size(4);
  const int64_t ho = dz.size(2), wo = dz.size(3);
  const int64_t per_out = cin * kh * kw, f = cout * per_out;
  const auto w_flat = weight.contiguous().view({k, f});
  if (concat) {
    const auto layout = xc.suggest_memory_format();
    const auto x_cat = gated_input(kern, xc, gates_acc);
    const bool gemm_dw = use_gemm_weight_grad(xc, ho, wo);
    const bool need_dx_cat = need_dx || need_dgates;  // da[n, k] = <x[n], dx_cat[n, k]>
    std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
    if (need_dx_cat || !gemm_dw) {
      grads = at::convolution_backward(dz, x_cat, concat_kernels(weight), c10::nullopt, {stride, stride},
                                       {pad_h, pad_w}, {1, 1}, false, {0, 0}, 1, {need_dx_cat, !gemm_dw, false});
    }
    if (need_dx_cat) {
      const auto dx_cat = std::get<0>(grads).contiguous(layout);
      const bool ungated = x_cat.is_same(xc);  // K=1, gates all 1: dx is dx_cat itself, only dgates to compute
      // The CPU kernel computes dgates alone when given no dx; the CUDA one always writes both.
      dx = ungated || (!need_dx && xc.is_cpu()) ? at::Tensor() : at::empty_like(xc);
      if (need_dgates || !ungated) {  // a gated dx is this reduction too (it then writes dgates anyway)
        FASTBLOCK_PROFILE("reduce_gated");
        kern.reduce_gated(xc, dx_cat, gates_acc, dx, dgates);
      }
      if (ungated) dx = dx_cat;
    }
    // [Cout, K, per_out] -> [K, Cout, per_out]: one strided copy straight into dW (the gradient of a
    // channels-last convolution may come channels-last: made contiguous first)
    at::Tensor dw_cat;
    if (gemm_dw) {
      FASTBLOCK_PROFILE("weight_grad_gemm");
      dw_cat = weight_grad_gemm(dz, x_cat, kh, kw, stride, pad_h, pad_w, dw_acc.scalar_type());
    } else {
      dw_cat = std::get<1>(grads);
    }
    dw_acc.view({k, cout, per_out}).copy_(dw_cat.contiguous().view({cout, k, per_out}).transpose(0, 1));
    return;
  }
  // Per-sample weight gradients G, never all at once: folded chunk by chunk into dW_k and da.
  const int64_t activation_elems = std::max(cin * h * w, cout * ho * wo);
  const int64_t chunk = samples_per_chunk(n, f, weight.element_size(), activation_elems, xc.device());
  if (need_dx && chunk < n) dx = at::empty_like(xc);
  for (int64_t n0 = 0; n0 < n; n0 += chunk) {
    const int64_t s = std::min(chunk, n - n0);
    auto g_chunk = gates_acc.narrow(0, n0, s);
    auto w_mix = at::empty({s, f}, weight.options());
    { FASTBLOCK_PROFILE("mix"); kern.mix(g_chunk, w_flat, nullptr, nullptr, per_out, w_mix); }
    auto grads = at::convolution_backward(
        dz.narrow(0, n0, s).reshape({1, s * cout, ho, wo}), xc.narrow(0, n0, s).reshape({1, s * cin, h, w}),
        w_mix.view({s * cout, cin, kh, kw}), c10::nullopt, {stride, stride}, {pad_h, pad_w}, {1, 1}, false, {0, 0},
        s, {need_dx, true, false});
    if (need_dx) {
      auto dx_chunk = std::get<0>(grads).view({s, cin, h, w});
      if (chunk >= n) {
        dx = dx_chunk;  // one chunk: no copy
      } else {
        dx.narrow(0, n0, s).copy_(dx_chunk);
      }
    }
    auto g_weight = std::get<1>(grads).contiguous().view({s, f});
    auto dg_chunk = dgates.narrow(0, n0, s);
    { FASTBLOCK_PROFILE("fold_weight_grad"); kern.fold_weight_grad(g_chunk, g_weight, w_flat, dw_acc, dg_chunk); }
  }
}

// 2x2 / stride-2 max-pool of z, laid out like z, and (with_argmax) where each window's maximum was: on CPU the
// extension's kernel (one byte per output), on CUDA ATen's (int64 indices). Both: the first maximum of a window in
// row-major order, a NaN over any number (the window's last NaN) -- F.max_pool2d's choice.
std::tuple<at::Tensor, at::Tensor> pool2x2(const at::Tensor& z, bool with_argmax) {
  if (!z.is_cpu()) {
    if (!with_argmax) return {at::max_pool2d(z, {2, 2}), at::Tensor()};
    return at::max_pool2d_with_indices(z, {2, 2});
  }
  FASTBLOCK_PROFILE("max_pool2x2");
  return max_pool2x2_forward_cpu(z, with_argmax);
}

// The gradient of z from that of its pool: each window's at its maximum, 0 elsewhere.
at::Tensor unpool2x2(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& argmax) {
  if (!z.is_cpu()) {
    return at::max_pool2d_with_indices_backward(grad, z, {2, 2}, {2, 2}, {0, 0}, {1, 1}, false, argmax);
  }
  FASTBLOCK_PROFILE("max_pool2x2_backward");
  return max_pool2x2_backward_cpu(grad, argmax, z.size(2), z.size(3));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const DeviceKernels& kern, const at::Tensor& x, const at::Tensor& gates, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool use_batch_stats, double momentum, double eps, int64_t stride, int64_t pad_h, int64_t pad_w,
    bool save_for_backward, int64_t activation, bool pool, int64_t schedule) {
  check_common(x, gates, weight, bias, bn_weight, bn_bias, stride, pad_h, pad_w);
  check_activation(activation);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "fastblock: running_mean and running_var must be given together");
  TORCH_CHECK(use_batch_stats || running_mean.has_value(), "fastblock: eval mode needs running statistics");
  const auto sdt = stats_dtype(x);
  const auto fmt = x.suggest_memory_format();
  const auto layout = compute_layout(kern, x, schedule);
  const auto xc = x.contiguous(layout);
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t k = weight.size(0), cout = weight.size(1), kh = weight.size(3), kw = weight.size(4);
  const int64_t ho = (h + 2 * pad_h - kh) / stride + 1, wo = (w + 2 * pad_w - kw) / stride + 1;
  const bool concat = use_concat(schedule, k, ho, wo, layout);
  const auto gates_acc = gates.to(sdt).contiguous();
  const auto gamma = bn_weight.to(sdt).contiguous(), beta = bn_bias.to(sdt).contiguous();

  at::Tensor mean, invstd, scale, shift;
  if (!use_batch_stats) {
    mean = running_mean->to(sdt, /*non_blocking=*/false, /*copy=*/true);
    invstd = (running_var->to(sdt) + eps).rsqrt();
  }
  if (pool) {
    TORCH_CHECK(ho >= 2 && wo >= 2, "fastblock: pool needs a convolution output of at least 2x2, got ", ho, "x", wo);
  }
  // Eval-mode inference folds BatchNorm into the mixed kernels and biases: the conv output is already BN(z). (Not
  // before a pool: a max commutes with BatchNorm's affine map only where its scale is >= 0.)
  const bool fold = !use_batch_stats && !save_for_backward && !pool;
  if (fold) {
    scale = invstd * gamma;
    shift = beta - mean * scale;
  }

  at::Tensor z = gated_conv(kern, xc, gates_acc, weight, bias, fold ? &scale : nullptr, fold ? &shift : nullptr,
                            stride, pad_h, pad_w, concat);

  if (fold) {
    activation == kActGelu ? at::gelu_(z) : z.relu_();
    return {z.contiguous(fmt), at::empty({0}, x.options()), mean, invstd};
  }
  // What BatchNorm normalises: z, or its 2x2 max-pool (the backward recomputes the pool's argmax from z).
  const at::Tensor zn = pool ? std::get<0>(pool2x2(z, /*with_argmax=*/false)).contiguous(layout) : z;
  if (use_batch_stats) {
    mean = at::empty({cout}, x.options().dtype(sdt));
    invstd = at::empty({cout}, x.options().dtype(sdt));
    at::Tensor rm, rv;
    if (running_mean.has_value()) {  // the kernels write contiguous running stats; a view is updated via a copy
      rm = running_mean->contiguous();
      rv = running_var->contiguous();
    }
    { FASTBLOCK_PROFILE("bn_stats"); kern.bn_stats(zn, mean, invstd, running_mean.has_value() ? &rm : nullptr,
                  running_var.has_value() ? &rv : nullptr, momentum, eps); }
    if (running_mean.has_value()) {
      if (!rm.is_same(*running_mean)) running_mean->copy_(rm);
      if (!rv.is_same(*running_var)) running_var->copy_(rv);
    }
  }
  auto y = at::empty_like(zn);
  { FASTBLOCK_PROFILE("bn_act_apply"); kern.bn_act_apply(zn, mean, invstd, gamma, beta, activation, y); }
  // The saved z: laid out like x where the kernels take channels-last (a copy only when the mixing schedule was
  // forced on a channels-last input), else NCHW (only this op's backward reads it)
  const auto z_saved = kern.channels_last ? z.contiguous(fmt) : z;
  return {y.contiguous(fmt), save_for_backward ? z_saved : at::empty({0}, x.options()), mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const DeviceKernels& kern, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gates,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd, bool use_batch_stats, int64_t stride,
    int64_t pad_h, int64_t pad_w, int64_t activation, bool pool, int64_t schedule, bool need_dx, bool need_dgates) {
  check_common(x, gates, weight, bias, bn_weight, bn_bias, stride, pad_h, pad_w);
  check_activation(activation);
  TORCH_CHECK(z.dim() == 4, "fastblock: z must be 4-d, got ", z.sizes());
  TORCH_CHECK(!pool || (z.size(2) >= 2 && z.size(3) >= 2), "fastblock: pool needs z of at least 2x2, got ", z.sizes());
  const auto sdt = stats_dtype(x);
  const auto fmt = x.suggest_memory_format();
  const auto layout = compute_layout(kern, x, schedule);
  const auto xc = x.contiguous(layout), zc = z.contiguous(layout);
  // What BatchNorm normalised (zn): z, or its 2x2 max-pool, recomputed here with each window's argmax.
  at::Tensor zn = zc, argmax;
  if (pool) {
    std::tie(zn, argmax) = pool2x2(zc, /*with_argmax=*/true);
    zn = zn.contiguous(layout);
  }
  TORCH_CHECK(dy.sizes() == zn.sizes(), "fastblock: dy ", dy.sizes(), " must match the output ", zn.sizes());
  const auto dyc = dy.contiguous(layout).to(z.scalar_type());
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t k = weight.size(0), cout = weight.size(1), kh = weight.size(3), kw = weight.size(4);
  const int64_t ho = z.size(2), wo = z.size(3), f = cout * cin * kh * kw;
  const auto gates_acc = gates.to(sdt).contiguous();
  const auto gamma = bn_weight.to(sdt).contiguous(), beta = bn_bias.to(sdt).contiguous();
  const auto mean_c = mean.to(sdt).contiguous(), invstd_c = invstd.to(sdt).contiguous();

  // BatchNorm + activation backward: two reductions over (N, H, W), then dz and its per-sample channel sums.
  auto sum_g = at::empty({cout}, x.options().dtype(sdt));
  auto sum_gx = at::empty({cout}, x.options().dtype(sdt));
  {
    FASTBLOCK_PROFILE("bn_act_bwd_reduce");
    kern.bn_act_bwd_reduce(dyc, zn, mean_c, invstd_c, gamma, beta, activation, sum_g, sum_gx);
  }
  auto dzn = at::empty_like(zn);
  auto dz_sum = at::empty({n, cout}, x.options().dtype(sdt));  // per-sample sums: the same before and after unpooling
  {
    FASTBLOCK_PROFILE("bn_act_bwd_dz");
    kern.bn_act_bwd_dz(dyc, zn, mean_c, invstd_c, gamma, beta, activation, sum_g, sum_gx, use_batch_stats, dzn,
                       dz_sum);
  }
  const at::Tensor dz = pool ? unpool2x2(dzn, zc, argmax).contiguous(layout) : dzn;

  at::Tensor dx;
  const bool concat = use_concat(schedule, k, ho, wo, layout);
  // the mixing schedule accumulates dW chunk by chunk; the concatenation schedule writes it once
  auto dw_acc = concat ? at::empty({k, f}, x.options().dtype(sdt)) : at::zeros({k, f}, x.options().dtype(sdt));
  auto dgates = at::empty({n, k}, x.options().dtype(sdt));
  gated_conv_backward(kern, dz, xc, gates_acc, weight, stride, pad_h, pad_w, concat, need_dx, need_dgates, dx, dw_acc,
                      dgates);
  // Bias terms, the same fold with G = dz_sum: db_k = sum_n a[n,k] s_n, da[n,k] += <b_k, s_n>.
  auto db_acc = at::zeros({k, cout}, x.options().dtype(sdt));
  auto dgates_bias = at::empty({n, k}, x.options().dtype(sdt));
  { FASTBLOCK_PROFILE("fold_weight_grad"); kern.fold_weight_grad(gates_acc, dz_sum, bias.to(sdt).contiguous(), db_acc, dgates_bias); }
  dgates.add_(dgates_bias);

  // Gradients not asked for come back as empty tensors.
  return {need_dx ? dx.contiguous(fmt) : at::empty({0}, x.options()),
          need_dgates ? dgates.to(gates.scalar_type()) : at::empty({0}, gates.options()),
          dw_acc.view(weight.sizes()).to(weight.scalar_type()),
          db_acc.to(bias.scalar_type()),
          sum_gx.to(bn_weight.scalar_type()),
          sum_g.to(bn_bias.scalar_type())};
}

namespace {

// How many threads the CPU kernels' parallel loops (at::parallel_for) run on: 1 when the extension was built
// without OpenMP, whatever torch's own thread count.
int64_t cpu_threads() {
  std::mutex mutex;
  std::set<int> seen;
  at::parallel_for(0, 64 * at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    seen.insert(at::get_thread_num());
  });
  return static_cast<int64_t>(seen.size());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& x, const at::Tensor& gates, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool use_batch_stats, double momentum, double eps, int64_t stride,
    int64_t pad_h, int64_t pad_w, bool save_for_backward, int64_t activation, bool pool, int64_t schedule) {
  PoolScope pooled;
  return forward_impl(cpu_kernels(), x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                      use_batch_stats, momentum, eps, stride, pad_h, pad_w, save_for_backward, activation, pool,
                      schedule);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gates, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& z,
    const at::Tensor& mean, const at::Tensor& invstd, bool use_batch_stats, int64_t stride, int64_t pad_h,
    int64_t pad_w, int64_t activation, bool pool, int64_t schedule, bool need_dx, bool need_dgates) {
  PoolScope pooled;
  return backward_impl(cpu_kernels(), dy, x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd,
                       use_batch_stats, stride, pad_h, pad_w, activation, pool, schedule, need_dx, need_dgates);
}

std::tuple<at::Tensor, at::Tensor> max_pool2x2_cpu(const at::Tensor& x, bool with_argmax) {
  PoolScope pooled;
  return max_pool2x2_forward_cpu(x, with_argmax);
}

at::Tensor max_pool2x2_backward_cpu_op(const at::Tensor& grad_out, const at::Tensor& argmax, int64_t height,
                                       int64_t width) {
  PoolScope pooled;
  return max_pool2x2_backward_cpu(grad_out, argmax, height, width);
}

}  // namespace
}  // namespace fastblock

TORCH_LIBRARY(fastblock_ext, m) {
  m.def(
      "forward(Tensor x, Tensor gates, Tensor weight, Tensor bias, Tensor bn_weight, Tensor bn_bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool use_batch_stats, float momentum, float eps, "
      "int stride, int pad_h, int pad_w, bool save_for_backward, int activation=0, bool pool=False, int schedule=-1) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor dy, Tensor x, Tensor gates, Tensor weight, Tensor bias, Tensor bn_weight, Tensor bn_bias, "
      "Tensor z, Tensor mean, Tensor invstd, bool use_batch_stats, int stride, int pad_h, int pad_w, int activation=0, "
      "bool pool=False, int schedule=-1, bool need_dx=True, bool need_dgates=True) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // 2x2 / stride-2 max-pooling with one-byte window positions (max_pool_cpu.cpp; CPU only).
  m.def("max_pool2x2(Tensor x, bool with_argmax) -> (Tensor, Tensor)");
  m.def("max_pool2x2_backward(Tensor grad_out, Tensor argmax, int height, int width) -> Tensor");
  // The CPU ops' opt-in allocation pool (cpu_pool.cpp): inspect, empty, limit (> 0 switches it on).
  m.def("cpu_pool_stats() -> int[]", &fastblock::cpu_pool_stats);
  m.def("cpu_pool_empty_cache() -> ()", &fastblock::cpu_pool_empty_cache);
  m.def("cpu_pool_set_limit(int bytes) -> ()", &fastblock::cpu_pool_set_limit);
  m.def("cpu_pool_enter() -> ()", &fastblock::cpu_pool_enter);
  m.def("cpu_pool_exit() -> ()", &fastblock::cpu_pool_exit);
  m.def("cpu_threads() -> int", &fastblock::cpu_threads);
}

TORCH_LIBRARY_IMPL(fastblock_ext, CPU, m) {
  m.impl("forward", &fastblock::forward_cpu);
  m.impl("backward", &fastblock::backward_cpu);
  m.impl("max_pool2x2", &fastblock::max_pool2x2_cpu);
  m.impl("max_pool2x2_backward", &fastblock::max_pool2x2_backward_cpu_op);
}
