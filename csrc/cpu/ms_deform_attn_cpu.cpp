// CPU kernels of sparse_detr::ms_deform_attn and its backward (float32, float64), multithreaded with
// at::parallel_for and compiled once per x86-64 instruction-set level. Where a sampling point falls and its
// bilinear weights come from the pieces of the shared header's msda_locate, as in the CUDA kernels, computed for
// all of a query's points in vector loops; the channel loops work on explicit vectors of the level's width.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
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

// What a call works out once, before its threads start: the order to visit the queries in, and the map size of
// each of a query's M * L * P sampling slots (slot (m * L + l) * P + p, the layout of sampling_locations), so that
// locating a query's points is one flat vector loop over its slots.
template <typename scalar_t>
struct CallPlan {
  std::vector<int64_t> order;                     // [N * Lq]: entry n * Lq + i is the i-th query of batch n to visit
  std::vector<scalar_t> slot_width, slot_height;  // [M * L * P]: the slot's level's W and H
  std::vector<scalar_t> slot_x_max, slot_y_max;   // [M * L * P]: W + 1 and H + 1, msda_pixel_coordinate's clamp
};

// Raw pointers and sizes of one call, contiguous inputs assumed.
template <typename scalar_t>
struct Inputs {
  const scalar_t* value;               // [N, S, M, D]
  const int64_t* spatial_shapes;       // [L, 2]
  const int64_t* level_start;          // [L]
  const scalar_t* sampling_locations;  // [N, Lq, M, L, P, 2]
  const scalar_t* attention_weights;   // [N, Lq, M, L, P]
  MSDeformAttnSizes s;
  const CallPlan<scalar_t>* plan;
};

// Queries in the order their first sampling point falls on a kOrderGrid x kOrderGrid grid over the image (a stable
// counting sort), the grid's cells taken in vertical strips kOrderStrip cells wide, row after row within a strip.
// Consecutive queries then sample nearby value rows, which stay in cache: the sparse encoder's queries (top-k
// tokens) and the decoder's come in no spatial order. Strips rather than whole rows of the grid: the value rows a
// sweep keeps reusing (those within the sampling offsets above and below the current row) then span a strip's
// width, not the image's, and stay in L2 (the encoder's backward at 850x1040 gets 9% faster on one core of a
// Xeon, the sparse encoder's 15%). Only the visiting order changes: each output row of the forward is computed
// the same, and the backward's sums into grad_value are taken in this order, the same for every thread count.
constexpr int64_t kOrderGrid = 64;
constexpr int64_t kOrderStrip = 8;

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
      const int64_t x = per_query > 0 ? to_cell(first_point[0]) : 0, y = per_query > 0 ? to_cell(first_point[1]) : 0;
      cell[q] = (x / kOrderStrip) * (kOrderGrid * kOrderStrip) + y * kOrderStrip + x % kOrderStrip;
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

template <typename scalar_t>
CallPlan<scalar_t> make_plan(const int64_t* spatial_shapes, const scalar_t* sampling_locations,
                             const MSDeformAttnSizes& s) {
  CallPlan<scalar_t> plan{spatial_query_order(sampling_locations, s), {}, {}, {}, {}};
  for (int64_t m = 0; m < s.num_heads; ++m) {
    for (int64_t l = 0; l < s.num_levels; ++l) {
      const int64_t height = spatial_shapes[2 * l], width = spatial_shapes[2 * l + 1];
      for (int64_t p = 0; p < s.num_points; ++p) {
        plan.slot_width.push_back(static_cast<scalar_t>(width));
        plan.slot_height.push_back(static_cast<scalar_t>(height));
        plan.slot_x_max.push_back(static_cast<scalar_t>(width + 1));
        plan.slot_y_max.push_back(static_cast<scalar_t>(height + 1));
      }
    }
  }
  return plan;
}

#if defined(__GNUC__) || defined(__clang__)
#define MSDA_PREFETCH(address, for_write) __builtin_prefetch((address), (for_write))
#else
#define MSDA_PREFETCH(address, for_write)
#endif

