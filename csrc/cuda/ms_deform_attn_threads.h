// The CUDA kernels' work, written once for the GPU and for a host harness.
//
// Everything a CUDA thread of the forward or backward kernel does is a host-device function here: turning its flat
// index into (n, q, m, channel), the loops over levels and points, the float16/bfloat16 loads and stores, and the
// value-gradient scatter. So is the host side of the ops (checks, contiguous copies, outputs, the dtype dispatch,
// the block count and the backward's group size). Two things differ between the GPU and the host, and callers plug
// them in: how the threads are launched (`Launch`), and in the backward the atomic scatter (`Adder`) and the sum
// over a group of lanes (`GroupSum`).
//
// ms_deform_attn_cuda.cu launches the kernels with atomics and warp shuffles; ms_deform_attn_harness.cpp, compiled
// into every build, calls the same thread functions one thread index after another with plain adds, so the CPU
// tests run everything the GPU runs except the launch itself.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/macros/Macros.h>

#include <limits>
#include <tuple>

#include "ms_deform_attn.h"
#include "ms_deform_attn_bilinear.h"

namespace sparse_detr {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;

template <typename scalar_t>
struct KernelInputs {
  const scalar_t* value;               // [N, S, M, D]
  const int64_t* spatial_shapes;       // [L, 2]
  const int64_t* level_start;          // [L]
  const scalar_t* sampling_locations;  // [N, Lq, M, L, P, 2]
  const scalar_t* attention_weights;   // [N, Lq, M, L, P]
  int64_t batch, num_values, num_heads, head_dim, num_queries, num_levels, num_points;
};

// The host does not read spatial_shapes on CUDA (that would cost a sync per call), so a level that does not fit
// in value is caught here, the way PyTorch's own indexing kernels catch bad indices.
MSDA_HOST_DEVICE inline void check_level(int64_t start, int64_t height, int64_t width, int64_t num_values) {
  CUDA_KERNEL_ASSERT_MSG(msda_level_fits(start, height, width, num_values),
                         "ms_deform_attn: spatial_shapes / level_start_index do not fit value");
}

// Forward thread `index` of a launch of at least `total` threads: one thread per output element (n, q, m, c). A
// warp covers consecutive channels of a value row, so the neighbour loads are coalesced, and the L * P samples of a
// head are read by all of its D threads at once.
template <typename scalar_t>
MSDA_HOST_DEVICE inline void forward_thread(const KernelInputs<scalar_t>& in, scalar_t* output, int64_t total,
                                            int64_t index) {
  using acc_t = at::opmath_type<scalar_t>;
  if (index >= total) {
    return;
  }
  const int64_t D = in.head_dim, M = in.num_heads, L = in.num_levels, P = in.num_points;
  const int64_t c = index % D;
  const int64_t nqm = index / D;  // flat (n, q, m)
  const int64_t m = nqm % M;
  const int64_t n = nqm / (M * in.num_queries);
  const int64_t row_stride = M * D;
  const scalar_t* value_nm = in.value + n * in.num_values * row_stride + m * D;
  const scalar_t* loc = in.sampling_locations + nqm * L * P * 2;
  const scalar_t* attn = in.attention_weights + nqm * L * P;
  acc_t acc = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t start = in.level_start[l], height = in.spatial_shapes[2 * l], width = in.spatial_shapes[2 * l + 1];
    check_level(start, height, width, in.num_values);
    const scalar_t* level_value = value_nm + start * row_stride;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t lp = l * P + p;
      const auto pt = msda_locate<acc_t>(static_cast<acc_t>(loc[2 * lp]), static_cast<acc_t>(loc[2 * lp + 1]),
                                         height, width);
      acc += static_cast<acc_t>(attn[lp]) * msda_gather(pt, level_value, row_stride, c);
    }
  }
  output[index] = static_cast<scalar_t>(acc);
}

