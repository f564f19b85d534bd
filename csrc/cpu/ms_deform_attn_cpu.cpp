// CPU kernels of sparse_detr::ms_deform_attn and its backward (float32, float64), multithreaded with
// at::parallel_for. The sampling arithmetic is the shared header's, the same the CUDA kernels run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_bilinear.h"

namespace sparse_detr {

namespace {

// Smallest amount of bilinear work (samples x channels) worth a task of its own.
constexpr int64_t kMinWorkPerTask = 1 << 15;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(1, work_per_item));
}

// Raw pointers and sizes of one call, contiguous inputs assumed.
template <typename scalar_t>
struct Inputs {
  const scalar_t* value;               // [N, S, M, D]
  const int64_t* spatial_shapes;       // [L, 2]
  const int64_t* level_start;          // [L]
  const scalar_t* sampling_locations;  // [N, Lq, M, L, P, 2]
  const scalar_t* attention_weights;   // [N, Lq, M, L, P]
  MSDeformAttnSizes s;
  const int64_t* order;  // [N * Lq]: entry n * Lq + i is the i-th query of batch n to visit
};

// Queries in the order their first sampling point falls on a kOrderGrid x kOrderGrid grid over the image, cells
// row-major (a stable counting sort). Consecutive queries then sample nearby value rows, which stay in cache: the
// sparse encoder's queries (top-k tokens) and the decoder's come in no spatial order. Only the visiting order
// changes; each output row is computed the same.
constexpr int64_t kOrderGrid = 64;

template <typename scalar_t>
std::vector<int64_t> spatial_query_order(const scalar_t* loc, const MSDeformAttnSizes& s) {
  const int64_t Lq = s.num_queries, per_query = s.num_heads * s.num_levels * s.num_points * 2;
  std::vector<int64_t> order(s.batch * Lq);
  std::vector<int64_t> cell(Lq), count(kOrderGrid * kOrderGrid + 1);
  const auto to_cell = [](scalar_t u) -> int64_t {
    const scalar_t scaled = u * static_cast<scalar_t>(kOrderGrid);
    if (!(scaled > 0)) {  // also NaN
      return 0;
    }
    return scaled < static_cast<scalar_t>(kOrderGrid) ? static_cast<int64_t>(scaled) : kOrderGrid - 1;
  };
  for (int64_t n = 0; n < s.batch; ++n) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t q = 0; q < Lq; ++q) {
      const scalar_t* first_point = loc + (n * Lq + q) * per_query;  // head 0, level 0, point 0
      cell[q] = per_query > 0 ? to_cell(first_point[1]) * kOrderGrid + to_cell(first_point[0]) : 0;
      ++count[cell[q] + 1];
    }
    for (size_t c = 1; c < count.size(); ++c) {
      count[c] += count[c - 1];
    }
    for (int64_t q = 0; q < Lq; ++q) {
      order[n * Lq + count[cell[q]]++] = q;
    }
  }
  return order;
}

#if defined(__GNUC__) || defined(__clang__)
#define MSDA_PREFETCH(address, for_write) __builtin_prefetch((address), (for_write))
#else
#define MSDA_PREFETCH(address, for_write)
#endif

// Prefetches the D channels of one value (or gradient) row.
template <bool kForWrite, typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t D) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t c = 0; c < D; c += kLine) {
    MSDA_PREFETCH(row + c, kForWrite);
  }
  MSDA_PREFETCH(row + D - 1, kForWrite);  // the row need not start on a cache line
}

// Locates the L * P sampling points of one (n, q, m) into `points` and prefetches the value rows they read (and,
// in the backward, the gradient rows they write). A decoder or sparse-encoder query samples rows scattered over
// the whole value tensor, mostly cache misses; issuing all 4 * L * P row loads before using any lets them overlap.
template <typename scalar_t>
inline void locate_points(const Inputs<scalar_t>& in,
                          const scalar_t* loc,
                          int64_t head_offset,
                          scalar_t* grad_value,
                          BilinearPoint<scalar_t>* points) {
  const auto& s = in.s;
  const int64_t D = s.head_dim, P = s.num_points, row_stride = s.num_heads * D;
  for (int64_t l = 0; l < s.num_levels; ++l) {
    const int64_t height = in.spatial_shapes[2 * l], width = in.spatial_shapes[2 * l + 1];
    const int64_t level_offset = head_offset + in.level_start[l] * row_stride;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t lp = l * P + p;
      points[lp] = msda_locate<scalar_t>(loc[2 * lp], loc[2 * lp + 1], height, width);
      for (int k = 0; k < 4; ++k) {
        const int64_t row = level_offset + points[lp].index[k] * row_stride;
        prefetch_row<false>(in.value + row, D);
        if (grad_value != nullptr) {
          prefetch_row<true>(grad_value + row, D);
        }
      }
    }
  }
}

