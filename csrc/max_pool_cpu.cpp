// 2x2 / stride-2 max-pooling for CPU tensors: the pooling layers between the Blocks of the speed-run networks.
//
// Same results as at::max_pool2d(x, 2) (floor mode): the first maximum of a window in row-major order wins, a NaN
// wins over numbers (the last NaN of a window, as ATen's CPU kernels pick it). What differs is the bookkeeping:
// the forward records which of the 4 window positions won in one byte (ATen: an int64 index, 4x the bytes of a
// bf16 output), and the backward writes every input gradient once -- the routed value or 0 -- instead of zero-
// filling the input-sized gradient and scattering into it. Both passes are bound by memory traffic.
//
// Layouts: NCHW-contiguous or channels-last; the output, argmax and input gradient keep the input's layout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "fastblock.h"

namespace fastblock {
namespace {

// Values are compared in float (bf16: its bits shifted into a float's upper half, which the compiler vectorises;
// c10's conversion goes through a function it does not).
template <typename scalar_t>
inline at::opmath_type<scalar_t> as_float(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return c10::bit_cast<float>(static_cast<uint32_t>(v.x) << 16);
  } else {
    return static_cast<at::opmath_type<scalar_t>>(v);
  }
}

// One window: its four values in row-major order -> (max, position 0..3). Branch-free (selects), so the channel
// loops vectorise; a later position takes over when strictly greater or NaN.
template <typename scalar_t>
inline void window_max(scalar_t a, scalar_t b, scalar_t c, scalar_t d, scalar_t& out, uint8_t& pos) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t va = as_float(a), vb = as_float(b), vc = as_float(c), vd = as_float(d);
  acc_t best = va;
  scalar_t value = a;
  uint8_t p = 0;
  bool m = vb > best || vb != vb;
  best = m ? vb : best; value = m ? b : value; p = m ? 1 : p;
  m = vc > best || vc != vc;
  best = m ? vc : best; value = m ? c : value; p = m ? 2 : p;
  m = vd > best || vd != vd;
  value = m ? d : value; p = m ? 3 : p;
  out = value;
  pos = p;
}

// `len` windows. Window k's top-left value is p0[k * kStep], its right neighbour `stride` further on, and p1 is
// the row below: channels-last windows sit side by side along the channels (kStep 1, stride C), NCHW windows along
// a row (kStep 2, stride 1). Own functions with value sizes and __restrict pointers: inside the parallel loops'
// lambdas a uint8 store may alias the sizes read by reference, and the compiler left the loops scalar.
template <typename scalar_t, int64_t kStep, bool kArgmax>
inline void windows(const scalar_t* __restrict p0, const scalar_t* __restrict p1, scalar_t* __restrict out,
                    uint8_t* __restrict pos, int64_t len, int64_t stride) {
  uint8_t unused;
  for (int64_t k = 0; k < len; ++k) {
    const int64_t e = k * kStep;
    window_max(p0[e], p0[e + stride], p1[e], p1[e + stride], out[k], kArgmax ? pos[k] : unused);
  }
}

// The backward of `len` windows, laid out as in `windows`: each of the 4 positions gets the gradient or 0. It
// only moves values, so it works on their bit patterns (an unsigned integer type of the data's width; 0 is +0.0):
// the compiler vectorises selects of integers, not copies of c10::BFloat16 / c10::Half objects.
template <typename bits_t, int64_t kStep>
inline void route_windows(const bits_t* __restrict g, const uint8_t* __restrict pos, bits_t* __restrict q0,
                          bits_t* __restrict q1, int64_t len, int64_t stride) {
  for (int64_t k = 0; k < len; ++k) {
    const int64_t e = k * kStep;
    const bits_t v = g[k];
    const uint8_t p = pos[k];
    q0[e] = p == 0 ? v : bits_t(0);
    q0[e + stride] = p == 1 ? v : bits_t(0);
    q1[e] = p == 2 ? v : bits_t(0);
    q1[e + stride] = p == 3 ? v : bits_t(0);
  }
}

// Channels-last: one task per output row (n, oh); the channel vector of each window position is contiguous.
template <typename scalar_t>
void forward_channels_last(const scalar_t* x, scalar_t* y, uint8_t* argmax, int64_t n, int64_t c, int64_t h,
                           int64_t w) {
  const int64_t oh = h / 2, ow = w / 2;
  at::parallel_for(0, n * oh, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / oh, i = r % oh;
      for (int64_t j = 0; j < ow; ++j) {
        const scalar_t* p0 = x + ((b * h + 2 * i) * w + 2 * j) * c;
        const int64_t o = (r * ow + j) * c;
        if (argmax) {
          windows<scalar_t, 1, true>(p0, p0 + w * c, y + o, argmax + o, c, c);
        } else {
          windows<scalar_t, 1, false>(p0, p0 + w * c, y + o, nullptr, c, c);
        }
      }
    }
  });
}

// NCHW: one task per output row (n, c, oh); the two input rows are contiguous.
template <typename scalar_t>
void forward_nchw(const scalar_t* x, scalar_t* y, uint8_t* argmax, int64_t planes, int64_t h, int64_t w) {
  const int64_t oh = h / 2, ow = w / 2;
  at::parallel_for(0, planes * oh, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t p = r / oh, i = r % oh;
      const scalar_t* row0 = x + (p * h + 2 * i) * w;
      if (argmax) {
        windows<scalar_t, 2, true>(row0, row0 + w, y + r * ow, argmax + r * ow, ow, 1);
      } else {
        windows<scalar_t, 2, false>(row0, row0 + w, y + r * ow, nullptr, ow, 1);
      }
    }
  });
}

