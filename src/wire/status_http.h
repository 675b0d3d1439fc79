// A small HTTP server for a training server's status (Boost.Beast): GET requests only, answered by a
// callback from a path. It is built for peers that may be hostile: one I/O thread, a cap on open
// connections, a deadline per connection, a request of at most 8 KiB (no body), and off loopback a
// bearer token (`Authorization: Bearer <token>`) compared in constant time.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace amaq::wire {

struct HttpResponse {
  int status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
};

struct StatusServerOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 0;  ///< 0: any free port (StatusServer::port() says which)
  std::string token;  ///< required of every request when set
  int max_connections = 32;
  int timeout_ms = 5000;  ///< a connection's whole request and response
};

class StatusServer {
 public:
  /// `answer(path)` for each GET (on the I/O thread: keep it short). Throws amaq::Error naming the
  /// cause when the address cannot be bound, or when it is off loopback and no token is given.
  StatusServer(StatusServerOptions options, std::function<HttpResponse(const std::string& path)> answer);
  ~StatusServer();
  uint16_t port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace amaq::wire
