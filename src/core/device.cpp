#include "core/device.h"

#include <cctype>

#include "core/error.h"

namespace amaq {

bool cuda_available() {
  return at::hasCUDA() && at::getNumGPUs() > 0;
}

at::Device parse_device(const std::string& name) {
  if (name == "cpu") return at::kCPU;
  const std::string prefix = "cuda";
  if (name.rfind(prefix, 0) != 0) throw Error("unknown device '" + name + "'", "use cpu, cuda or cuda:N");
  int64_t index = 0;
  if (name.size() > prefix.size()) {
    const std::string n = name.substr(prefix.size() + 1);
    if (name[prefix.size()] != ':' || n.empty() || n.size() > 3 ||
        n.find_first_not_of("0123456789") != std::string::npos) {
      throw Error("unknown device '" + name + "'", "use cpu, cuda or cuda:N");
    }
    index = std::stoll(n);
  }
  if (!at::hasCUDA()) {
    throw Error("device '" + name + "': this amaq is built against a libtorch without CUDA",
                "build it against PyTorch's libtorch with CUDA (README: GPU server), or use --device cpu");
  }
  const int64_t gpus = static_cast<int64_t>(at::getNumGPUs());
  if (gpus == 0) throw Error("device '" + name + "': no CUDA GPU is visible", "check nvidia-smi, or use --device cpu");
  if (index >= gpus) {
    throw Error("device '" + name + "': this machine has " + std::to_string(gpus) + " CUDA GPU(s)",
                "use cuda:0 .. cuda:" + std::to_string(gpus - 1));
  }
  return {at::kCUDA, static_cast<c10::DeviceIndex>(index)};
}

at::ScalarType parse_dtype(const std::string& name) {
  if (name == "fp32" || name == "float32") return at::kFloat;
  if (name == "bf16" || name == "bfloat16") return at::kBFloat16;
  throw Error("unknown dtype '" + name + "'",
              "use fp32, or bf16 (base weights and activations in bf16; LoRA, optimizer state and "
              "norms in fp32)");
}

std::string dtype_flag(at::ScalarType t) {
  return t == at::kBFloat16 ? "bf16" : t == at::kFloat ? "fp32" : std::string(c10::toString(t));
}

at::TensorOptions compute_options(const std::string& device, const std::string& dtype) {
  return at::TensorOptions().dtype(parse_dtype(dtype)).device(parse_device(device));
}

#if !AMAQ_HAVE_CUDA
// Without CUDA in the build no tensor is ever on a GPU: parse_device refuses "cuda" first.
void synchronize(at::Device) {}
int64_t peak_memory_bytes(at::Device) {
  return -1;
}
void reset_peak_memory(at::Device) {}

struct GraphedStep::Impl {};
GraphedStep::GraphedStep(at::Device, const std::function<void()>&, int) {
  throw Error("CUDA graphs need a GPU and a build against a libtorch with CUDA",
              "leave out --cuda-graph, or build amaq against PyTorch's libtorch with CUDA");
}
GraphedStep::~GraphedStep() = default;
void GraphedStep::replay() {}
#endif

}  // namespace amaq
