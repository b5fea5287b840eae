// CPU kernels of the fastblock extension (see fastblock.h for what each computes).
//
// Parallelised with at::parallel_for over independent units (channels, (n, c) planes, column blocks).
// Reductions are deterministic: every unit reduces its own data in a fixed order and units are combined in a fixed
// order (in double), independent of the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "fastblock.h"

namespace fastblock {
namespace {

#define FASTBLOCK_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Statistics tensors are float32, or float64 for float64 data.
#define FASTBLOCK_DISPATCH_ACC(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__)

// Reductions over one contiguous plane use kLanes independent accumulators: the compiler vectorises them without
// -ffast-math, and the summation order is fixed (deterministic). Planes are then combined in double.
constexpr int64_t kLanes = 8;

template <typename acc_t>
inline acc_t combine_lanes(const acc_t* lanes) {
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// float32/float64 data (accumulated in its own type) takes the Vectorized kernels mix_rows / fold_rows; the
// plain loops below them remain for bf16/fp16 (accumulating in float32) and for eval-mode folding's shift.
bool same_dtype_fp(const at::Tensor& data, const at::Tensor& gates) {
  const auto dt = data.scalar_type();
  return (dt == at::kFloat || dt == at::kDouble) && gates.scalar_type() == dt;
}

// out[n, :] = sum_k a[n, k] w[k, :] for float32/float64 (data type == accumulation type). Parallel over column
// blocks: a block of the K kernel rows (K * 4 KiB at float32) stays in L1 while every sample's row of it is
// written, so the kernels are read from memory once and the output is streamed out once. Four vectors per step:
// four independent FMA chains hide the FMA latency (one chain ran at ~9 cycles per vector).
template <typename T>
void mix_rows(const T* a, const T* w, T* out, int64_t s, int64_t k, int64_t f) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kCols = 1024, V = Vec::size();
  const int64_t blocks = (f + kCols - 1) / kCols;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * kCols, len = std::min(kCols, f - j0);
      const T* wb = w + j0;
      for (int64_t n = 0; n < s; ++n) {
        const T* an = a + n * k;
        T* o = out + n * f + j0;
        int64_t j = 0;
        for (; j + 4 * V <= len; j += 4 * V) {
          const Vec a0(an[0]);
          Vec r0 = a0 * Vec::loadu(wb + j), r1 = a0 * Vec::loadu(wb + j + V);
          Vec r2 = a0 * Vec::loadu(wb + j + 2 * V), r3 = a0 * Vec::loadu(wb + j + 3 * V);
          for (int64_t kk = 1; kk < k; ++kk) {
            const Vec ak(an[kk]);
            const T* wk = wb + kk * f + j;
            r0 = at::vec::fmadd(ak, Vec::loadu(wk), r0);
            r1 = at::vec::fmadd(ak, Vec::loadu(wk + V), r1);
            r2 = at::vec::fmadd(ak, Vec::loadu(wk + 2 * V), r2);
            r3 = at::vec::fmadd(ak, Vec::loadu(wk + 3 * V), r3);
          }
          r0.store(o + j);
          r1.store(o + j + V);
          r2.store(o + j + 2 * V);
          r3.store(o + j + 3 * V);
        }
        for (; j < len; ++j) {
          T acc = an[0] * wb[j];
          for (int64_t kk = 1; kk < k; ++kk) acc += an[kk] * wb[kk * f + j];
          o[j] = acc;
        }
      }
    }
  });
}

