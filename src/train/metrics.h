// What a run reports: one JSON line per step (RUN/metrics.jsonl), a progress bar on a terminal (a
// plain line every 10% otherwise), and a summary table at the end.
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "quant/bits_stats.h"

namespace amaq::train {

using BitsStats = quant::BitsStats;

/// One optimizer step, as the client saw it.
struct StepRecord {
  int64_t step = 0;
  double loss = 0;       ///< task loss + beta * regularizer
  double task_loss = 0;  ///< mean over micro-batches of the server's loss
  double reg_loss = 0;   ///< AMAQ bit regularizer (0 without AMAQ)
  double lr = 0;
  double grad_norm = 0;  ///< global, before clipping
  BitsStats fwd_bits, bwd_bits;
  /// U-shaped split: the widths at the tail split (activations down, gradients up).
  std::optional<BitsStats> tail_fwd_bits, tail_bwd_bits;
  uint64_t fwd_wire_bytes = 0, bwd_wire_bytes = 0;             ///< whole frames, headers included
  uint64_t fwd_packet_bytes = 0, bwd_packet_bytes = 0;         ///< the codecs' packets (their headers included)
  uint64_t forward_frame_bytes = 0, backward_frame_bytes = 0;  ///< the FORWARD / BACKWARD frames alone
  uint64_t elements = 0;  ///< values sent each way (activations up = gradients down; a U-shaped split counts both cuts)
  uint64_t rows = 0, cells = 0;  ///< sequences and (padded) token positions sent
  /// Where the step's time went: client_seconds + server_seconds + network_seconds = step_seconds
  /// for a serial step (--in-flight 1); each side's codec time is part of its seconds.
  double client_seconds = 0, server_seconds = 0, network_seconds = 0, step_seconds = 0;
  double client_codec_seconds = 0, server_codec_seconds = 0;
  double send_seconds = 0;  ///< handing frames to the socket: counted as network
  int64_t tokens = 0;
  double tokens_per_second = 0;
  /// budget=auto (train/auto_budget.h): the budgets chosen after this step and what they were chosen
  /// from (rates 0: not measured, the link kept up).
  struct AutoBudgetRecord {
    double fwd = 0, bwd = 0;
    double up_bytes_per_second = 0, down_bytes_per_second = 0, compute_seconds = 0;
  };
  std::optional<AutoBudgetRecord> auto_budget;
  /// AMAQ: the forward bit map this step's activations travelled with, one base-36 digit per channel
  /// (empty for other codecs).
  std::string fwd_map;

  nlohmann::json to_json() const;
};

/// Appends JSON lines to a file, flushed per line.
class JsonlLog {
 public:
  explicit JsonlLog(const std::string& path);
  ~JsonlLog();
  /// One line, flushed; throws amaq::Error naming the file when it cannot be written (disk full).
  void write(const nlohmann::json& line);

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
};

class Progress {
 public:
  /// A bar on stderr when it is a terminal (or `force_bar`), else a line every 10%.
  Progress(int64_t first_step, int64_t total_steps, bool force_bar = false);
  void update(const StepRecord& r, uint64_t total_bytes);
  void finish();

 private:
  int64_t first_, total_;
  bool bar_;
  int64_t last_decile_ = -1;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

/// A (C,) integer bit map as StepRecord::fwd_map's digits, and back (throws amaq::Error on a bad digit).
std::string encode_bit_map(const std::vector<int64_t>& bits);
std::vector<int64_t> decode_bit_map(const std::string& digits);

/// A plain-text table with aligned columns (first row = header).
std::string format_table(const std::vector<std::vector<std::string>>& rows);

/// Reads RUN/metrics.jsonl; a step logged twice (re-run after a resume) keeps its last line.
std::vector<StepRecord> read_metrics(const std::string& path);
/// The summary rows of a run's metrics (bytes each way against bf16, mean bits overall and over the
/// last 10%, final loss, eval).
std::string summarize(const std::vector<StepRecord>& steps, const nlohmann::json& eval);

}  // namespace amaq::train