// Forward over positions [begin, end) of the visiting order (flat over n): for each head the D-vector of the
// output row is accumulated in place (it stays in L1), reading each neighbour's D contiguous channels in one
// vectorized sweep.
template <typename scalar_t>
inline void forward_rows(const Inputs<scalar_t>& in, int64_t begin, int64_t end, scalar_t* output) {
  const auto& s = in.s;
  const int64_t M = s.num_heads, D = s.head_dim, L = s.num_levels, P = s.num_points;
  const int64_t row_stride = M * D;
  std::vector<BilinearPoint<scalar_t>> points(L * P);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = i / s.num_queries;
    const int64_t nq = n * s.num_queries + in.order[i];
    for (int64_t m = 0; m < M; ++m) {
      const int64_t nqm = nq * M + m;
      const int64_t head_offset = n * s.num_values * row_stride + m * D;
      const scalar_t* attn = in.attention_weights + nqm * L * P;
      locate_points<scalar_t>(in, in.sampling_locations + nqm * L * P * 2, head_offset, nullptr, points.data());
      scalar_t* out = output + nqm * D;
      std::fill(out, out + D, scalar_t(0));
      for (int64_t l = 0; l < L; ++l) {
        const scalar_t* level_value = in.value + head_offset + in.level_start[l] * row_stride;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t lp = l * P + p;
          const auto& pt = points[lp];
          const scalar_t a = attn[lp];
#pragma omp simd
          for (int64_t c = 0; c < D; ++c) {
            out[c] += a * msda_gather(pt, level_value, row_stride, c);
          }
        }
      }
    }
  }
}

// Partial sums per quantity in the backward's channel loop: one AVX-512 vector of float.
constexpr int kLanes = 16;

// Backward of one (n, q, m): scatters into grad_value[n, :, m, :] and writes the location and attention-weight
// gradients of the query's L * P samples.
template <typename scalar_t>
inline void backward_query_head(const Inputs<scalar_t>& in,
                                int64_t n,
                                int64_t q,
                                int64_t m,
                                const scalar_t* grad_output,
                                scalar_t* grad_value,
                                scalar_t* grad_sampling_locations,
                                scalar_t* grad_attention_weights,
                                BilinearPoint<scalar_t>* points) {
  const auto& s = in.s;
  const int64_t M = s.num_heads, D = s.head_dim, L = s.num_levels, P = s.num_points;
  const int64_t row_stride = M * D;
  const int64_t head_offset = n * s.num_values * row_stride + m * D;
  const int64_t nqm = (n * s.num_queries + q) * M + m;
  const scalar_t* go = grad_output + nqm * D;
  const scalar_t* loc = in.sampling_locations + nqm * L * P * 2;
  const scalar_t* attn = in.attention_weights + nqm * L * P;
  scalar_t* g_loc = grad_sampling_locations + nqm * L * P * 2;
  scalar_t* g_attn = grad_attention_weights + nqm * L * P;
  locate_points(in, loc, head_offset, grad_value, points);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t height = in.spatial_shapes[2 * l], width = in.spatial_shapes[2 * l + 1];
    const int64_t level_offset = head_offset + in.level_start[l] * row_stride;
    const scalar_t* level_value = in.value + level_offset;
    PlainAdder<scalar_t> add{grad_value + level_offset};
    for (int64_t p = 0; p < P; ++p) {
      const int64_t lp = l * P + p;
      const auto& pt = points[lp];
      const scalar_t a = attn[lp];
      // Each channel sum is kept as kLanes partial sums, so that the channel loop vectorizes without reassociating
      // one accumulator, and folded once per sample by halving (GCC's `omp simd reduction` folds its lane copies
      // with one scalar add each).
      scalar_t sum_x[kLanes] = {}, sum_y[kLanes] = {}, sum_a[kLanes] = {};
      const auto accumulate = [&](int64_t c, int lane) {
        const auto b = msda_scatter(pt, level_value, row_stride, c, go[c] * a, add);
        sum_a[lane] += go[c] * b.sample;
        sum_x[lane] += b.grad_x;
        sum_y[lane] += b.grad_y;
      };
      int64_t c0 = 0;
      for (; c0 + kLanes <= D; c0 += kLanes) {
        // Channels touch disjoint addresses, so the lanes are independent.
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) {
          accumulate(c0 + j, j);
        }
      }
      for (int j = 0; c0 + j < D; ++j) {
        accumulate(c0 + j, j);
      }
      for (int half = kLanes / 2; half > 0; half /= 2) {
        for (int j = 0; j < half; ++j) {
          sum_x[j] += sum_x[j + half];
          sum_y[j] += sum_y[j + half];
          sum_a[j] += sum_a[j + half];
        }
      }
      // d(pixel x)/d(normalized x) = width, and likewise for y.
      g_loc[2 * lp] = sum_x[0] * static_cast<scalar_t>(width);
      g_loc[2 * lp + 1] = sum_y[0] * static_cast<scalar_t>(height);
      g_attn[lp] = sum_a[0];
    }
  }
}

