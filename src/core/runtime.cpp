#include "core/runtime.h"

#include <ATen/Parallel.h>

#include <thread>

namespace amaq {

int configure_threads(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(threads);
  return threads;
}

}  // namespace amaq