void mix_cpu(const at::Tensor& gates, const at::Tensor& w, const at::Tensor* scale, const at::Tensor* shift,
             int64_t inner, at::Tensor& out) {
  if (!shift && same_dtype_fp(w, gates)) {
    const int64_t k = w.size(0), f = w.size(1);
    // eval-mode folding scales the K small kernels, not the S mixed ones
    const at::Tensor ws = scale ? (w.view({k, f / inner, inner}) * scale->view({1, -1, 1})).view({k, f}) : w;
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fastblock_mix_rows", [&] {
      mix_rows<scalar_t>(gates.data_ptr<scalar_t>(), ws.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                         gates.size(0), k, f);
    });
    return;
  }
  // out[n, block] = sum_k a[n,k] w_k[block] over L1-sized column blocks (parallel over (sample, block)), with
  // 8-lane inner loops the compiler vectorises; then the optional per-output-channel scale/shift (eval-mode
  // BatchNorm folding) and one cast to the data type.
  const int64_t s = gates.size(0), k = gates.size(1), f = w.size(1);
  constexpr int64_t kBlock = 2048;
  const int64_t blocks = (f + kBlock - 1) / kBlock;
  FASTBLOCK_DISPATCH(w.scalar_type(), "fastblock_mix_cpu", [&] {
    using data_t = scalar_t;
    const data_t* wp = w.data_ptr<data_t>();
    data_t* op = out.data_ptr<data_t>();
    FASTBLOCK_DISPATCH_ACC(gates.scalar_type(), "fastblock_mix_cpu_acc", [&] {
      using acc_t = scalar_t;
      const acc_t* a = gates.data_ptr<acc_t>();
      const acc_t* sc = scale ? scale->data_ptr<acc_t>() : nullptr;
      const acc_t* sh = shift ? shift->data_ptr<acc_t>() : nullptr;
      at::parallel_for(0, s * blocks, 1, [&](int64_t t0, int64_t t1) {
        acc_t r[kBlock];
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n = t / blocks, j0 = (t % blocks) * kBlock, len = std::min(kBlock, f - j0);
          for (int64_t j = 0; j < len; ++j) r[j] = acc_t(0);
          for (int64_t kk = 0; kk < k; ++kk) {
            const acc_t ank = a[n * k + kk];
            const data_t* wk = wp + kk * f + j0;
            int64_t j = 0;
            for (; j + kLanes <= len; j += kLanes)
              for (int64_t l = 0; l < kLanes; ++l) r[j + l] += ank * static_cast<acc_t>(wk[j + l]);
            for (; j < len; ++j) r[j] += ank * static_cast<acc_t>(wk[j]);
          }
          data_t* o = op + n * f + j0;
          if (sc || sh) {
            for (int64_t j = 0; j < len;) {  // one output channel's segment at a time (no division per element)
              const int64_t ch = (j0 + j) / inner, end = std::min(len, (ch + 1) * inner - j0);
              const acc_t m = sc ? sc[ch] : acc_t(1), t = sh ? sh[ch] : acc_t(0);
              for (; j < end; ++j) o[j] = static_cast<data_t>(r[j] * m + t);
            }
          } else {
            for (int64_t j = 0; j < len; ++j) o[j] = static_cast<data_t>(r[j]);
          }
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
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    const data_t* zp = z.data_ptr<data_t>();
    at::parallel_for(0, c, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        // two passes, mean then squared deviations: no cancellation
        double sum = 0;
        for (int64_t i = 0; i < n; ++i) {
          const data_t* p = zp + (i * c + ch) * hw;
          acc_t lanes[kLanes] = {};
          int64_t j = 0;
          for (; j + kLanes <= hw; j += kLanes)
            for (int64_t l = 0; l < kLanes; ++l) lanes[l] += static_cast<acc_t>(p[j + l]);
          for (; j < hw; ++j) lanes[0] += static_cast<acc_t>(p[j]);
          sum += static_cast<double>(combine_lanes(lanes));
        }
        const double mu = sum / count;
        const acc_t mu_acc = static_cast<acc_t>(mu);
        double m2 = 0;
        for (int64_t i = 0; i < n; ++i) {
          const data_t* p = zp + (i * c + ch) * hw;
          acc_t lanes[kLanes] = {};
          int64_t j = 0;
          for (; j + kLanes <= hw; j += kLanes)
            for (int64_t l = 0; l < kLanes; ++l) {
              const acc_t d = static_cast<acc_t>(p[j + l]) - mu_acc;
              lanes[l] += d * d;
            }
          for (; j < hw; ++j) {
            const acc_t d = static_cast<acc_t>(p[j]) - mu_acc;
            lanes[0] += d * d;
          }
          m2 += static_cast<double>(combine_lanes(lanes));
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

// A plane's data as acc_t: the pointer itself for float32/float64, else converted into buf (len <= kChunk).
constexpr int64_t kChunk = 256;

template <typename data_t, typename acc_t>
inline const acc_t* as_acc(const data_t* p, int64_t len, acc_t* buf) {
  if constexpr (std::is_same_v<data_t, acc_t>) {
    return p;
  } else {
    for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<acc_t>(p[j]);
    return buf;
  }
}

template <typename acc_t>
inline acc_t hsum(const at::vec::Vectorized<acc_t>& v) {  // fixed-order horizontal sum (deterministic)
  acc_t lanes[at::vec::Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t total = 0;
  for (int64_t l = 0; l < at::vec::Vectorized<acc_t>::size(); ++l) total += lanes[l];
  return total;
}

// The activation after BatchNorm, on a value u = xhat * gamma + beta or on Vectorized lanes of them, and its
// backward grad(u, dy) = dy * act'(u). The kernels below take one as a template argument (with_activation picks it).
struct ReluAct {
  template <typename T>
  static T one(T u) {
    return std::isnan(u) ? u : (u > T(0) ? u : T(0));  // NaN propagates, as in torch.relu
  }
  template <typename T>
  static at::vec::Vectorized<T> vec(const at::vec::Vectorized<T>& u) {
    return at::vec::maximum(u, at::vec::Vectorized<T>(T(0)));  // at::vec::maximum propagates NaN too
  }
  // torch's ReLU mask is "not <= 0": a NaN passes the gradient
  template <typename T>
  static T grad_one(T u, T dy) {
    return u <= T(0) ? T(0) : dy;
  }
  template <typename T>
  static at::vec::Vectorized<T> grad_vec(const at::vec::Vectorized<T>& u, const at::vec::Vectorized<T>& dy) {
    using Vec = at::vec::Vectorized<T>;
    return Vec::blendv(dy, Vec(T(0)), u <= Vec(T(0)));
  }
};

// GELU(u) = u * Phi(u) with the exact (erf) normal CDF, as F.gelu's default; its derivative Phi(u) + u * phi(u) is
// written as torch's GELU backward writes it.
struct GeluAct {
  template <typename T>
  static T one(T u) {
    return u * T(0.5) * (T(1) + std::erf(u * T(kSqrtHalf)));
  }
  template <typename T>
  static at::vec::Vectorized<T> vec(const at::vec::Vectorized<T>& u) {
    using Vec = at::vec::Vectorized<T>;
    return u * Vec(T(0.5)) * (Vec(T(1)) + (u * Vec(T(kSqrtHalf))).erf());
  }
  template <typename T>
  static T grad_one(T u, T dy) {
    const T cdf = T(0.5) * (T(1) + std::erf(u * T(kSqrtHalf)));
    const T pdf = std::exp(T(-0.5) * u * u) * T(kInvSqrt2Pi);
    return dy * (cdf + u * pdf);
  }
  template <typename T>
  static at::vec::Vectorized<T> grad_vec(const at::vec::Vectorized<T>& u, const at::vec::Vectorized<T>& dy) {
    using Vec = at::vec::Vectorized<T>;
    const Vec gauss = (Vec(T(-0.5)) * u * u).exp();  // exp(-u^2 / 2)
    Vec cdf;
    if constexpr (std::is_same_v<T, float>) {
      // float: erf(x) = sign(x) (1 - p(t) exp(-x^2)), t = 1 / (1 + 0.3275911 |x|) (Abramowitz & Stegun 7.1.26,
      // |error| < 1.5e-7: the form ATen's own vectorised float erf takes). At x = u / sqrt(2), exp(-x^2) is the
      // pdf's exponential, so one exp serves both -- the exp is what the backward passes spend their time on.
      const Vec t = Vec(1.f) / at::vec::fmadd(Vec(0.3275911f), (u * Vec(float(kSqrtHalf))).abs(), Vec(1.f));
      Vec p = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
      p = at::vec::fmadd(p, t, Vec(1.421413741f));
      p = at::vec::fmadd(p, t, Vec(-0.284496736f));
      p = at::vec::fmadd(p, t, Vec(0.254829592f));
      const Vec tail = Vec(0.5f) * p * t * gauss;  // Phi(-|u|)
      cdf = Vec::blendv(Vec(1.f) - tail, tail, u < Vec(0.f));
    } else {
      cdf = Vec(T(0.5)) * (Vec(T(1)) + (u * Vec(T(kSqrtHalf))).erf());
    }
    return dy * (cdf + u * gauss * Vec(T(kInvSqrt2Pi)));
  }
};

template <typename Act>
void bn_act_apply_cpu(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& gamma,
                       const at::Tensor& beta, at::Tensor& y) {
  const int64_t n = z.size(0), c = z.size(1), hw = z.size(2) * z.size(3);
  FASTBLOCK_DISPATCH(z.scalar_type(), "fastblock_bn_apply_cpu", [&] {
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const data_t* zp = z.data_ptr<data_t>();
    data_t* yp = y.data_ptr<data_t>();
    const acc_t *mu = mean.data_ptr<acc_t>(), *is = invstd.data_ptr<acc_t>();
    const acc_t *ga = gamma.data_ptr<acc_t>(), *be = beta.data_ptr<acc_t>();
    at::parallel_for(0, n * c, 1, [&](int64_t p0, int64_t p1) {
      acc_t zbuf[kChunk], obuf[kChunk];
      for (int64_t plane = p0; plane < p1; ++plane) {
        const int64_t ch = plane % c;
        const acc_t scale = is[ch] * ga[ch], shift = be[ch] - mu[ch] * scale;
        const Vec vscale(scale), vshift(shift);
        for (int64_t j0 = 0; j0 < hw; j0 += kChunk) {
          const int64_t len = std::min(kChunk, hw - j0);
          const acc_t* src = as_acc(zp + plane * hw + j0, len, zbuf);
          acc_t* dst = std::is_same_v<data_t, acc_t> ? reinterpret_cast<acc_t*>(yp + plane * hw + j0) : obuf;
          int64_t j = 0;
          for (; j + Vec::size() <= len; j += Vec::size())
            Act::vec(at::vec::fmadd(Vec::loadu(src + j), vscale, vshift)).store(dst + j);
          for (; j < len; ++j) dst[j] = Act::one(src[j] * scale + shift);
          if constexpr (!std::is_same_v<data_t, acc_t>) {
            for (int64_t i = 0; i < len; ++i) yp[plane * hw + j0 + i] = static_cast<data_t>(obuf[i]);
          }
        }
      }
    });
  });
}

// The BN+activation backward kernels recompute, per element, xhat = (z - mean) * invstd and u = xhat * gamma + beta
// from z (cheaper than saving y), and use g = dy * act'(u) (ReLU: its mask). They are written with ATen's
// Vectorized (AVX2 when the build targets it): gcc vectorises the plain-loop versions' two interleaved reductions
// and select poorly (bench/RESULTS.md).
template <typename Act>
void bn_act_bwd_reduce_cpu(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean,
                            const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                            at::Tensor& sum_g, at::Tensor& sum_gx) {
  // Pass 1, parallel over (n, c) planes: per-plane sums of g and g * xhat. Pass 2: per channel, the N plane
  // sums added in sample order (double). Deterministic for any thread count.
  const int64_t n = z.size(0), c = z.size(1), hw = z.size(2) * z.size(3);
  std::vector<double> plane_g(static_cast<size_t>(n * c)), plane_gx(static_cast<size_t>(n * c));
  FASTBLOCK_DISPATCH(z.scalar_type(), "fastblock_bn_bwd_reduce_cpu", [&] {
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const data_t *zp = z.data_ptr<data_t>(), *dp = dy.data_ptr<data_t>();
    const acc_t *mu = mean.data_ptr<acc_t>(), *is = invstd.data_ptr<acc_t>();
    const acc_t *ga = gamma.data_ptr<acc_t>(), *be = beta.data_ptr<acc_t>();
    acc_t *sg = sum_g.data_ptr<acc_t>(), *sgx = sum_gx.data_ptr<acc_t>();
    at::parallel_for(0, n * c, 1, [&](int64_t p0, int64_t p1) {
      acc_t zbuf[kChunk], dbuf[kChunk];
      for (int64_t plane = p0; plane < p1; ++plane) {
        const int64_t ch = plane % c;
        const acc_t m = mu[ch], s = is[ch], gm = ga[ch], bt = be[ch];
        const Vec vm(m), vs(s), vgm(gm), vbt(bt);
        Vec v1(acc_t(0)), v2(acc_t(0));
        acc_t t1 = 0, t2 = 0;
        for (int64_t j0 = 0; j0 < hw; j0 += kChunk) {
          const int64_t len = std::min(kChunk, hw - j0);
          const acc_t* zr = as_acc(zp + plane * hw + j0, len, zbuf);
          const acc_t* dr = as_acc(dp + plane * hw + j0, len, dbuf);
          int64_t j = 0;
          for (; j + Vec::size() <= len; j += Vec::size()) {
            const Vec xhat = (Vec::loadu(zr + j) - vm) * vs;
            const Vec g = Act::grad_vec(xhat * vgm + vbt, Vec::loadu(dr + j));
            v1 = v1 + g;
            v2 = at::vec::fmadd(g, xhat, v2);
          }
          for (; j < len; ++j) {
            const acc_t xhat = (zr[j] - m) * s;
            const acc_t g = Act::grad_one(xhat * gm + bt, dr[j]);
            t1 += g;
            t2 += g * xhat;
          }
        }
        plane_g[static_cast<size_t>(plane)] = static_cast<double>(hsum(v1) + t1);
        plane_gx[static_cast<size_t>(plane)] = static_cast<double>(hsum(v2) + t2);
      }
    });
    for (int64_t ch = 0; ch < c; ++ch) {
      double s1 = 0, s2 = 0;
      for (int64_t i = 0; i < n; ++i) {
        s1 += plane_g[static_cast<size_t>(i * c + ch)];
        s2 += plane_gx[static_cast<size_t>(i * c + ch)];
      }
      sg[ch] = static_cast<acc_t>(s1);
      sgx[ch] = static_cast<acc_t>(s2);
    }
  });
}

template <typename Act>
void bn_act_bwd_dz_cpu(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
                        const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& sum_g,
                        const at::Tensor& sum_gx, bool batch_stats, at::Tensor& dz, at::Tensor& dz_sum) {
  const int64_t n = z.size(0), c = z.size(1), hw = z.size(2) * z.size(3);
  const double inv_count = 1.0 / (double(n) * double(hw));
  FASTBLOCK_DISPATCH(z.scalar_type(), "fastblock_bn_bwd_dz_cpu", [&] {
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const data_t *zp = z.data_ptr<data_t>(), *dp = dy.data_ptr<data_t>();
    data_t* out = dz.data_ptr<data_t>();
    const acc_t *mu = mean.data_ptr<acc_t>(), *is = invstd.data_ptr<acc_t>();
    const acc_t *ga = gamma.data_ptr<acc_t>(), *be = beta.data_ptr<acc_t>();
    const acc_t *sg = sum_g.data_ptr<acc_t>(), *sgx = sum_gx.data_ptr<acc_t>();
    acc_t* plane_sum = dz_sum.data_ptr<acc_t>();
    at::parallel_for(0, n * c, 1, [&](int64_t p0, int64_t p1) {
      acc_t zbuf[kChunk], dbuf[kChunk], obuf[kChunk];
      for (int64_t plane = p0; plane < p1; ++plane) {
        const int64_t ch = plane % c;
        const acc_t m = mu[ch], s = is[ch], gm = ga[ch], bt = be[ch], k_scale = gm * s;
        const acc_t mean_g = batch_stats ? acc_t(sg[ch] * inv_count) : acc_t(0);
        const acc_t mean_gx = batch_stats ? acc_t(sgx[ch] * inv_count) : acc_t(0);
        const Vec vm(m), vs(s), vgm(gm), vbt(bt), vk(k_scale), vmg(mean_g), vmgx(mean_gx);
        Vec vsum(acc_t(0));
        acc_t tsum = 0;
        for (int64_t j0 = 0; j0 < hw; j0 += kChunk) {
          const int64_t len = std::min(kChunk, hw - j0);
          const acc_t* zr = as_acc(zp + plane * hw + j0, len, zbuf);
          const acc_t* dr = as_acc(dp + plane * hw + j0, len, dbuf);
          // dz = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)); written in acc_t, stored as data_t
          acc_t* o = std::is_same_v<data_t, acc_t> ? reinterpret_cast<acc_t*>(out + plane * hw + j0) : obuf;
          int64_t j = 0;
          // eval mode: dz = gamma * invstd * g alone (no 0 * xhat term: a NaN z must not reach dz through it)
          for (; j + Vec::size() <= len; j += Vec::size()) {
            const Vec xhat = (Vec::loadu(zr + j) - vm) * vs;
            const Vec g = Act::grad_vec(xhat * vgm + vbt, Vec::loadu(dr + j));
            (batch_stats ? vk * (g - vmg - xhat * vmgx) : vk * g).store(o + j);
          }
          for (; j < len; ++j) {
            const acc_t xhat = (zr[j] - m) * s;
            const acc_t g = Act::grad_one(xhat * gm + bt, dr[j]);
            o[j] = batch_stats ? k_scale * (g - mean_g - xhat * mean_gx) : k_scale * g;
          }
          if constexpr (!std::is_same_v<data_t, acc_t>) {  // round to data_t; sum what was stored
            data_t* dst = out + plane * hw + j0;
            for (int64_t i = 0; i < len; ++i) {
              dst[i] = static_cast<data_t>(o[i]);
              o[i] = static_cast<acc_t>(dst[i]);
            }
          }
          j = 0;
          for (; j + Vec::size() <= len; j += Vec::size()) vsum = vsum + Vec::loadu(o + j);
          for (; j < len; ++j) tsum += o[j];
        }
        plane_sum[plane] = hsum(vsum) + tsum;
      }
    });
  });
}

// y += alpha * g and returns <w, g>, in one pass (kLanes accumulators). restrict: y never aliases g or w, which
// lets the compiler vectorise both halves.
template <typename acc_t, typename data_t>
inline acc_t axpy_dot(int64_t len, acc_t alpha, const acc_t* __restrict__ g, const data_t* __restrict__ w,
                      acc_t* __restrict__ y) {
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      y[j + l] += alpha * g[j + l];
      lanes[l] += static_cast<acc_t>(w[j + l]) * g[j + l];
    }
  for (; j < len; ++j) {
    y[j] += alpha * g[j];
    lanes[0] += static_cast<acc_t>(w[j]) * g[j];
  }
  return combine_lanes(lanes);
}

// The dW/da folds' last step: da[n, k] = sum over column blocks b of partial[(b * s + n) * k + k'], added in
// block order (double), so the result does not depend on how the blocks were split among threads.
template <typename acc_t>
void sum_block_partials(const std::vector<double>& partial, int64_t blocks, int64_t s, int64_t k, acc_t* da,
                        int64_t da_row) {
  for (int64_t n = 0; n < s; ++n) {
    for (int64_t kk = 0; kk < k; ++kk) {
      double total = 0;
      for (int64_t b = 0; b < blocks; ++b) total += partial[size_t((b * s + n) * k + kk)];
      da[n * da_row + kk] = static_cast<acc_t>(total);
    }
  }
}

// dw[k, :] += sum_n a[n, k] g[n, :] and da[n, k] = <w[k, :], g[n, :]> for float32/float64, in ONE pass over g.
// Parallel over column blocks (a block of dw's and w's K rows stays in L1); each block's partial dot products
// are kept and added in block order (sum_block_partials). Two vectors per step, with two dot accumulators, so
// the dot product is not one latency-bound FMA chain.
template <typename T>
void fold_rows(const T* a, const T* g, const T* w, T* dw, T* da, int64_t da_row, int64_t s, int64_t k, int64_t f) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kCols = 512, V = Vec::size();
  const int64_t blocks = (f + kCols - 1) / kCols;
  std::vector<double> partial(size_t(blocks * s * k));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * kCols, len = std::min(kCols, f - j0);
      for (int64_t n = 0; n < s; ++n) {
        const T* gn = g + n * f + j0;
        for (int64_t kk = 0; kk < k; ++kk) {
          const T* wk = w + kk * f + j0;
          T* dwk = dw + kk * f + j0;
          const T alpha = a[n * k + kk];
          const Vec valpha(alpha);
          Vec dot0(T(0)), dot1(T(0));
          int64_t j = 0;
          for (; j + 2 * V <= len; j += 2 * V) {
            const Vec g0 = Vec::loadu(gn + j), g1 = Vec::loadu(gn + j + V);
            at::vec::fmadd(valpha, g0, Vec::loadu(dwk + j)).store(dwk + j);
            at::vec::fmadd(valpha, g1, Vec::loadu(dwk + j + V)).store(dwk + j + V);
            dot0 = at::vec::fmadd(Vec::loadu(wk + j), g0, dot0);
            dot1 = at::vec::fmadd(Vec::loadu(wk + j + V), g1, dot1);
          }
          T tail = 0;
          for (; j < len; ++j) {
            dwk[j] += alpha * gn[j];
            tail += wk[j] * gn[j];
          }
          partial[size_t((b * s + n) * k + kk)] = static_cast<double>(hsum(dot0 + dot1) + tail);
        }
      }
    }
  });
  sum_block_partials(partial, blocks, s, k, da, da_row);
}

void fold_weight_grad_cpu(const at::Tensor& gates, const at::Tensor& g, const at::Tensor& w, at::Tensor& dw,
                          at::Tensor& dgates) {
  if (same_dtype_fp(g, gates) && dw.scalar_type() == g.scalar_type()) {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "fastblock_fold_rows", [&] {
      fold_rows<scalar_t>(gates.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                          dw.data_ptr<scalar_t>(), dgates.data_ptr<scalar_t>(), dgates.stride(0), g.size(0),
                          gates.size(1), g.size(1));
    });
    return;
  }
  // One pass over g: each fixed-size column block accumulates its dW columns (axpy per sample and kernel) and
  // its partial <W_k, G_n> (acc_t within the block, double across blocks); partials are summed in block order.
  // The block size is fixed, not derived from the thread count, so results do not depend on it.
  const int64_t s = g.size(0), f = g.size(1), k = gates.size(1);
  constexpr int64_t kBlock = 1024;
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
        acc_t gbuf[kBlock];
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t j0 = b * kBlock, len = std::min(f, j0 + kBlock) - j0;
          for (int64_t n = 0; n < s; ++n) {
            const data_t* gn = gp + n * f + j0;
            for (int64_t j = 0; j < len; ++j) gbuf[j] = static_cast<acc_t>(gn[j]);
            for (int64_t kk = 0; kk < k; ++kk) {
              partial[size_t((b * s + n) * k + kk)] = static_cast<double>(
                  axpy_dot(len, a[n * k + kk], gbuf, wp + kk * f + j0, dwp + kk * f + j0));
            }
          }
        }
      });
      sum_block_partials(partial, blocks, s, k, dgates.data_ptr<acc_t>(), dgates.stride(0));
    });
  });
}

