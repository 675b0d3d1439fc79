// A C interface over libsentencepiece, built as its own shared library and opened with dlmopen in a
// link-map namespace of its own (tokenizer/sentencepiece.cpp). Debian's libtorch exports a protobuf
// of its own; a libsentencepiece linked into the same image binds to it and crashes at load.
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {
void set_error(char* err, size_t n, const std::string& msg) {
  if (err && n) {
    std::strncpy(err, msg.c_str(), n - 1);
    err[n - 1] = '\0';
  }
}
}  // namespace

extern "C" {

void* amaq_spm_load(const char* path, char* err, size_t errlen) {
  auto* sp = new sentencepiece::SentencePieceProcessor();
  const auto st = sp->Load(path);
  if (!st.ok()) {
    set_error(err, errlen, st.ToString());
    delete sp;
    return nullptr;
  }
  return sp;
}

void amaq_spm_free(void* h) {
  delete static_cast<sentencepiece::SentencePieceProcessor*>(h);
}

// ids: malloc'd array the caller frees with amaq_spm_release. Returns 0 on success.
int amaq_spm_encode(void* h, const char* text, size_t n, int** ids, size_t* count, char* err, size_t errlen) {
  std::vector<int> out;
  const auto st = static_cast<sentencepiece::SentencePieceProcessor*>(h)->Encode(std::string(text, n), &out);
  if (!st.ok()) {
    set_error(err, errlen, st.ToString());
    return 1;
  }
  *count = out.size();
  *ids = static_cast<int*>(std::malloc(std::max<size_t>(1, out.size()) * sizeof(int)));
  std::memcpy(*ids, out.data(), out.size() * sizeof(int));
  return 0;
}

// Returns a malloc'd string (caller: amaq_spm_release) of `*len` bytes.
char* amaq_spm_decode(void* h, const int* ids, size_t n, size_t* len) {
  auto* sp = static_cast<sentencepiece::SentencePieceProcessor*>(h);
  std::vector<int> keep;
  for (size_t i = 0; i < n; ++i) {
    if (ids[i] >= 0 && ids[i] < sp->GetPieceSize() && !sp->IsControl(ids[i])) keep.push_back(ids[i]);
  }
  std::string out;
  sp->Decode(keep, &out);
  *len = out.size();
  char* buf = static_cast<char*>(std::malloc(out.size() + 1));
  std::memcpy(buf, out.data(), out.size());
  buf[out.size()] = '\0';
  return buf;
}

void amaq_spm_release(void* p) {
  std::free(p);
}

// what: 0 vocabulary size, 1 bos id, 2 eos id.
int amaq_spm_info(void* h, int what) {
  auto* sp = static_cast<sentencepiece::SentencePieceProcessor*>(h);
  return what == 0 ? sp->GetPieceSize() : what == 1 ? sp->bos_id() : sp->eos_id();
}

// Trains a model (SentencePiece's own flags, e.g. "--input=a.txt --model_prefix=m --vocab_size=300").
int amaq_spm_train(const char* args, char* err, size_t errlen) {
  const auto st = sentencepiece::SentencePieceTrainer::Train(args);
  if (!st.ok()) {
    set_error(err, errlen, st.ToString());
    return 1;
  }
  return 0;
}
}
