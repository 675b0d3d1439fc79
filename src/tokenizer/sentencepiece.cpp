// SentencePiece `tokenizer.model` (Llama-2, Mistral) through libsentencepiece, reached through the
// shim library libamaq_spm (see tokenizer/spm/spm_shim.cpp for why it is opened with dlmopen).
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>

#include <mutex>

#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace amaq {
namespace {

struct SpmApi {
  void* (*load)(const char*, char*, size_t) = nullptr;
  void (*free_model)(void*) = nullptr;
  int (*encode)(void*, const char*, size_t, int**, size_t*, char*, size_t) = nullptr;
  char* (*decode)(void*, const int*, size_t, size_t*) = nullptr;
  void (*release)(void*) = nullptr;
  int (*info)(void*, int) = nullptr;
  int (*train)(const char*, char*, size_t) = nullptr;
};

const SpmApi& spm_api() {
  static SpmApi api;
  static std::once_flag once;
  static std::string error;
  std::call_once(once, [] {
    // A link-map namespace of its own: libsentencepiece, its libprotobuf and libstdc++ are
    // separate copies there, so neither libtorch's protobuf nor this image's iostreams are shared.
    // Only C types cross, and memory is freed on the side that allocated it.
    void* lib = dlmopen(LM_ID_NEWLM, AMAQ_SPM_LIBRARY, RTLD_NOW | RTLD_LOCAL);
    if (!lib) lib = dlmopen(LM_ID_NEWLM, "libamaq_spm.so", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      error = dlerror();
      return;
    }
    auto sym = [&](const char* name) { return dlsym(lib, name); };
    api.load = reinterpret_cast<decltype(api.load)>(sym("amaq_spm_load"));
    api.free_model = reinterpret_cast<decltype(api.free_model)>(sym("amaq_spm_free"));
    api.encode = reinterpret_cast<decltype(api.encode)>(sym("amaq_spm_encode"));
    api.decode = reinterpret_cast<decltype(api.decode)>(sym("amaq_spm_decode"));
    api.release = reinterpret_cast<decltype(api.release)>(sym("amaq_spm_release"));
    api.info = reinterpret_cast<decltype(api.info)>(sym("amaq_spm_info"));
    api.train = reinterpret_cast<decltype(api.train)>(sym("amaq_spm_train"));
  });
  if (!api.load)
    throw Error("SentencePiece support is not available: " + error, "build amaq with libsentencepiece-dev installed");
  return api;
}

class SentencePieceTokenizer : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::string& path) : path_(path) {
    char err[512] = {0};
    handle_ = spm_api().load(path.c_str(), err, sizeof err);
    if (!handle_) throw Error("cannot load SentencePiece model " + path + ": " + err, "pass a tokenizer.model file");
  }
  ~SentencePieceTokenizer() override { spm_api().free_model(handle_); }
  std::vector<int64_t> encode(std::string_view text) const override {
    int* ids = nullptr;
    size_t n = 0;
    char err[512] = {0};
    if (spm_api().encode(handle_, text.data(), text.size(), &ids, &n, err, sizeof err) != 0) {
      throw Error(std::string("SentencePiece cannot encode: ") + err, "");
    }
    std::vector<int64_t> out(ids, ids + n);
    spm_api().release(ids);
    return out;
  }
  std::string decode(const std::vector<int64_t>& ids) const override {
    std::vector<int> in(ids.begin(), ids.end());
    size_t n = 0;
    char* s = spm_api().decode(handle_, in.data(), in.size(), &n);
    std::string out(s, n);
    spm_api().release(s);
    return out;
  }
  int64_t vocab_size() const override { return spm_api().info(handle_, 0); }
  int64_t bos_id() const override { return spm_api().info(handle_, 1); }
  int64_t eos_id() const override { return spm_api().info(handle_, 2); }
  std::string name() const override { return path_; }

 private:
  std::string path_;
  void* handle_ = nullptr;
};

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const std::string& path) {
  return std::make_unique<SentencePieceTokenizer>(path);
}

void train_sentencepiece(const std::string& args) {
  char err[512] = {0};
  if (!spm_api().train || spm_api().train(args.c_str(), err, sizeof err) != 0) {
    throw Error(std::string("SentencePiece training failed: ") + err, "check the trainer flags");
  }
}

}  // namespace amaq
