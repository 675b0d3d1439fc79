#include "wire/status_http.h"

#include <openssl/crypto.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <thread>

#include "core/error.h"
#include "wire/tcp.h"

namespace amaq::wire {
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

// Handlers hold a plain pointer to the Impl: it outlives them, since the io_context it owns destroys
// the handlers still pending (and their connections) when it goes.
struct StatusServer::Impl {
  StatusServerOptions options;
  std::function<HttpResponse(const std::string&)> answer;
  std::atomic<int> open{0};  // before io: connections destroyed with io still count down
  asio::io_context io;
  tcp::acceptor acceptor{io};
  std::thread thread;

  void accept_next() {
    acceptor.async_accept(asio::make_strand(io), [this](beast::error_code ec, tcp::socket s) {
      if (ec == asio::error::operation_aborted || !acceptor.is_open()) return;
      if (!ec) {
        if (open.fetch_add(1) >= options.max_connections) {
          --open;  // over the cap: closed unread
        } else {
          std::make_shared<Connection>(this, std::move(s))->start();
        }
      }
      accept_next();
    });
  }

  // One request, one response, then the connection closes.
  struct Connection : std::enable_shared_from_this<Connection> {
    Impl* srv;
    beast::tcp_stream stream;
    beast::flat_buffer buffer{8192};
    http::request_parser<http::empty_body> parser;
    http::response<http::string_body> res;

    Connection(Impl* s, tcp::socket socket) : srv(s), stream(std::move(socket)) {
      parser.header_limit(8192);
      parser.body_limit(0);
    }
    ~Connection() { --srv->open; }

    void start() {
      stream.expires_after(std::chrono::milliseconds(srv->options.timeout_ms));
      http::async_read(stream, buffer, parser, [self = shared_from_this()](beast::error_code ec, size_t) {
        if (ec == beast::error::timeout || ec == http::error::end_of_stream) return;
        self->respond(ec ? HttpResponse{400, "text/plain; charset=utf-8", "bad request: " + ec.message() + "\n"}
                         : self->handle(self->parser.get()));
      });
    }

    HttpResponse handle(const http::request<http::empty_body>& req) {
      if (req.method() != http::verb::get) return {405, "text/plain; charset=utf-8", "GET only\n"};
      const std::string& token = srv->options.token;
      if (!token.empty()) {
        const std::string want = "Bearer " + token;
        auto it = req.find(http::field::authorization);
        const std::string got = it == req.end() ? std::string() : std::string(it->value());
        if (got.size() != want.size() || CRYPTO_memcmp(got.data(), want.data(), want.size()) != 0)
          return {401, "text/plain; charset=utf-8", "this status page needs 'Authorization: Bearer <token>'\n"};
      }
      try {
        return srv->answer(std::string(req.target()));
      } catch (const std::exception& e) {
        return {500, "text/plain; charset=utf-8", std::string("status failed: ") + e.what() + "\n"};
      }
    }

    void respond(HttpResponse r) {
      res.result(static_cast<http::status>(r.status));
      res.version(11);
      res.set(http::field::content_type, r.content_type);
      res.set(http::field::cache_control, "no-store");
      if (r.status == 401) res.set(http::field::www_authenticate, "Bearer");
      res.keep_alive(false);
      res.body() = std::move(r.body);
      res.prepare_payload();
      http::async_write(stream, res, [self = shared_from_this()](beast::error_code, size_t) {
        beast::error_code ignored;
        self->stream.socket().shutdown(tcp::socket::shutdown_send, ignored);
      });
    }
  };
};

StatusServer::StatusServer(StatusServerOptions options, std::function<HttpResponse(const std::string&)> answer)
    : impl_(std::make_unique<Impl>()) {
  if (!is_loopback(options.host) && options.token.empty()) {
    throw Error("the status page on " + options.host + " would be open to anyone who reaches it",
                "give the server a --token-file (scrapers send 'Authorization: Bearer <token>'), or listen on "
                "127.0.0.1");
  }
  impl_->options = std::move(options);
  impl_->answer = std::move(answer);
  beast::error_code ec;
  const auto address = asio::ip::make_address(impl_->options.host, ec);
  if (ec) throw Error("--status-listen: '" + impl_->options.host + "' is not an IP address", "e.g. 127.0.0.1:9090");
  const tcp::endpoint at(address, impl_->options.port);
  impl_->acceptor.open(at.protocol(), ec);
  if (!ec) impl_->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl_->acceptor.bind(at, ec);
  if (!ec) impl_->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    throw Error("cannot listen for the status page on " + impl_->options.host + ":" +
                    std::to_string(impl_->options.port) + ": " + ec.message(),
                "choose another --status-listen port");
  }
  impl_->accept_next();
  impl_->thread = std::thread([impl = impl_.get()] { impl->io.run(); });
}

StatusServer::~StatusServer() {
  asio::post(impl_->io, [impl = impl_.get()] {
    beast::error_code ignored;
    impl->acceptor.close(ignored);
    impl->io.stop();
  });
  impl_->thread.join();
}

uint16_t StatusServer::port() const {
  return impl_->acceptor.local_endpoint().port();
}

}  // namespace amaq::wire