// Prefetches the cache lines of the `count` elements at `p`: a query's contiguous inputs and outputs.
template <bool kForWrite, typename scalar_t>
inline void prefetch_range(const scalar_t* p, int64_t count) {
  if (count <= 0) {  // L * P = 0: nothing there, and `last` below would wrap around
    return;
  }
  constexpr uintptr_t kLine = 64;
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~(kLine - 1);
  const uintptr_t last = (reinterpret_cast<uintptr_t>(p + count) - 1) & ~(kLine - 1);
  for (uintptr_t line = first; line <= last; line += kLine) {
    MSDA_PREFETCH(reinterpret_cast<const void*>(line), kForWrite);
  }
}

// Prefetches a value (or gradient) row of D channels: only the lines of its first and last channel, two
// instructions and no loop, which is all of a row of D = 32 float (the paper's: 128 bytes at the 64-byte alignment
// of PyTorch's CPU tensors); the spatial prefetcher fetches a line's 128-byte buddy with it, which covers most
// others. Prefetching every line of each row measured slower (the encoder's forward, one core of a Xeon: 67 ms
// against 55).
template <bool kForWrite, typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t D) {
  MSDA_PREFETCH(row, kForWrite);
  MSDA_PREFETCH(row + D - 1, kForWrite);
}

// ---------------------------------------------------------------------------------------------------------------
// Explicit vectors.
//
// The channel loops are written on `Vec<scalar_t, kBytes>::type`, kBytes / sizeof(scalar_t) lanes (GCC/Clang
// vector extensions), rather than left to the auto-vectorizer: the vector width is then the level's (16 bytes at
// the baseline, SSE2 or NEON; 32 at x86-64-v3, AVX2; 64 at x86-64-v4, AVX-512), and a per-sample sum over channels
// stays in a vector register and is folded once, by halves. (The kernels before them left the channel loops to
// `omp simd` with 16 partial sums per quantity, one AVX-512 vector of float, and their AVX2 clone ran the backward
// 3x slower than the AVX-512 one.)
#if defined(__GNUC__) || defined(__clang__)
template <typename scalar_t, int kBytes>
struct VecType {
  typedef scalar_t type __attribute__((vector_size(kBytes)));
};
#define MSDA_INLINE inline __attribute__((always_inline))
#define MSDA_FLATTEN __attribute__((flatten))
#else
template <typename scalar_t, int kBytes>
struct VecType {
  using type = scalar_t;  // no vector extensions: one lane
};
#define MSDA_INLINE inline
#define MSDA_FLATTEN
#endif

template <typename scalar_t, int kBytes>
struct Vec {
  using type = typename VecType<scalar_t, kBytes>::type;
  static constexpr int64_t kWidth = sizeof(type) / sizeof(scalar_t);
};

// Unaligned load and store: value rows start wherever m * D puts them.
template <typename V, typename scalar_t>
MSDA_INLINE void load(V& v, const scalar_t* p) {
  std::memcpy(&v, p, sizeof(V));
}

