#include "train/metrics.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>

#include "core/error.h"

namespace amaq::train {

nlohmann::json StepRecord::to_json() const {
  auto bits = [](const BitsStats& b) { return nlohmann::json{{"mean", b.mean}, {"min", b.min}, {"max", b.max}}; };
  return {{"step", step},
          {"loss", loss},
          {"task_loss", task_loss},
          {"reg_loss", reg_loss},
          {"lr", lr},
          {"grad_norm", grad_norm},
          {"fwd_bits", bits(fwd_bits)},
          {"bwd_bits", bits(bwd_bits)},
          {"fwd_wire_bytes", fwd_wire_bytes},
          {"bwd_wire_bytes", bwd_wire_bytes},
          {"fwd_packet_bytes", fwd_packet_bytes},
          {"bwd_packet_bytes", bwd_packet_bytes},
          {"fwd_header_bytes", fwd_wire_bytes - fwd_packet_bytes},
          {"bwd_header_bytes", bwd_wire_bytes - bwd_packet_bytes},
          {"forward_frame_bytes", forward_frame_bytes},
          {"backward_frame_bytes", backward_frame_bytes},
          {"elements", elements},
          {"rows", rows},
          {"cells", cells},
          {"client_seconds", client_seconds},
          {"server_seconds", server_seconds},
          {"network_seconds", network_seconds},
          {"tokens", tokens},
          {"tokens_per_second", tokens_per_second}};
}

JsonlLog::JsonlLog(const std::string& path) : f_(std::fopen(path.c_str(), "a")) {
  if (!f_) throw Error("cannot open " + path + " for appending", "check that the run directory is writable");
}

JsonlLog::~JsonlLog() {
  if (f_) std::fclose(f_);
}

void JsonlLog::write(const nlohmann::json& line) {
  const std::string s = line.dump() + "\n";
  std::fwrite(s.data(), 1, s.size(), f_);
  std::fflush(f_);
}

Progress::Progress(int64_t first_step, int64_t total_steps, bool force_bar)
    : first_(first_step), total_(total_steps), bar_(force_bar || ::isatty(STDERR_FILENO)) {}

void Progress::update(const StepRecord& r, uint64_t total_bytes) {
  const int64_t done = r.step + 1;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double eta = done > first_ ? elapsed / static_cast<double>(done - first_) * static_cast<double>(total_ - done) : 0;
  const std::string stats = fmt::format("step {}/{} loss {:.4f} bits {:.2f}/{:.2f} sent {:.2f} MB ETA {:02d}:{:02d}", done, total_,
                                        r.loss, r.fwd_bits.mean, r.bwd_bits.mean, static_cast<double>(total_bytes) / 1e6,
                                        static_cast<int>(eta) / 60, static_cast<int>(eta) % 60);
  if (bar_) {
    const int width = 24, filled = static_cast<int>(width * done / std::max<int64_t>(1, total_));
    std::fprintf(stderr, "\r[%s%s] %s\x1b[K", std::string(static_cast<size_t>(filled), '#').c_str(),
                 std::string(static_cast<size_t>(width - filled), '.').c_str(), stats.c_str());
  } else {
    const int64_t decile = done * 10 / std::max<int64_t>(1, total_);
    if (decile == last_decile_ && done != total_) return;
    last_decile_ = decile;
    std::fprintf(stderr, "%s\n", stats.c_str());
  }
  std::fflush(stderr);
}

void Progress::finish() {
  if (bar_) std::fprintf(stderr, "\n");
}

std::string format_table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width;
  for (const auto& row : rows) {
    width.resize(std::max(width.size(), row.size()));
    for (size_t i = 0; i < row.size(); ++i) width[i] = std::max(width[i], row[i].size());
  }
  std::string out;
  for (size_t r = 0; r < rows.size(); ++r) {
    for (size_t i = 0; i < rows[r].size(); ++i) {
      out += rows[r][i] + std::string(width[i] - rows[r][i].size(), ' ');
      out += i + 1 < rows[r].size() ? "  " : "";
    }
    while (!out.empty() && out.back() == ' ') out.pop_back();
    out += "\n";
    if (r == 0) {
      size_t total = 0;
      for (size_t w : width) total += w + 2;
      out += std::string(total > 2 ? total - 2 : 0, '-') + "\n";
    }
  }
  return out;
}

}  // namespace amaq::train
