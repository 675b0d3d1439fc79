#include "train/metrics.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>

#include "core/error.h"

namespace amaq::train {
namespace {

std::string fmt_mb(uint64_t bytes) {
  return fmt::format("{:.3f}", static_cast<double>(bytes) / 1e6);
}

}  // namespace

nlohmann::json StepRecord::to_json() const {
  auto bits = [](const BitsStats& b) { return nlohmann::json{{"mean", b.mean}, {"min", b.min}, {"max", b.max}}; };
  nlohmann::json j{{"step", step},
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
                   {"step_seconds", step_seconds},
                   {"client_codec_seconds", client_codec_seconds},
                   {"server_codec_seconds", server_codec_seconds},
                   {"tokens", tokens},
                   {"tokens_per_second", tokens_per_second}};
  if (!fwd_map.empty()) j["fwd_map"] = fwd_map;
  if (tail_fwd_bits) j["tail_fwd_bits"] = bits(*tail_fwd_bits);
  if (tail_bwd_bits) j["tail_bwd_bits"] = bits(*tail_bwd_bits);
  if (auto_budget) {
    const AutoBudgetRecord& a = *auto_budget;
    j["auto_budget"] = {{"fwd", a.fwd},
                        {"bwd", a.bwd},
                        {"up_mbit_per_s", a.up_bytes_per_second * 8e-6},
                        {"down_mbit_per_s", a.down_bytes_per_second * 8e-6},
                        {"compute_seconds", a.compute_seconds}};
  }
  return j;
}

std::string encode_bit_map(const std::vector<int64_t>& bits) {
  static const char* kDigits = "0123456789abcdefghijklmnopqrstuvwxyz";
  std::string out;
  out.reserve(bits.size());
  for (int64_t b : bits) out += kDigits[std::clamp<int64_t>(b, 0, 35)];
  return out;
}

std::vector<int64_t> decode_bit_map(const std::string& digits) {
  std::vector<int64_t> out;
  out.reserve(digits.size());
  for (char c : digits) {
    if (c >= '0' && c <= '9') {
      out.push_back(c - '0');
    } else if (c >= 'a' && c <= 'z') {
      out.push_back(c - 'a' + 10);
    } else {
      throw Error(std::string("a bit map holds the character '") + c + "'", "the metrics file is damaged");
    }
  }
  return out;
}

JsonlLog::JsonlLog(const std::string& path) : path_(path), f_(std::fopen(path.c_str(), "a")) {
  if (!f_) throw Error("cannot open " + path + " for appending", "check that the run directory is writable");
}

JsonlLog::~JsonlLog() {
  if (f_) std::fclose(f_);
}

void JsonlLog::write(const nlohmann::json& line) {
  const std::string s = line.dump() + "\n";
  errno = 0;
  if (std::fwrite(s.data(), 1, s.size(), f_) != s.size() || std::fflush(f_) != 0) {
    const std::string why = errno ? std::strerror(errno) : "short write";
    std::clearerr(f_);
    throw Error("cannot write to " + path_ + ": " + why,
                "free disk space (or fix the run directory's permissions), then rerun with --resume");
  }
}

Progress::Progress(int64_t first_step, int64_t total_steps, bool force_bar)
    : first_(first_step), total_(total_steps), bar_(force_bar || ::isatty(STDERR_FILENO)) {}

void Progress::update(const StepRecord& r, uint64_t total_bytes) {
  const int64_t done = r.step + 1;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double eta =
      done > first_ ? elapsed / static_cast<double>(done - first_) * static_cast<double>(total_ - done) : 0;
  const std::string stats =
      fmt::format("step {}/{} loss {:.4f} bits {:.2f}/{:.2f} sent {:.2f} MB ETA {:02d}:{:02d}", done, total_, r.loss,
                  r.fwd_bits.mean, r.bwd_bits.mean, static_cast<double>(total_bytes) / 1e6, static_cast<int>(eta) / 60,
                  static_cast<int>(eta) % 60);
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

std::vector<StepRecord> read_metrics(const std::string& path) {
  std::map<int64_t, StepRecord> by_step;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("step") || !j.contains("fwd_bits")) continue;
    StepRecord r;
    r.step = j["step"];
    r.loss = j["loss"];
    r.task_loss = j["task_loss"];
    r.reg_loss = j["reg_loss"];
    r.lr = j["lr"];
    r.grad_norm = j["grad_norm"];
    for (auto [key, dst] : {std::pair{"fwd_bits", &r.fwd_bits}, std::pair{"bwd_bits", &r.bwd_bits}}) {
      dst->mean = j[key]["mean"];
      dst->min = j[key]["min"];
      dst->max = j[key]["max"];
    }
    for (auto [key, dst] :
         {std::pair{"tail_fwd_bits", &r.tail_fwd_bits}, std::pair{"tail_bwd_bits", &r.tail_bwd_bits}}) {
      if (j.contains(key)) *dst = BitsStats{j[key]["mean"], j[key]["min"], j[key]["max"]};
    }
    r.fwd_wire_bytes = j["fwd_wire_bytes"];
    r.bwd_wire_bytes = j["bwd_wire_bytes"];
    r.fwd_packet_bytes = j["fwd_packet_bytes"];
    r.bwd_packet_bytes = j["bwd_packet_bytes"];
    r.forward_frame_bytes = j["forward_frame_bytes"];
    r.backward_frame_bytes = j["backward_frame_bytes"];
    r.elements = j["elements"];
    r.rows = j["rows"];
    r.cells = j["cells"];
    r.client_seconds = j["client_seconds"];
    r.server_seconds = j["server_seconds"];
    r.network_seconds = j["network_seconds"];
    // Logs older than the timing split have none of these three.
    r.step_seconds = j.value("step_seconds", 0.0);
    r.client_codec_seconds = j.value("client_codec_seconds", 0.0);
    r.server_codec_seconds = j.value("server_codec_seconds", 0.0);
    r.tokens = j["tokens"];
    r.tokens_per_second = j["tokens_per_second"];
    r.fwd_map = j.value("fwd_map", std::string());
    if (j.contains("auto_budget") && j["auto_budget"].is_object()) {
      const nlohmann::json& a = j["auto_budget"];
      r.auto_budget =
          StepRecord::AutoBudgetRecord{a.value("fwd", 0.0), a.value("bwd", 0.0), a.value("up_mbit_per_s", 0.0) / 8e-6,
                                       a.value("down_mbit_per_s", 0.0) / 8e-6, a.value("compute_seconds", 0.0)};
    }
    by_step[r.step] = r;
  }
  std::vector<StepRecord> out;
  for (auto& [s, r] : by_step) out.push_back(r);
  return out;
}

