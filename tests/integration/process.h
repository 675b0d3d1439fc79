// Real processes for the integration tests: spawn with stdout/stderr in files, signal, wait; read
// a run's JSON lines; start an `amaq server` and learn its port.
#pragma once
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "core/fs.h"

extern char** environ;

namespace amaq::testing {

// A child process with stdout and stderr in files.
class Process {
 public:
  Process(const std::vector<std::string>& args, const std::string& out, const std::string& err) {
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    const int e = posix_spawn(&pid_, argv[0], &fa, nullptr, argv.data(), environ);
    EXPECT_EQ(e, 0) << "cannot start " << args[0] << " (output to " << out << "): " << std::strerror(e);
    posix_spawn_file_actions_destroy(&fa);
    if (e != 0) {  // as if it had exited with 127, and never waitpid(-1), which would reap another child
      pid_ = -1;
      exited_ = true;
      status_ = 127 << 8;
    }
  }
  ~Process() {
    if (pid_ > 0 && !exited_) {
      ::kill(pid_, SIGKILL);
      wait();
    }
  }
  /// The exit code, or 128 + the signal that ended it.
  int wait() {
    if (!exited_) {
      ::waitpid(pid_, &status_, 0);
      exited_ = true;
    }
    return WIFEXITED(status_) ? WEXITSTATUS(status_) : 128 + WTERMSIG(status_);
  }
  /// False once the process has ended (its status is kept for wait()).
  bool alive() {
    if (!exited_ && ::waitpid(pid_, &status_, WNOHANG) == pid_) exited_ = true;
    return !exited_;
  }
  void signal(int sig) { ::kill(pid_, sig); }
  int pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  int status_ = 0;
  bool exited_ = false;
};

inline std::string slurp(const std::string& path) {
  return file_exists(path) ? read_file(path) : std::string();
}

inline std::vector<nlohmann::json> lines_with(const std::string& path, const char* key) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.contains(key)) out.push_back(j);
  }
  return out;
}

// An `amaq client` on one thread, of the llama-gqa fixture split after layer 2, against 127.0.0.1:PORT:
// the byte tokenizer, 2 x 32 tokens per micro-batch, learning rate 1e-2, then `extra`.
inline std::vector<std::string> small_client_args(const std::string& bin, const std::string& model,
                                                  const std::string& port, const std::string& run_dir,
                                                  const std::string& data, const std::vector<std::string>& extra) {
  std::vector<std::string> a{bin,         "--threads", "1",      "client",    "--model",
                             model,       "--split",   "2",      "--connect", "127.0.0.1:" + port,
                             "--run-dir", run_dir,     "--data", data,        "--tokenizer",
                             "byte",      "--batch",   "2",      "--seq-len", "32",
                             "--lr",      "1e-2"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

// The port an `amaq server` writing "listening on 127.0.0.1:PORT" to `out_file` took; empty
// after 30 s without it.
inline std::string wait_for_port(const std::string& out_file) {
  for (int i = 0; i < 600; ++i) {
    const std::string o = slurp(out_file);
    if (auto p = o.find("listening on 127.0.0.1:"); p != std::string::npos && o.find('\n', p) != std::string::npos)
      return o.substr(p + 23, o.find('\n', p) - p - 23);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return {};
}

// Whether `file` contains `text` within 10 s (a log line a process writes when it gets somewhere).
inline bool wait_for_text(const std::string& file, const std::string& text) {
  for (int i = 0; i < 200; ++i) {
    if (slurp(file).find(text) != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

}  // namespace amaq::testing