void expand_gated_cpu(const at::Tensor& x, const at::Tensor& gates, at::Tensor& out) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3), k = gates.size(1);
  FASTBLOCK_DISPATCH(x.scalar_type(), "fastblock_expand_gated_cpu", [&] {
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    const data_t* xp = x.data_ptr<data_t>();
    data_t* op = out.data_ptr<data_t>();
    const acc_t* a = gates.data_ptr<acc_t>();
    at::parallel_for(0, n * k, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i = t / k;
        const acc_t g = a[t];
        const data_t* src = xp + i * c * hw;
        data_t* dst = op + t * c * hw;
        for (int64_t j = 0; j < c * hw; ++j) dst[j] = static_cast<data_t>(g * static_cast<acc_t>(src[j]));
      }
    });
  });
}

void reduce_gated_cpu(const at::Tensor& x, const at::Tensor& g, const at::Tensor& gates, at::Tensor& dx,
                      at::Tensor& dgates) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3), k = gates.size(1);
  const int64_t len = c * hw;
  FASTBLOCK_DISPATCH(x.scalar_type(), "fastblock_reduce_gated_cpu", [&] {
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    const data_t *xp = x.data_ptr<data_t>(), *gp = g.data_ptr<data_t>();
    data_t* dxp = dx.defined() ? dx.data_ptr<data_t>() : nullptr;  // undefined: dgates alone
    const acc_t* a = gates.data_ptr<acc_t>();
    acc_t* da = dgates.data_ptr<acc_t>();
    // with_dx: also sum a_k g_k into row (a compile-time choice, so the dgates-only loop carries no row work)
    auto sample = [&](int64_t i, std::vector<acc_t>& row, auto with_dx) {
      const data_t* xi = xp + i * len;
      if constexpr (decltype(with_dx)::value) std::fill(row.begin(), row.end(), acc_t(0));
      for (int64_t kk = 0; kk < k; ++kk) {
        const data_t* gk = gp + (i * k + kk) * len;
        const acc_t ak = a[i * k + kk];
        acc_t lanes[kLanes] = {};
        int64_t j = 0;
        for (; j + kLanes <= len; j += kLanes)
          for (int64_t l = 0; l < kLanes; ++l) {
            const acc_t gv = static_cast<acc_t>(gk[j + l]);
            if constexpr (decltype(with_dx)::value) row[j + l] += ak * gv;
            lanes[l] += gv * static_cast<acc_t>(xi[j + l]);
          }
        for (; j < len; ++j) {
          const acc_t gv = static_cast<acc_t>(gk[j]);
          if constexpr (decltype(with_dx)::value) row[j] += ak * gv;
          lanes[0] += gv * static_cast<acc_t>(xi[j]);
        }
        da[i * k + kk] = combine_lanes(lanes);
      }
      if constexpr (decltype(with_dx)::value) {
        data_t* dst = dxp + i * len;
        for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<data_t>(row[j]);
      }
    };
    at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> row(dxp != nullptr ? static_cast<size_t>(len) : 0);
      for (int64_t i = i0; i < i1; ++i) {
        if (dxp != nullptr)
          sample(i, row, std::true_type{});
        else
          sample(i, row, std::false_type{});
      }
    });
  });
}


