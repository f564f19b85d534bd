// Multi-scale deformable attention: the operator's argument checks, shared by the CPU and the CUDA kernels.
//
// The op `sparse_detr::ms_deform_attn` and its backward `sparse_detr::ms_deform_attn_backward` are defined in
// ms_deform_attn.cpp; cpu/ and cuda/ register their kernels for them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <string>
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

// The input specification of ms_deform_attn, written once, here: the compiled op checks it whichever way it is
// called (torch.ops, torch.compile, export, the Python wrapper `ms_deform_attn` in
// sparse_detr/layers/ms_deform_attn_op.py), applying the rules in this order and raising the first broken one as
// "ms_deform_attn: ..." (TORCH_CHECK_TYPE is Python's TypeError, TORCH_CHECK_VALUE its ValueError). The table
// BAD_INPUTS in tests/layers/test_ms_deform_attn_op.py runs every rule through the op, against the exact message.
// The pure-PyTorch fallback (no compiled extension) checks none of it itself: PyTorch's own ops reject what it
// cannot compute, as torchvision.ops' Python references do.
//
//   0. Each argument is a Tensor: the schema's `Tensor` arguments enforce it (an error naming the argument).
//   1. Ranks, argument by argument (ValueError): value [N, S, M, D], spatial_shapes [L, 2], level_start_index [L],
//      sampling_locations [N, Lq, M, L, P, 2], attention_weights [N, Lq, M, L, P].
//   2. Dtypes (TypeError): value is floating point; sampling_locations, then attention_weights, have value's
//      dtype; spatial_shapes, then level_start_index, are int64. Dtypes are named as Python names them
//      ("torch.float64").
//   3. Devices (ValueError): spatial_shapes, level_start_index, sampling_locations, attention_weights, in this
//      order, are on value's device.
//   4. Sizes (ValueError), dim by dim, against N, M of value, L of spatial_shapes and Lq, P of sampling_locations:
//      spatial_shapes dim 1 is 2; level_start_index dim 0 is L; sampling_locations dims 0, 2, 3, 5 are N, M, L, 2;
//      attention_weights dims 0 to 4 are N, Lq, M, L, P.
//   5. Levels (ValueError), read from the values of spatial_shapes and level_start_index, level by level:
//      a. H and W are positive;
//      b. level_start_index[l] is the number of positions of the levels before l;
//      c. H * W fits in the positions of value left after them. Checked exactly (msda_level_fits), so that a level
//         like 2^32 x 2^32, whose H * W wraps around in int64, is rejected rather than read out of bounds.
//      Then, after the last level: the levels add up to S.
//
// Rule 5 needs spatial_shapes and level_start_index on the host, so it runs only where they already are:
//   - C++, `check_levels` set: the CPU kernels.
//   - CUDA kernels: a device assert per level (msda_level_fits: 5a, 5c and level_start_index within value), which
//     guards memory without a host sync but not 5b nor the sum.
//   - `_C.check_inputs`: every rule, rule 5 on host copies (one small sync), which the Python wrapper runs before
//     an eager call on CUDA; skipped while compiling or tracing, where the two lines above still apply.
// Returns the sizes.
MSDeformAttnSizes check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    bool check_levels);

// Rule 5 on `spatial_shapes` and `level_start_index` on the host, for the sizes rules 1-4 read.
void check_ms_deform_attn_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                 const MSDeformAttnSizes& sizes);

// Rule 5's bound for one level: positive H and W, a start within value, and H * W no more than the num_values -
// start positions left, exactly, though H * W may not fit in int64 (2^32 x 2^32 wraps around to 0).
C10_HOST_DEVICE inline bool msda_level_fits(int64_t start, int64_t height, int64_t width, int64_t num_values) {
  if (height <= 0 || width <= 0 || start < 0 || start > num_values) {
    return false;
  }
  const int64_t left = num_values - start;
  // Below 2^31 each, H * W < 2^62 cannot overflow. Only larger levels pay for the division: the CUDA kernels assert
  // this in every thread for every level, and 64-bit division is an emulated routine on the GPU.
  constexpr int64_t kExactProduct = int64_t{1} << 31;
  return height < kExactProduct && width < kExactProduct ? height * width <= left : height <= left / width;
}

// The backward op's extra argument, checked after the inputs (C++ only: autograd makes grad_output itself):
// grad_output is [N, Lq, M * D] (ValueError), of value's dtype (TypeError) and on value's device (ValueError).
// A dtype as Python prints it ("torch.float64"), so that the C++ and Python checks word it alike.
std::string msda_dtype_name(at::ScalarType dtype);

void check_ms_deform_attn_grad_output(const at::Tensor& grad_output, const at::Tensor& value,
                                      const MSDeformAttnSizes& sizes);

// The instruction-set level the CPU kernels run at (cpu/ms_deform_attn_cpu.cpp): "x86-64-v4" (AVX-512),
// "x86-64-v3" (AVX2, FMA) or "default" (the baseline: SSE2 on x86-64, any other architecture). The CPU's best level
// unless the environment variable SPARSE_DETR_CPU_ISA (v4, v3 or default; read once per process) forces a lower
// one; a value the CPU cannot honour raises ValueError here and in every CPU kernel call.
std::string msda_cpu_isa();

}  // namespace sparse_detr
