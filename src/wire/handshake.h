// The handshake. Nothing is trained before both sides agree on the protocol, the model, the split
// and the codecs, and (with a token) have proved to each other that they hold it:
//
//   client -> HELLO      {protocol, model_fingerprint, split, fwd_codec, bwd_codec, client_nonce, resume_step,
//                         tail_split, tail_fwd_codec, tail_bwd_codec}
//   server -> CHALLENGE  {server_nonce}                           only when the server has a token
//   client -> AUTH       {mac: HMAC-SHA256(token, "client" | transcript)}
//   server -> HELLO_ACK  {session_id, settings, proof: HMAC-SHA256(token, "server" | transcript)}
//          or ERROR      {code, text naming the difference}, then closes
//
// transcript = "amaq-auth-v1" | client_nonce | server_nonce | HELLO payload. The token itself
// never crosses the wire; the server proves itself too, so a client cannot be fooled by an
// impostor that merely accepts everything.
#pragma once
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "wire/channel.h"

namespace amaq::wire {

struct Hello {
  int protocol = kProtocolVersion;
  std::string model_fingerprint;
  int64_t split = 0;
  std::string fwd_codec, bwd_codec;
  std::string client_nonce;
  int64_t resume_step = -1;  ///< step to resume from, -1 for a fresh run
  /// U-shaped split: the client also holds layers [tail_split, L) and the loss (0: no tail), and
  /// the codecs of the activations coming back to it and of their gradient.
  int64_t tail_split = 0;
  std::string tail_fwd_codec, tail_bwd_codec;

  std::string to_payload() const;
  static Status parse(const std::string& payload, Hello* out);
};

struct ServerPolicy {
  std::string model_fingerprint;
  int64_t split = 0, tail_split = 0;
  std::string fwd_codec, bwd_codec, tail_fwd_codec, tail_bwd_codec;
  /// When set, decides which codecs a client may ask for (a server that serves each run with its
  /// own; its refusal goes to the client as it is), called for the pair at the split and, with a
  /// tail split, for the pair at the tail; otherwise they must equal the policy's.
  std::function<Status(const std::string& fwd, const std::string& bwd)> accept_codecs;
  std::string token;  ///< empty: no authentication
  nlohmann::json settings = nlohmann::json::object();
};

struct HelloAck {
  uint64_t session_id = 0;
  nlohmann::json settings;
};

/// Client side. Returns the server's ERROR as a Status when refused.
Status client_handshake(Channel& ch, Hello hello, const std::string& token, std::chrono::milliseconds timeout,
                        HelloAck* ack);

/// The server's side as a state machine of frames in, frames out, so that the same rules run in a
/// blocking session (server_handshake) and in the TCP server's asynchronous pre-authentication stage.
class ServerHandshake {
 public:
  enum class State { kMore, kAccepted, kRefused };
  struct Reply {
    State state = State::kMore;
    Frame send;     ///< CHALLENGE, HELLO_ACK or ERROR: always sent
    Status status;  ///< why, when refused
  };
  ServerHandshake(const ServerPolicy& policy, uint64_t session_id) : policy_(policy), session_id_(session_id) {}
  Reply on_frame(const Frame& f);
  const Hello& hello() const { return hello_; }

 private:
  Reply refuse(Status why);
  Reply finish();

  const ServerPolicy& policy_;
  uint64_t session_id_;
  bool want_auth_ = false;
  std::string hello_payload_, server_nonce_;
  Hello hello_;
};

/// Server side. On failure it has already told the client (ERROR frame) and closed the channel.
Status server_handshake(Channel& ch, const ServerPolicy& policy, uint64_t session_id, std::chrono::milliseconds timeout,
                        Hello* hello);

}  // namespace amaq::wire
