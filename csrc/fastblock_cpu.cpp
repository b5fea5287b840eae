// CPU kernels of the fastblock extension (see fastblock.h for what each computes).
//
// Parallelised with at::parallel_for over independent units (channels, (n, c) planes, column blocks).
// Reductions are deterministic: every unit reduces its own data in a fixed order, and the column-block split of
// fold_weight_grad is a fixed size, not a function of the thread count. Reductions accumulate in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "fastblock.h"

namespace fastblock {
namespace {

#define FASTBLOCK_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Statistics tensors are float32, or float64 for float64 data.
#define FASTBLOCK_DISPATCH_ACC(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__)

void mix_cpu(const at::Tensor& gates, const at::Tensor& w, const at::Tensor* scale, const at::Tensor* shift,
             int64_t inner, at::Tensor& out) {
  const int64_t s = gates.size(0), k = gates.size(1), f = w.size(1);
  FASTBLOCK_DISPATCH(w.scalar_type(), "fastblock_mix_cpu", [&] {
    using data_t = scalar_t;
    const data_t* wp = w.data_ptr<data_t>();
    data_t* op = out.data_ptr<data_t>();
    FASTBLOCK_DISPATCH_ACC(gates.scalar_type(), "fastblock_mix_cpu_acc", [&] {
      using acc_t = scalar_t;
      const acc_t* a = gates.data_ptr<acc_t>();
      const acc_t* sc = scale ? scale->data_ptr<acc_t>() : nullptr;
      const acc_t* sh = shift ? shift->data_ptr<acc_t>() : nullptr;
      at::parallel_for(0, s * f, 4096, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t n = i / f, j = i - n * f;
          acc_t v = 0;
          for (int64_t kk = 0; kk < k; ++kk) v += a[n * k + kk] * static_cast<acc_t>(wp[kk * f + j]);
          if (sc) v *= sc[j / inner];
          if (sh) v += sh[j / inner];
          op[i] = static_cast<data_t>(v);
        }
      });
    });
  });
}

void bn_stats_cpu(const at::Tensor& z, at::Tensor& mean, at::Tensor& invstd, at::Tensor* running_mean,
                  at::Tensor* running_var, double momentum, double eps) {
  const int64_t n = z.size(0), c = z.size(1), hw = z.size(2) * z.size(3);
  const double count = double(n) * double(hw);
  FASTBLOCK_DISPATCH(z.scalar_type(), "fastblock_bn_stats_cpu", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    at::parallel_for(0, c, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        double sum = 0;  // two passes: mean, then squared deviations (no cancellation)
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* p = zp + (i * c + ch) * hw;
          for (int64_t j = 0; j < hw; ++j) sum += static_cast<double>(p[j]);
        }
        const double mu = sum / count;
        double m2 = 0;
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* p = zp + (i * c + ch) * hw;
          for (int64_t j = 0; j < hw; ++j) {
            const double d = static_cast<double>(p[j]) - mu;
            m2 += d * d;
          }
        }
        const double is = 1.0 / std::sqrt(m2 / count + eps);
        FASTBLOCK_DISPATCH_ACC(mean.scalar_type(), "fastblock_bn_stats_cpu_out", [&] {
          mean.data_ptr<scalar_t>()[ch] = static_cast<scalar_t>(mu);
          invstd.data_ptr<scalar_t>()[ch] = static_cast<scalar_t>(is);
        });
        if (running_mean) {
          const double unbiased = m2 / (count - 1.0);
          FASTBLOCK_DISPATCH(running_mean->scalar_type(), "fastblock_running_stats_cpu", [&] {
            scalar_t* rm = running_mean->data_ptr<scalar_t>();
            scalar_t* rv = running_var->data_ptr<scalar_t>();
            rm[ch] = static_cast<scalar_t>((1.0 - momentum) * static_cast<double>(rm[ch]) + momentum * mu);
            rv[ch] = static_cast<scalar_t>((1.0 - momentum) * static_cast<double>(rv[ch]) + momentum * unbiased);
          });
        }
      }
    });
  });
}