// Backward thread `thread`: a group of kGroup lanes (a power of two <= 32) per (n, q, m), lane j handling channels
// j, j + kGroup, ... The value gradient is scattered into an acc_t buffer through `Adder{base}(index, amount,
// inside)` (queries race for the same rows: atomics on the GPU). The location and attention-weight gradients are
// sums over channels: each lane sums its own, `group_sum` adds them up over the group (every lane of a live group
// calls it equally often, with the same sequence of quantities), and lane 0 writes them.
template <typename scalar_t, int kGroup, typename Adder, typename GroupSum>
MSDA_HOST_DEVICE inline void backward_thread(const KernelInputs<scalar_t>& in,
                                             const scalar_t* grad_output,
                                             at::opmath_type<scalar_t>* grad_value,
                                             scalar_t* grad_sampling_locations,
                                             scalar_t* grad_attention_weights,
                                             int64_t num_groups,
                                             int64_t thread,
                                             GroupSum& group_sum) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(kGroup >= 1 && kGroup <= kWarpSize && (kGroup & (kGroup - 1)) == 0, "group must be 2^k <= 32");
  const int64_t nqm = thread / kGroup;
  // Whole groups leave together, so the group sums only ever involve lanes of live groups.
  if (nqm >= num_groups) {
    return;
  }
  const int lane = static_cast<int>(thread % kGroup);
  const int64_t D = in.head_dim, M = in.num_heads, L = in.num_levels, P = in.num_points;
  const int64_t m = nqm % M;
  const int64_t n = nqm / (M * in.num_queries);
  const int64_t row_stride = M * D;
  const int64_t head_offset = n * in.num_values * row_stride + m * D;
  const scalar_t* go = grad_output + nqm * D;
  const scalar_t* loc = in.sampling_locations + nqm * L * P * 2;
  const scalar_t* attn = in.attention_weights + nqm * L * P;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t start = in.level_start[l], height = in.spatial_shapes[2 * l], width = in.spatial_shapes[2 * l + 1];
    check_level(start, height, width, in.num_values);
    const int64_t level_offset = head_offset + start * row_stride;
    const scalar_t* level_value = in.value + level_offset;
    Adder add{grad_value + level_offset};
    for (int64_t p = 0; p < P; ++p) {
      const int64_t lp = l * P + p;
      const auto pt = msda_locate<acc_t>(static_cast<acc_t>(loc[2 * lp]), static_cast<acc_t>(loc[2 * lp + 1]),
                                         height, width);
      const acc_t a = static_cast<acc_t>(attn[lp]);
      acc_t grad_x = 0, grad_y = 0, grad_a = 0;
      for (int64_t c = lane; c < D; c += kGroup) {
        const acc_t g = static_cast<acc_t>(go[c]);
        const auto b = msda_scatter(pt, level_value, row_stride, c, g * a, add);
        grad_a += g * b.sample;
        grad_x += b.grad_x;
        grad_y += b.grad_y;
      }
      grad_x = group_sum(grad_x);
      grad_y = group_sum(grad_y);
      grad_a = group_sum(grad_a);
      if (lane == 0) {
        // d(pixel x)/d(normalized x) = width, and likewise for y.
        grad_sampling_locations[(nqm * L * P + lp) * 2] = static_cast<scalar_t>(grad_x * static_cast<acc_t>(width));
        grad_sampling_locations[(nqm * L * P + lp) * 2 + 1] =
            static_cast<scalar_t>(grad_y * static_cast<acc_t>(height));
        grad_attention_weights[nqm * L * P + lp] = static_cast<scalar_t>(grad_a);
      }
    }
  }
}

// Blocks of kThreadsPerBlock that cover `threads`.
inline int64_t blocks_for(int64_t threads) {
  const int64_t blocks = (threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "ms_deform_attn: input too large for one CUDA launch");
  return blocks;
}

// Lanes per (n, q, m) in the backward: D rounded up to a power of two, at most a warp.
inline int backward_group_size(int64_t head_dim) {
  int group = 1;
  while (group < head_dim && group < kWarpSize) {
    group *= 2;
  }
  return group;
}

// The op's tensor arguments, checked (check_ms_deform_attn_inputs) and made contiguous.
struct ContiguousInputs {
  MSDeformAttnSizes sizes;
  at::Tensor value, spatial_shapes, level_start_index, sampling_locations, attention_weights;
};

inline ContiguousInputs checked_contiguous_inputs(const at::Tensor& value,
                                                  const at::Tensor& spatial_shapes,
                                                  const at::Tensor& level_start_index,
                                                  const at::Tensor& sampling_locations,
                                                  const at::Tensor& attention_weights,
                                                  bool check_levels) {
  // A braced list is evaluated in order: the checks come first.
  return {check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                      attention_weights, check_levels),
          value.contiguous(),
          spatial_shapes.contiguous(),
          level_start_index.contiguous(),
          sampling_locations.contiguous(),
          attention_weights.contiguous()};
}