template <typename V, typename scalar_t>
MSDA_INLINE void store(scalar_t* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// The sum of the lanes of `v`: the upper half added onto the lower one until one lane is left.
template <typename scalar_t, int kBytes>
MSDA_INLINE scalar_t lane_sum(const typename Vec<scalar_t, kBytes>::type& v) {
  if constexpr (Vec<scalar_t, kBytes>::kWidth == 1) {
    scalar_t s;
    std::memcpy(&s, &v, sizeof(s));
    return s;
  } else {
    using Half = typename Vec<scalar_t, kBytes / 2>::type;
    Half lo, hi;
    std::memcpy(&lo, &v, sizeof(Half));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    const Half folded = lo + hi;
    return lane_sum<scalar_t, kBytes / 2>(folded);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The kernels.

// The rows of one point's four neighbours (msda_locate's order). A neighbour off the map reads a row of zeros and
// adds its gradient into a scratch row, instead of being masked channel by channel: the channel loops have
// neither branches nor selects, and whatever value sits at the clamped index (even inf or NaN) never reaches the
// result, as in msda_load_corners.
template <typename scalar_t>
struct Rows {
  const scalar_t* value[4];
  scalar_t* grad[4];  // backward only
};

// A task's scratch, allocated once: the located points of one query (for the heads the task visits, slot
// j = (m - first head) * L * P + l * P + p), a row of D zeros for off-map neighbours to read and (backward) a row
// for their gradients to go to.
template <typename scalar_t>
struct TaskBuffers {
  std::vector<scalar_t> storage;
  std::vector<Rows<scalar_t>> rows;
  std::vector<scalar_t> zeros, sink;
  // Per slot, each an array of M * L * P in `storage`: the pixel coordinate, its floor and its fractional part,
  // the bilinear weights, the weights times the attention weight, and (backward) the dot products of the
  // neighbours' rows with grad_output's row.
  scalar_t *x, *y, *x_floor, *y_floor, *lx, *ly, *weight[4], *coef[4], *dot[4];
  static constexpr int kArrays = 6 + 3 * 4;

  TaskBuffers(const MSDeformAttnSizes& s, bool backward)
      : storage(kArrays * s.num_heads * s.num_levels * s.num_points),
        rows(s.num_heads * s.num_levels * s.num_points),
        zeros(s.head_dim, 0),
        sink(backward ? s.head_dim : 0, 0) {
    scalar_t* next = storage.data();
    const auto take = [&]() {
      scalar_t* array = next;
      next += rows.size();
      return array;
    };
    x = take();
    y = take();
    x_floor = take();
    y_floor = take();
    lx = take();
    ly = take();
    for (int k = 0; k < 4; ++k) {
      weight[k] = take();
      coef[k] = take();
      dot[k] = take();
    }
  }
};

// Locates the points of query `nq` for heads [m_begin, m_end): msda_locate's arithmetic, in three passes over the
// points so that the floating-point ones are vector loops. First the pixel coordinates, clamped; then per point, in
// int64, their floors, which neighbours lie on the map and their rows, whose loads (and, backward, gradient rows)
// are prefetched: a decoder or sparse-encoder query samples rows scattered over the whole value tensor, mostly
// cache misses, and issuing all the loads before using any lets them overlap; last the fractional parts and the
// bilinear weights, also times the attention weight.
template <typename scalar_t>
MSDA_INLINE void locate_query(const Inputs<scalar_t>& in,
                              int64_t n,
                              int64_t nq,
                              int64_t m_begin,
                              int64_t m_end,
                              scalar_t* grad_value,
                              TaskBuffers<scalar_t>& b) {
  const auto& s = in.s;
  const int64_t M = s.num_heads, D = s.head_dim, L = s.num_levels, P = s.num_points, LP = L * P;
  const int64_t first = (nq * M + m_begin) * LP, count = (m_end - m_begin) * LP;
  const scalar_t* loc = in.sampling_locations + first * 2;
  const scalar_t* attn = in.attention_weights + first;
  const scalar_t* width = in.plan->slot_width.data() + m_begin * LP;
  const scalar_t* height = in.plan->slot_height.data() + m_begin * LP;
  const scalar_t* x_max = in.plan->slot_x_max.data() + m_begin * LP;
  const scalar_t* y_max = in.plan->slot_y_max.data() + m_begin * LP;
  scalar_t *x = b.x, *y = b.y;
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    x[j] = msda_pixel_coordinate(loc[2 * j], width[j], x_max[j]);
    y[j] = msda_pixel_coordinate(loc[2 * j + 1], height[j], y_max[j]);
  }
  const int64_t row_stride = M * D;
  for (int64_t m = m_begin; m < m_end; ++m) {
    const int64_t head_offset = n * s.num_values * row_stride + m * D;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t height_l = in.spatial_shapes[2 * l], width_l = in.spatial_shapes[2 * l + 1];
      const int64_t level_offset = head_offset + in.level_start[l] * row_stride;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t j = (m - m_begin) * LP + l * P + p;
        const int64_t x0 = msda_floor_to_int(x[j]), y0 = msda_floor_to_int(y[j]);
        b.x_floor[j] = static_cast<scalar_t>(x0);
        b.y_floor[j] = static_cast<scalar_t>(y0);
        const bool x_in[2] = {x0 >= 0 && x0 < width_l, x0 >= -1 && x0 + 1 < width_l};
        const bool y_in[2] = {y0 >= 0 && y0 < height_l, y0 >= -1 && y0 + 1 < height_l};
        auto& rows = b.rows[j];
        for (int k = 0; k < 4; ++k) {
          const int dy = k / 2, dx = k % 2;
          const bool inside = y_in[dy] && x_in[dx];
          const int64_t offset = level_offset + ((y0 + dy) * width_l + x0 + dx) * row_stride;  // if inside
          rows.value[k] = inside ? in.value + offset : b.zeros.data();
          prefetch_row<false>(rows.value[k], D);
          if (grad_value != nullptr) {
            rows.grad[k] = inside ? grad_value + offset : b.sink.data();
            prefetch_row<true>(rows.grad[k], D);
          }
        }
      }
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    const scalar_t lx = x[j] - b.x_floor[j], ly = y[j] - b.y_floor[j];
    scalar_t weight[4];
    msda_bilinear_weights(lx, ly, weight);
    b.lx[j] = lx;
    b.ly[j] = ly;
    for (int k = 0; k < 4; ++k) {
      b.weight[k][j] = weight[k];
      b.coef[k][j] = attn[j] * weight[k];
    }
  }
}

// Forward of query `nq`, every head: each head's D-vector of the output row is accumulated in place (it stays in
// L1), reading each neighbour's D contiguous channels a vector at a time.
template <typename scalar_t, int kBytes>
MSDA_INLINE void forward_query(const Inputs<scalar_t>& in,
                               int64_t n,
                               int64_t nq,
                               scalar_t* output,
                               TaskBuffers<scalar_t>& b) {
  using V = typename Vec<scalar_t, kBytes>::type;
  constexpr int64_t W = Vec<scalar_t, kBytes>::kWidth;
  const int64_t M = in.s.num_heads, D = in.s.head_dim, LP = in.s.num_levels * in.s.num_points;
  locate_query<scalar_t>(in, n, nq, 0, M, nullptr, b);
  for (int64_t m = 0; m < M; ++m) {
    scalar_t* out = output + (nq * M + m) * D;
    std::fill(out, out + D, scalar_t(0));
    for (int64_t j = m * LP; j < (m + 1) * LP; ++j) {
      const auto& rows = b.rows[j];
      const scalar_t coef[4] = {b.coef[0][j], b.coef[1][j], b.coef[2][j], b.coef[3][j]};
      int64_t c = 0;
      for (; c + W <= D; c += W) {
        V acc, v;
        load(acc, out + c);
        for (int k = 0; k < 4; ++k) {
          load(v, rows.value[k] + c);
          acc += coef[k] * v;
        }
        store(out + c, acc);
      }
      for (; c < D; ++c) {
        for (int k = 0; k < 4; ++k) {
          out[c] += coef[k] * rows.value[k][c];
        }
      }
    }
  }
}

// Backward of query `nq` for heads [m_begin, m_end): scatters into grad_value[n, :, m, :] and writes the location
// and attention-weight gradients of the heads' L * P samples.
//
// For one sample with attention weight a, bilinear weights w_k and neighbour rows v_k, and go = grad_output's row,
// the three per-sample gradients are linear in the four dot products d_k = sum_c go[c] * v_k[c]:
//   d attn   = sum_c go[c] * sum_k w_k v_k[c]                  = sum_k w_k d_k
//   d x_pix  = a * sum_c go[c] * (hy (v1 - v0) + ly (v3 - v2))  = a (hy (d1 - d0) + ly (d3 - d2))
//   d y_pix  = a * sum_c go[c] * (hx (v2 - v0) + lx (v3 - v1))  = a (hx (d2 - d0) + lx (d3 - d1))
// (hx = 1 - lx, hy = 1 - ly). So the channel loop accumulates just four dot products, next to the scatter
// grad_row_k += (a w_k) go, and the three gradients of all the query's samples come out of one vector loop at the
// end. grid_sample's own backward, like msda_scatter, sums the same corner terms channel by channel in another
// order: the results agree to rounding.
template <typename scalar_t, int kBytes>
MSDA_INLINE void backward_query(const Inputs<scalar_t>& in,
                                int64_t n,
                                int64_t nq,
                                int64_t m_begin,
                                int64_t m_end,
                                const scalar_t* grad_output,
                                scalar_t* grad_value,
                                scalar_t* grad_sampling_locations,
                                scalar_t* grad_attention_weights,
                                TaskBuffers<scalar_t>& b) {
  using V = typename Vec<scalar_t, kBytes>::type;
  constexpr int64_t W = Vec<scalar_t, kBytes>::kWidth;
  const auto& s = in.s;
  const int64_t M = s.num_heads, D = s.head_dim, LP = s.num_levels * s.num_points;
  locate_query<scalar_t>(in, n, nq, m_begin, m_end, grad_value, b);
  for (int64_t m = m_begin; m < m_end; ++m) {
    const scalar_t* go = grad_output + (nq * M + m) * D;
    for (int64_t j = (m - m_begin) * LP; j < (m - m_begin + 1) * LP; ++j) {
      const auto& rows = b.rows[j];
      const scalar_t coef[4] = {b.coef[0][j], b.coef[1][j], b.coef[2][j], b.coef[3][j]};
      V dot[4] = {};
      int64_t c = 0;
      for (; c + W <= D; c += W) {
        V g, v;
        load(g, go + c);
        for (int k = 0; k < 4; ++k) {
          load(v, rows.value[k] + c);
          dot[k] += g * v;
        }
        for (int k = 0; k < 4; ++k) {
          load(v, rows.grad[k] + c);
          v += coef[k] * g;
          store(rows.grad[k] + c, v);
        }
      }
      scalar_t d[4];
      for (int k = 0; k < 4; ++k) {
        d[k] = lane_sum<scalar_t, kBytes>(dot[k]);
      }
      for (; c < D; ++c) {
        for (int k = 0; k < 4; ++k) {
          d[k] += go[c] * rows.value[k][c];
          rows.grad[k][c] += coef[k] * go[c];
        }
      }
      for (int k = 0; k < 4; ++k) {
        b.dot[k][j] = d[k];
      }
    }
  }
  const int64_t first = (nq * M + m_begin) * LP, count = (m_end - m_begin) * LP;
  const scalar_t* attn = in.attention_weights + first;
  const scalar_t* width = in.plan->slot_width.data() + m_begin * LP;
  const scalar_t* height = in.plan->slot_height.data() + m_begin * LP;
  scalar_t* g_loc = grad_sampling_locations + first * 2;
  scalar_t* g_attn = grad_attention_weights + first;
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    const scalar_t d0 = b.dot[0][j], d1 = b.dot[1][j], d2 = b.dot[2][j], d3 = b.dot[3][j];
    const scalar_t lx = b.lx[j], ly = b.ly[j], hx = scalar_t(1) - lx, hy = scalar_t(1) - ly;
    g_attn[j] = b.weight[0][j] * d0 + b.weight[1][j] * d1 + b.weight[2][j] * d2 + b.weight[3][j] * d3;
    // d(pixel x)/d(normalized x) = W, and likewise for y.
    g_loc[2 * j] = attn[j] * (hy * (d1 - d0) + ly * (d3 - d2)) * width[j];
    g_loc[2 * j + 1] = attn[j] * (hx * (d2 - d0) + lx * (d3 - d1)) * height[j];
  }
}

