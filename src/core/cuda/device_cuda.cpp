// core/device.h's CUDA parts: built only against a libtorch with CUDA (AMAQ_HAVE_CUDA).
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

#include "core/device.h"
#include "core/error.h"

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

struct GraphedStep::Impl {
  at::cuda::CUDAGraph graph;
};

GraphedStep::GraphedStep(at::Device device, const std::function<void()>& fn, int warmup) : impl_(new Impl) {
  if (!device.is_cuda()) {
    throw Error("CUDA graphs need the model on a GPU, it is on " + device.str(),
                "use --device cuda, or leave out --cuda-graph");
  }
  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream(device.index());
  const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, device.index());
  at::cuda::CUDAEvent ready;
  ready.record(main);
  ready.block(side);
  {
    const c10::cuda::CUDAStreamGuard on_side(side);
    for (int i = 0; i < warmup; ++i) fn();
    impl_->graph.capture_begin();
    fn();
    impl_->graph.capture_end();
  }
  at::cuda::CUDAEvent done;
  done.record(side);
  done.block(main);
}

GraphedStep::~GraphedStep() = default;

void GraphedStep::replay() {
  impl_->graph.replay();
}

}  // namespace amaq