template <typename scalar_t>
KernelInputs<scalar_t> make_kernel_inputs(const ContiguousInputs& in) {
  const auto& s = in.sizes;
  return {in.value.data_ptr<scalar_t>(),
          in.spatial_shapes.data_ptr<int64_t>(),
          in.level_start_index.data_ptr<int64_t>(),
          in.sampling_locations.data_ptr<scalar_t>(),
          in.attention_weights.data_ptr<scalar_t>(),
          s.batch,
          s.num_values,
          s.num_heads,
          s.head_dim,
          s.num_queries,
          s.num_levels,
          s.num_points};
}

// The forward op around the launch: float32, float16, bfloat16 and float64, accumulating in float32 (float64 for
// float64). `launch.template forward<scalar_t>(inputs, output, total)` runs forward_thread for every thread index
// of blocks_for(total) blocks. `check_levels`: see check_ms_deform_attn_inputs.
template <typename Launch>
at::Tensor ms_deform_attn_forward_launch(const at::Tensor& value,
                                         const at::Tensor& spatial_shapes,
                                         const at::Tensor& level_start_index,
                                         const at::Tensor& sampling_locations,
                                         const at::Tensor& attention_weights,
                                         bool check_levels,
                                         const Launch& launch) {
  const auto in = checked_contiguous_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                            attention_weights, check_levels);
  const auto& s = in.sizes;
  auto output = at::empty({s.batch, s.num_queries, s.num_heads * s.head_dim}, in.value.options());
  const int64_t total = output.numel();
  if (total == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_forward", [&] {
    launch.template forward<scalar_t>(make_kernel_inputs<scalar_t>(in), output.data_ptr<scalar_t>(), total);
  });
  return output;
}

// The backward op around the launch. `launch.template backward<scalar_t, kGroup>(inputs, grad_output, grad_value,
// grad_sampling_locations, grad_attention_weights, num_groups)` runs backward_thread for every thread index of
// blocks_for(num_groups * kGroup) blocks.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_launch(const at::Tensor& grad_output_,
                                                                             const at::Tensor& value,
                                                                             const at::Tensor& spatial_shapes,
                                                                             const at::Tensor& level_start_index,
                                                                             const at::Tensor& sampling_locations,
                                                                             const at::Tensor& attention_weights,
                                                                             bool check_levels,
                                                                             const Launch& launch) {
  const auto in = checked_contiguous_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                            attention_weights, check_levels);
  const auto& s = in.sizes;
  check_ms_deform_attn_grad_output(grad_output_, value, s);
  const auto grad_output = grad_output_.contiguous();

  // float16/bfloat16 values get their gradient accumulated in a float32 buffer, cast once at the end.
  const auto acc_type = at::toOpMathType(in.value.scalar_type());
  auto grad_value_acc = at::zeros(in.value.sizes(), in.value.options().dtype(acc_type));
  // Every entry of these two is written by the kernel.
  auto grad_sampling_locations = at::empty(in.sampling_locations.sizes(), in.sampling_locations.options());
  auto grad_attention_weights = at::empty(in.attention_weights.sizes(), in.attention_weights.options());

  const int64_t num_groups = s.batch * s.num_queries * s.num_heads;
  if (num_groups > 0 && s.head_dim > 0 && s.num_levels * s.num_points > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto inputs = make_kernel_inputs<scalar_t>(in);
      const scalar_t* go = grad_output.data_ptr<scalar_t>();
      acc_t* gv = grad_value_acc.data_ptr<acc_t>();
      scalar_t* gl = grad_sampling_locations.data_ptr<scalar_t>();
      scalar_t* ga = grad_attention_weights.data_ptr<scalar_t>();
      switch (backward_group_size(s.head_dim)) {
        case 1: launch.template backward<scalar_t, 1>(inputs, go, gv, gl, ga, num_groups); break;
        case 2: launch.template backward<scalar_t, 2>(inputs, go, gv, gl, ga, num_groups); break;
        case 4: launch.template backward<scalar_t, 4>(inputs, go, gv, gl, ga, num_groups); break;
        case 8: launch.template backward<scalar_t, 8>(inputs, go, gv, gl, ga, num_groups); break;
        case 16: launch.template backward<scalar_t, 16>(inputs, go, gv, gl, ga, num_groups); break;
        default: launch.template backward<scalar_t, 32>(inputs, go, gv, gl, ga, num_groups); break;
      }
    });
  } else {
    grad_sampling_locations.zero_();
    grad_attention_weights.zero_();
  }
  return {grad_value_acc.to(in.value.scalar_type()), grad_sampling_locations, grad_attention_weights};
}

}  // namespace sparse_detr
