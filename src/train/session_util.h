// Pieces both sides of a session share (internal to src/train).
#pragma once
#include <ATen/ATen.h>

#include <chrono>
#include <nlohmann/json.hpp>
#include <string>

#include "wire/channel.h"
#include "wire/messages.h"

namespace amaq::train::detail {

/// Sends CONTROL {kind, json, blob}.
wire::Status send_control(wire::Channel& ch, wire::ControlKind kind, const nlohmann::json& j, std::string blob = {});
/// Receives the next frame and checks it is `type` (an ERROR frame becomes its Status).
wire::Status expect(wire::Channel& ch, wire::MessageType type, std::chrono::milliseconds timeout, wire::Frame* f);
/// The same for a frame of either type (`f->type` says which).
wire::Status expect_either(wire::Channel& ch, wire::MessageType a, wire::MessageType b,
                           std::chrono::milliseconds timeout, wire::Frame* f);
/// Parses a CONTROL frame of `kind` with a JSON object body.
wire::Status parse_control(const wire::Frame& f, wire::ControlKind kind, nlohmann::json* j,
                           std::string* blob = nullptr);

/// The tensor dtype of FORWARD labels of type `t`.
at::ScalarType label_scalar(wire::LabelType t);

}  // namespace amaq::train::detail
