// Schema of the multi-scale deformable attention ops, their argument checks, and the Python module `sparse_detr._C`.
//
// Autograd and the fake (meta) kernels are registered from Python, in sparse_detr/layers/ms_deform_attn_op.py.
#include "ms_deform_attn.h"

#include <ATen/ATen.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <utility>

namespace sparse_detr {

std::string msda_dtype_name(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

namespace {

void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, "ms_deform_attn: ", name, " must be ", layout, " (", rank, " dims), got shape ",
                    t.sizes());
}

void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, "ms_deform_attn: ", name, " must have ", expected, " ", what, " in dim ",
                    dim, ", got shape ", t.sizes());
}

}  // namespace

void check_ms_deform_attn_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                 const MSDeformAttnSizes& s) {
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < s.num_levels; ++l) {
    const int64_t height = hw[2 * l], width = hw[2 * l + 1];
    TORCH_CHECK_VALUE(height > 0 && width > 0, "ms_deform_attn: spatial_shapes[", l, "] must be positive (H, W), got (",
                      height, ", ", width, ")");
    TORCH_CHECK_VALUE(start[l] == total, "ms_deform_attn: level_start_index[", l, "] is ", start[l],
                      " but spatial_shapes put level ", l, " at ", total);
    TORCH_CHECK_VALUE(msda_level_fits(total, height, width, s.num_values), "ms_deform_attn: spatial_shapes[", l,
                      "] = (", height, ", ", width, ") does not fit in value: level ", l, " starts at ", total,
                      " of S = ", s.num_values);
    total += height * width;  // at most S, by the check above
  }
  TORCH_CHECK_VALUE(total == s.num_values, "ms_deform_attn: spatial_shapes add up to ", total,
                    " positions but value has S = ", s.num_values);
}

// The rules are numbered as in the specification in ms_deform_attn.h.
MSDeformAttnSizes check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    bool check_levels) {
  // 1. Ranks.
  check_rank(value, "value", 4, "[N, S, M, D]");
  check_rank(spatial_shapes, "spatial_shapes", 2, "[L, 2]");
  check_rank(level_start_index, "level_start_index", 1, "[L]");
  check_rank(sampling_locations, "sampling_locations", 6, "[N, Lq, M, L, P, 2]");
  check_rank(attention_weights, "attention_weights", 5, "[N, Lq, M, L, P]");

  // 2. Dtypes.
  const auto dtype = value.scalar_type();
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "ms_deform_attn: value must be floating point, got ",
                   msda_dtype_name(dtype));
  for (const auto& [t, name] : {std::pair{&sampling_locations, "sampling_locations"},
                                std::pair{&attention_weights, "attention_weights"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == dtype, "ms_deform_attn: ", name, " has dtype ",
                     msda_dtype_name(t->scalar_type()), " but value has ", msda_dtype_name(dtype));
  }
  for (const auto& [t, name] : {std::pair{&spatial_shapes, "spatial_shapes"},
                                std::pair{&level_start_index, "level_start_index"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong, "ms_deform_attn: ", name, " must be torch.int64, got ",
                     msda_dtype_name(t->scalar_type()));
  }

  // 3. Devices.
  const auto device = value.device();
  for (const auto& [t, name] : {std::pair{&spatial_shapes, "spatial_shapes"},
                                std::pair{&level_start_index, "level_start_index"},
                                std::pair{&sampling_locations, "sampling_locations"},
                                std::pair{&attention_weights, "attention_weights"}}) {
    TORCH_CHECK_VALUE(t->device() == device, "ms_deform_attn: ", name, " is on ", t->device(), " but value is on ",
                      device);
  }

  // 4. Sizes.
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

  // 5. Levels.
  if (check_levels) {
    check_ms_deform_attn_levels(spatial_shapes, level_start_index, s);
  }
  return s;
}

void check_ms_deform_attn_grad_output(const at::Tensor& grad_output, const at::Tensor& value,
                                      const MSDeformAttnSizes& sizes) {
  TORCH_CHECK_VALUE(grad_output.dim() == 3 && grad_output.size(0) == sizes.batch &&
                        grad_output.size(1) == sizes.num_queries &&
                        grad_output.size(2) == sizes.num_heads * sizes.head_dim,
                    "ms_deform_attn_backward: grad_output must be [N, Lq, M * D] = [", sizes.batch, ", ",
                    sizes.num_queries, ", ", sizes.num_heads * sizes.head_dim, "], got ", grad_output.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == value.scalar_type(), "ms_deform_attn_backward: grad_output has dtype ",
                   msda_dtype_name(grad_output.scalar_type()), " but value has ", msda_dtype_name(value.scalar_type()));
  TORCH_CHECK_VALUE(grad_output.device() == value.device(), "ms_deform_attn_backward: grad_output is on ",
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
      "check_inputs",
      [](const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
         const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
        const auto s = sparse_detr::check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index,
                                                                sampling_locations, attention_weights,
                                                                /*check_levels=*/false);
        sparse_detr::check_ms_deform_attn_levels(spatial_shapes.cpu(), level_start_index.cpu(), s);
      },
      "Every rule of the input specification (ms_deform_attn.h), rule 5 on host copies of spatial_shapes and "
      "level_start_index: what Python runs before an eager call on CUDA, whose kernels assert only part of rule 5.");
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
  m.def("cpu_isa", &sparse_detr::msda_cpu_isa,
        "The instruction-set level the CPU kernels run at: 'x86-64-v4', 'x86-64-v3' or 'default' (the CPU's best, "
        "or the lower one the environment variable SPARSE_DETR_CPU_ISA = v4 / v3 / default forces).");
}