// Prefetches what query `nq` reads and writes for heads [m_begin, m_end) besides the value rows: its sampling
// locations, attention weights and grad_output row or output row, and (backward) its gradient rows. Called a query
// ahead: in the spatial order consecutive queries are seldom neighbours in memory, so the hardware prefetchers
// miss these (the encoder on one core of a Xeon: about 8% off the forward and off the backward).
template <typename scalar_t>
inline void prefetch_query(const Inputs<scalar_t>& in,
                           int64_t nq,
                           int64_t m_begin,
                           int64_t m_end,
                           const scalar_t* grad_output,
                           scalar_t* output,
                           scalar_t* grad_sampling_locations,
                           scalar_t* grad_attention_weights) {
  const int64_t M = in.s.num_heads, D = in.s.head_dim, LP = in.s.num_levels * in.s.num_points;
  const int64_t first = (nq * M + m_begin) * LP, count = (m_end - m_begin) * LP;
  prefetch_range<false>(in.sampling_locations + first * 2, count * 2);
  prefetch_range<false>(in.attention_weights + first, count);
  if (output != nullptr) {
    prefetch_range<true>(output + (nq * M + m_begin) * D, (m_end - m_begin) * D);
  }
  if (grad_output != nullptr) {
    prefetch_range<false>(grad_output + (nq * M + m_begin) * D, (m_end - m_begin) * D);
    prefetch_range<true>(grad_sampling_locations + first * 2, count * 2);
    prefetch_range<true>(grad_attention_weights + first, count);
  }
}

