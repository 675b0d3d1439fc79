#include "wire/handshake.h"

#include "core/hash.h"

namespace amaq::wire {
namespace {

std::string transcript(const std::string& client_nonce, const std::string& server_nonce,
                       const std::string& hello_payload) {
  return "amaq-auth-v1|" + client_nonce + "|" + server_nonce + "|" + hello_payload;
}

Status bad(const std::string& what) {
  return Status::Fail(ErrorCode::kBadMessage, what);
}

// Receives one frame of the expected type; an ERROR from the peer comes back as its Status.
Status expect(Channel& ch, MessageType want, std::chrono::milliseconds timeout, Frame* f) {
  Status s = ch.receive(f, timeout);
  if (!s.ok()) return s;
  if (f->type == MessageType::kError) return parse_error_payload(f->payload);
  if (f->type != want) return bad(std::string("expected ") + message_name(want) + ", got " + message_name(f->type));
  return Status::Ok();
}

bool parse_json(const std::string& payload, nlohmann::json* j) {
  *j = nlohmann::json::parse(payload, nullptr, false);
  return !j->is_discarded() && j->is_object();
}

}  // namespace

std::string Hello::to_payload() const {
  return nlohmann::json{{"protocol", protocol},
                        {"model_fingerprint", model_fingerprint},
                        {"split", split},
                        {"fwd_codec", fwd_codec},
                        {"bwd_codec", bwd_codec},
                        {"client_nonce", client_nonce},
                        {"resume_step", resume_step}}
      .dump();
}

Status Hello::parse(const std::string& payload, Hello* out) {
  nlohmann::json j;
  if (!parse_json(payload, &j)) return bad("HELLO is not a JSON object");
  try {
    out->protocol = j.at("protocol").get<int>();
    out->model_fingerprint = j.at("model_fingerprint").get<std::string>();
    out->split = j.at("split").get<int64_t>();
    out->fwd_codec = j.at("fwd_codec").get<std::string>();
    out->bwd_codec = j.at("bwd_codec").get<std::string>();
    out->client_nonce = j.at("client_nonce").get<std::string>();
    out->resume_step = j.value("resume_step", int64_t{-1});
  } catch (const nlohmann::json::exception& e) {
    return bad(std::string("HELLO field missing or of the wrong type: ") + e.what());
  }
  if (out->client_nonce.size() < 32) return bad("HELLO client_nonce is too short");
  return Status::Ok();
}

Status client_handshake(Channel& ch, Hello hello, const std::string& token, std::chrono::milliseconds timeout,
                        HelloAck* ack) {
  if (hello.client_nonce.empty()) hello.client_nonce = random_hex(32);
  const std::string hello_payload = hello.to_payload();
  Status s = ch.send({MessageType::kHello, 0, hello_payload});
  if (!s.ok()) return s;
  Frame f;
  s = ch.receive(&f, timeout);
  if (!s.ok()) return s;
  if (f.type == MessageType::kError) return parse_error_payload(f.payload);
  std::string server_nonce;
  if (f.type == MessageType::kChallenge) {
    nlohmann::json j;
    if (!parse_json(f.payload, &j) || !j.contains("server_nonce") || !j["server_nonce"].is_string())
      return bad("bad CHALLENGE");
    if (token.empty()) return Status::Fail(ErrorCode::kBadAuth, "the server requires a token (--token-file)");
    server_nonce = j["server_nonce"].get<std::string>();
    const std::string mac =
        to_hex(hmac_sha256(token, "client|" + transcript(hello.client_nonce, server_nonce, hello_payload)));
    s = ch.send({MessageType::kAuth, 0, nlohmann::json{{"mac", mac}}.dump()});
    if (!s.ok()) return s;
    s = expect(ch, MessageType::kHelloAck, timeout, &f);
    if (!s.ok()) return s;
  } else if (f.type != MessageType::kHelloAck) {
    return bad(std::string("expected CHALLENGE or HELLO_ACK, got ") + message_name(f.type));
  }
  nlohmann::json j;
  if (!parse_json(f.payload, &j) || !j.contains("session_id") || !j["session_id"].is_number_unsigned())
    return bad("bad HELLO_ACK");
  if (!token.empty()) {
    const std::string want =
        to_hex(hmac_sha256(token, "server|" + transcript(hello.client_nonce, server_nonce, hello_payload)));
    if (server_nonce.empty() || !j.contains("proof") || !j["proof"].is_string() ||
        !equal_secret(j["proof"].get<std::string>(), want)) {
      ch.close();
      return Status::Fail(ErrorCode::kBadAuth,
                          "the server did not prove it holds the token (impostor or different token)");
    }
  }
  ack->session_id = j["session_id"].get<uint64_t>();
  ack->settings = j.value("settings", nlohmann::json::object());
  return Status::Ok();
}

Status server_handshake(Channel& ch, const ServerPolicy& policy, uint64_t session_id, std::chrono::milliseconds timeout,
                        Hello* hello) {
  auto fail = [&](Status s) {
    refuse(ch, s);
    return s;
  };
  Frame f;
  Status s = ch.receive(&f, timeout);
  if (!s.ok()) return fail(s);
  if (f.type != MessageType::kHello) return fail(bad(std::string("expected HELLO first, got ") + message_name(f.type)));
  const std::string hello_payload = f.payload;
  s = Hello::parse(hello_payload, hello);
  if (!s.ok()) return fail(s);
  std::string server_nonce;
  if (!policy.token.empty()) {
    server_nonce = random_hex(32);
    s = ch.send({MessageType::kChallenge, 0, nlohmann::json{{"server_nonce", server_nonce}}.dump()});
    if (!s.ok()) return s;
    s = ch.receive(&f, timeout);
    if (!s.ok()) return fail(s);
    nlohmann::json j;
    if (f.type != MessageType::kAuth || !parse_json(f.payload, &j) || !j.contains("mac") || !j["mac"].is_string()) {
      return fail(bad("expected AUTH after CHALLENGE"));
    }
    const std::string want =
        to_hex(hmac_sha256(policy.token, "client|" + transcript(hello->client_nonce, server_nonce, hello_payload)));
    if (!equal_secret(j["mac"].get<std::string>(), want)) {
      return fail(Status::Fail(ErrorCode::kBadAuth, "bad credentials: the token does not match the server's"));
    }
  }
  // Only an authenticated client learns how its configuration differs from the server's.
  if (hello->protocol != kProtocolVersion) {
    return fail(Status::Fail(ErrorCode::kBadVersion, "client protocol " + std::to_string(hello->protocol) +
                                                         ", server protocol " + std::to_string(kProtocolVersion)));
  }
  if (hello->model_fingerprint != policy.model_fingerprint) {
    return fail(Status::Fail(ErrorCode::kModelMismatch, "different model: client fingerprint " +
                                                            hello->model_fingerprint.substr(0, 16) + ", server " +
                                                            policy.model_fingerprint.substr(0, 16) +
                                                            " (config.json or weight shapes/dtypes differ)"));
  }
  if (hello->split != policy.split) {
    return fail(Status::Fail(ErrorCode::kSplitMismatch, "different split: client " + std::to_string(hello->split) +
                                                            ", server " + std::to_string(policy.split)));
  }
  if (hello->fwd_codec != policy.fwd_codec || hello->bwd_codec != policy.bwd_codec) {
    return fail(Status::Fail(ErrorCode::kCodecMismatch, "different codecs: client fwd " + hello->fwd_codec + " bwd " +
                                                            hello->bwd_codec + ", server fwd " + policy.fwd_codec +
                                                            " bwd " + policy.bwd_codec));
  }
  nlohmann::json ack = {{"session_id", session_id}, {"settings", policy.settings}};
  if (!policy.token.empty()) {
    ack["proof"] =
        to_hex(hmac_sha256(policy.token, "server|" + transcript(hello->client_nonce, server_nonce, hello_payload)));
  }
  return ch.send({MessageType::kHelloAck, 0, ack.dump()});
}

}  // namespace amaq::wire
