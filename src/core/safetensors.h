// safetensors files: a validated header, tensors read one at a time, and an atomic writer.
//
// Layout (https://github.com/huggingface/safetensors): u64 little-endian header length N, N bytes of
// JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data.
// Offsets are relative to the first byte after the header.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace amaq {

struct TensorInfo {
  std::string name;
  std::string dtype_name;  // as written in the header, e.g. "BF16"
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range inside the data section
};

/// Opens a safetensors file and validates its header: every dtype known, every shape consistent
/// with its byte range, every range inside the file, no two ranges overlapping. Tensor bytes are
/// only touched by `load`, which maps just that tensor's pages.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  bool contains(const std::string& name) const { return tensors_.count(name) > 0; }
  const TensorInfo& info(const std::string& name) const;
  std::vector<std::string> names() const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// Reads one tensor into owned CPU memory with its stored dtype.
  at::Tensor load(const std::string& name) const;

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t file_size_ = 0;
  uint64_t data_start_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

/// Serialises tensors (any device, made contiguous on CPU) to safetensors bytes.
std::string safetensors_bytes(const NamedTensors& tensors, const std::map<std::string, std::string>& metadata = {});
/// Writes a safetensors file atomically (temp file, fsync, rename).
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});
/// Reads every tensor of a file.
std::map<std::string, at::Tensor> load_safetensors(const std::string& path);
/// Every tensor of safetensors bytes (a peer's message), validated as a file is; `what` names them in errors.
std::map<std::string, at::Tensor> safetensors_from_bytes(const std::string& bytes, const std::string& what);

/// The weights of an HF checkpoint directory: `model.safetensors`, or shards listed in
/// `model.safetensors.index.json`. Shards are opened only when one of their tensors is asked for.
class CheckpointReader {
 public:
  explicit CheckpointReader(const std::string& dir);
  const std::string& dir() const { return dir_; }
  bool contains(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;
  /// Loads a floating-point tensor converted to `dtype`; checks its shape when `shape` is given.
  at::Tensor load(const std::string& name, at::ScalarType dtype, const std::vector<int64_t>& shape = {}) const;
  /// Every tensor name of the checkpoint with its byte size (reads the headers of all shards).
  std::map<std::string, uint64_t> sizes() const;

 private:
  SafetensorsFile& shard(const std::string& file) const;
  const std::string& file_of(const std::string& name) const;

  std::string dir_;
  std::map<std::string, std::string> weight_map_;  // tensor -> shard file; empty for a single file
  std::string single_file_;
  mutable std::map<std::string, std::unique_ptr<SafetensorsFile>> shards_;
};

at::ScalarType dtype_from_safetensors(const std::string& name, bool* ok);
std::string dtype_to_safetensors(at::ScalarType t);

}  // namespace amaq
