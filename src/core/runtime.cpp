#include "core/runtime.h"

#include <ATen/Parallel.h>
#include <malloc.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <thread>

#include "core/compute.h"

namespace amaq {

int configure_threads(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(threads);
  compute::set_threads(threads);  // the compute thread's own team (see core/compute.h)
  return threads;
}

void exec_with_openmp_settings(char** argv) {
  if (std::getenv("GOMP_SPINCOUNT")) return;
  if (setenv("GOMP_SPINCOUNT", "10000", 1) != 0) return;
  execv("/proc/self/exe", argv);  // returns only on failure: then run on with libgomp's defaults
}

void configure_memory() {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);  // glibc's upper limit: blocks below it come from the heap
  mallopt(M_TRIM_THRESHOLD, 1 << 30);   // and stay there when freed
}

void release_free_memory() {
  malloc_trim(0);
}

int64_t proc_status_value(const std::string& key, int pid) {
  std::ifstream in("/proc/" + (pid > 0 ? std::to_string(pid) : std::string("self")) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) return std::stoll(line.substr(key.size() + 1));
  }
  return -1;
}

}  // namespace amaq
