#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "core/error.h"
#include "core/fs.h"

namespace amaq {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // the reference implementation's limit

struct DtypeEntry {
  const char* name;
  at::ScalarType type;
};
constexpr DtypeEntry kDtypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16}, {"I64", at::kLong},
    {"I32", at::kInt},    {"I16", at::kShort}, {"I8", at::kChar},  {"U8", at::kByte},       {"BOOL", at::kBool},
};

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

[[noreturn]] void bad_file(const std::string& path, const std::string& what) {
  throw Error("invalid safetensors file " + path + ": " + what,
              "the file is truncated or was not written by a safetensors writer; download or export it again");
}

}  // namespace

at::ScalarType dtype_from_safetensors(const std::string& name, bool* ok) {
  for (const auto& d : kDtypes) {
    if (name == d.name) {
      *ok = true;
      return d.type;
    }
  }
  *ok = false;
  return at::kFloat;
}

std::string dtype_to_safetensors(at::ScalarType t) {
  for (const auto& d : kDtypes) {
    if (d.type == t) return d.name;
  }
  TORCH_CHECK(false, "safetensors cannot store dtype ", t);
}

namespace {

// The header length that a file or buffer of `size` bytes starts with (`first8`), checked against its size.
uint64_t header_length(const std::string& path, const char* first8, uint64_t size) {
  if (size < 8) bad_file(path, std::to_string(size) + " bytes, shorter than its 8-byte header length");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(first8[i]);
  if (header_len > kMaxHeaderBytes) bad_file(path, "header length " + std::to_string(header_len) + " exceeds 100 MiB");
  if (8 + header_len > size) {
    bad_file(path, "header length " + std::to_string(header_len) + " runs past the end of the " + std::to_string(size) +
                       " bytes");
  }
  return header_len;
}

// The JSON header of a safetensors file or buffer (`path` names it in errors): every dtype known,
// every shape consistent with its byte range, every range inside the `data_size` bytes that follow
// the header, no two ranges overlapping.
void parse_header(const std::string& path, const std::string& header, uint64_t data_size,
                  std::map<std::string, TensorInfo>* tensors, std::map<std::string, std::string>* metadata) {
  nlohmann::json j = nlohmann::json::parse(header, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) bad_file(path, "header is not a JSON object");

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const auto& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) bad_file(path, "__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) bad_file(path, "__metadata__ value '" + m.key() + "' is not a string");
        (*metadata)[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    auto where = "tensor '" + name + "': ";
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets")) {
      bad_file(path, where + "entry needs dtype, shape and data_offsets");
    }
    TensorInfo info;
    info.name = name;
    if (!v["dtype"].is_string()) bad_file(path, where + "dtype is not a string");
    info.dtype_name = v["dtype"].get<std::string>();
    bool ok = false;
    info.dtype = dtype_from_safetensors(info.dtype_name, &ok);
    if (!ok) {
      throw Error("tensor '" + name + "' in " + path + " has unsupported dtype " + info.dtype_name,
                  "amaq reads F64, F32, F16, BF16 and integer tensors; convert the checkpoint to bf16 or fp32");
    }
    const auto& shape = v["shape"];
    if (!shape.is_array()) bad_file(path, where + "shape is not an array");
    uint64_t numel = 1;
    for (const auto& d : shape) {
      if (!d.is_number_unsigned()) bad_file(path, where + "shape has a negative or non-integer dimension");
      uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / 16 / dim)
        bad_file(path, where + "shape product overflows");
      numel *= dim;
      info.shape.push_back(static_cast<int64_t>(dim));
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      bad_file(path, where + "data_offsets must be two non-negative integers");
    }
    info.begin = off[0].get<uint64_t>();
    info.end = off[1].get<uint64_t>();
    if (info.begin > info.end) bad_file(path, where + "data_offsets begin > end");
    if (info.end > data_size) {
      bad_file(path, where + "data_offsets end " + std::to_string(info.end) + " is past the end of the data (" +
                         std::to_string(data_size) + " bytes)");
    }
    uint64_t expect = numel * at::elementSize(info.dtype);
    if (info.end - info.begin != expect) {
      bad_file(path, where + "shape " + shape_str(info.shape) + " of " + info.dtype_name + " needs " +
                         std::to_string(expect) + " bytes, data_offsets span " + std::to_string(info.end - info.begin));
    }
    tensors->emplace(name, std::move(info));
  }
  std::vector<const TensorInfo*> by_offset;
  for (const auto& kv : *tensors) by_offset.push_back(&kv.second);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->begin < by_offset[i - 1]->end) {
      bad_file(path, "tensors '" + by_offset[i - 1]->name + "' and '" + by_offset[i]->name + "' overlap");
    }
  }
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) {
    throw Error("cannot open " + path + ": " + std::strerror(errno), "check that the checkpoint path is right");
  }
  struct stat st {};
  ::fstat(fd_, &st);
  file_size_ = static_cast<uint64_t>(st.st_size);
  try {
    char len_bytes[8] = {};
    if (file_size_ >= 8 && ::pread(fd_, len_bytes, 8, 0) != 8) bad_file(path, "cannot read the header length");
    const uint64_t header_len = header_length(path, len_bytes, file_size_);
    std::string header(header_len, '\0');
    if (::pread(fd_, header.data(), header_len, 8) != static_cast<ssize_t>(header_len))
      bad_file(path, "short read of header");
    data_start_ = 8 + header_len;
    parse_header(path, header, file_size_ - data_start_, &tensors_, &metadata_);
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (fd_ >= 0) ::close(fd_);
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    throw Error("tensor '" + name + "' not found in " + path_, "check that the checkpoint matches config.json");
  }
  return it->second;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& kv : tensors_) out.push_back(kv.first);
  return out;
}