void bn_relu_apply_cpu(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& gamma,
                       const at::Tensor& beta, at::Tensor& y) {
  const int64_t n = z.size(0), c = z.size(1), hw = z.size(2) * z.size(3);
  FASTBLOCK_DISPATCH(z.scalar_type(), "fastblock_bn_apply_cpu", [&] {
    using data_t = scalar_t;
    const data_t* zp = z.data_ptr<data_t>();
    data_t* yp = y.data_ptr<data_t>();
    FASTBLOCK_DISPATCH_ACC(mean.scalar_type(), "fastblock_bn_apply_cpu_acc", [&] {
      using acc_t = scalar_t;
      const acc_t *mu = mean.data_ptr<acc_t>(), *is = invstd.data_ptr<acc_t>();
      const acc_t *ga = gamma.data_ptr<acc_t>(), *be = beta.data_ptr<acc_t>();
      at::parallel_for(0, n * c, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t plane = p0; plane < p1; ++plane) {
          const int64_t ch = plane % c;
          const acc_t scale = is[ch] * ga[ch], shift = be[ch] - mu[ch] * scale;
          const data_t* src = zp + plane * hw;
          data_t* dst = yp + plane * hw;
          for (int64_t j = 0; j < hw; ++j) {
            const acc_t v = static_cast<acc_t>(src[j]) * scale + shift;
            dst[j] = static_cast<data_t>(v > acc_t(0) ? v : acc_t(0));
          }
        }
      });
    });
  });
}

void bn_relu_bwd_reduce_cpu(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean,
                            const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                            at::Tensor& sum_g, at::Tensor& sum_gx) {
  const int64_t n = z.size(0), c = z.size(1), hw = z.size(2) * z.size(3);
  FASTBLOCK_DISPATCH(z.scalar_type(), "fastblock_bn_bwd_reduce_cpu", [&] {
    using data_t = scalar_t;
    const data_t *zp = z.data_ptr<data_t>(), *dp = dy.data_ptr<data_t>();
    FASTBLOCK_DISPATCH_ACC(mean.scalar_type(), "fastblock_bn_bwd_reduce_cpu_acc", [&] {
      using acc_t = scalar_t;
      const acc_t *mu = mean.data_ptr<acc_t>(), *is = invstd.data_ptr<acc_t>();
      const acc_t *ga = gamma.data_ptr<acc_t>(), *be = beta.data_ptr<acc_t>();
      acc_t *sg = sum_g.data_ptr<acc_t>(), *sgx = sum_gx.data_ptr<acc_t>();
      at::parallel_for(0, c, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t ch = c0; ch < c1; ++ch) {
          double s1 = 0, s2 = 0;
          for (int64_t i = 0; i < n; ++i) {
            const int64_t base = (i * c + ch) * hw;
            for (int64_t j = 0; j < hw; ++j) {
              const acc_t xhat = (static_cast<acc_t>(zp[base + j]) - mu[ch]) * is[ch];
              if (xhat * ga[ch] + be[ch] > acc_t(0)) {
                const double g = static_cast<double>(dp[base + j]);
                s1 += g;
                s2 += g * static_cast<double>(xhat);
              }
            }
          }
          sg[ch] = static_cast<acc_t>(s1);
          sgx[ch] = static_cast<acc_t>(s2);
        }
      });
    });
  });
}