// Forward over positions [begin, end) of the visiting order (flat over n).
template <typename scalar_t, int kBytes>
MSDA_INLINE void forward_rows(const Inputs<scalar_t>& in, int64_t begin, int64_t end, scalar_t* output) {
  const auto& s = in.s;
  TaskBuffers<scalar_t> buffers(s, /*backward=*/false);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = i / s.num_queries;
    if (i + 1 < end) {
      prefetch_query<scalar_t>(in, ((i + 1) / s.num_queries) * s.num_queries + in.plan->order[i + 1], 0,
                               s.num_heads, nullptr, output, nullptr, nullptr);
    }
    forward_query<scalar_t, kBytes>(in, n, n * s.num_queries + in.plan->order[i], output, buffers);
  }
}

// Backward over the flat (n, m) range [begin, end), every query of each head. Within one n the task's heads are
// visited query by query, in the spatial order: all the heads' channels of a value row are then used while its
// cache lines are in. (Head after head, which uses 1 / M of each value row's bytes at a time, measured 1.6x slower
// on the encoder; groups of 2 or 4 heads were slower too.)
template <typename scalar_t, int kBytes>
MSDA_INLINE void backward_heads(const Inputs<scalar_t>& in,
                                int64_t begin,
                                int64_t end,
                                const scalar_t* grad_output,
                                scalar_t* grad_value,
                                scalar_t* grad_sampling_locations,
                                scalar_t* grad_attention_weights) {
  const auto& s = in.s;
  const int64_t M = s.num_heads;
  TaskBuffers<scalar_t> buffers(s, /*backward=*/true);
  for (int64_t first = begin; first < end;) {
    const int64_t n = first / M, m_begin = first % M;
    const int64_t m_end = std::min(M, m_begin + (end - first));
    first += m_end - m_begin;
    for (int64_t i = 0; i < s.num_queries; ++i) {
      const int64_t nq = n * s.num_queries + in.plan->order[n * s.num_queries + i];
      if (i + 1 < s.num_queries) {
        prefetch_query<scalar_t>(in, n * s.num_queries + in.plan->order[n * s.num_queries + i + 1], m_begin, m_end,
                                 grad_output, nullptr, grad_sampling_locations, grad_attention_weights);
      }
      backward_query<scalar_t, kBytes>(in, n, nq, m_begin, m_end, grad_output, grad_value, grad_sampling_locations,
                                       grad_attention_weights, buffers);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Instruction-set levels.
//
// The kernels are compiled once per x86-64 level: each entry point below carries __attribute__((target)) and
// `flatten`, so the templates above are inlined into it and compiled for its level, and the extension stays
// portable without -march=native. The level is picked once per process (a table of function pointers): the best
// one the CPU supports (__builtin_cpu_supports, the test GCC's target_clones resolver makes), or a lower one that
// SPARSE_DETR_CPU_ISA forces, so that the AVX2 kernels can be tested and timed on an AVX-512 machine too.
// `__builtin_cpu_supports("x86-64-vN")` and target("arch=x86-64-vN") need GCC 12; other compilers and other
// architectures build the baseline level only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define MSDA_X86_LEVELS 1
#else
#define MSDA_X86_LEVELS 0
#endif

enum class CpuIsa { kBaseline = 0, kV3 = 1, kV4 = 2 };  // ordered: a CPU with a level has the ones below

struct IsaName {
  const char* env;       // as SPARSE_DETR_CPU_ISA takes it
  const char* reported;  // as cpu_isa() reports it
};
constexpr IsaName kIsaNames[] = {{"default", "default"}, {"v3", "x86-64-v3"}, {"v4", "x86-64-v4"}};
constexpr const char* kIsaEnvVar = "SPARSE_DETR_CPU_ISA";

CpuIsa best_cpu_isa() {
#if MSDA_X86_LEVELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) {
    return CpuIsa::kV4;
  }
  if (__builtin_cpu_supports("x86-64-v3")) {
    return CpuIsa::kV3;
  }
#endif
  return CpuIsa::kBaseline;
}

// The level, or why SPARSE_DETR_CPU_ISA cannot be honoured; decided at the first call and kept, so that a bad value
// fails every call alike (the first kernel call, or cpu_isa()) rather than falling back silently.
struct IsaChoice {
  CpuIsa isa;
  std::string error;
};

IsaChoice choose_cpu_isa() {
  const CpuIsa best = best_cpu_isa();
  const char* requested = std::getenv(kIsaEnvVar);
  if (requested == nullptr || *requested == '\0') {
    return {best, ""};
  }
  const IsaName& best_name = kIsaNames[static_cast<int>(best)];
  for (int level = 0; level <= static_cast<int>(CpuIsa::kV4); ++level) {
    if (std::string(requested) != kIsaNames[level].env) {
      continue;
    }
    if (level > static_cast<int>(best)) {
      return {best, std::string("ms_deform_attn: ") + kIsaEnvVar + "=" + requested + " asks for the " +
                        kIsaNames[level].reported + " kernels, but the best level this CPU supports" +
                        (MSDA_X86_LEVELS ? "" : " in this build") + " is " + best_name.reported + " (" +
                        kIsaEnvVar + "=" + best_name.env + ")"};
    }
    return {static_cast<CpuIsa>(level), ""};
  }
  return {best, std::string("ms_deform_attn: ") + kIsaEnvVar + " must be v4, v3 or default (or unset: the CPU's " +
                    "best level, here " + best_name.env + "), got '" + requested + "'"};
}

CpuIsa selected_cpu_isa() {
  static const IsaChoice choice = choose_cpu_isa();
  TORCH_CHECK_VALUE(choice.error.empty(), choice.error);
  return choice.isa;
}

#define MSDA_DEFINE_LEVEL(level, attributes, bytes)                                                               \
  template <typename scalar_t>                                                                                    \
  attributes void forward_##level(const Inputs<scalar_t>& in, int64_t begin, int64_t end, scalar_t* output) {    \
    forward_rows<scalar_t, bytes>(in, begin, end, output);                                                        \
  }                                                                                                               \
  template <typename scalar_t>                                                                                    \
  attributes void backward_##level(const Inputs<scalar_t>& in, int64_t begin, int64_t end,                       \
                                   const scalar_t* grad_output, scalar_t* grad_value,                             \
                                   scalar_t* grad_sampling_locations, scalar_t* grad_attention_weights) {         \
    backward_heads<scalar_t, bytes>(in, begin, end, grad_output, grad_value, grad_sampling_locations,             \
                                    grad_attention_weights);                                                      \
  }