at::Tensor SafetensorsFile::load(const std::string& name) const {
  const TensorInfo& ti = info(name);
  at::Tensor out = at::empty(ti.shape, at::TensorOptions().dtype(ti.dtype));
  uint64_t bytes = ti.end - ti.begin;
  if (bytes == 0) return out;
  // Map only this tensor's pages, copy them into the owned tensor, unmap.
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  uint64_t off = data_start_ + ti.begin;
  uint64_t aligned = off / page * page;
  size_t map_len = static_cast<size_t>(off - aligned + bytes);
  void* base = ::mmap(nullptr, map_len, PROT_READ, MAP_PRIVATE, fd_, static_cast<off_t>(aligned));
  if (base == MAP_FAILED) {
    throw Error("cannot map tensor '" + name + "' of " + path_ + ": " + std::strerror(errno),
                "check the file is readable");
  }
  std::memcpy(out.data_ptr(), static_cast<const char*>(base) + (off - aligned), bytes);
  ::munmap(base, map_len);
  return out;
}

std::string safetensors_bytes(const NamedTensors& tensors, const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> cpu;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(name != "__metadata__", "a tensor cannot be named __metadata__");
    TORCH_CHECK(!header.contains(name), "duplicate tensor name ", name);
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    uint64_t bytes = static_cast<uint64_t>(c.numel()) * c.element_size();
    header[name] = {{"dtype", dtype_to_safetensors(c.scalar_type())},
                    {"shape", c.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    cpu.push_back(c);
  }
  std::string h = header.dump();
  while ((h.size() % 8) != 0) h.push_back(' ');  // keep the data section 8-byte aligned
  std::string out;
  out.reserve(8 + h.size() + offset);
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += h;
  for (const auto& c : cpu) out.append(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
  return out;
}

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  write_file_atomic(path, safetensors_bytes(tensors, metadata));
}

std::map<std::string, at::Tensor> safetensors_from_bytes(const std::string& bytes, const std::string& what) {
  const uint64_t header_len = header_length(what, bytes.data(), bytes.size());
  std::map<std::string, TensorInfo> infos;
  std::map<std::string, std::string> metadata;
  parse_header(what, bytes.substr(8, header_len), bytes.size() - 8 - header_len, &infos, &metadata);
  const char* data = bytes.data() + 8 + header_len;
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, ti] : infos) {
    at::Tensor t = at::empty(ti.shape, at::TensorOptions().dtype(ti.dtype));
    if (ti.end > ti.begin) std::memcpy(t.data_ptr(), data + ti.begin, ti.end - ti.begin);
    out.emplace(name, std::move(t));
  }
  return out;
}

