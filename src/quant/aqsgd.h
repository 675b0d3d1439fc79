// AQ-SGD's per-sample memory (Wang et al., NeurIPS 2022): the last activation each side agreed on for
// every training sample, so that only the quantized change needs to cross the wire.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <list>
#include <map>
#include <string>
#include <vector>

namespace amaq::quant {

/// Sample id -> (T, C) fp32 tensor, at most `max_memory_bytes` in memory; least recently used
/// entries spill to an append-only file and are read back on use.
class AqsgdBuffer {
 public:
  AqsgdBuffer(int64_t max_memory_bytes, std::string spill_path);
  ~AqsgdBuffer();
  AqsgdBuffer(const AqsgdBuffer&) = delete;
  AqsgdBuffer& operator=(const AqsgdBuffer&) = delete;

  bool contains(int64_t id) const { return memory_.count(id) || spilled_.count(id); }
  /// The stored tensor (owned by the buffer; callers that modify it call put afterwards).
  at::Tensor get(int64_t id);
  void put(int64_t id, const at::Tensor& m);  // (T, C) fp32

  /// Every sample id held, ascending.
  std::vector<int64_t> ids() const;
  int64_t samples() const { return static_cast<int64_t>(memory_.size() + spilled_.size()); }
  int64_t memory_bytes() const { return memory_bytes_; }
  int64_t spilled_samples() const { return static_cast<int64_t>(spilled_.size()); }

 private:
  struct Entry {
    at::Tensor value;
    std::list<int64_t>::iterator lru;
  };
  struct Spilled {
    uint64_t offset;
    int64_t rows, cols;
  };
  void evict_until_fits();

  int64_t max_memory_bytes_;
  std::string spill_path_;
  int fd_ = -1;
  uint64_t spill_end_ = 0;
  std::map<int64_t, Entry> memory_;
  std::list<int64_t> lru_;  // front = most recent
  std::map<int64_t, Spilled> spilled_;
  int64_t memory_bytes_ = 0;
};

}  // namespace amaq::quant
