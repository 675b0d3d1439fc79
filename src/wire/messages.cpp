#include "wire/messages.h"

#include <cstring>

namespace amaq::wire {
namespace {

class Writer {
 public:
  template <typename T>
  void put(T v) {
    out_.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  void bytes(const void* p, size_t n) {
    if (n) out_.append(static_cast<const char*>(p), n);
  }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

// Reads that check the bytes are there; the first failure sticks and names the field.
class Reader {
 public:
  Reader(const std::string& data, const char* message) : data_(data), message_(message) {}
  template <typename T>
  T get(const char* field) {
    T v{};
    if (need(sizeof v, field)) std::memcpy(&v, data_.data() + pos_, sizeof v), pos_ += sizeof v;
    return v;
  }
  // `count` items of `width` bytes as a view into the data.
  std::string_view view(uint64_t count, size_t width, const char* field) {
    if (!status_.ok()) return {};
    if (count > (data_.size() - pos_) / width) {
      fail(std::string(field) + ": " + std::to_string(count) + " entries announced, " +
           std::to_string(data_.size() - pos_) + " bytes left");
      return {};
    }
    std::string_view v(data_.data() + pos_, count * width);
    pos_ += count * width;
    return v;
  }
  template <typename T>
  void array(std::vector<T>* out, uint64_t count, const char* field) {
    if (count > (data_.size() - pos_) / sizeof(T)) {
      fail(std::string(field) + ": " + std::to_string(count) + " entries announced, " +
           std::to_string(data_.size() - pos_) + " bytes left");
      return;
    }
    out->resize(count);
    if (count) std::memcpy(out->data(), data_.data() + pos_, count * sizeof(T));
    pos_ += count * sizeof(T);
  }
  // u64 length, then exactly that many bytes to the end of the data.
  std::string_view blob(const char* field) {
    uint64_t n = get<uint64_t>(field);
    if (!status_.ok()) return {};
    if (n != data_.size() - pos_) {
      fail(std::string(field) + ": length " + std::to_string(n) + " but " + std::to_string(data_.size() - pos_) +
           " bytes follow");
      return {};
    }
    std::string_view v(data_.data() + pos_, n);
    pos_ += n;
    return v;
  }
  void fail(const std::string& why) {
    if (status_.ok()) status_ = Status::Fail(ErrorCode::kBadMessage, std::string(message_) + " " + why);
  }
  const Status& status() const { return status_; }

 private:
  bool need(size_t n, const char* field) {
    if (!status_.ok()) return false;
    if (n > data_.size() - pos_) {
      fail(std::string("truncated at ") + field);
      return false;
    }
    return true;
  }
  const std::string& data_;
  const char* message_;
  size_t pos_ = 0;
  Status status_;
};

}  // namespace

size_t label_bytes(LabelType t) {
  switch (t) {
    case LabelType::kNone:
      return 0;
    case LabelType::kI8:
      return 1;
    case LabelType::kI16:
      return 2;
    case LabelType::kI32:
      return 4;
    case LabelType::kI64:
      return 8;
  }
  return 0;
}

LabelType narrowest_label_type(int64_t vocab_size) {
  if (vocab_size <= 128) return LabelType::kI8;
  if (vocab_size <= 32768) return LabelType::kI16;
  if (vocab_size <= (int64_t{1} << 31)) return LabelType::kI32;
  return LabelType::kI64;
}

std::string ForwardMsg::encode() const {
  Writer w;
  w.put(step);
  w.put(micro_batch);
  w.put(batch);
  w.put(seq);
  w.put<uint8_t>(static_cast<uint8_t>(labels.empty() ? LabelType::kNone : label_type));
  w.put<uint8_t>(!mask.empty());
  w.put<uint16_t>(0);
  w.bytes(labels.data(), labels.size());
  w.bytes(mask.data(), mask.size());
  w.put<uint64_t>(sample_ids.size());
  w.bytes(sample_ids.data(), sample_ids.size() * sizeof(int64_t));
  w.put<uint64_t>(packet.size());
  w.bytes(packet.data(), packet.size());
  return w.take();
}

Status ForwardMsg::decode(const std::string& payload, ForwardMsg* m) {
  *m = ForwardMsg{};
  Reader r(payload, "FORWARD");
  m->step = r.get<uint64_t>("step");
  m->micro_batch = r.get<uint32_t>("micro_batch");
  m->batch = r.get<uint32_t>("batch");
  m->seq = r.get<uint32_t>("seq");
  const uint8_t label_type = r.get<uint8_t>("label_type"), has_mask = r.get<uint8_t>("has_mask");
  r.get<uint16_t>("reserved");
  if (!r.status().ok()) return r.status();
  if (label_type > kMaxLabelType) r.fail("label_type " + std::to_string(label_type) + " unknown");
  if (has_mask > 1) r.fail("has_mask must be 0 or 1");
  m->label_type = static_cast<LabelType>(label_type);
  const uint64_t cells = uint64_t{m->batch} * m->seq;
  if (m->label_type != LabelType::kNone) m->labels = r.view(cells, label_bytes(m->label_type), "labels");
  if (has_mask) {
    m->mask = r.view(cells, 1, "mask");
    for (char v : m->mask) {
      if (static_cast<uint8_t>(v) > 1) {
        r.fail("mask values must be 0 or 1");
        break;
      }
    }
  }
  const uint64_t ids = r.get<uint64_t>("sample_count");
  if (r.status().ok() && ids != 0 && ids != m->batch)
    r.fail("has " + std::to_string(ids) + " sample ids for a batch of " + std::to_string(m->batch));
  if (r.status().ok()) r.array(&m->sample_ids, ids, "sample_ids");
  m->packet = r.blob("packet");
  return r.status();
}

std::string BackwardMsg::encode() const {
  Writer w;
  w.put(step);
  w.put(micro_batch);
  w.put(loss);
  w.put(grad_sq_norm);
  w.put(server_seconds);
  w.put(server_codec_seconds);
  w.put(forward_arrival_seconds);
  w.put<uint64_t>(packet.size());
  w.bytes(packet.data(), packet.size());
  return w.take();
}

Status BackwardMsg::decode(const std::string& payload, BackwardMsg* m) {
  *m = BackwardMsg{};
  Reader r(payload, "BACKWARD");
  m->step = r.get<uint64_t>("step");
  m->micro_batch = r.get<uint32_t>("micro_batch");
  m->loss = r.get<float>("loss");
  m->grad_sq_norm = r.get<double>("grad_sq_norm");
  m->server_seconds = r.get<float>("server_seconds");
  m->server_codec_seconds = r.get<float>("server_codec_seconds");
  m->forward_arrival_seconds = r.get<float>("forward_arrival_seconds");
  m->packet = r.blob("packet");
  return r.status();
}

std::string ControlMsg::encode() const {
  Writer w;
  w.put(static_cast<uint16_t>(kind));
  w.put<uint16_t>(0);
  w.put<uint32_t>(static_cast<uint32_t>(json.size()));
  w.bytes(json.data(), json.size());
  w.bytes(blob.data(), blob.size());
  return w.take();
}

Status ControlMsg::decode(const std::string& payload, ControlMsg* m) {
  *m = ControlMsg{};
  Reader r(payload, "CONTROL");
  const uint16_t kind = r.get<uint16_t>("kind");
  r.get<uint16_t>("reserved");
  const uint32_t n = r.get<uint32_t>("json_len");
  if (!r.status().ok()) return r.status();
  if (kind < 1 || kind > kMaxControlKind) r.fail("kind " + std::to_string(kind) + " unknown");
  if (n > payload.size() - 8)
    r.fail("json_len " + std::to_string(n) + " but " + std::to_string(payload.size() - 8) + " bytes follow");
  if (!r.status().ok()) return r.status();
  m->kind = static_cast<ControlKind>(kind);
  m->json = payload.substr(8, n);
  m->blob = payload.substr(8 + n);
  return Status::Ok();
}

std::string EvalResultMsg::encode() const {
  Writer w;
  w.put(step);
  w.put<uint32_t>(static_cast<uint32_t>(rows.size()));
  for (const Row& row : rows) {
    w.put(row.nll_sum);
    w.put(row.tokens);
    w.put(row.correct);
  }
  return w.take();
}

Status EvalResultMsg::decode(const std::string& payload, EvalResultMsg* m) {
  *m = EvalResultMsg{};
  Reader r(payload, "EVAL result");
  m->step = r.get<uint64_t>("step");
  const uint32_t n = r.get<uint32_t>("rows");
  if (!r.status().ok()) return r.status();
  if (uint64_t{n} * 16 != payload.size() - 12) {
    r.fail(std::to_string(n) + " rows announced, " + std::to_string(payload.size() - 12) + " bytes follow");
    return r.status();
  }
  m->rows.resize(n);
  for (Row& row : m->rows) {
    row.nll_sum = r.get<double>("nll_sum");
    row.tokens = r.get<uint32_t>("tokens");
    row.correct = r.get<uint32_t>("correct");
    if (row.correct > row.tokens || !(row.nll_sum >= 0)) r.fail("row with correct > tokens or a negative/NaN NLL");
  }
  return r.status();
}

uint64_t max_payload_for(uint64_t batch, uint64_t seq, uint64_t hidden) {  // labels at most i64
  return batch * seq * (hidden * 4 + 8 + 1) + batch * 8 + (uint64_t{1} << 20);
}

}  // namespace amaq::wire