MSDA_DEFINE_LEVEL(baseline, MSDA_FLATTEN, 16)
#if MSDA_X86_LEVELS
MSDA_DEFINE_LEVEL(v3, __attribute__((target("arch=x86-64-v3"), flatten)), 32)
MSDA_DEFINE_LEVEL(v4, __attribute__((target("arch=x86-64-v4"), flatten)), 64)
#endif

template <typename scalar_t>
struct CpuKernels {
  void (*forward)(const Inputs<scalar_t>&, int64_t, int64_t, scalar_t*);
  void (*backward)(const Inputs<scalar_t>&, int64_t, int64_t, const scalar_t*, scalar_t*, scalar_t*, scalar_t*);
};

template <typename scalar_t>
CpuKernels<scalar_t> cpu_kernels() {
  switch (selected_cpu_isa()) {
#if MSDA_X86_LEVELS
    case CpuIsa::kV4:
      return {&forward_v4<scalar_t>, &backward_v4<scalar_t>};
    case CpuIsa::kV3:
      return {&forward_v3<scalar_t>, &backward_v3<scalar_t>};
#endif
    default:
      return {&forward_baseline<scalar_t>, &backward_baseline<scalar_t>};
  }
}

template <typename scalar_t>
void forward_kernel(const Inputs<scalar_t>& in, scalar_t* output) {
  const auto& s = in.s;
  const auto run = cpu_kernels<scalar_t>().forward;
  at::parallel_for(0, s.batch * s.num_queries, grain_for(s.num_heads * s.num_levels * s.num_points * s.head_dim),
                   [&](int64_t begin, int64_t end) { run(in, begin, end, output); });
}