// Backward over the flat (n, m) range [begin, end), every query of each head. Within one n the task's heads are
// visited query by query, in the spatial order, so that a query's rows are read together and nearby queries
// follow each other.
template <typename scalar_t>
inline void backward_heads(const Inputs<scalar_t>& in,
                           int64_t begin,
                           int64_t end,
                           const scalar_t* grad_output,
                           scalar_t* grad_value,
                           scalar_t* grad_sampling_locations,
                           scalar_t* grad_attention_weights) {
  const int64_t M = in.s.num_heads;
  std::vector<BilinearPoint<scalar_t>> points(in.s.num_levels * in.s.num_points);
  for (int64_t first = begin; first < end;) {
    const int64_t n = first / M, m_begin = first % M;
    const int64_t m_end = std::min(M, m_begin + (end - first));
    first += m_end - m_begin;
    for (int64_t i = 0; i < in.s.num_queries; ++i) {
      const int64_t q = in.order[n * in.s.num_queries + i];
      for (int64_t m = m_begin; m < m_end; ++m) {
        backward_query_head(in, n, q, m, grad_output, grad_value, grad_sampling_locations, grad_attention_weights,
                            points.data());
      }
    }
  }
}

// The channel loops above are compiled once per x86-64 level (AVX-512, AVX2+FMA, baseline SSE2) and the best one
// the CPU supports is picked at load time (GCC/Clang function multiversioning): the extension stays portable
// without -march=native, and still gets 8- or 16-wide vectors. `flatten` inlines the templates into each clone.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MSDA_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define MSDA_CPU_MULTIVERSION
#endif

#define MSDA_DEFINE_CPU_ENTRY_POINTS(scalar_t)                                                                 \
  MSDA_CPU_MULTIVERSION void forward_rows_##scalar_t(                                                          \
      const Inputs<scalar_t>& in, int64_t begin, int64_t end, scalar_t* output) {                              \
    forward_rows<scalar_t>(in, begin, end, output);                                                            \
  }                                                                                                            \
  MSDA_CPU_MULTIVERSION void backward_heads_##scalar_t(const Inputs<scalar_t>& in,                            \
                                                       int64_t begin,                                          \
                                                       int64_t end,                                            \
                                                       const scalar_t* grad_output,                            \
                                                       scalar_t* grad_value,                                   \
                                                       scalar_t* grad_sampling_locations,                      \
                                                       scalar_t* grad_attention_weights) {                     \
    backward_heads<scalar_t>(in, begin, end, grad_output, grad_value, grad_sampling_locations,                 \
                             grad_attention_weights);                                                          \
  }                                                                                                            \
  void run_forward(const Inputs<scalar_t>& in, int64_t begin, int64_t end, scalar_t* output) {                 \
    forward_rows_##scalar_t(in, begin, end, output);                                                           \
  }                                                                                                            \
  void run_backward(const Inputs<scalar_t>& in, int64_t begin, int64_t end, const scalar_t* grad_output,       \
                    scalar_t* grad_value, scalar_t* grad_sampling_locations, scalar_t* grad_attention_weights) { \
    backward_heads_##scalar_t(in, begin, end, grad_output, grad_value, grad_sampling_locations,                \
                              grad_attention_weights);                                                         \
  }

MSDA_DEFINE_CPU_ENTRY_POINTS(float)
MSDA_DEFINE_CPU_ENTRY_POINTS(double)

template <typename scalar_t>
void forward_kernel(const Inputs<scalar_t>& in, scalar_t* output) {
  const auto& s = in.s;
  at::parallel_for(0, s.batch * s.num_queries, grain_for(s.num_heads * s.num_levels * s.num_points * s.head_dim),
                   [&](int64_t begin, int64_t end) { run_forward(in, begin, end, output); });
}