std::map<std::string, at::Tensor> load_safetensors(const std::string& path) {
  SafetensorsFile f(path);
  std::map<std::string, at::Tensor> out;
  for (const auto& n : f.names()) out[n] = f.load(n);
  return out;
}

CheckpointReader::CheckpointReader(const std::string& dir) : dir_(dir) {
  std::string index = join_path(dir, "model.safetensors.index.json");
  if (file_exists(index)) {
    nlohmann::json j = nlohmann::json::parse(read_file(index), nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
      throw Error(index + " has no weight_map object", "the sharded checkpoint index is malformed; download it again");
    }
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        throw Error(index + ": weight_map['" + it.key() + "'] is not a file name",
                    "the sharded checkpoint index is malformed; download it again");
      std::string file = it.value().get<std::string>();
      if (file.find('/') != std::string::npos || file.find("..") != std::string::npos) {
        throw Error(index + ": shard name '" + file + "' is not a plain file name", "shards must lie beside the index");
      }
      weight_map_[it.key()] = file;
    }
    return;
  }
  single_file_ = "model.safetensors";
  if (!file_exists(join_path(dir, single_file_))) {
    throw Error("no model.safetensors or model.safetensors.index.json in " + dir,
                "point --model at a HuggingFace checkpoint directory with safetensors weights");
  }
}

const std::string& CheckpointReader::file_of(const std::string& name) const {
  if (weight_map_.empty()) return single_file_;
  auto it = weight_map_.find(name);
  if (it == weight_map_.end()) {
    throw Error("tensor '" + name + "' is missing from the checkpoint in " + dir_,
                "the checkpoint does not match config.json (architecture or layer count)");
  }
  return it->second;
}

SafetensorsFile& CheckpointReader::shard(const std::string& file) const {
  auto& slot = shards_[file];
  if (!slot) slot = std::make_unique<SafetensorsFile>(join_path(dir_, file));
  return *slot;
}

bool CheckpointReader::contains(const std::string& name) const {
  if (!weight_map_.empty()) return weight_map_.count(name) > 0;
  return shard(single_file_).contains(name);
}

const TensorInfo& CheckpointReader::info(const std::string& name) const {
  SafetensorsFile& f = shard(file_of(name));
  if (!f.contains(name)) {
    throw Error("tensor '" + name + "' is missing from " + f.path(),
                "the checkpoint does not match config.json (architecture or layer count)");
  }
  return f.info(name);
}

at::Tensor CheckpointReader::load(const std::string& name, at::ScalarType dtype,
                                  const std::vector<int64_t>& shape) const {
  const TensorInfo& ti = info(name);
  if (!at::isFloatingType(ti.dtype)) {
    throw Error(
        "tensor '" + name + "' in " + dir_ + " has dtype " + ti.dtype_name + ", expected a floating-point weight",
        "model weights must be F32, F16 or BF16; this file is not a model checkpoint or is corrupted");
  }
  if (!shape.empty() && ti.shape != shape) {
    throw Error("tensor '" + name + "' in " + dir_ + " has shape " + shape_str(ti.shape) + ", config.json implies " +
                    shape_str(shape),
                "config.json and the weights disagree; use the config that came with the checkpoint");
  }
  at::Tensor t = shard(file_of(name)).load(name);
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

std::map<std::string, uint64_t> CheckpointReader::sizes() const {
  std::map<std::string, uint64_t> out;
  std::vector<std::string> files;
  if (weight_map_.empty()) {
    files.push_back(single_file_);
  } else {
    for (const auto& kv : weight_map_) files.push_back(kv.second);
    std::sort(files.begin(), files.end());
    files.erase(std::unique(files.begin(), files.end()), files.end());
  }
  for (const auto& f : files) {
    SafetensorsFile& s = shard(f);
    for (const auto& n : s.names()) out[n] = s.info(n).end - s.info(n).begin;
  }
  return out;
}

}  // namespace amaq