// ---------------------------------------------------------------------------------------------------------------
// Channels-last (NHWC) versions. A channels-last [N, C, H, W] tensor is a [N*H*W rows, C] matrix: the kernels
// run along rows, vectorised over the channels of a row. The op sends a tensor here when it is channels-last and
// not also NCHW-contiguous (for H = W = 1 or C = 1 the two layouts are the same memory and the NCHW kernels serve).
// Per-channel reductions add fixed blocks of kRowBlock rows (acc_t within a block, double across blocks, in block
// order); per-sample ones add a sample's rows in order: deterministic for any thread count.
// ---------------------------------------------------------------------------------------------------------------
constexpr int64_t kRowBlock = 128;

bool is_rows(const at::Tensor& t) {
  if (t.is_contiguous()) return false;
  TORCH_INTERNAL_ASSERT(t.is_contiguous(at::MemoryFormat::ChannelsLast),
                        "fastblock: a CPU kernel got a tensor that is neither NCHW- nor channels-last-contiguous");
  return true;
}

// Vectors of acc_t loaded from / stored to data_t memory: bf16/fp16 converted (round to nearest even on the way
// out), float32/float64 as they are. kV = Vectorized<acc_t>::size() values per vector.
template <typename data_t, typename acc_t>
inline at::vec::Vectorized<acc_t> load_acc(const data_t* p) {
  if constexpr (std::is_same_v<data_t, acc_t>) {
    return at::vec::Vectorized<acc_t>::loadu(p);
  } else {
    at::vec::Vectorized<acc_t> v;
    at::vec::load_to_float(p, v);
    return v;
  }
}