// The value gradient is a scatter: queries that sample the same neighbour add into the same row. Partitioning the
// work by (n, m) instead of by query gives every task its own disjoint slice grad_value[n, :, m, :], so the scatter
// needs neither atomics nor per-thread copies of grad_value; the price is at most N * M parallel tasks.
template <typename scalar_t>
void backward_kernel(const Inputs<scalar_t>& in,
                     const scalar_t* grad_output,
                     scalar_t* grad_value,
                     scalar_t* grad_sampling_locations,
                     scalar_t* grad_attention_weights) {
  const auto& s = in.s;
  at::parallel_for(0, s.batch * s.num_heads,
                   grain_for(s.num_queries * s.num_levels * s.num_points * s.head_dim),
                   [&](int64_t begin, int64_t end) {
                     run_backward(in, begin, end, grad_output, grad_value, grad_sampling_locations,
                                  grad_attention_weights);
                   });
}

void check_cpu_dtype(const at::Tensor& value) {
  // the same words as the Python check in ms_deform_attn()
  TORCH_CHECK_TYPE(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
                   "ms_deform_attn: value has dtype ", msda_dtype_name(value.scalar_type()),
                   "; the CPU kernel supports torch.float32, torch.float64");
}

template <typename scalar_t>
Inputs<scalar_t> make_inputs(const at::Tensor& value,
                             const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index,
                             const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights,
                             const MSDeformAttnSizes& s,
                             const std::vector<int64_t>& order) {
  return {value.data_ptr<scalar_t>(),
          spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>(),
          sampling_locations.data_ptr<scalar_t>(),
          attention_weights.data_ptr<scalar_t>(),
          s,
          order.data()};
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value_,
                              const at::Tensor& spatial_shapes_,
                              const at::Tensor& level_start_index_,
                              const at::Tensor& sampling_locations_,
                              const at::Tensor& attention_weights_) {
  const auto s = check_ms_deform_attn_inputs(value_, spatial_shapes_, level_start_index_, sampling_locations_,
                                             attention_weights_, /*check_levels=*/true);
  check_cpu_dtype(value_);
  const auto value = value_.contiguous();
  const auto spatial_shapes = spatial_shapes_.contiguous();
  const auto level_start_index = level_start_index_.contiguous();
  const auto sampling_locations = sampling_locations_.contiguous();
  const auto attention_weights = attention_weights_.contiguous();
  auto output = at::empty({s.batch, s.num_queries, s.num_heads * s.head_dim}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu", [&] {
    const auto order = spatial_query_order(sampling_locations.data_ptr<scalar_t>(), s);
    forward_kernel<scalar_t>(
        make_inputs<scalar_t>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s,
                              order),
        output.data_ptr<scalar_t>());
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(const at::Tensor& grad_output_,
                                                                           const at::Tensor& value_,
                                                                           const at::Tensor& spatial_shapes_,
                                                                           const at::Tensor& level_start_index_,
                                                                           const at::Tensor& sampling_locations_,
                                                                           const at::Tensor& attention_weights_) {
  const auto s = check_ms_deform_attn_inputs(value_, spatial_shapes_, level_start_index_, sampling_locations_,
                                             attention_weights_, /*check_levels=*/true);
  check_ms_deform_attn_grad_output(grad_output_, value_, s);
  check_cpu_dtype(value_);
  const auto grad_output = grad_output_.contiguous();
  const auto value = value_.contiguous();
  const auto spatial_shapes = spatial_shapes_.contiguous();
  const auto level_start_index = level_start_index_.contiguous();
  const auto sampling_locations = sampling_locations_.contiguous();
  const auto attention_weights = attention_weights_.contiguous();
  auto grad_value = at::zeros(value.sizes(), value.options());
  // Every entry of these two is written by the kernel.
  auto grad_sampling_locations = at::empty(sampling_locations.sizes(), sampling_locations.options());
  auto grad_attention_weights = at::empty(attention_weights.sizes(), attention_weights.options());
  if (grad_output.numel() > 0 && attention_weights.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      const auto order = spatial_query_order(sampling_locations.data_ptr<scalar_t>(), s);
      backward_kernel<scalar_t>(
          make_inputs<scalar_t>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s,
                                order),
          grad_output.data_ptr<scalar_t>(),
          grad_value.data_ptr<scalar_t>(),
          grad_sampling_locations.data_ptr<scalar_t>(),
          grad_attention_weights.data_ptr<scalar_t>());
    });
  } else {
    grad_sampling_locations.zero_();
    grad_attention_weights.zero_();
  }
  return {grad_value, grad_sampling_locations, grad_attention_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_detr, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace sparse_detr
