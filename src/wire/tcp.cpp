#include "wire/tcp.h"

#include <openssl/ssl.h>
#include <spdlog/spdlog.h>

#include <array>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <cstring>

#include "core/error.h"

namespace amaq::wire {
namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using error_code = boost::system::error_code;

namespace {

using Clock = std::chrono::steady_clock;

// Runs `io` until `done` or the deadline; on timeout cancels the stream's operations, drains their
// handlers and returns false. Every blocking step of a channel goes through here.
template <typename Stream>
bool run_until(asio::io_context& io, Stream& stream, const bool& done, Clock::time_point deadline) {
  io.restart();
  while (!done) {
    if (io.run_one_until(deadline) == 0) break;
  }
  if (done) return true;
  error_code ignored;
  stream.lowest_layer().cancel(ignored);
  io.restart();
  while (!done && io.run_one() > 0) {
  }
  return false;
}

template <typename Stream>
class StreamChannel : public Channel {
 public:
  StreamChannel(std::shared_ptr<asio::io_context> io, std::shared_ptr<asio::ssl::context> ssl, Stream stream,
                uint64_t max_payload, Millis io_timeout)
      : io_(std::move(io)),
        ssl_(std::move(ssl)),
        stream_(std::move(stream)),
        decoder_(max_payload),
        io_timeout_(io_timeout),
        buffer_(1 << 20) {}
  ~StreamChannel() override { close(); }

  Status send_frame(const Frame& frame) override {
    if (closed_) return Status::Fail(ErrorCode::kClosed, "channel is closed");
    const FrameHeader header = frame_header(frame);
    const size_t total = sizeof header + frame.payload.size();
    const std::array<asio::const_buffer, 2> bytes = {asio::buffer(&header, sizeof header), asio::buffer(frame.payload)};
    bool done = false;
    error_code ec;
    asio::async_write(stream_, bytes, [&](const error_code& e, size_t) {
      ec = e;
      done = true;
    });
    if (!run_until(*io_, stream_, done, Clock::now() + io_timeout_)) {
      close();
      return Status::Fail(ErrorCode::kTimeout, "send of " + std::to_string(total) + " bytes timed out");
    }
    if (ec) {
      close();
      return Status::Fail(ErrorCode::kClosed, "send failed: " + ec.message());
    }
    accounting_.count_sent(frame.type, total);
    return Status::Ok();
  }

  Status receive_frame(Frame* frame, Millis timeout) override {
    const auto t0 = Clock::now();
    while (!decoder_.next(frame)) {
      if (!decoder_.status().ok()) return decoder_.status();
      if (closed_) return Status::Fail(ErrorCode::kClosed, "channel is closed");
      bool done = false;
      size_t n = 0;
      error_code ec;
      const auto r0 = Clock::now();
      stream_.async_read_some(asio::buffer(buffer_), [&](const error_code& e, size_t k) {
        ec = e;
        n = k;
        done = true;
      });
      const bool in_time = run_until(*io_, stream_, done, t0 + timeout);
      accounting_.seconds_blocked += std::chrono::duration<double>(Clock::now() - r0).count();  // this read's wait
      if (!in_time)
        return Status::Fail(ErrorCode::kTimeout, "no complete frame within " + std::to_string(timeout.count()) + " ms");
      if (ec) {
        close();
        return Status::Fail(ErrorCode::kClosed, ec == asio::error::eof ? "peer closed the connection" : ec.message());
      }
      Status s = decoder_.feed(std::string_view(buffer_.data(), n));
      if (!s.ok()) return s;
    }
    accounting_.count_received(frame->type, sizeof(FrameHeader) + frame->payload.size());
    return Status::Ok();
  }

  void close() override {
    if (closed_) return;
    closed_ = true;
    error_code ignored;
    stream_.lowest_layer().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.lowest_layer().close(ignored);
  }