void bn_relu_bwd_dz_cpu(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
                        const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& sum_g,
                        const at::Tensor& sum_gx, bool batch_stats, at::Tensor& dz, at::Tensor& dz_sum) {
  const int64_t n = z.size(0), c = z.size(1), hw = z.size(2) * z.size(3);
  const double inv_count = 1.0 / (double(n) * double(hw));
  FASTBLOCK_DISPATCH(z.scalar_type(), "fastblock_bn_bwd_dz_cpu", [&] {
    using data_t = scalar_t;
    const data_t *zp = z.data_ptr<data_t>(), *dp = dy.data_ptr<data_t>();
    data_t* out = dz.data_ptr<data_t>();
    FASTBLOCK_DISPATCH_ACC(mean.scalar_type(), "fastblock_bn_bwd_dz_cpu_acc", [&] {
      using acc_t = scalar_t;
      const acc_t *mu = mean.data_ptr<acc_t>(), *is = invstd.data_ptr<acc_t>();
      const acc_t *ga = gamma.data_ptr<acc_t>(), *be = beta.data_ptr<acc_t>();
      const acc_t *sg = sum_g.data_ptr<acc_t>(), *sgx = sum_gx.data_ptr<acc_t>();
      acc_t* plane_sum = dz_sum.data_ptr<acc_t>();
      at::parallel_for(0, n * c, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t plane = p0; plane < p1; ++plane) {
          const int64_t ch = plane % c;
          const acc_t k_scale = ga[ch] * is[ch];
          const acc_t mean_g = batch_stats ? acc_t(sg[ch] * inv_count) : acc_t(0);
          const acc_t mean_gx = batch_stats ? acc_t(sgx[ch] * inv_count) : acc_t(0);
          double total = 0;
          for (int64_t j = 0; j < hw; ++j) {
            const int64_t idx = plane * hw + j;
            const acc_t xhat = (static_cast<acc_t>(zp[idx]) - mu[ch]) * is[ch];
            const acc_t g = xhat * ga[ch] + be[ch] > acc_t(0) ? static_cast<acc_t>(dp[idx]) : acc_t(0);
            const data_t v = static_cast<data_t>(k_scale * (g - mean_g - xhat * mean_gx));
            out[idx] = v;
            total += static_cast<double>(v);
          }
          plane_sum[plane] = static_cast<acc_t>(total);
        }
      });
    });
  });
}

void fold_weight_grad_cpu(const at::Tensor& gates, const at::Tensor& g, const at::Tensor& w, at::Tensor& dw,
                          at::Tensor& dgates) {
  // One pass over g: each fixed-size column block accumulates its dW columns and its partial <W_k, G_n>;
  // the partials are then summed over blocks in block order.
  const int64_t s = g.size(0), f = g.size(1), k = gates.size(1);
  constexpr int64_t kBlock = 2048;
  const int64_t blocks = (f + kBlock - 1) / kBlock;
  std::vector<double> partial(size_t(blocks * s * k), 0.0);
  FASTBLOCK_DISPATCH(g.scalar_type(), "fastblock_fold_cpu", [&] {
    using data_t = scalar_t;
    const data_t *gp = g.data_ptr<data_t>(), *wp = w.data_ptr<data_t>();
    FASTBLOCK_DISPATCH_ACC(gates.scalar_type(), "fastblock_fold_cpu_acc", [&] {
      using acc_t = scalar_t;
      const acc_t* a = gates.data_ptr<acc_t>();
      acc_t* dwp = dw.data_ptr<acc_t>();
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t j0 = b * kBlock, j1 = std::min(f, j0 + kBlock);
          for (int64_t n = 0; n < s; ++n) {
            const data_t* gn = gp + n * f;
            for (int64_t kk = 0; kk < k; ++kk) {
              const acc_t ank = a[n * k + kk];
              const data_t* wk = wp + kk * f;
              acc_t* dwk = dwp + kk * f;
              double dot = 0;
              for (int64_t j = j0; j < j1; ++j) {
                const acc_t gv = static_cast<acc_t>(gn[j]);
                dwk[j] += ank * gv;
                dot += static_cast<double>(wk[j]) * static_cast<double>(gv);
              }
              partial[size_t((b * s + n) * k + kk)] = dot;
            }
          }
        }
      });
      acc_t* da = dgates.data_ptr<acc_t>();
      const int64_t da_row = dgates.stride(0);
      for (int64_t n = 0; n < s; ++n) {
        for (int64_t kk = 0; kk < k; ++kk) {
          double total = 0;
          for (int64_t b = 0; b < blocks; ++b) total += partial[size_t((b * s + n) * k + kk)];
          da[n * da_row + kk] = static_cast<acc_t>(total);
        }
      }
    });
  });
}

}  // namespace

const DeviceKernels& cpu_kernels() {
  static const DeviceKernels kernels{mix_cpu, bn_stats_cpu, bn_relu_apply_cpu, bn_relu_bwd_reduce_cpu,
                                     bn_relu_bwd_dz_cpu, fold_weight_grad_cpu};
  return kernels;
}

}  // namespace fastblock
