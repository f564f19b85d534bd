// Per-sample bilinear sampling: where a point falls and its weights, written once for the CPU and the CUDA
// kernels, and the per-channel gather and backward scatter of the CUDA kernels.
//
// Semantics are grid_sample's: bilinear, padding_mode="zeros", align_corners=False. A normalized location u in
// [0, 1] maps to the pixel coordinate u * size - 0.5 (pixel centres sit at (i + 0.5) / size), and a neighbour that
// falls off the map reads as zero and receives no gradient.
//
// A CUDA thread owns one channel and calls msda_locate, msda_gather and msda_scatter (the CPU tests run that code
// through the host harness of cuda/). The CPU kernel locates all the points of a query in vector loops built from
// msda_pixel_coordinate, msda_floor_to_int and msda_bilinear_weights, and works on whole vectors of channels
// (cpu/ms_deform_attn_cpu.cpp).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MSDA_HOST_DEVICE __host__ __device__
#define MSDA_UNROLL _Pragma("unroll")
#else
#define MSDA_HOST_DEVICE
#define MSDA_UNROLL _Pragma("GCC unroll 4")
#endif

namespace sparse_detr {

// Where one sampling point falls on a level's H x W map. Neighbours are ordered (y0, x0), (y0, x1), (y1, x0),
// (y1, x1). `index` is the neighbour's position y * W + x, clamped into the map so that a load is always in
// bounds; `inside` is 1 where the neighbour really lies on the map, else 0. Loads are unconditional and then
// selected with `inside != 0`, which keeps the channel loop branch-free and never lets a non-finite value at a
// clamped position leak into the result. (`inside` is an acc_t rather than a bool so that the select compares
// values as wide as the data: GCC vectorizes that, not a select on a byte-sized bool, in the host harness.)
template <typename acc_t>
struct BilinearPoint {
  int64_t index[4];
  acc_t inside[4];
  acc_t weight[4];
  acc_t lx, ly;  // fractional parts of the pixel coordinate, for the location gradient
};

template <typename acc_t>
MSDA_HOST_DEVICE inline int64_t msda_floor_to_int(acc_t v) {
  const int64_t t = static_cast<int64_t>(v);  // truncates toward zero
  return (static_cast<acc_t>(t) > v) ? t - 1 : t;
}

MSDA_HOST_DEVICE inline int64_t msda_clamp_index(int64_t i, int64_t size) {
  return i < 0 ? 0 : (i >= size ? size - 1 : i);
}

// The pixel coordinate of normalized location `u` on a map `size` pixels long (`size_plus_one` is size + 1; both
// given as acc_t, converted once by the caller), clamped to [-2, size + 1]. A point more than one pixel off the
// map has no neighbour on it, so its value and gradients are zero wherever it is; clamping it changes nothing but
// keeps the int conversion defined (NaN goes to -2). The two selects come one after the other, so that both
// comparisons are made on every lane of a vector loop: GCC does not vectorize a comparison made on some lanes
// only, since it might trap.
template <typename acc_t>
MSDA_HOST_DEVICE inline acc_t msda_pixel_coordinate(acc_t u, acc_t size, acc_t size_plus_one) {
  acc_t x = u * size - acc_t(0.5);
  x = x > acc_t(-2) ? x : acc_t(-2);
  return x < size_plus_one ? x : size_plus_one;
}

// The bilinear weights of the four neighbours (BilinearPoint's order), from the fractional parts of the pixel
// coordinate.
template <typename acc_t>
MSDA_HOST_DEVICE inline void msda_bilinear_weights(acc_t lx, acc_t ly, acc_t weight[4]) {
  const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
  weight[0] = hy * hx;
  weight[1] = hy * lx;
  weight[2] = ly * hx;
  weight[3] = ly * lx;
}

// `loc_x`, `loc_y`: normalized location; `height`, `width`: the level's map size (both >= 1).
template <typename acc_t>
MSDA_HOST_DEVICE inline BilinearPoint<acc_t> msda_locate(acc_t loc_x, acc_t loc_y, int64_t height, int64_t width) {
  const acc_t x = msda_pixel_coordinate(loc_x, static_cast<acc_t>(width), static_cast<acc_t>(width + 1));
  const acc_t y = msda_pixel_coordinate(loc_y, static_cast<acc_t>(height), static_cast<acc_t>(height + 1));
  const int64_t x0 = msda_floor_to_int(x), y0 = msda_floor_to_int(y);
  const int64_t x1 = x0 + 1, y1 = y0 + 1;

  BilinearPoint<acc_t> p;
  p.lx = x - static_cast<acc_t>(x0);
  p.ly = y - static_cast<acc_t>(y0);
  msda_bilinear_weights(p.lx, p.ly, p.weight);

  const bool x0_in = x0 >= 0 && x0 < width, x1_in = x1 >= 0 && x1 < width;
  const bool y0_in = y0 >= 0 && y0 < height, y1_in = y1 >= 0 && y1 < height;
  p.inside[0] = (y0_in && x0_in) ? acc_t(1) : acc_t(0);
  p.inside[1] = (y0_in && x1_in) ? acc_t(1) : acc_t(0);
  p.inside[2] = (y1_in && x0_in) ? acc_t(1) : acc_t(0);
  p.inside[3] = (y1_in && x1_in) ? acc_t(1) : acc_t(0);

  const int64_t cx0 = msda_clamp_index(x0, width), cx1 = msda_clamp_index(x1, width);
  const int64_t cy0 = msda_clamp_index(y0, height), cy1 = msda_clamp_index(y1, height);
  p.index[0] = cy0 * width + cx0;
  p.index[1] = cy0 * width + cx1;
  p.index[2] = cy1 * width + cx0;
  p.index[3] = cy1 * width + cx1;
  return p;
}

// The four neighbours' values of channel `c`, zero off the map. `level_value` points at channel 0 of the level's
// first position for one (batch, head); consecutive positions are `row_stride` elements apart (M * D).
template <typename scalar_t, typename acc_t>
MSDA_HOST_DEVICE inline void msda_load_corners(
    const BilinearPoint<acc_t>& p, const scalar_t* level_value, int64_t row_stride, int64_t c, acc_t v[4]) {
MSDA_UNROLL
  for (int k = 0; k < 4; ++k) {
    const acc_t loaded = static_cast<acc_t>(level_value[p.index[k] * row_stride + c]);
    v[k] = p.inside[k] != acc_t(0) ? loaded : acc_t(0);
  }
}

// Bilinear sample of channel `c` at point `p`.
template <typename scalar_t, typename acc_t>
MSDA_HOST_DEVICE inline acc_t msda_gather(
    const BilinearPoint<acc_t>& p, const scalar_t* level_value, int64_t row_stride, int64_t c) {
  acc_t v[4];
  msda_load_corners(p, level_value, row_stride, c, v);
  return p.weight[0] * v[0] + p.weight[1] * v[1] + p.weight[2] * v[2] + p.weight[3] * v[3];
}

// What the backward of one channel's sample yields besides the value-gradient scatter.
template <typename acc_t>
struct BilinearBackward {
  acc_t sample;  // the forward sample itself, which the attention-weight gradient needs
  acc_t grad_x;  // dL/dx and dL/dy in pixel units (the caller scales them by width and height)
  acc_t grad_y;
};

// Backward of `msda_gather` for channel `c`, given grad_sample = dL/d(sample of channel c). Scatters
// weight[k] * grad_sample into the value gradient through `add(flat_index, amount, inside)`, where flat_index is
// relative to the same base as `level_value`. When `inside` is false the amount is exactly zero (and the index is
// a clamped in-bounds one): an adder may skip it (CUDA, saving an atomic) or add it unconditionally (CPU, keeping
// the channel loop branch-free).
template <typename scalar_t, typename acc_t, typename Adder>
MSDA_HOST_DEVICE inline BilinearBackward<acc_t> msda_scatter(
    const BilinearPoint<acc_t>& p,
    const scalar_t* level_value,
    int64_t row_stride,
    int64_t c,
    acc_t grad_sample,
    Adder& add) {
  acc_t v[4];
  msda_load_corners(p, level_value, row_stride, c, v);
MSDA_UNROLL
  for (int k = 0; k < 4; ++k) {
    add(p.index[k] * row_stride + c, p.inside[k] != acc_t(0) ? p.weight[k] * grad_sample : acc_t(0), p.inside[k] != acc_t(0));
  }
  const acc_t hx = acc_t(1) - p.lx, hy = acc_t(1) - p.ly;
  BilinearBackward<acc_t> b;
  b.sample = p.weight[0] * v[0] + p.weight[1] * v[1] + p.weight[2] * v[2] + p.weight[3] * v[3];
  b.grad_x = grad_sample * (hy * (v[1] - v[0]) + p.ly * (v[3] - v[2]));
  b.grad_y = grad_sample * (hx * (v[2] - v[0]) + p.lx * (v[3] - v[1]));
  return b;
}

// An adder for `msda_scatter` that adds plainly, for the host harness of the CUDA kernels (one thread at a time).
template <typename acc_t>
struct PlainAdder {
  acc_t* base;
  void operator()(int64_t i, acc_t amount, bool /*inside: amount is zero when false*/) { base[i] += amount; }
};

}  // namespace sparse_detr