// The channels-last BN+activation backward's start at channel j of a row (the NCHW kernels' note above): xhat and
// g = dy * act'(u), from z, dy and the per-channel mean, invstd, gamma and beta.
template <typename Act, typename data_t, typename acc_t>
struct ActGradRow {
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t *mu, *is, *ga, *be;

  std::pair<Vec, Vec> vec(const data_t* z, const data_t* dy, int64_t j) const {  // kV channels from j
    const Vec xhat = (load_acc<data_t, acc_t>(z + j) - Vec::loadu(mu + j)) * Vec::loadu(is + j);
    return {xhat, Act::grad_vec(xhat * Vec::loadu(ga + j) + Vec::loadu(be + j), load_acc<data_t, acc_t>(dy + j))};
  }

  std::pair<acc_t, acc_t> one(const data_t* z, const data_t* dy, int64_t j) const {
    const acc_t xhat = (static_cast<acc_t>(z[j]) - mu[j]) * is[j];
    return {xhat, Act::grad_one(xhat * ga[j] + be[j], static_cast<acc_t>(dy[j]))};
  }
};

// Stores two vectors (2 kV values) at p and returns, in a and b, the values as stored (rounded to data_t), so that
// sums of a stored tensor add what was stored.
template <typename data_t, typename acc_t>
inline void store_pair(data_t* p, at::vec::Vectorized<acc_t>& a, at::vec::Vectorized<acc_t>& b) {
  if constexpr (std::is_same_v<data_t, acc_t>) {
    a.store(p);
    b.store(p + at::vec::Vectorized<acc_t>::size());
  } else {
    const auto packed = at::vec::convert_from_float<data_t>(a, b);
    packed.store(p);
    std::tie(a, b) = at::vec::convert_to_float<data_t>(packed);
  }
}

