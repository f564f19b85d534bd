// CUDA kernels of sparse_detr::ms_deform_attn and its backward (float32, float16, bfloat16, float64), accumulating in
// float32 (float64 for float64). The sampling arithmetic is the shared header's, the same the CPU kernels run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <limits>

#include "ms_deform_attn.h"
#include "ms_deform_attn_bilinear.h"

// Only c10's CUDA headers on purpose: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which a minimal
// toolkit (nvcc + runtime) does not ship.

namespace sparse_detr {

namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;

template <typename scalar_t>
struct DeviceInputs {
  const scalar_t* value;               // [N, S, M, D]
  const int64_t* spatial_shapes;       // [L, 2]
  const int64_t* level_start;          // [L]
  const scalar_t* sampling_locations;  // [N, Lq, M, L, P, 2]
  const scalar_t* attention_weights;   // [N, Lq, M, L, P]
  int64_t batch, num_values, num_heads, head_dim, num_queries, num_levels, num_points;
};

// The host does not read spatial_shapes on CUDA (that would cost a sync per call), so a level that does not fit
// in value is caught here, the way PyTorch's own indexing kernels catch bad indices.
__device__ inline void check_level(int64_t start, int64_t height, int64_t width, int64_t num_values) {
  CUDA_KERNEL_ASSERT_MSG(msda_level_fits(start, height, width, num_values),
                         "ms_deform_attn: spatial_shapes / level_start_index do not fit value");
}

// One thread per output element (n, q, m, c): a warp covers consecutive channels of a value row, so the
// neighbour loads are coalesced, and the L * P samples of a head are read by all of its D threads at once.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    forward_kernel(const DeviceInputs<scalar_t> in, scalar_t* __restrict__ output, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
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

// Value-gradient scatter into an acc_t buffer. Queries race for the same rows, hence atomics; float32 (float64)
// atomics rather than native half ones, so that many small contributions to a row do not round at every add.
template <typename acc_t>
struct AtomicAdder {
  acc_t* base;
  __device__ void operator()(int64_t i, acc_t amount, bool inside) {
    if (inside) {  // outside neighbours contribute exactly zero: skip the atomic
      atomicAdd(base + i, amount);
    }
  }
};

// Sum over the kGroup lanes of a group; the group's lanes are aligned within the warp.
template <int kGroup, typename acc_t>
__device__ inline acc_t group_sum(acc_t v, unsigned mask) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(mask, v, offset, kGroup);
  }
  return v;
}

// A group of kGroup lanes (a power of two <= 32) per (n, q, m); lane j handles channels j, j + kGroup, ... The
// location and attention-weight gradients are sums over channels, reduced with warp shuffles within the group.
template <typename scalar_t, int kGroup>
__global__ void __launch_bounds__(kThreadsPerBlock) backward_kernel(const DeviceInputs<scalar_t> in,
                                                                    const scalar_t* __restrict__ grad_output,
                                                                    at::opmath_type<scalar_t>* grad_value,
                                                                    scalar_t* __restrict__ grad_sampling_locations,
                                                                    scalar_t* __restrict__ grad_attention_weights,
                                                                    int64_t num_groups) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(kGroup >= 1 && kGroup <= kWarpSize && (kGroup & (kGroup - 1)) == 0, "group must be 2^k <= 32");
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nqm = thread / kGroup;
  // Whole groups leave together, so the shuffles below only ever involve lanes of live groups.
  if (nqm >= num_groups) {
    return;
  }
  const int lane = static_cast<int>(thread % kGroup);
  const int warp_lane = static_cast<int>(threadIdx.x % kWarpSize);
  const unsigned mask =
      kGroup == kWarpSize ? 0xffffffffu : (((1u << kGroup) - 1u) << (warp_lane / kGroup * kGroup));

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
    AtomicAdder<acc_t> add{grad_value + level_offset};
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
      grad_x = group_sum<kGroup>(grad_x, mask);
      grad_y = group_sum<kGroup>(grad_y, mask);
      grad_a = group_sum<kGroup>(grad_a, mask);
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

unsigned blocks_for(int64_t threads) {
  const int64_t blocks = (threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "ms_deform_attn: input too large for one CUDA launch");
  return static_cast<unsigned>(blocks);
}

template <typename scalar_t>
DeviceInputs<scalar_t> make_inputs(const at::Tensor& value,
                                   const at::Tensor& spatial_shapes,
                                   const at::Tensor& level_start_index,
                                   const at::Tensor& sampling_locations,
                                   const at::Tensor& attention_weights,
                                   const MSDeformAttnSizes& s) {
  return {value.data_ptr<scalar_t>(),
          spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>(),
          sampling_locations.data_ptr<scalar_t>(),
          attention_weights.data_ptr<scalar_t>(),
          s.batch,
          s.num_values,
          s.num_heads,
          s.head_dim,
          s.num_queries,
          s.num_levels,
          s.num_points};
}

