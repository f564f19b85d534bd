// Multi-scale deformable attention: the operator's argument checks, shared by the CPU and the CUDA kernels.
//
// The op `sparse_detr::ms_deform_attn` and its backward `sparse_detr::ms_deform_attn_backward` are defined in
// ms_deform_attn.cpp; cpu/ and cuda/ register their kernels for them.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace sparse_detr {

// Sizes of one call, read off the (checked) inputs.
struct MSDeformAttnSizes {
  int64_t batch;        // N
  int64_t num_values;   // S, the number of value tokens over all levels
  int64_t num_heads;    // M
  int64_t head_dim;     // D
  int64_t num_queries;  // Lq
  int64_t num_levels;   // L
  int64_t num_points;   // P
};

// Checks ranks, sizes, dtypes and devices (TORCH_CHECK, errors name the argument) and returns the sizes.
// When `check_levels` is set (index tensors on the CPU) it also checks that spatial_shapes add up to S and that
// level_start_index is their exclusive prefix sum; CUDA kernels guard the same bounds with device asserts instead
// of a host sync.
MSDeformAttnSizes check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    bool check_levels);

// Checks grad_output against the forward's sizes: [N, Lq, M * D], same dtype and device as value.
void check_ms_deform_attn_grad_output(const at::Tensor& grad_output, const at::Tensor& value,
                                      const MSDeformAttnSizes& sizes);

}  // namespace sparse_detr