// One vector (kV values) at p, as store_pair.
template <typename data_t, typename acc_t>
inline void store_one(data_t* p, at::vec::Vectorized<acc_t>& a) {
  if constexpr (std::is_same_v<data_t, acc_t>) {
    a.store(p);
  } else {
    const auto packed = at::vec::convert_from_float<data_t>(a, a);
    packed.store(p, at::vec::Vectorized<acc_t>::size());
    a = std::get<0>(at::vec::convert_to_float<data_t>(packed));
  }
}

// Writes a row of c values: out[j..] = f_vec(j) (kV values) or f_one(j) (one value, the tail), as data_t; sink(j, v)
// / sink_one(j, v) then see each value as stored.
template <typename data_t, typename acc_t, typename FVec, typename FOne, typename Sink, typename SinkOne>
inline void row_write(data_t* out, int64_t c, const FVec& f_vec, const FOne& f_one, const Sink& sink,
                      const SinkOne& sink_one) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kV = Vec::size();
  int64_t j = 0;
  for (; j + 2 * kV <= c; j += 2 * kV) {
    Vec a = f_vec(j), b = f_vec(j + kV);
    store_pair(out + j, a, b);
    sink(j, a);
    sink(j + kV, b);
  }
  for (; j + kV <= c; j += kV) {
    Vec a = f_vec(j);
    store_one(out + j, a);
    sink(j, a);
  }
  for (; j < c; ++j) {
    out[j] = static_cast<data_t>(f_one(j));
    sink_one(j, static_cast<acc_t>(out[j]));
  }
}

template <typename data_t, typename acc_t, typename FVec, typename FOne>
inline void row_write(data_t* out, int64_t c, const FVec& f_vec, const FOne& f_one) {
  row_write<data_t, acc_t>(out, c, f_vec, f_one, [](int64_t, const at::vec::Vectorized<acc_t>&) {},
                           [](int64_t, acc_t) {});
}

// Per-channel sums of NS terms over all rows of a [rows, c] matrix: sums[s * c + ch] (double). Each fixed block of
// kRowBlock rows is summed in acc_t, rows in order, a chunk of kChunk vectors of channels at a time with the sums
// held in registers; blocks are then added in block order in double. add_vec(r, j, acc) adds row r's NS terms for
// channels j..j+kV to acc[0..NS), add_one(r, j, acc) those of channel j alone.
template <typename acc_t, int NS, typename AddVec, typename AddOne>
std::vector<double> channel_sums(int64_t rows, int64_t c, const AddVec& add_vec, const AddOne& add_one) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kV = Vec::size(), kChunk = 4;
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  std::vector<double> partial(static_cast<size_t>(blocks * NS * c));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock, r1 = std::min(rows, r0 + kRowBlock);
      double* out = partial.data() + b * NS * c;
      auto flush = [&](const Vec* acc, int64_t j) {
        for (int s = 0; s < NS; ++s) {
          __at_align__ acc_t lanes[kV];
          acc[s].store(lanes);
          for (int64_t l = 0; l < kV; ++l) out[s * c + j + l] = static_cast<double>(lanes[l]);
        }
      };
      int64_t j = 0;
      for (; j + kChunk * kV <= c; j += kChunk * kV) {
        Vec acc[kChunk][NS];
        for (auto& chunk : acc)
          for (auto& v : chunk) v = Vec(acc_t(0));
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t q = 0; q < kChunk; ++q) add_vec(r, j + q * kV, acc[q]);
        for (int64_t q = 0; q < kChunk; ++q) flush(acc[q], j + q * kV);
      }
      for (; j + kV <= c; j += kV) {
        Vec acc[NS];
        for (auto& v : acc) v = Vec(acc_t(0));
        for (int64_t r = r0; r < r1; ++r) add_vec(r, j, acc);
        flush(acc, j);
      }
      for (; j < c; ++j) {
        acc_t acc[NS] = {};
        for (int64_t r = r0; r < r1; ++r) add_one(r, j, acc);
        for (int s = 0; s < NS; ++s) out[s * c + j] = static_cast<double>(acc[s]);
      }
    }
  });
  std::vector<double> sums(static_cast<size_t>(NS * c), 0.0);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t q = 0; q < NS * c; ++q) sums[static_cast<size_t>(q)] += partial[static_cast<size_t>(b * NS * c + q)];
  return sums;
}

void bn_stats_rows(const at::Tensor& z, at::Tensor& mean, at::Tensor& invstd, at::Tensor* running_mean,
                   at::Tensor* running_var, double momentum, double eps) {
  const int64_t c = z.size(1), rows = z.numel() / c;
  const double count = static_cast<double>(rows);
  FASTBLOCK_DISPATCH(z.scalar_type(), "fastblock_bn_stats_rows", [&] {
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const data_t* zp = z.data_ptr<data_t>();
    // two passes, mean then squared deviations: no cancellation
    const std::vector<double> sums = channel_sums<acc_t, 1>(
        rows, c, [&](int64_t r, int64_t j, Vec* acc) { acc[0] = acc[0] + load_acc<data_t, acc_t>(zp + r * c + j); },
        [&](int64_t r, int64_t j, acc_t* acc) { acc[0] += static_cast<acc_t>(zp[r * c + j]); });
    std::vector<acc_t> mu(static_cast<size_t>(c));
    for (int64_t j = 0; j < c; ++j) mu[static_cast<size_t>(j)] = static_cast<acc_t>(sums[static_cast<size_t>(j)] / count);
    const std::vector<double> m2 = channel_sums<acc_t, 1>(
        rows, c,
        [&](int64_t r, int64_t j, Vec* acc) {
          const Vec d = load_acc<data_t, acc_t>(zp + r * c + j) - Vec::loadu(mu.data() + j);
          acc[0] = at::vec::fmadd(d, d, acc[0]);
        },
        [&](int64_t r, int64_t j, acc_t* acc) {
          const acc_t d = static_cast<acc_t>(zp[r * c + j]) - mu[static_cast<size_t>(j)];
          acc[0] += d * d;
        });
    for (int64_t ch = 0; ch < c; ++ch) {
      const double mean_c = sums[static_cast<size_t>(ch)] / count, m2_c = m2[static_cast<size_t>(ch)];
      FASTBLOCK_DISPATCH_ACC(mean.scalar_type(), "fastblock_bn_stats_rows_out", [&] {
        mean.data_ptr<scalar_t>()[ch] = static_cast<scalar_t>(mean_c);
        invstd.data_ptr<scalar_t>()[ch] = static_cast<scalar_t>(1.0 / std::sqrt(m2_c / count + eps));
      });
      if (running_mean) {
        const double unbiased = m2_c / (count - 1.0);
        FASTBLOCK_DISPATCH(running_mean->scalar_type(), "fastblock_running_stats_rows", [&] {
          scalar_t* rm = running_mean->data_ptr<scalar_t>();
          scalar_t* rv = running_var->data_ptr<scalar_t>();
          rm[ch] = static_cast<scalar_t>((1.0 - momentum) * static_cast<double>(rm[ch]) + momentum * mean_c);
          rv[ch] = static_cast<scalar_t>((1.0 - momentum) * static_cast<double>(rv[ch]) + momentum * unbiased);
        });
      }
    }
  });
}