template <typename scalar_t, int kGroup>
void launch_backward(const DeviceInputs<scalar_t>& in,
                     const scalar_t* grad_output,
                     at::opmath_type<scalar_t>* grad_value,
                     scalar_t* grad_sampling_locations,
                     scalar_t* grad_attention_weights,
                     int64_t num_groups,
                     cudaStream_t stream) {
  backward_kernel<scalar_t, kGroup><<<blocks_for(num_groups * kGroup), kThreadsPerBlock, 0, stream>>>(
      in, grad_output, grad_value, grad_sampling_locations, grad_attention_weights, num_groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value_,
                               const at::Tensor& spatial_shapes_,
                               const at::Tensor& level_start_index_,
                               const at::Tensor& sampling_locations_,
                               const at::Tensor& attention_weights_) {
  const auto s = check_ms_deform_attn_inputs(value_, spatial_shapes_, level_start_index_, sampling_locations_,
                                             attention_weights_, /*check_levels=*/false);
  const c10::cuda::CUDAGuard guard(value_.device());
  const auto value = value_.contiguous();
  const auto spatial_shapes = spatial_shapes_.contiguous();
  const auto level_start_index = level_start_index_.contiguous();
  const auto sampling_locations = sampling_locations_.contiguous();
  const auto attention_weights = attention_weights_.contiguous();
  auto output = at::empty({s.batch, s.num_queries, s.num_heads * s.head_dim}, value.options());
  const int64_t total = output.numel();
  if (total == 0) {
    return output;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(
        make_inputs<scalar_t>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s),
        output.data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(const at::Tensor& grad_output_,
                                                                            const at::Tensor& value_,
                                                                            const at::Tensor& spatial_shapes_,
                                                                            const at::Tensor& level_start_index_,
                                                                            const at::Tensor& sampling_locations_,
                                                                            const at::Tensor& attention_weights_) {
  const auto s = check_ms_deform_attn_inputs(value_, spatial_shapes_, level_start_index_, sampling_locations_,
                                             attention_weights_, /*check_levels=*/false);
  check_ms_deform_attn_grad_output(grad_output_, value_, s);
  const c10::cuda::CUDAGuard guard(value_.device());
  const auto grad_output = grad_output_.contiguous();
  const auto value = value_.contiguous();
  const auto spatial_shapes = spatial_shapes_.contiguous();
  const auto level_start_index = level_start_index_.contiguous();
  const auto sampling_locations = sampling_locations_.contiguous();
  const auto attention_weights = attention_weights_.contiguous();

  // float16/bfloat16 values get their gradient accumulated in a float32 buffer, cast once at the end.
  const auto acc_type = at::toOpMathType(value.scalar_type());
  auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  // Every entry of these two is written by the kernel.
  auto grad_sampling_locations = at::empty(sampling_locations.sizes(), sampling_locations.options());
  auto grad_attention_weights = at::empty(attention_weights.sizes(), attention_weights.options());

  const int64_t num_groups = s.batch * s.num_queries * s.num_heads;
  if (num_groups > 0 && s.head_dim > 0 && s.num_levels * s.num_points > 0) {
    int group = 1;
    while (group < s.head_dim && group < kWarpSize) {
      group *= 2;
    }
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto in =
          make_inputs<scalar_t>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s);
      const scalar_t* go = grad_output.data_ptr<scalar_t>();
      acc_t* gv = grad_value_acc.data_ptr<acc_t>();
      scalar_t* gl = grad_sampling_locations.data_ptr<scalar_t>();
      scalar_t* ga = grad_attention_weights.data_ptr<scalar_t>();
      switch (group) {
        case 1: launch_backward<scalar_t, 1>(in, go, gv, gl, ga, num_groups, stream); break;
        case 2: launch_backward<scalar_t, 2>(in, go, gv, gl, ga, num_groups, stream); break;
        case 4: launch_backward<scalar_t, 4>(in, go, gv, gl, ga, num_groups, stream); break;
        case 8: launch_backward<scalar_t, 8>(in, go, gv, gl, ga, num_groups, stream); break;
        case 16: launch_backward<scalar_t, 16>(in, go, gv, gl, ga, num_groups, stream); break;
        default: launch_backward<scalar_t, 32>(in, go, gv, gl, ga, num_groups, stream); break;
      }
    });
  } else {
    grad_sampling_locations.zero_();
    grad_attention_weights.zero_();
  }
  return {grad_value_acc.to(value.scalar_type()), grad_sampling_locations, grad_attention_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_detr, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace sparse_detr
