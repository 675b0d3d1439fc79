#include "wire/handshake.h"

#include "core/hash.h"
#include "core/json.h"

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
                        {"resume_step", resume_step},
                        {"tail_split", tail_split},
                        {"tail_fwd_codec", tail_fwd_codec},
                        {"tail_bwd_codec", tail_bwd_codec}}
      .dump();
}

Status Hello::parse(const std::string& payload, Hello* out) {
  nlohmann::json j;
  if (!parse_json(payload, &j)) return bad("HELLO is not a JSON object");
  try {
    out->protocol = json_int<int>(j, "protocol");
    out->model_fingerprint = j.at("model_fingerprint").get<std::string>();
    out->split = json_int<int64_t>(j, "split");
    out->fwd_codec = j.at("fwd_codec").get<std::string>();
    out->bwd_codec = j.at("bwd_codec").get<std::string>();
    out->client_nonce = j.at("client_nonce").get<std::string>();
    out->resume_step = j.contains("resume_step") ? json_int<int64_t>(j, "resume_step") : -1;
    out->tail_split = j.contains("tail_split") ? json_int<int64_t>(j, "tail_split") : 0;
    if (out->tail_split != 0) {
      out->tail_fwd_codec = j.at("tail_fwd_codec").get<std::string>();
      out->tail_bwd_codec = j.at("tail_bwd_codec").get<std::string>();
    }
  } catch (const nlohmann::json::exception& e) {
    return bad(std::string("HELLO field missing or of the wrong type: ") + e.what());
  } catch (const Error& e) {
    return bad(std::string("HELLO: ") + e.what());
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

ServerHandshake::Reply ServerHandshake::refuse(Status why) {
  return {State::kRefused, Frame{MessageType::kError, 0, error_payload(why)}, why};
}

ServerHandshake::Reply ServerHandshake::on_frame(const Frame& f) {
  if (!want_auth_) {
    if (f.type != MessageType::kHello)
      return refuse(bad(std::string("expected HELLO first, got ") + message_name(f.type)));
    hello_payload_ = f.payload;
    Status s = Hello::parse(hello_payload_, &hello_);
    if (!s.ok()) return refuse(s);
    if (policy_.token.empty()) return finish();
    want_auth_ = true;
    server_nonce_ = random_hex(32);
    return {
        State::kMore, Frame{MessageType::kChallenge, 0, nlohmann::json{{"server_nonce", server_nonce_}}.dump()}, {}};
  }
  nlohmann::json j;
  if (f.type != MessageType::kAuth || !parse_json(f.payload, &j) || !j.contains("mac") || !j["mac"].is_string())
    return refuse(bad("expected AUTH after CHALLENGE"));
  const std::string want =
      to_hex(hmac_sha256(policy_.token, "client|" + transcript(hello_.client_nonce, server_nonce_, hello_payload_)));
  if (!equal_secret(j["mac"].get<std::string>(), want))
    return refuse(Status::Fail(ErrorCode::kBadAuth, "bad credentials: the token does not match the server's"));
  return finish();
}

// Only an authenticated client learns how its configuration differs from the server's.
ServerHandshake::Reply ServerHandshake::finish() {
  if (hello_.protocol != kProtocolVersion) {
    return refuse(Status::Fail(ErrorCode::kBadVersion, "client protocol " + std::to_string(hello_.protocol) +
                                                           ", server protocol " + std::to_string(kProtocolVersion)));
  }
  if (hello_.model_fingerprint != policy_.model_fingerprint) {
    return refuse(Status::Fail(ErrorCode::kModelMismatch, "different model: client fingerprint " +
                                                              hello_.model_fingerprint.substr(0, 16) + ", server " +
                                                              policy_.model_fingerprint.substr(0, 16) +
                                                              " (config.json or weight shapes/dtypes differ)"));
  }
  if (hello_.split != policy_.split) {
    return refuse(Status::Fail(ErrorCode::kSplitMismatch, "different split: client " + std::to_string(hello_.split) +
                                                              ", server " + std::to_string(policy_.split)));
  }
  if (hello_.tail_split != policy_.tail_split) {
    auto name = [](int64_t m) { return m == 0 ? std::string("none") : std::to_string(m); };
    return refuse(Status::Fail(ErrorCode::kSplitMismatch, "different tail split: client " + name(hello_.tail_split) +
                                                              ", server " + name(policy_.tail_split)));
  }
  if (policy_.accept_codecs) {
    if (Status s = policy_.accept_codecs(hello_.fwd_codec, hello_.bwd_codec); !s.ok()) return refuse(s);
    if (hello_.tail_split != 0) {
      if (Status s = policy_.accept_codecs(hello_.tail_fwd_codec, hello_.tail_bwd_codec); !s.ok()) return refuse(s);
    }
  } else if (hello_.fwd_codec != policy_.fwd_codec || hello_.bwd_codec != policy_.bwd_codec) {
    return refuse(Status::Fail(ErrorCode::kCodecMismatch, "different codecs: client fwd " + hello_.fwd_codec + " bwd " +
                                                              hello_.bwd_codec + ", server fwd " + policy_.fwd_codec +
                                                              " bwd " + policy_.bwd_codec));
  } else if (hello_.tail_fwd_codec != policy_.tail_fwd_codec || hello_.tail_bwd_codec != policy_.tail_bwd_codec) {
    return refuse(Status::Fail(ErrorCode::kCodecMismatch, "different codecs at the tail split: client fwd " +
                                                              hello_.tail_fwd_codec + " bwd " + hello_.tail_bwd_codec +
                                                              ", server fwd " + policy_.tail_fwd_codec + " bwd " +
                                                              policy_.tail_bwd_codec));
  }
  nlohmann::json ack = {{"session_id", session_id_}, {"settings", policy_.settings}};
  if (!policy_.token.empty()) {
    ack["proof"] =
        to_hex(hmac_sha256(policy_.token, "server|" + transcript(hello_.client_nonce, server_nonce_, hello_payload_)));
  }
  return {State::kAccepted, Frame{MessageType::kHelloAck, 0, ack.dump()}, {}};
}

Status server_handshake(Channel& ch, const ServerPolicy& policy, uint64_t session_id, std::chrono::milliseconds timeout,
                        Hello* hello) {
  ServerHandshake hs(policy, session_id);
  while (true) {
    Frame f;
    Status s = ch.receive(&f, timeout);
    if (!s.ok()) {
      refuse(ch, s);
      return s;
    }
    ServerHandshake::Reply r = hs.on_frame(f);
    if (r.state == ServerHandshake::State::kRefused) {
      refuse(ch, r.status);  // r.send is this ERROR
      return r.status;
    }
    s = ch.send(r.send);
    if (!s.ok()) return s;
    if (r.state == ServerHandshake::State::kAccepted) {
      *hello = hs.hello();
      return Status::Ok();
    }
  }
}

}  // namespace amaq::wire
