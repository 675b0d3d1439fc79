#include "core/runtime.h"

#include <ATen/Parallel.h>
#include <fcntl.h>
#include <malloc.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <thread>

#include "core/compute.h"
#include "core/error.h"

extern char** environ;

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

void limit_malloc_arenas(int arenas) {
  mallopt(M_ARENA_MAX, arenas);
}

int64_t proc_status_value(const std::string& key, int pid) {
  std::ifstream in("/proc/" + (pid > 0 ? std::to_string(pid) : std::string("self")) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) return std::stoll(line.substr(key.size() + 1));
  }
  return -1;
}

int spawn_process(const std::vector<std::string>& argv, const std::string& output) {
  std::vector<std::string> args = argv;
  std::vector<char*> ptrs;
  for (auto& a : args) ptrs.push_back(a.data());
  ptrs.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, output.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  pid_t pid = -1;
  const int rc = posix_spawnp(&pid, ptrs[0], &fa, nullptr, ptrs.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0)
    throw Error("cannot start " + argv.at(0) + ": " + std::strerror(rc), "check that it is installed and on the path");
  return pid;
}

int wait_process(int pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return 128;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace amaq
