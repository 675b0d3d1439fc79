// TCP and TLS 1.3 channels (Boost.Asio + OpenSSL) and a server that runs each client session in its
// own thread: one session's bad input, stall or crash never touches the others.
#pragma once
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "wire/channel.h"

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
  /// Sessions served at once; more are refused. Default 64.
  ServerOptions& max_sessions(int v) {
    max_sessions_ = v;
    return *this;
  }

  uint16_t port_;
  std::string host_ = "127.0.0.1";
  bool tls_ = false, mutual_ = false, insecure_ = false;
  TlsFiles files_;
  uint64_t max_payload_ = uint64_t{1} << 30;
  Millis handshake_timeout_{10000}, io_timeout_{60000};
  int max_sessions_ = 64;
};

struct SessionContext {
  uint64_t id;
  std::string peer;  ///< "address:port"
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
  /// Stops accepting and waits for running sessions to end.
  void stop();
  uint64_t sessions_started() const { return started_; }
  uint64_t sessions_failed() const { return failed_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  uint16_t port_ = 0;
  std::atomic<uint64_t> started_{0}, failed_{0};
};

bool is_loopback(const std::string& host);

}  // namespace amaq::wire
