// core/device.h's CUDA parts: built only against a libtorch with CUDA (AMAQ_HAVE_CUDA).
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

#include "core/device.h"

namespace amaq {

void synchronize(at::Device device) {
  if (device.is_cuda()) c10::cuda::device_synchronize();
}

int64_t peak_memory_bytes(at::Device device) {
  if (!device.is_cuda()) return -1;
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index());
  return stats.allocated_bytes[0].peak;  // [0]: StatType::AGGREGATE (its namespace moved in PyTorch 2.4)
}

void reset_peak_memory(at::Device device) {
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index() < 0 ? 0 : device.index());
}

}  // namespace amaq