std::string summarize(const std::vector<StepRecord>& steps, const nlohmann::json& eval) {
  if (steps.empty()) return "no steps recorded\n";
  uint64_t fwd = 0, bwd = 0, fwd_packet = 0, bwd_packet = 0, elements = 0;
  double fwd_bits = 0, bwd_bits = 0, fwd_tail = 0, bwd_tail = 0, client_s = 0, server_s = 0, net_s = 0;
  double client_codec_s = 0, server_codec_s = 0;
  const size_t tail_from = steps.size() - std::max<size_t>(1, steps.size() / 10);
  for (size_t i = 0; i < steps.size(); ++i) {
    const StepRecord& r = steps[i];
    fwd += r.fwd_wire_bytes;
    bwd += r.bwd_wire_bytes;
    fwd_packet += r.fwd_packet_bytes;
    bwd_packet += r.bwd_packet_bytes;
    elements += r.elements;
    fwd_bits += r.fwd_bits.mean;
    bwd_bits += r.bwd_bits.mean;
    if (i >= tail_from) {
      fwd_tail += r.fwd_bits.mean / static_cast<double>(steps.size() - tail_from);
      bwd_tail += r.bwd_bits.mean / static_cast<double>(steps.size() - tail_from);
    }
    client_s += r.client_seconds;
    server_s += r.server_seconds;
    net_s += r.network_seconds;
    client_codec_s += r.client_codec_seconds;
    server_codec_s += r.server_codec_seconds;
  }
  const auto n = static_cast<double>(steps.size());
  const uint64_t bf16 = elements * 2;  // what a bf16 transport would have sent each way (packets only)
  std::vector<std::vector<std::string>> rows{{"", "forward", "backward"}};
  rows.push_back({"wire MB (frames)", fmt_mb(fwd), fmt_mb(bwd)});
  rows.push_back({"codec MB (packets)", fmt_mb(fwd_packet), fmt_mb(bwd_packet)});
  rows.push_back({"bf16 would send MB", fmt_mb(bf16), fmt_mb(bf16)});
  rows.push_back({"packets / bf16",
                  fmt::format("{:.1f}%", 100.0 * static_cast<double>(fwd_packet) /
                                             static_cast<double>(std::max<uint64_t>(1, bf16))),
                  fmt::format("{:.1f}%", 100.0 * static_cast<double>(bwd_packet) /
                                             static_cast<double>(std::max<uint64_t>(1, bf16)))});
  rows.push_back({"effective bits/elem",
                  fmt::format("{:.3f}", 8.0 * static_cast<double>(fwd_packet) /
                                            static_cast<double>(std::max<uint64_t>(1, elements))),
                  fmt::format("{:.3f}", 8.0 * static_cast<double>(bwd_packet) /
                                            static_cast<double>(std::max<uint64_t>(1, elements)))});
  rows.push_back({"mean bits (run)", fmt::format("{:.3f}", fwd_bits / n), fmt::format("{:.3f}", bwd_bits / n)});
  rows.push_back({"mean bits (last 10%)", fmt::format("{:.3f}", fwd_tail), fmt::format("{:.3f}", bwd_tail)});
  std::string out = fmt::format(
      "\nsummary: {} steps, loss {:.4f} -> {:.4f}; client {:.1f} s (codec {:.1f} s), server {:.1f} s (codec {:.1f} s), "
      "network {:.1f} s\n",
      steps.size(), steps.front().loss, steps.back().loss, client_s, client_codec_s, server_s, server_codec_s, net_s);
  out += format_table(rows);
  if (!eval.is_null() && !eval.empty()) {
    out += fmt::format(
        "eval at step {}: loss {:.4f}, perplexity {:.3f}, token accuracy {:.2f}%, exact match {:.2f}% ({} sequences)\n",
        eval["step"].get<int64_t>(), eval["loss"].get<double>(), eval["perplexity"].get<double>(),
        100 * eval["token_accuracy"].get<double>(), 100 * eval["exact_match"].get<double>(),
        eval["sequences"].get<uint64_t>());
  }
  return out;
}

}  // namespace amaq::train
