// One compute thread per process. Torch's parallel regions (OpenMP, and OpenBLAS built on it) belong
// to the thread that starts them: a client thread and a server thread computing on their own each
// keep a team of workers, which spin and switch against each other on a small machine (measured:
// ~1,300 voluntary context switches per step of a 2-core in-process run). Both sides hand their
// compute to this thread instead and wait for it; the one team stays warm between them, and the
// side that is not computing holds no workers at all.
//
// Work that overlaps compute (sending and receiving micro-batches in flight) belongs on other
// threads that never compute: that keeps one team per process.
//
// Jobs run in the order they are submitted. A job submitted from the compute thread itself runs
// inline. Thread-local torch state (grad mode) does not cross: a job sets what it needs.
#pragma once
#include <functional>
#include <optional>
#include <type_traits>
#include <utility>

namespace amaq::compute {

/// Runs `job` on the compute thread and waits for it; its exception is rethrown here.
void run_job(const std::function<void()>& job);

/// Runs `fn` on the compute thread and returns its result.
template <typename F>
auto run(F&& fn) -> std::invoke_result_t<F&> {
  using R = std::invoke_result_t<F&>;
  if constexpr (std::is_void_v<R>) {
    run_job([&] { fn(); });
  } else {
    std::optional<R> out;
    run_job([&] { out.emplace(fn()); });
    return std::move(*out);
  }
}

/// The torch thread count the compute thread uses (set by configure_threads).
void set_threads(int threads);
/// Whether the caller is the compute thread.
bool on_compute_thread();

}  // namespace amaq::compute
