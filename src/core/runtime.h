// Process-wide runtime settings.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace amaq {

/// Sets torch's intra-op thread count; `threads <= 0` means one per core. Returns the count used.
int configure_threads(int threads);

/// OpenMP reads its settings once, when libgomp loads, before main. Idle worker threads spin for
/// GOMP_SPINCOUNT iterations (libgomp's default: 300000) before they sleep: with the client and the
/// server as two processes on one machine, the idle side's team spins against the side that
/// computes (measured on 2 cores: two processes 8% slower than one). When GOMP_SPINCOUNT is unset,
/// this sets it to 10000 and executes the program again, once; a value the user set is kept.
void exec_with_openmp_settings(char** argv);

/// Tensors of the same sizes are allocated and freed every step: keeps freed memory in the process
/// (glibc would unmap or trim it, and every reuse would fault its pages in and zero them again).
void configure_memory();

/// At most `arenas` malloc arenas from here on (glibc gives each new thread its own, up to 8 per
/// core, and configure_memory keeps what each one frees): for a server whose session threads come
/// and go, so that every one does not leave an arena of kept pages behind.
void limit_malloc_arenas(int arenas);

/// A number from /proc/PID/status (`pid` 0: this process), such as "VmRSS" or "VmHWM" in kB or
/// "Threads"; -1 where the file or the key is missing.
int64_t proc_status_value(const std::string& key, int pid = 0);

/// Starts argv[0] (looked up in PATH when it holds no '/') with stdout and stderr into `output`
/// (created or truncated). Throws amaq::Error naming the program when it cannot start.
int spawn_process(const std::vector<std::string>& argv, const std::string& output);
/// Waits for a spawned process: its exit code, or 128 + the signal that ended it.
int wait_process(int pid);

}  // namespace amaq
