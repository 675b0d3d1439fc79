// Bodies of the training messages. Binary, little-endian, every count and length checked against
// the bytes actually present before use (docs/protocol.md). The compressed tensors are opaque
// byte strings here: wire/ knows nothing of codecs or models. Decoding yields views into the
// frame's payload (nothing is copied in or out): the payload must outlive the message.
//
//   FORWARD   u64 step | u32 micro_batch | u32 batch | u32 seq | u8 label_type | u8 has_mask | u16 0
//             | [labels: batch*seq integers of label_type] | [mask: batch*seq x u8]
//             | u64 sample_count | sample ids x i64 | u64 packet_len | packet
//             label_type 0: none; 1..4: i8, i16, i32, i64 (the narrowest that holds -100 and the
//             vocabulary's largest id: a 32K vocabulary sends 2 bytes per label)
//   BACKWARD  u64 step | u32 micro_batch | f32 loss | f64 grad_sq_norm | f32 server_seconds | u64 packet_len | packet
//   CONTROL   u16 kind | u16 0 | u32 json_len | JSON | blob (the rest; kind-specific, usually empty)
//   EVAL      client -> server: same layout as FORWARD (labels required)
//             server -> client: u64 step | u32 rows | rows x (f64 nll_sum | u32 tokens | u32 correct)
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "wire/frame.h"

namespace amaq::wire {

/// The integer type of FORWARD labels: raw little-endian tensor bytes of this width.
enum class LabelType : uint8_t { kNone = 0, kI8 = 1, kI16 = 2, kI32 = 3, kI64 = 4 };
constexpr uint8_t kMaxLabelType = 4;
/// Bytes per label of `t` (0 for kNone).
size_t label_bytes(LabelType t);
/// The narrowest type that holds the ignore label (-100) and every id below `vocab_size`.
LabelType narrowest_label_type(int64_t vocab_size);

struct ForwardMsg {
  uint64_t step = 0;
  uint32_t micro_batch = 0;
  uint32_t batch = 0, seq = 0;
  LabelType label_type = LabelType::kNone;
  std::string_view labels;          ///< batch * seq integers of label_type, or empty
  std::string_view mask;            ///< batch * seq attention mask bytes (0/1), or empty
  std::vector<int64_t> sample_ids;  ///< one per batch row (AQ-SGD), or empty
  std::string_view packet;          ///< compressed activations

  std::string encode() const;
  /// The views point into `payload`.
  static Status decode(const std::string& payload, ForwardMsg* out);
};

struct BackwardMsg {
  uint64_t step = 0;
  uint32_t micro_batch = 0;
  float loss = 0;                  ///< the server's task loss for this micro-batch (for the client's log)
  double grad_sq_norm = 0;         ///< squared L2 norm of the server's accumulated gradients (global clipping)
  float server_seconds = 0;        ///< the server's time for this micro-batch, its codec's included
  float server_codec_seconds = 0;  ///< of which decoding the activations and encoding the gradients
  /// The FORWARD frame's wire::Frame::arrival_seconds at the server (-1: not measured): the client's
  /// measure of its upstream link (train/auto_budget.h).
  float forward_arrival_seconds = -1;
  std::string_view packet;  ///< compressed gradients

  std::string encode() const;
  /// The packet points into `payload`.
  static Status decode(const std::string& payload, BackwardMsg* out);
};

/// CONTROL kinds (docs/protocol.md "Training session"). kResume (4) is reserved: resuming is agreed
/// in the SCHEDULE exchange.
/// kStop (server -> client, {step}): the server is stopping; it answered no FORWARD of this step and
/// serves only CHECKPOINT at this step and BYE from now on.
enum class ControlKind : uint16_t {
  kCheckpoint = 1,
  kBitSync = 2,
  kSchedule = 3,
  kResume = 4,
  kStep = 5,
  kStop = 6,
  kFedAvg = 7,
};
constexpr uint16_t kMaxControlKind = 7;

struct ControlMsg {
  ControlKind kind = ControlKind::kCheckpoint;
  std::string json;  ///< kind-specific settings
  std::string blob;  ///< kind-specific bytes (the server's adapter in a final checkpoint reply)

  std::string encode() const;
  static Status decode(const std::string& payload, ControlMsg* out);
};

/// The server's answer to an EVAL: per batch row, the summed next-token NLL over labelled
/// positions, their count, and how many of them the argmax predicted.
struct EvalResultMsg {
  struct Row {
    double nll_sum = 0;
    uint32_t tokens = 0, correct = 0;
  };
  uint64_t step = 0;
  std::vector<Row> rows;

  std::string encode() const;
  static Status decode(const std::string& payload, EvalResultMsg* out);
};

/// A frame limit that fits one FORWARD of (batch, seq, hidden) in fp32 with labels, mask and ids,
/// plus slack for headers: the default `max_payload` for a run.
uint64_t max_payload_for(uint64_t batch, uint64_t seq, uint64_t hidden);

}  // namespace amaq::wire
