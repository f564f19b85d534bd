// CUDA kernels of sparse_detr::ms_deform_attn and its backward (float32, float16, bfloat16, float64), accumulating in
// float32 (float64 for float64). What each thread does, and the host side of the ops, are in
// ms_deform_attn_threads.h, which the host harness (ms_deform_attn_harness.cpp) runs on the CPU; this file holds
// what only a GPU runs: the launches, the atomic scatter and the warp-shuffle sums.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/ms_deform_attn_threads.h"

// Only c10's CUDA headers on purpose: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which a minimal
// toolkit (nvcc + runtime) does not ship.

namespace sparse_detr {

namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    forward_kernel(const KernelInputs<scalar_t> in, scalar_t* __restrict__ output, int64_t total) {
  forward_thread(in, output, total, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
}

// float32 (float64) atomics rather than native half ones, so that many small contributions to a row do not round
// at every add.
template <typename acc_t>
struct AtomicAdder {
  acc_t* base;
  __device__ void operator()(int64_t i, acc_t amount, bool inside) {
    if (inside) {  // outside neighbours contribute exactly zero: skip the atomic
      atomicAdd(base + i, amount);
    }
  }
};

// Sum over the kGroup lanes of a group by warp shuffles; the group's lanes are aligned within the warp.
template <int kGroup>
struct ShuffleGroupSum {
  unsigned mask;
  template <typename acc_t>
  __device__ acc_t operator()(acc_t v) const {
#pragma unroll
    for (int offset = kGroup / 2; offset > 0; offset /= 2) {
      v += __shfl_xor_sync(mask, v, offset, kGroup);
    }
    return v;
  }
};

template <typename scalar_t, int kGroup>
__global__ void __launch_bounds__(kThreadsPerBlock) backward_kernel(const KernelInputs<scalar_t> in,
                                                                    const scalar_t* __restrict__ grad_output,
                                                                    at::opmath_type<scalar_t>* grad_value,
                                                                    scalar_t* __restrict__ grad_sampling_locations,
                                                                    scalar_t* __restrict__ grad_attention_weights,
                                                                    int64_t num_groups) {
  const int warp_lane = static_cast<int>(threadIdx.x % kWarpSize);
  ShuffleGroupSum<kGroup> group_sum{kGroup == kWarpSize ? 0xffffffffu
                                                        : (((1u << kGroup) - 1u) << (warp_lane / kGroup * kGroup))};
  backward_thread<scalar_t, kGroup, AtomicAdder<at::opmath_type<scalar_t>>>(
      in, grad_output, grad_value, grad_sampling_locations, grad_attention_weights, num_groups,
      static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, group_sum);
}

struct CudaLaunch {
  cudaStream_t stream;

  template <typename scalar_t>
  void forward(const KernelInputs<scalar_t>& in, scalar_t* output, int64_t total) const {
    forward_kernel<scalar_t><<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(in, output, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t, int kGroup>
  void backward(const KernelInputs<scalar_t>& in,
                const scalar_t* grad_output,
                at::opmath_type<scalar_t>* grad_value,
                scalar_t* grad_sampling_locations,
                scalar_t* grad_attention_weights,
                int64_t num_groups) const {
    backward_kernel<scalar_t, kGroup><<<blocks_for(num_groups * kGroup), kThreadsPerBlock, 0, stream>>>(
        in, grad_output, grad_value, grad_sampling_locations, grad_attention_weights, num_groups);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor ms_deform_attn_cuda(const at::Tensor& value,
                               const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index,
                               const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  return ms_deform_attn_forward_launch(value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights, /*check_levels=*/false,
                                       CudaLaunch{c10::cuda::getCurrentCUDAStream()});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(const at::Tensor& grad_output,
                                                                            const at::Tensor& value,
                                                                            const at::Tensor& spatial_shapes,
                                                                            const at::Tensor& level_start_index,
                                                                            const at::Tensor& sampling_locations,
                                                                            const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  return ms_deform_attn_backward_launch(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights, /*check_levels=*/false,
                                        CudaLaunch{c10::cuda::getCurrentCUDAStream()});
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_detr, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace sparse_detr