template <typename Act>
void bn_act_apply_rows(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
                        const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& y) {
  const int64_t c = z.size(1), rows = z.numel() / c;
  FASTBLOCK_DISPATCH(z.scalar_type(), "fastblock_bn_apply_rows", [&] {
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const data_t* zp = z.data_ptr<data_t>();
    data_t* yp = y.data_ptr<data_t>();
    const acc_t *mu = mean.data_ptr<acc_t>(), *is = invstd.data_ptr<acc_t>();
    const acc_t *ga = gamma.data_ptr<acc_t>(), *be = beta.data_ptr<acc_t>();
    std::vector<acc_t> scale(static_cast<size_t>(c)), shift(static_cast<size_t>(c));
    for (int64_t j = 0; j < c; ++j) {
      scale[j] = is[j] * ga[j];
      shift[j] = be[j] - mu[j] * scale[j];
    }
    at::parallel_for(0, rows, kRowBlock, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const data_t* src = zp + r * c;
        row_write<data_t, acc_t>(
            yp + r * c, c,
            [&](int64_t j) {
              return Act::vec(at::vec::fmadd(load_acc<data_t, acc_t>(src + j), Vec::loadu(scale.data() + j),
                                             Vec::loadu(shift.data() + j)));
            },
            [&](int64_t j) { return Act::one(static_cast<acc_t>(src[j]) * scale[j] + shift[j]); });
      }
    });
  });
}

template <typename Act>
void bn_act_bwd_reduce_rows(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean,
                             const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                             at::Tensor& sum_g, at::Tensor& sum_gx) {
  const int64_t c = z.size(1), rows = z.numel() / c;
  FASTBLOCK_DISPATCH(z.scalar_type(), "fastblock_bn_bwd_reduce_rows", [&] {
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const data_t *zp = z.data_ptr<data_t>(), *dp = dy.data_ptr<data_t>();
    const ActGradRow<Act, data_t, acc_t> act_grad{mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
                                               gamma.data_ptr<acc_t>(), beta.data_ptr<acc_t>()};
    // one pass computing both sums: [sum g (c values), sum g * xhat (c values)]
    const std::vector<double> sums = channel_sums<acc_t, 2>(
        rows, c,
        [&](int64_t r, int64_t j, Vec* acc) {
          const auto [xhat, g] = act_grad.vec(zp + r * c, dp + r * c, j);
          acc[0] = acc[0] + g;
          acc[1] = at::vec::fmadd(g, xhat, acc[1]);
        },
        [&](int64_t r, int64_t j, acc_t* acc) {
          const auto [xhat, g] = act_grad.one(zp + r * c, dp + r * c, j);
          acc[0] += g;
          acc[1] += g * xhat;
        });
    acc_t *sg = sum_g.data_ptr<acc_t>(), *sgx = sum_gx.data_ptr<acc_t>();
    for (int64_t j = 0; j < c; ++j) {
      sg[j] = static_cast<acc_t>(sums[static_cast<size_t>(j)]);
      sgx[j] = static_cast<acc_t>(sums[static_cast<size_t>(c + j)]);
    }
  });
}

template <typename Act>
void bn_act_bwd_dz_rows(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean,
                         const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                         const at::Tensor& sum_g, const at::Tensor& sum_gx, bool batch_stats, at::Tensor& dz,
                         at::Tensor& dz_sum) {
  const int64_t n = z.size(0), c = z.size(1), hw = z.size(2) * z.size(3);
  const double inv_count = 1.0 / (double(n) * double(hw));
  FASTBLOCK_DISPATCH(z.scalar_type(), "fastblock_bn_bwd_dz_rows", [&] {
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const data_t *zp = z.data_ptr<data_t>(), *dp = dy.data_ptr<data_t>();
    data_t* out = dz.data_ptr<data_t>();
    const acc_t *is = invstd.data_ptr<acc_t>(), *ga = gamma.data_ptr<acc_t>();
    const acc_t *sg = sum_g.data_ptr<acc_t>(), *sgx = sum_gx.data_ptr<acc_t>();
    const ActGradRow<Act, data_t, acc_t> act_grad{mean.data_ptr<acc_t>(), is, ga, beta.data_ptr<acc_t>()};
    std::vector<acc_t> kscale(static_cast<size_t>(c)), mean_g(static_cast<size_t>(c)), mean_gx(static_cast<size_t>(c));
    for (int64_t j = 0; j < c; ++j) {
      kscale[j] = ga[j] * is[j];
      mean_g[j] = batch_stats ? acc_t(sg[j] * inv_count) : acc_t(0);
      mean_gx[j] = batch_stats ? acc_t(sgx[j] * inv_count) : acc_t(0);
    }
    acc_t* sample_sum = dz_sum.data_ptr<acc_t>();
    at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        acc_t* total = sample_sum + i * c;
        std::fill(total, total + c, acc_t(0));
        for (int64_t r = i * hw; r < (i + 1) * hw; ++r) {
          const data_t *zr = zp + r * c, *dr = dp + r * c;
          // dz = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)); eval mode: gamma * invstd * g alone (no
          // 0 * xhat term: a NaN z must not reach dz through it). The per-sample sums add dz as stored.
          row_write<data_t, acc_t>(
              out + r * c, c,
              [&](int64_t j) {
                const auto [xhat, g] = act_grad.vec(zr, dr, j);
                const Vec ks = Vec::loadu(kscale.data() + j);
                return batch_stats ? ks * (g - Vec::loadu(mean_g.data() + j) - xhat * Vec::loadu(mean_gx.data() + j))
                                   : ks * g;
              },
              [&](int64_t j) {
                const auto [xhat, g] = act_grad.one(zr, dr, j);
                return batch_stats ? kscale[j] * (g - mean_g[j] - xhat * mean_gx[j]) : kscale[j] * g;
              },
              [&](int64_t j, const Vec& v) { (Vec::loadu(total + j) + v).store(total + j); },
              [&](int64_t j, acc_t v) { total[j] += v; });
        }
      }
    });
  });
}