// The value gradient is a scatter: queries that sample the same neighbour add into the same row. Partitioning the
// work by (n, m) instead of by query gives every task its own disjoint slice grad_value[n, :, m, :], so the scatter
// needs neither atomics nor per-thread copies of grad_value, and every sum is taken in the same order whatever the
// number of threads (the results are bitwise the same); the price is at most N * M parallel tasks.
template <typename scalar_t>
void backward_kernel(const Inputs<scalar_t>& in,
                     const scalar_t* grad_output,
                     scalar_t* grad_value,
                     scalar_t* grad_sampling_locations,
                     scalar_t* grad_attention_weights) {
  const auto& s = in.s;
  const auto run = cpu_kernels<scalar_t>().backward;
  at::parallel_for(0, s.batch * s.num_heads,
                   grain_for(s.num_queries * s.num_levels * s.num_points * s.head_dim),
                   [&](int64_t begin, int64_t end) {
                     run(in, begin, end, grad_output, grad_value, grad_sampling_locations, grad_attention_weights);
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
                             const CallPlan<scalar_t>& plan) {
  return {value.data_ptr<scalar_t>(),
          spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>(),
          sampling_locations.data_ptr<scalar_t>(),
          attention_weights.data_ptr<scalar_t>(),
          s,
          &plan};
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
    const auto plan = make_plan(spatial_shapes.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(), s);
    forward_kernel<scalar_t>(
        make_inputs<scalar_t>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s,
                              plan),
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
      const auto plan = make_plan(spatial_shapes.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(), s);
      backward_kernel<scalar_t>(
          make_inputs<scalar_t>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s,
                                plan),
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

std::string msda_cpu_isa() {
  return kIsaNames[static_cast<int>(selected_cpu_isa())].reported;
}

TORCH_LIBRARY_IMPL(sparse_detr, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace sparse_detr