 private:
  std::shared_ptr<asio::io_context> io_;
  std::shared_ptr<asio::ssl::context> ssl_;  // must outlive an ssl stream
  Stream stream_;
  FrameDecoder decoder_;
  Millis io_timeout_;
  std::vector<char> buffer_;
  bool closed_ = false;
};

using TlsStream = asio::ssl::stream<tcp::socket>;

std::string ssl_error_text(const error_code& ec) {
  std::string s = ec.message();
  if (ec.category() == asio::error::get_ssl_category()) {
    char buf[256];
    ERR_error_string_n(static_cast<unsigned long>(ec.value()), buf, sizeof buf);
    s += std::string(" (") + buf + ")";
  }
  return s;
}

std::shared_ptr<asio::ssl::context> make_tls_context(bool server, const TlsFiles& f, bool verify_peer) {
  auto ctx =
      std::make_shared<asio::ssl::context>(server ? asio::ssl::context::tls_server : asio::ssl::context::tls_client);
  SSL_CTX_set_min_proto_version(ctx->native_handle(), TLS1_3_VERSION);
  try {
    if (!f.cert.empty()) ctx->use_certificate_chain_file(f.cert);
    if (!f.key.empty()) ctx->use_private_key_file(f.key, asio::ssl::context::pem);
    if (!f.ca.empty()) ctx->load_verify_file(f.ca);
  } catch (const boost::system::system_error& e) {
    throw Error(std::string("cannot load TLS files (cert '") + f.cert + "', key '" + f.key + "', ca '" + f.ca +
                    "'): " + e.what(),
                "give PEM files: --tls-cert/--tls-key on the server, --tls-ca on the client");
  }
  if (verify_peer) ctx->set_verify_mode(asio::ssl::verify_peer | asio::ssl::verify_fail_if_no_peer_cert);
  return ctx;
}

}  // namespace

bool is_loopback(const std::string& host) {
  if (host == "localhost") return true;
  error_code ec;
  auto addr = asio::ip::make_address(host, ec);
  return !ec && addr.is_loopback();
}

Status connect(const ClientOptions& opt, std::unique_ptr<Channel>* out) {
  auto io = std::make_shared<asio::io_context>();
  tcp::resolver resolver(*io);
  error_code ec;
  auto endpoints = resolver.resolve(opt.host_, std::to_string(opt.port_), ec);
  if (ec) return Status::Fail(ErrorCode::kClosed, "cannot resolve " + opt.host_ + ": " + ec.message());
  const auto deadline = Clock::now() + opt.connect_timeout_;
  tcp::socket socket(*io);
  bool done = false;
  asio::async_connect(socket, endpoints, [&](const error_code& e, const tcp::endpoint&) {
    ec = e;
    done = true;
  });
  if (!run_until(*io, socket, done, deadline))
    return Status::Fail(ErrorCode::kTimeout, "connect to " + opt.host_ + " timed out");
  if (ec)
    return Status::Fail(ErrorCode::kClosed,
                        "cannot connect to " + opt.host_ + ":" + std::to_string(opt.port_) + ": " + ec.message());
  socket.set_option(tcp::no_delay(true), ec);
  if (!opt.tls_) {
    *out =
        std::make_unique<StreamChannel<tcp::socket>>(io, nullptr, std::move(socket), opt.max_payload_, opt.io_timeout_);
    return Status::Ok();
  }
  std::shared_ptr<asio::ssl::context> ctx;
  try {
    ctx = make_tls_context(false, opt.files_, true);
  } catch (const Error& e) {
    return Status::Fail(ErrorCode::kTls, e.what());
  }
  TlsStream stream(std::move(socket), *ctx);
  SSL_set_tlsext_host_name(stream.native_handle(), opt.host_.c_str());
  stream.set_verify_callback(asio::ssl::host_name_verification(opt.host_));
  done = false;
  stream.async_handshake(asio::ssl::stream_base::client, [&](const error_code& e) {
    ec = e;
    done = true;
  });
  if (!run_until(*io, stream, done, deadline))
    return Status::Fail(ErrorCode::kTimeout, "TLS handshake with " + opt.host_ + " timed out");
  if (ec) return Status::Fail(ErrorCode::kTls, "TLS handshake with " + opt.host_ + " failed: " + ssl_error_text(ec));
  *out = std::make_unique<StreamChannel<TlsStream>>(io, ctx, std::move(stream), opt.max_payload_, opt.io_timeout_);
  return Status::Ok();
}

struct Server::Impl {
  ServerOptions options;
  Handler handler;
  asio::io_context io;
  tcp::acceptor acceptor{io};
  std::shared_ptr<asio::ssl::context> tls;
  std::thread accept_thread;
  struct SessionThread {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::mutex mu;
  std::vector<SessionThread> sessions;
  std::atomic<int> active{0};
  std::atomic<uint64_t> next_id{1};
  Server* owner = nullptr;

  explicit Impl(ServerOptions o, Handler h) : options(std::move(o)), handler(std::move(h)) {}

  void accept_next() {
    auto ctx = std::make_shared<asio::io_context>();
    acceptor.async_accept(*ctx, [this, ctx](const error_code& ec, tcp::socket socket) {
      if (ec) return;  // acceptor closed
      accept_next();
      const uint64_t id = next_id++;
      auto done = std::make_shared<std::atomic<bool>>(false);
      std::lock_guard<std::mutex> lock(mu);
      reap_finished();
      sessions.push_back({std::thread([this, ctx, id, done, s = std::move(socket)]() mutable {
                            run_session(ctx, std::move(s), id);
                            *done = true;
                          }),
                          done});
    });
  }

  // Joins the threads of sessions that ended, so a long-running server holds only live ones.
  void reap_finished() {
    for (auto it = sessions.begin(); it != sessions.end();) {
      if (*it->done) {
        it->thread.join();
        it = sessions.erase(it);
      } else {
        ++it;
      }
    }
  }