void expand_gated_rows(const at::Tensor& x, const at::Tensor& gates, at::Tensor& out) {
  const int64_t c = x.size(1), hw = x.size(2) * x.size(3), rows = x.numel() / c, k = gates.size(1);
  FASTBLOCK_DISPATCH(x.scalar_type(), "fastblock_expand_gated_rows", [&] {
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const data_t* xp = x.data_ptr<data_t>();
    data_t* op = out.data_ptr<data_t>();
    const acc_t* a = gates.data_ptr<acc_t>();
    at::parallel_for(0, rows, kRowBlock, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const data_t* src = xp + r * c;
        for (int64_t kk = 0; kk < k; ++kk) {
          const acc_t g = a[(r / hw) * k + kk];
          row_write<data_t, acc_t>(
              op + (r * k + kk) * c, c, [&](int64_t j) { return load_acc<data_t, acc_t>(src + j) * Vec(g); },
              [&](int64_t j) { return g * static_cast<acc_t>(src[j]); });
        }
      }
    });
  });
}

// dx (when defined) = sum_k a_k g_k, and dgates[n, k] = <x_n, g_{n,k}>. An undefined dx (an ungated K=1 Block,
// whose dx is g itself) computes dgates alone.
void reduce_gated_rows(const at::Tensor& x, const at::Tensor& g, const at::Tensor& gates, at::Tensor& dx,
                       at::Tensor& dgates) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3), k = gates.size(1);
  FASTBLOCK_DISPATCH(x.scalar_type(), "fastblock_reduce_gated_rows", [&] {
    using data_t = scalar_t;
    using acc_t = at::opmath_type<data_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t kV = Vec::size();
    const data_t *xp = x.data_ptr<data_t>(), *gp = g.data_ptr<data_t>();
    data_t* dxp = dx.defined() ? dx.data_ptr<data_t>() : nullptr;
    const acc_t* a = gates.data_ptr<acc_t>();
    acc_t* da = dgates.data_ptr<acc_t>();
    at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> dots(static_cast<size_t>(k * c));  // per (k, channel) partial <x, g_k> of this sample
      for (int64_t i = i0; i < i1; ++i) {
        std::fill(dots.begin(), dots.end(), acc_t(0));
        const acc_t* ai = a + i * k;
        for (int64_t r = i * hw; r < (i + 1) * hw; ++r) {
          const data_t* xr = xp + r * c;
          const data_t* gr = gp + r * k * c;
          auto dot_vec = [&](int64_t kk, int64_t j, const Vec& gv) {
            acc_t* dot = dots.data() + kk * c + j;
            at::vec::fmadd(gv, load_acc<data_t, acc_t>(xr + j), Vec::loadu(dot)).store(dot);
          };
          auto dot_one = [&](int64_t kk, int64_t j, acc_t gv) { dots[kk * c + j] += gv * static_cast<acc_t>(xr[j]); };
          if (dxp == nullptr) {
            for (int64_t kk = 0; kk < k; ++kk) {
              int64_t j = 0;
              for (; j + kV <= c; j += kV) dot_vec(kk, j, load_acc<data_t, acc_t>(gr + kk * c + j));
              for (; j < c; ++j) dot_one(kk, j, static_cast<acc_t>(gr[kk * c + j]));
            }
            continue;
          }
          row_write<data_t, acc_t>(
              dxp + r * c, c,
              [&](int64_t j) {
                Vec sum(acc_t(0));
                for (int64_t kk = 0; kk < k; ++kk) {
                  const Vec gv = load_acc<data_t, acc_t>(gr + kk * c + j);
                  sum = at::vec::fmadd(Vec(ai[kk]), gv, sum);
                  dot_vec(kk, j, gv);
                }
                return sum;
              },
              [&](int64_t j) {
                acc_t sum = 0;
                for (int64_t kk = 0; kk < k; ++kk) {
                  const acc_t gv = static_cast<acc_t>(gr[kk * c + j]);
                  sum += ai[kk] * gv;
                  dot_one(kk, j, gv);
                }
                return sum;
              });
        }
        for (int64_t kk = 0; kk < k; ++kk) {
          acc_t lanes[kLanes] = {};
          for (int64_t j = 0; j < c; ++j) lanes[j % kLanes] += dots[kk * c + j];
          da[i * k + kk] = combine_lanes(lanes);
        }
      }
    });
  });
}

// The DeviceKernels entries: channels-last tensors take the row kernels, NCHW ones the plane kernels.
void bn_stats_any(const at::Tensor& z, at::Tensor& mean, at::Tensor& invstd, at::Tensor* running_mean,
                  at::Tensor* running_var, double momentum, double eps) {
  (is_rows(z) ? bn_stats_rows : bn_stats_cpu)(z, mean, invstd, running_mean, running_var, momentum, eps);
}

void bn_act_apply_any(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
                      const at::Tensor& gamma, const at::Tensor& beta, int64_t activation, at::Tensor& y) {
  with_activation<ReluAct, GeluAct>(activation, [&](auto act) {
    using Act = decltype(act);
    (is_rows(z) ? bn_act_apply_rows<Act> : bn_act_apply_cpu<Act>)(z, mean, invstd, gamma, beta, y);
  });
}

void bn_act_bwd_reduce_any(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean,
                           const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                           int64_t activation, at::Tensor& sum_g, at::Tensor& sum_gx) {
  with_activation<ReluAct, GeluAct>(activation, [&](auto act) {
    using Act = decltype(act);
    (is_rows(z) ? bn_act_bwd_reduce_rows<Act> : bn_act_bwd_reduce_cpu<Act>)(dy, z, mean, invstd, gamma, beta, sum_g,
                                                                             sum_gx);
  });
}

void bn_act_bwd_dz_any(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
                       const at::Tensor& gamma, const at::Tensor& beta, int64_t activation, const at::Tensor& sum_g,
                       const at::Tensor& sum_gx, bool batch_stats, at::Tensor& dz, at::Tensor& dz_sum) {
  with_activation<ReluAct, GeluAct>(activation, [&](auto act) {
    using Act = decltype(act);
    (is_rows(z) ? bn_act_bwd_dz_rows<Act> : bn_act_bwd_dz_cpu<Act>)(dy, z, mean, invstd, gamma, beta, sum_g, sum_gx,
                                                                     batch_stats, dz, dz_sum);
  });
}

void expand_gated_any(const at::Tensor& x, const at::Tensor& gates, at::Tensor& out) {
  (is_rows(x) ? expand_gated_rows : expand_gated_cpu)(x, gates, out);
}

void reduce_gated_any(const at::Tensor& x, const at::Tensor& g, const at::Tensor& gates, at::Tensor& dx,
                      at::Tensor& dgates) {
  (is_rows(x) ? reduce_gated_rows : reduce_gated_cpu)(x, g, gates, dx, dgates);
}

}  // namespace

const DeviceKernels& cpu_kernels() {
  static const DeviceKernels kernels{mix_cpu,          bn_stats_any,        bn_act_apply_any,
                                     bn_act_bwd_reduce_any, bn_act_bwd_dz_any, fold_weight_grad_cpu,
                                     expand_gated_any, reduce_gated_any,  /*channels_last=*/true};
  return kernels;
}

}  // namespace fastblock
