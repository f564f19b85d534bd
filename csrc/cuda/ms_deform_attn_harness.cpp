// The CUDA kernels run on the host: ops `sparse_detr_cuda_harness::ms_deform_attn` and `..._backward`, same schema
// as the real ones, for CPU tensors of any dtype the CUDA kernels take (float32, float16, bfloat16, float64).
//
// They run the host side of the CUDA ops and then call the kernels' thread functions (ms_deform_attn_threads.h)
// serially, once for every thread index of the launch the GPU would get, tail of the last block included. Only the
// launch differs: atomic adds become plain adds, and the warp-shuffle sum over a group of lanes is done on values
// the group's lanes leave behind. Compiled into every build, so that CI tests the kernels' logic without a GPU.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cuda/ms_deform_attn_threads.h"

namespace sparse_detr {

namespace {

// The sum over a group that `__shfl_xor_sync` computes (a butterfly: at each step every lane adds the value of the
// lane `offset` away), for lanes that run one after another. Threads run from the highest index down, so lane 0 of
// a group comes after all its other lanes: they leave the value of each call in `values` (call-major, kGroup
// values a call) and lane 0, the one lane that uses the sum, adds them up in the butterfly's order.
template <typename acc_t, int kGroup>
struct SerialGroupSum {
  acc_t* values;
  int lane;
  int64_t call = 0;

  acc_t operator()(acc_t v) {
    acc_t* slot = values + kGroup * call++;
    slot[lane] = v;
    if (lane != 0) {
      return v;
    }
    acc_t lanes[kGroup];
    std::copy(slot, slot + kGroup, lanes);
    for (int offset = kGroup / 2; offset > 0; offset /= 2) {
      acc_t next[kGroup];
      for (int j = 0; j < kGroup; ++j) {
        next[j] = lanes[j] + lanes[j ^ offset];
      }
      std::copy(next, next + kGroup, lanes);
    }
    return lanes[0];
  }
};

struct SerialLaunch {
  template <typename scalar_t>
  void forward(const KernelInputs<scalar_t>& in, scalar_t* output, int64_t total) const {
    const int64_t threads = blocks_for(total) * kThreadsPerBlock;
    for (int64_t t = 0; t < threads; ++t) {
      forward_thread(in, output, total, t);
    }
  }

  template <typename scalar_t, int kGroup>
  void backward(const KernelInputs<scalar_t>& in,
                const scalar_t* grad_output,
                at::opmath_type<scalar_t>* grad_value,
                scalar_t* grad_sampling_locations,
                scalar_t* grad_attention_weights,
                int64_t num_groups) const {
    using acc_t = at::opmath_type<scalar_t>;
    // Three group sums per sample.
    std::vector<acc_t> values(static_cast<size_t>(kGroup) * 3 * in.num_levels * in.num_points);
    for (int64_t t = blocks_for(num_groups * kGroup) * kThreadsPerBlock - 1; t >= 0; --t) {
      SerialGroupSum<acc_t, kGroup> group_sum{values.data(), static_cast<int>(t % kGroup)};
      backward_thread<scalar_t, kGroup, PlainAdder<acc_t>>(in, grad_output, grad_value, grad_sampling_locations,
                                                           grad_attention_weights, num_groups, t, group_sum);
    }
  }
};

at::Tensor ms_deform_attn_harness(const at::Tensor& value,
                                  const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index,
                                  const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights) {
  return ms_deform_attn_forward_launch(value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights, /*check_levels=*/true, SerialLaunch{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_harness(const at::Tensor& grad_output,
                                                                               const at::Tensor& value,
                                                                               const at::Tensor& spatial_shapes,
                                                                               const at::Tensor& level_start_index,
                                                                               const at::Tensor& sampling_locations,
                                                                               const at::Tensor& attention_weights) {
  return ms_deform_attn_backward_launch(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights, /*check_levels=*/true, SerialLaunch{});
}

}  // namespace

// Schemas inferred from the functions (arguments as the real ops', positional); CPU tensors only.
TORCH_LIBRARY(sparse_detr_cuda_harness, m) {
  m.def("ms_deform_attn", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(ms_deform_attn_harness)));
  m.def("ms_deform_attn_backward", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(ms_deform_attn_backward_harness)));
}

}  // namespace sparse_detr