  // One line per session that ended on a failure (refused, timed out, dropped); the others continue.
  void log_end(const Channel& ch, const SessionContext& sc) {
    const Status& e = ch.first_error();
    if (e.ok() || e.code == ErrorCode::kClosed) {
      if (!e.ok()) spdlog::info("session {} from {}: peer closed the connection", sc.id, sc.peer);
      return;
    }
    owner->failed_++;
    spdlog::warn("session {} from {}: closed: {} ({})", sc.id, sc.peer, error_name(e.code), e.message);
  }

  void run_session(std::shared_ptr<asio::io_context> ctx, tcp::socket socket, uint64_t id) {
    error_code ec;
    auto ep = socket.remote_endpoint(ec);
    SessionContext sc{id, ec ? "?" : ep.address().to_string() + ":" + std::to_string(ep.port())};
    owner->started_++;
    if (++active > options.max_sessions_) {
      spdlog::warn("session {} from {}: refused, {} sessions already running", id, sc.peer, options.max_sessions_);
      StreamChannel<tcp::socket> ch(ctx, nullptr, std::move(socket), options.max_payload_, Millis(1000));
      if (!options.tls_) refuse(ch, Status::Fail(ErrorCode::kInternal, "server is full; try again later"));
      --active;
      owner->failed_++;
      return;
    }
    socket.set_option(tcp::no_delay(true), ec);
    try {
      if (!options.tls_) {
        StreamChannel<tcp::socket> ch(ctx, nullptr, std::move(socket), options.max_payload_, options.io_timeout_);
        handler(ch, sc);
        log_end(ch, sc);
      } else {
        TlsStream stream(std::move(socket), *tls);
        bool done = false;
        stream.async_handshake(asio::ssl::stream_base::server, [&](const error_code& e) {
          ec = e;
          done = true;
        });
        if (!run_until(*ctx, stream, done, Clock::now() + options.handshake_timeout_) || ec) {
          spdlog::warn("session {} from {}: TLS handshake failed: {}", id, sc.peer,
                       ec ? ssl_error_text(ec) : "timeout");
          owner->failed_++;
        } else {
          StreamChannel<TlsStream> ch(ctx, tls, std::move(stream), options.max_payload_, options.io_timeout_);
          handler(ch, sc);
          log_end(ch, sc);
        }
      }
    } catch (const std::exception& e) {
      spdlog::error("session {} from {}: ended by an error: {}", id, sc.peer, e.what());
      owner->failed_++;
    } catch (...) {
      spdlog::error("session {} from {}: ended by an unknown error", id, sc.peer);
      owner->failed_++;
    }
    --active;
  }
};

Server::Server(ServerOptions options, Handler handler)
    : impl_(std::make_unique<Impl>(std::move(options), std::move(handler))) {
  Impl& s = *impl_;
  s.owner = this;
  if (!s.options.tls_ && !is_loopback(s.options.host_)) {
    if (!s.options.insecure_) {
      throw Error("refusing to serve plain TCP on " + s.options.host_ +
                      ": activations, gradients and tokens would cross the network unencrypted",
                  "give --tls-cert and --tls-key, or pass --insecure if the network is trusted");
    }
    spdlog::warn("serving plain TCP on non-loopback {} (--insecure): traffic is not encrypted", s.options.host_);
  }
  if (s.options.tls_) s.tls = make_tls_context(true, s.options.files_, s.options.mutual_);
  error_code ec;
  auto addr = asio::ip::make_address(s.options.host_ == "localhost" ? "127.0.0.1" : s.options.host_, ec);
  if (ec)
    throw Error("cannot parse listen address '" + s.options.host_ + "'",
                "use an IP address such as 127.0.0.1 or 0.0.0.0");
  tcp::endpoint ep(addr, s.options.port_);
  s.acceptor.open(ep.protocol(), ec);
  if (!ec) s.acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) s.acceptor.bind(ep, ec);
  if (!ec) s.acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    throw Error("cannot listen on " + s.options.host_ + ":" + std::to_string(s.options.port_) + ": " + ec.message(),
                "pick a free port or stop the process holding it");
  }
  port_ = s.acceptor.local_endpoint().port();
  s.accept_next();
  s.accept_thread = std::thread([&s] { s.io.run(); });
}

void Server::stop() {
  if (!impl_ || !impl_->accept_thread.joinable()) return;
  asio::post(impl_->io, [this] {
    error_code ignored;
    impl_->acceptor.close(ignored);
  });
  impl_->accept_thread.join();
  std::vector<Impl::SessionThread> sessions;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    sessions.swap(impl_->sessions);
  }
  for (auto& s : sessions) s.thread.join();
}

Server::~Server() {
  stop();
}

}  // namespace amaq::wire
