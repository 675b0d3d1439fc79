// Pieces both sides of a session share (internal to src/train).
#pragma once
#include <nlohmann/json.hpp>

#include <map>
#include <string>

#include "core/safetensors.h"
#include "quant/codec.h"
#include "wire/channel.h"
#include "wire/messages.h"

namespace amaq::train::detail {

/// What goes back for gradients when the forward codec keeps per-sample memory (AQ-SGD): the
/// gradients are quantized directly, no delta (Wang et al.), at the spec's bits, per token.
quant::CodecSpec direct_spec(const quant::CodecSpec& spec);
/// The codec each direction actually runs: aqsgd in the backward direction means direct.
quant::CodecSpec backward_spec(const quant::CodecSpec& spec);

/// AQ-SGD memory of a codec as named tensors ("aqsgd/<id>"), and back.
void add_aqsgd_state(quant::Codec& codec, NamedTensors* out);
void restore_aqsgd_state(quant::Codec& codec, const std::map<std::string, at::Tensor>& tensors);

/// Sends CONTROL {kind, json, blob}.
wire::Status send_control(wire::Channel& ch, wire::ControlKind kind, const nlohmann::json& j, std::string blob = {});
/// Receives the next frame and checks it is `type` (an ERROR frame becomes its Status).
wire::Status expect(wire::Channel& ch, wire::MessageType type, std::chrono::milliseconds timeout, wire::Frame* f);
/// Parses a CONTROL frame of `kind` with a JSON object body.
wire::Status parse_control(const wire::Frame& f, wire::ControlKind kind, nlohmann::json* j, std::string* blob = nullptr);

/// Run ids name directories: 8-64 lowercase hex characters.
bool valid_run_id(const std::string& id);

/// Per-row next-token NLL sum, labelled-token count and argmax hits (labels -100 ignored).
wire::EvalResultMsg score_rows(const at::Tensor& logits, const at::Tensor& labels, uint64_t step);

}  // namespace amaq::train::detail
