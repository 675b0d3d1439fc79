#include "quant/aqsgd.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "core/hash.h"

namespace amaq::quant {

AqsgdBuffer::AqsgdBuffer(int64_t max_memory_bytes, std::string spill_path)
    : max_memory_bytes_(max_memory_bytes), spill_path_(std::move(spill_path)) {
  if (spill_path_.empty()) {
    static std::atomic<int> counter{0};
    const char* tmp = std::getenv("TMPDIR");
    // Not guessable, and created exclusively (below): another user cannot plant a file or link there.
    spill_path_ = std::string(tmp ? tmp : "/tmp") + "/amaq-aqsgd-" + std::to_string(::getpid()) + "-" +
                  std::to_string(counter++) + "-" + random_hex(8) + ".spill";
  }
}

AqsgdBuffer::~AqsgdBuffer() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(spill_path_.c_str());
  }
}

std::vector<int64_t> AqsgdBuffer::ids() const {
  std::vector<int64_t> out;
  for (const auto& [id, e] : memory_) out.push_back(id);
  for (const auto& [id, s] : spilled_) out.push_back(id);
  std::sort(out.begin(), out.end());
  return out;
}

at::Tensor AqsgdBuffer::get(int64_t id) {
  auto it = memory_.find(id);
  if (it != memory_.end()) {
    lru_.splice(lru_.begin(), lru_, it->second.lru);
    return it->second.value;
  }
  auto sp = spilled_.find(id);
  TORCH_CHECK(sp != spilled_.end(), "AQ-SGD buffer has no sample ", id);
  at::Tensor t = at::empty({sp->second.rows, sp->second.cols}, at::kFloat);
  const size_t bytes = static_cast<size_t>(t.numel()) * sizeof(float);
  if (::pread(fd_, t.data_ptr(), bytes, static_cast<off_t>(sp->second.offset)) != static_cast<ssize_t>(bytes)) {
    throw Error("cannot read AQ-SGD spill file " + spill_path_ + ": " + std::strerror(errno), "check the disk");
  }
  spilled_.erase(sp);
  put(id, t);
  return memory_.at(id).value;
}

void AqsgdBuffer::put(int64_t id, const at::Tensor& m) {
  TORCH_CHECK(m.dim() == 2 && m.scalar_type() == at::kFloat, "AQ-SGD buffer stores (T, C) fp32");
  spilled_.erase(id);
  auto it = memory_.find(id);
  if (it != memory_.end()) {
    memory_bytes_ -= it->second.value.numel() * 4;
    lru_.erase(it->second.lru);
    memory_.erase(it);
  }
  lru_.push_front(id);
  memory_[id] = Entry{m.contiguous(), lru_.begin()};
  memory_bytes_ += m.numel() * 4;
  evict_until_fits();
}

void AqsgdBuffer::evict_until_fits() {
  while (memory_bytes_ > max_memory_bytes_ && memory_.size() > 1) {
    int64_t victim = lru_.back();
    lru_.pop_back();
    Entry e = std::move(memory_.at(victim));
    memory_.erase(victim);
    if (fd_ < 0) {
      fd_ = ::open(spill_path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
      if (fd_ < 0) {
        throw Error("cannot create AQ-SGD spill file " + spill_path_ + ": " + std::strerror(errno),
                    "give the run directory free space, or raise the AQ-SGD memory limit");
      }
    }
    const size_t bytes = static_cast<size_t>(e.value.numel()) * sizeof(float);
    if (::pwrite(fd_, e.value.data_ptr(), bytes, static_cast<off_t>(spill_end_)) != static_cast<ssize_t>(bytes)) {
      throw Error("cannot write AQ-SGD spill file " + spill_path_ + ": " + std::strerror(errno),
                  "check free disk space");
    }
    spilled_[victim] = Spilled{spill_end_, e.value.size(0), e.value.size(1)};
    spill_end_ += bytes;
    memory_bytes_ -= e.value.numel() * 4;
  }
}

}  // namespace amaq::quant
