#include "core/compute.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

namespace amaq::compute {
namespace {

std::atomic<int> g_threads{0};  // 0: torch's default

struct Job {
  const std::function<void()>* fn;
  std::exception_ptr error;
  bool done = false;
};

class Worker {
 public:
  Worker() : thread_([this] { loop(); }) {}
  ~Worker() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void submit(const std::function<void()>& fn) {
    Job job{&fn, nullptr, false};
    std::unique_lock<std::mutex> lock(mu_);
    queue_.push_back(&job);
    cv_.notify_all();
    done_cv_.wait(lock, [&] { return job.done; });
    if (job.error) std::rethrow_exception(job.error);
  }
  std::thread::id id() const { return thread_.get_id(); }

 private:
  void loop() {
    int applied = -1;
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      Job* job = queue_.front();
      queue_.pop_front();
      lock.unlock();
      const int want = g_threads.load();
      if (want > 0 && want != applied) at::set_num_threads(want), applied = want;
      try {
        (*job->fn)();
      } catch (...) {
        job->error = std::current_exception();
      }
      lock.lock();
      job->done = true;
      done_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::deque<Job*> queue_;
  bool stop_ = false;
  std::thread thread_;  // last: starts after the members it uses
};

Worker& worker() {
  static Worker w;
  return w;
}

}  // namespace

void run_job(const std::function<void()>& job) {
  if (on_compute_thread()) return job();
  worker().submit(job);
}

void set_threads(int threads) {
  g_threads = threads;
}

bool on_compute_thread() {
  return std::this_thread::get_id() == worker().id();
}

}  // namespace amaq::compute
