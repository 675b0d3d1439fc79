// TCP and TLS 1.3 channels (Boost.Asio + OpenSSL) and a server that runs each authenticated client
// session in its own thread: one session's bad input, stall or crash never touches the others.
//
// All socket I/O runs on one I/O thread (the server's, or a client channel's own), each connection
// on its own strand; a channel's blocking send/receive post there and wait with a deadline, so one
// thread may send while another receives. Before a client has authenticated, the server spends no
// thread and almost no memory on it: the TLS handshake and HELLO / CHALLENGE / AUTH run
// asynchronously on the I/O thread, frames are limited to kUnauthenticatedMaxPayload, connections
// are capped in total and per address, and the whole exchange has one deadline.
#pragma once
#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "wire/channel.h"
#include "wire/handshake.h"

namespace amaq::wire {

using Millis = std::chrono::milliseconds;

/// Files for TLS. A server needs cert + key (and ca to verify client certificates); a client needs
/// ca to verify the server (and cert + key for mutual TLS).
struct TlsFiles {
  std::string cert, key, ca;
};

struct ClientOptions {
  ClientOptions(std::string host, uint16_t port) : host_(std::move(host)), port_(port) {}
  /// TLS with these files; off by default.
  ClientOptions& tls(TlsFiles f) {
    tls_ = true;
    files_ = std::move(f);
    return *this;
  }
  /// Limit on one frame's payload; default 1 GiB.
  ClientOptions& max_payload(uint64_t v) {
    max_payload_ = v;
    return *this;
  }
  /// Connect + TLS handshake deadline; default 10 s.
  ClientOptions& connect_timeout(Millis v) {
    connect_timeout_ = v;
    return *this;
  }
  /// Deadline of one send; default 60 s.
  ClientOptions& io_timeout(Millis v) {
    io_timeout_ = v;
    return *this;
  }

  std::string host_;
  uint16_t port_;
  bool tls_ = false;
  TlsFiles files_;
  uint64_t max_payload_ = uint64_t{1} << 30;
  Millis connect_timeout_{10000}, io_timeout_{60000};
};

/// Connects; on failure returns the status and leaves `out` empty.
Status connect(const ClientOptions& opt, std::unique_ptr<Channel>* out);

struct ServerOptions {
  explicit ServerOptions(uint16_t port) : port_(port) {}
  /// Address to bind; default loopback.
  ServerOptions& host(std::string v) {
    host_ = std::move(v);
    return *this;
  }
  /// Serve TLS 1.3 with these files; `require_client_cert` asks for mutual TLS.
  ServerOptions& tls(TlsFiles f, bool require_client_cert = false) {
    tls_ = true;
    files_ = std::move(f);
    mutual_ = require_client_cert;
    return *this;
  }
  /// Allow plain TCP on a non-loopback address (prints a warning); default false.
  ServerOptions& insecure(bool v) {
    insecure_ = v;
    return *this;
  }
  ServerOptions& max_payload(uint64_t v) {
    max_payload_ = v;
    return *this;
  }
  /// TLS handshake deadline; default 10 s.
  ServerOptions& handshake_timeout(Millis v) {
    handshake_timeout_ = v;
    return *this;
  }
  ServerOptions& io_timeout(Millis v) {
    io_timeout_ = v;
    return *this;
  }
  /// Authenticated sessions served at once; more are refused (kBusy). Default 64.
  ServerOptions& max_sessions(int v) {
    max_sessions_ = v;
    return *this;
  }
  /// Run the handshake (server_handshake's rules) before a session gets a thread; the handler then
  /// sees SessionContext::hello. Without it the handler gets the connection right after TLS.
  ServerOptions& handshake(ServerPolicy p) {
    policy_ = std::make_shared<const ServerPolicy>(std::move(p));
    return *this;
  }
  /// Connections not yet authenticated, in total and per client address; more are closed at once.
  ServerOptions& max_unauthenticated(int total, int per_address) {
    max_unauthenticated_ = total;
    max_unauthenticated_per_address_ = per_address;
    return *this;
  }

  uint16_t port_;
  std::string host_ = "127.0.0.1";
  bool tls_ = false, mutual_ = false, insecure_ = false;
  TlsFiles files_;
  uint64_t max_payload_ = uint64_t{1} << 30;
  Millis handshake_timeout_{10000}, io_timeout_{60000};
  int max_sessions_ = 64;
  int max_unauthenticated_ = 64, max_unauthenticated_per_address_ = 8;
  std::shared_ptr<const ServerPolicy> policy_;
};

/// Frames a connection may send before it has authenticated (a HELLO is a few hundred bytes).
constexpr uint64_t kUnauthenticatedMaxPayload = 16 << 10;

struct SessionContext {
  uint64_t id;
  std::string peer;            ///< "address:port"
  std::optional<Hello> hello;  ///< set when the server ran the handshake (ServerOptions::handshake)
};

/// Accepts connections and runs `handler(channel, context)` for each in its own thread. Exceptions
/// from a handler end that session only (logged). Binding a non-loopback address without TLS
/// needs `insecure(true)`; otherwise the constructor throws amaq::Error.
class Server {
 public:
  using Handler = std::function<void(Channel&, const SessionContext&)>;
  Server(ServerOptions options, Handler handler);
  ~Server();
  uint16_t port() const { return port_; }
  /// Closes the listening socket and every connection not yet handed to a session.
  void stop_accepting();
  /// Closes every live session's connection: their blocked sends and receives fail at once.
  void close_sessions();
  /// Stops accepting and waits for running sessions to end.
  void stop();
  /// Connections accepted, and those that ended in a failure (refused before or after
  /// authentication, timed out, dropped).
  uint64_t sessions_started() const { return started_; }
  /// Sessions holding a slot now (authenticated and not ended).
  int live_sessions() const;
  uint64_t sessions_failed() const { return failed_; }
  /// Connections ended before a session by cause (an ERROR's name, such as "authentication failed" or
  /// "server busy", or "tls or connection" for a peer that failed the TLS handshake or vanished).
  std::map<std::string, uint64_t> refusals() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  uint16_t port_ = 0;
  std::atomic<uint64_t> started_{0}, failed_{0};
};

bool is_loopback(const std::string& host);

}  // namespace amaq::wire
