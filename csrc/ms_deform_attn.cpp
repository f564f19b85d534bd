// Schema of the multi-scale deformable attention ops, their argument checks, and the Python module `sparse_detr._C`.
//
// Autograd and the fake (meta) kernels are registered from Python, in sparse_detr/layers/ms_deform_attn_op.py.
#include "ms_deform_attn.h"

#include <ATen/ATen.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <vector>

namespace sparse_detr {

namespace {

void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK(t.dim() == rank, "ms_deform_attn: ", name, " must be ", layout, " (", rank, " dims), got shape ",
              t.sizes());
}

void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected, const char* what) {
  TORCH_CHECK(t.size(dim) == expected, "ms_deform_attn: ", name, " must have ", expected, " ", what, " in dim ", dim,
              ", got shape ", t.sizes());
}

}  // namespace

MSDeformAttnSizes check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    bool check_levels) {
  check_rank(value, "value", 4, "[N, S, M, D]");
  check_rank(spatial_shapes, "spatial_shapes", 2, "[L, 2]");
  check_rank(level_start_index, "level_start_index", 1, "[L]");
  check_rank(sampling_locations, "sampling_locations", 6, "[N, Lq, M, L, P, 2]");
  check_rank(attention_weights, "attention_weights", 5, "[N, Lq, M, L, P]");

  TORCH_CHECK(at::isFloatingType(value.scalar_type()), "ms_deform_attn: value must be floating point, got ",
              value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type(),
              "ms_deform_attn: sampling_locations has dtype ", sampling_locations.scalar_type(),
              " but value has ", value.scalar_type());
  TORCH_CHECK(attention_weights.scalar_type() == value.scalar_type(), "ms_deform_attn: attention_weights has dtype ",
              attention_weights.scalar_type(), " but value has ", value.scalar_type());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, "ms_deform_attn: spatial_shapes must be int64, got ",
              spatial_shapes.scalar_type());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong, "ms_deform_attn: level_start_index must be int64, got ",
              level_start_index.scalar_type());

  const auto device = value.device();
  const std::pair<const at::Tensor*, const char*> others[] = {
      {&spatial_shapes, "spatial_shapes"},
      {&level_start_index, "level_start_index"},
      {&sampling_locations, "sampling_locations"},
      {&attention_weights, "attention_weights"}};
  for (const auto& [t, name] : others) {
    TORCH_CHECK(t->device() == device, "ms_deform_attn: ", name, " is on ", t->device(), " but value is on ", device);
  }

  MSDeformAttnSizes s;
  s.batch = value.size(0);
  s.num_values = value.size(1);
  s.num_heads = value.size(2);
  s.head_dim = value.size(3);
  s.num_queries = sampling_locations.size(1);
  s.num_levels = spatial_shapes.size(0);
  s.num_points = sampling_locations.size(4);

  check_size(spatial_shapes, "spatial_shapes", 1, 2, "entries per level (H, W)");
  check_size(level_start_index, "level_start_index", 0, s.num_levels, "levels (L of spatial_shapes)");
  check_size(sampling_locations, "sampling_locations", 0, s.batch, "batch entries (N of value)");
  check_size(sampling_locations, "sampling_locations", 2, s.num_heads, "heads (M of value)");
  check_size(sampling_locations, "sampling_locations", 3, s.num_levels, "levels (L of spatial_shapes)");
  check_size(sampling_locations, "sampling_locations", 5, 2, "coordinates (x, y)");
  check_size(attention_weights, "attention_weights", 0, s.batch, "batch entries (N of value)");
  check_size(attention_weights, "attention_weights", 1, s.num_queries, "queries (Lq of sampling_locations)");
  check_size(attention_weights, "attention_weights", 2, s.num_heads, "heads (M of value)");
  check_size(attention_weights, "attention_weights", 3, s.num_levels, "levels (L of spatial_shapes)");
  check_size(attention_weights, "attention_weights", 4, s.num_points, "points (P of sampling_locations)");

  if (check_levels) {
    const auto shapes = spatial_shapes.contiguous();
    const auto starts = level_start_index.contiguous();
    const int64_t* hw = shapes.data_ptr<int64_t>();
    const int64_t* start = starts.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t l = 0; l < s.num_levels; ++l) {
      TORCH_CHECK(hw[2 * l] > 0 && hw[2 * l + 1] > 0, "ms_deform_attn: spatial_shapes[", l,
                  "] must be positive (H, W), got (", hw[2 * l], ", ", hw[2 * l + 1], ")");
      TORCH_CHECK(start[l] == total, "ms_deform_attn: level_start_index[", l, "] is ", start[l],
                  " but spatial_shapes put level ", l, " at ", total);
      total += hw[2 * l] * hw[2 * l + 1];
    }
    TORCH_CHECK(total == s.num_values, "ms_deform_attn: spatial_shapes add up to ", total,
                " positions but value has S = ", s.num_values);
  }
  return s;
}

void check_ms_deform_attn_grad_output(const at::Tensor& grad_output, const at::Tensor& value,
                                      const MSDeformAttnSizes& sizes) {
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == sizes.batch &&
                  grad_output.size(1) == sizes.num_queries &&
                  grad_output.size(2) == sizes.num_heads * sizes.head_dim,
              "ms_deform_attn_backward: grad_output must be [N, Lq, M * D] = [", sizes.batch, ", ", sizes.num_queries,
              ", ", sizes.num_heads * sizes.head_dim, "], got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), "ms_deform_attn_backward: grad_output has dtype ",
              grad_output.scalar_type(), " but value has ", value.scalar_type());
  TORCH_CHECK(grad_output.device() == value.device(), "ms_deform_attn_backward: grad_output is on ",
              grad_output.device(), " but value is on ", value.device());
}

TORCH_LIBRARY(sparse_detr, m) {
  // value [N, S, M, D], spatial_shapes [L, 2] (H, W), level_start_index [L], sampling_locations [N, Lq, M, L, P, 2]
  // normalized (x, y), attention_weights [N, Lq, M, L, P] -> [N, Lq, M * D]
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights) -> Tensor");
  // -> (grad_value, grad_sampling_locations, grad_attention_weights)
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
}

}  // namespace sparse_detr

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention kernels; the ops live in torch.ops.sparse_detr.";
  m.def(
      "compiled_with_cuda",
      []() {
#ifdef WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA kernels were built into this extension.");
}
