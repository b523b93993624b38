// What the CUDA host code needs from torch, on the stable ABI: the current stream of a
// tensor's device (torch's, so kernels order with the caller's work and CUDA-graph capture
// sees them), the device guard, and the launch check.
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>

#include <ganops/tensor.h>

namespace ganops {

// Makes t's device current for the scope (kernels launch on the current device).
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(const Tensor& t) : guard_(t.get_device_index()) {}

 private:
  torch::stable::accelerator::DeviceGuard guard_;
};

// torch's current CUDA stream on a device, or on t's device.
inline cudaStream_t current_stream(const Device& device) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device.index(), &stream));
  return static_cast<cudaStream_t>(stream);
}
inline cudaStream_t current_stream(const Tensor& t) { return current_stream(t.device()); }

// Whether work on the stream is being captured into a CUDA graph.
inline bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  STD_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace ganops

// After every kernel launch: a bad configuration raises, naming the CUDA error.
#define GANOPS_CUDA_LAUNCH_CHECK() STD_CUDA_KERNEL_LAUNCH_CHECK()