// Backward: the task of output row (n[, c], oh) writes input rows 2oh and 2oh + 1 whole (an odd width's last
// column gets 0), and the last output row's task also zeroes an odd height's last input row.
template <typename bits_t>
void backward_channels_last(const bits_t* gy, const uint8_t* argmax, bits_t* gx, int64_t n, int64_t c, int64_t h,
                            int64_t w) {
  const int64_t oh = h / 2, ow = w / 2;
  const bits_t zero = 0;
  at::parallel_for(0, n * oh, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / oh, i = r % oh;
      bits_t* q0 = gx + (b * h + 2 * i) * w * c;
      bits_t* q1 = q0 + w * c;
      for (int64_t j = 0; j < ow; ++j) {
        const int64_t o = (r * ow + j) * c;
        route_windows<bits_t, 1>(gy + o, argmax + o, q0 + 2 * j * c, q1 + 2 * j * c, c, c);
      }
      if (w % 2) {
        std::fill(q0 + (w - 1) * c, q0 + w * c, zero);
        std::fill(q1 + (w - 1) * c, q1 + w * c, zero);
      }
      if (h % 2 && i == oh - 1) {
        std::fill(q1 + w * c, q1 + 2 * w * c, zero);
      }
    }
  });
}

template <typename bits_t>
void backward_nchw(const bits_t* gy, const uint8_t* argmax, bits_t* gx, int64_t planes, int64_t h, int64_t w) {
  const int64_t oh = h / 2, ow = w / 2;
  const bits_t zero = 0;
  at::parallel_for(0, planes * oh, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t p = r / oh, i = r % oh;
      bits_t* q0 = gx + (p * h + 2 * i) * w;
      bits_t* q1 = q0 + w;
      route_windows<bits_t, 2>(gy + r * ow, argmax + r * ow, q0, q1, ow, 1);
      if (w % 2) {
        q0[w - 1] = zero;
        q1[w - 1] = zero;
      }
      if (h % 2 && i == oh - 1) {
        std::fill(q1 + w, q1 + 2 * w, zero);
      }
    }
  });
}

bool is_channels_last(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "fastblock max_pool2x2: expected a 4-d [N, C, H, W] tensor, got ", x.dim(), " dims");
  TORCH_CHECK(x.is_floating_point(), "fastblock max_pool2x2: expected a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, "fastblock max_pool2x2: the input (", x.sizes(),
              ") is smaller than the 2x2 window");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_pool2x2_forward_cpu(const at::Tensor& input, bool with_argmax) {
  check_input(input);
  const auto fmt = is_channels_last(input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = input.contiguous(fmt);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  at::Tensor y = at::empty({n, c, h / 2, w / 2}, x.options().memory_format(fmt));
  at::Tensor argmax = with_argmax ? at::empty({n, c, h / 2, w / 2}, x.options().dtype(at::kByte).memory_format(fmt))
                                  : at::empty({0}, x.options().dtype(at::kByte));
  if (y.numel() == 0) return {y, argmax};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastblock_max_pool2x2", [&] {
    uint8_t* pos = with_argmax ? argmax.data_ptr<uint8_t>() : nullptr;
    if (fmt == at::MemoryFormat::ChannelsLast) {
      forward_channels_last(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), pos, n, c, h, w);
    } else {
      forward_nchw(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), pos, n * c, h, w);
    }
  });
  return {y, argmax};
}

at::Tensor max_pool2x2_backward_cpu(const at::Tensor& grad_out, const at::Tensor& argmax, int64_t height,
                                    int64_t width) {
  TORCH_CHECK(argmax.scalar_type() == at::kByte && argmax.dim() == 4,
              "fastblock max_pool2x2 backward: argmax must be the forward's uint8 [N, C, H/2, W/2] tensor");
  TORCH_CHECK(grad_out.sizes() == argmax.sizes(), "fastblock max_pool2x2 backward: grad_out ", grad_out.sizes(),
              " does not match argmax ", argmax.sizes());
  TORCH_CHECK(height / 2 == argmax.size(2) && width / 2 == argmax.size(3),
              "fastblock max_pool2x2 backward: input size ", height, "x", width, " does not pool to ",
              argmax.size(2), "x", argmax.size(3));
  const auto fmt = is_channels_last(argmax) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor gy = grad_out.contiguous(fmt), pos = argmax.contiguous(fmt);
  const int64_t n = gy.size(0), c = gy.size(1);
  at::Tensor gx = at::empty({n, c, height, width}, gy.options().memory_format(fmt));
  if (gy.numel() == 0) return gx.zero_();
  TORCH_CHECK(gy.is_floating_point() && gy.element_size() <= 8, "fastblock max_pool2x2 backward: grad_out must be a "
              "floating-point tensor, got ", gy.scalar_type());
  const auto run = [&](auto zero_bits) {
    using bits_t = decltype(zero_bits);
    const auto* g = static_cast<const bits_t*>(gy.const_data_ptr());
    auto* d = static_cast<bits_t*>(gx.data_ptr());
    if (fmt == at::MemoryFormat::ChannelsLast) {
      backward_channels_last(g, pos.const_data_ptr<uint8_t>(), d, n, c, height, width);
    } else {
      backward_nchw(g, pos.const_data_ptr<uint8_t>(), d, n * c, height, width);
    }
  };
  switch (gy.element_size()) {
    case 2: run(uint16_t{0}); break;
    case 4: run(uint32_t{0}); break;
    default: run(uint64_t{0}); break;
  }
  return gx;
}

}  // namespace fastblock
