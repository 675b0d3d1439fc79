#include "wire/tcp.h"

#include <openssl/ssl.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <cstring>
#include <future>
#include <map>
#include <optional>
#include <type_traits>

#include "core/error.h"

namespace amaq::wire {
namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using error_code = boost::system::error_code;

namespace {

using Clock = std::chrono::steady_clock;
using TlsStream = asio::ssl::stream<tcp::socket>;

// An io_context run by one thread until this object dies.
class IoThread {
 public:
  IoThread() : guard_(asio::make_work_guard(io_)), thread_([this] { io_.run(); }) {}
  ~IoThread() {
    guard_.reset();
    io_.stop();
    thread_.join();
  }
  asio::io_context& io() { return io_; }

 private:
  asio::io_context io_;
  asio::executor_work_guard<asio::io_context::executor_type> guard_;
  std::thread thread_;
};

// Starts an asynchronous operation on `ex` and waits for it from the calling thread (never the
// I/O thread). `start(done)` runs on `ex` and must call done(result) once; at the deadline
// `cancel()` runs on `ex` and the wait goes on until the cancelled operation reports.
template <typename R, typename Executor, typename Start, typename Cancel>
R await(const Executor& ex, Start start, Cancel cancel, Clock::time_point deadline, bool* timed_out) {
  struct Wait {
    std::mutex mu;
    std::condition_variable cv;
    std::optional<R> result;
  };
  auto w = std::make_shared<Wait>();
  asio::post(ex, [w, start]() mutable {
    start([w](R r) {
      std::lock_guard<std::mutex> lock(w->mu);
      w->result.emplace(std::move(r));
      w->cv.notify_all();
    });
  });
  std::unique_lock<std::mutex> lock(w->mu);
  *timed_out = !w->cv.wait_until(lock, deadline, [&] { return w->result.has_value(); });
  if (*timed_out) {
    asio::post(ex, cancel);
    w->cv.wait(lock, [&] { return w->result.has_value(); });
  }
  return std::move(*w->result);
}

Status io_status(const error_code& ec) {
  if (ec == asio::error::eof) return Status::Fail(ErrorCode::kClosed, "peer closed the connection");
  if (ec == asio::error::operation_aborted) return Status::Fail(ErrorCode::kTimeout, "operation cancelled");
  return Status::Fail(ErrorCode::kClosed, ec.message());
}

// A type-erased handle on a connection, so a server can close sessions it does not know the stream type of.
class ConnBase {
 public:
  virtual ~ConnBase() = default;
  /// Closes from any thread; pending operations complete with an error.
  virtual void close_async() = 0;
};

// One connection: its stream, its strand (the stream's executor) and the state of the frame being
// read, kept across a timed-out receive so the next one goes on where it stopped. Every member
// function named *_async runs on the strand.
template <typename Stream>
class Conn : public ConnBase, public std::enable_shared_from_this<Conn<Stream>> {
 public:
  using Done = std::function<void(Status)>;
  using FrameDone = std::function<void(Status, Frame)>;
  Conn(Stream stream, uint64_t max_payload) : stream_(std::move(stream)), decoder_(max_payload) {}
  ~Conn() override {
    error_code ignored;
    stream_.lowest_layer().close(ignored);
  }
  Stream& stream() { return stream_; }
  auto executor() { return stream_.lowest_layer().get_executor(); }

  // The next whole frame: the decoder's buffer (the rest of the header, then of the payload) is
  // read into in place, so a payload crosses from the socket into its frame without a copy. Each
  // read is committed as it lands, so the payload's checksum is computed while the rest arrives.
  void read_frame_async(FrameDone done) {
    if (decoder_.empty() && !arrival_.waiting) arrival_ = {true, Clock::now(), {}};
    read_more(std::move(done));
  }
  /// The frame limit from the next header on.
  void set_max_payload(uint64_t v) { decoder_.set_max_payload(v); }

  // Header and payload in one gathered write; `f` must live until done.
  void write_frame_async(const Frame& f, Done done) {
    auto header = std::make_shared<FrameHeader>(frame_header(f));
    const std::array<asio::const_buffer, 2> bytes = {asio::buffer(header.get(), sizeof(FrameHeader)),
                                                     asio::buffer(f.payload)};
    asio::async_write(stream_, bytes,
                      [header, done](const error_code& ec, size_t) { done(ec ? io_status(ec) : Status::Ok()); });
  }

  void cancel() {
    error_code ignored;
    stream_.lowest_layer().cancel(ignored);
  }
  void close() {
    error_code ignored;
    stream_.lowest_layer().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.lowest_layer().close(ignored);
  }
  // After a refusal: nothing more goes out, and what the peer still sends is read and dropped until
  // it closes (or the caller's timer closes the socket). Closing with its bytes unread would answer
  // with a reset, and a reset can discard the ERROR frame before the peer has read it.
  void drain_async() {
    error_code ignored;
    stream_.lowest_layer().shutdown(tcp::socket::shutdown_send, ignored);
    drain_rest(std::make_shared<std::array<char, 4096>>());
  }
  void close_async() override {
    asio::post(executor(), [self = this->shared_from_this()] { self->close(); });
  }

 private:
  void read_more(FrameDone done) {
    Frame f;
    if (decoder_.next(&f)) {
      f.arrival_seconds = take_arrival_seconds(sizeof(FrameHeader) + f.payload.size());
      return done(Status::Ok(), std::move(f));
    }
    if (!decoder_.status().ok()) return done(decoder_.status(), {});
    const auto [at, room] = decoder_.buffer();
    stream_.async_read_some(
        asio::buffer(at, room), [self = this->shared_from_this(), done](const error_code& ec, size_t n) {
          if (n > 0 && self->arrival_.waiting && self->arrival_.first == Clock::time_point{}) {
            self->arrival_.first = Clock::now();
            error_code ignored;  // what came with the first bytes (a packet, a relay's chunk) arrived at once
            self->arrival_.at_once = n + self->stream_.lowest_layer().available(ignored);
          }
          self->decoder_.commit(n);  // bytes read before a cancellation are kept for the next receive
          if (ec) return done(io_status(ec), {});
          self->read_more(done);
        });
  }
  // Frame::arrival_seconds of the frame of `bytes` just completed: only for a frame none of whose
  // bytes were here when it was asked for, and whose first bytes came later (not at once, from the
  // socket's buffer). The bytes that came with the first ones arrived together, so the rate is
  // timed on the rest, and the whole frame's time is given at it. A frame of which more than three
  // quarters came with its first bytes was faster than can be timed: 0.
  double take_arrival_seconds(uint64_t bytes) {
    const Arrival a = arrival_;
    arrival_ = {};
    if (!a.waiting || a.first == Clock::time_point{} || a.first - a.asked < std::chrono::microseconds(200)) return -1;
    const double spread = std::chrono::duration<double>(Clock::now() - a.first).count();
    if (a.at_once >= bytes || 4 * (bytes - a.at_once) < bytes || spread <= 0) return 0;
    return spread * static_cast<double>(bytes) / static_cast<double>(bytes - a.at_once);
  }

  void drain_rest(std::shared_ptr<std::array<char, 4096>> scratch) {
    tcp::socket& raw = [this]() -> tcp::socket& {  // the bytes are dropped unread: below TLS, if there is one
      if constexpr (std::is_same_v<Stream, TlsStream>)
        return stream_.next_layer();
      else
        return stream_;
    }();
    raw.async_read_some(asio::buffer(*scratch),
                        [self = this->shared_from_this(), scratch](const error_code& ec, size_t) {
                          if (ec) return self->close();
                          self->drain_rest(scratch);
                        });
  }

  Stream stream_;
  FrameDecoder decoder_;
  struct Arrival {
    bool waiting = false;  // a frame was asked for while the decoder held none of its bytes
    Clock::time_point asked, first;
    uint64_t at_once = 0;  // bytes here when the first ones were read
  } arrival_;              // the frame being read, kept across a timed-out receive
};

template <typename Stream>
class StreamChannel : public Channel {
 public:
  // `io` keeps the I/O thread of a client channel alive; a server's outlives its channels anyway.
  // `handshake`: the frames the server's pre-authentication stage moved, counted as this channel's.
  StreamChannel(std::shared_ptr<IoThread> io, std::shared_ptr<asio::ssl::context> ssl,
                std::shared_ptr<Conn<Stream>> conn, uint64_t max_payload, Millis io_timeout,
                const Accounting& handshake = {})
      : io_(std::move(io)), ssl_(std::move(ssl)), conn_(std::move(conn)), io_timeout_(io_timeout) {
    accounting_ = handshake;
    // On the strand, ahead of every read this channel will post: the session's frame limit.
    asio::post(conn_->executor(), [c = conn_, max_payload] { c->set_max_payload(max_payload); });
  }
  ~StreamChannel() override {
    close();
    conn_.reset();  // before the I/O thread and the TLS context it uses
  }

  Status send_frame(const Frame& frame) override {
    if (closed_) return Status::Fail(ErrorCode::kClosed, "channel is closed");
    const size_t total = sizeof(FrameHeader) + frame.payload.size();
    bool timed_out = false;
    Status s = await<Status>(
        conn_->executor(), [&](std::function<void(Status)> done) { conn_->write_frame_async(frame, std::move(done)); },
        [c = conn_] { c->cancel(); }, Clock::now() + io_timeout_, &timed_out);
    if (timed_out) s = Status::Fail(ErrorCode::kTimeout, "send of " + std::to_string(total) + " bytes timed out");
    if (!s.ok()) {
      close();
      if (s.code == ErrorCode::kClosed) s.message = "send failed: " + s.message;
      return s;
    }
    accounting_.count_sent(frame.type, total);
    return Status::Ok();
  }

  Status receive_frame(Frame* frame, Millis timeout) override {
    if (closed_) return Status::Fail(ErrorCode::kClosed, "channel is closed");
    const auto t0 = Clock::now();
    bool timed_out = false;
    using Got = std::pair<Status, Frame>;
    Got got = await<Got>(
        conn_->executor(),
        [&](std::function<void(Got)> done) {
          conn_->read_frame_async([done](Status s, Frame f) { done({std::move(s), std::move(f)}); });
        },
        [c = conn_] { c->cancel(); }, t0 + timeout, &timed_out);
    accounting_.seconds_blocked += std::chrono::duration<double>(Clock::now() - t0).count();
    if (timed_out)
      return Status::Fail(ErrorCode::kTimeout, "no complete frame within " + std::to_string(timeout.count()) + " ms");
    if (!got.first.ok()) {
      if (got.first.code == ErrorCode::kClosed) close();
      return got.first;
    }
    *frame = std::move(got.second);
    accounting_.count_received(frame->type, sizeof(FrameHeader) + frame->payload.size());
    return Status::Ok();
  }

  void close() override {
    if (closed_.exchange(true)) return;
    bool timed_out = false;
    await<bool>(
        conn_->executor(),
        [c = conn_](std::function<void(bool)> done) {
          c->close();
          done(true);
        },
        [] {}, Clock::now() + std::chrono::seconds(10), &timed_out);
  }

 private:
  std::shared_ptr<IoThread> io_;
  std::shared_ptr<asio::ssl::context> ssl_;  // must outlive an ssl stream
  std::shared_ptr<Conn<Stream>> conn_;
  Millis io_timeout_;
  std::atomic<bool> closed_{false};
};

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

namespace {

// Connects `conn`'s socket, runs the client's TLS handshake for a TLS stream, and wraps it in a channel.
template <typename Stream>
Status connect_stream(const ClientOptions& opt, std::shared_ptr<IoThread> io, std::shared_ptr<asio::ssl::context> ssl,
                      std::shared_ptr<Conn<Stream>> conn, const tcp::resolver::results_type& endpoints,
                      std::unique_ptr<Channel>* out) {
  const auto deadline = Clock::now() + opt.connect_timeout_;
  bool timed_out = false;
  error_code ec = await<error_code>(
      conn->executor(),
      [&](std::function<void(error_code)> done) {
        asio::async_connect(conn->stream().lowest_layer(), endpoints,
                            [done](const error_code& e, const tcp::endpoint&) { done(e); });
      },
      [conn] { conn->cancel(); }, deadline, &timed_out);
  if (timed_out) return Status::Fail(ErrorCode::kTimeout, "connect to " + opt.host_ + " timed out");
  if (ec)
    return Status::Fail(ErrorCode::kClosed,
                        "cannot connect to " + opt.host_ + ":" + std::to_string(opt.port_) + ": " + ec.message());
  conn->stream().lowest_layer().set_option(tcp::no_delay(true), ec);
  if constexpr (std::is_same_v<Stream, TlsStream>) {
    SSL_set_tlsext_host_name(conn->stream().native_handle(), opt.host_.c_str());
    conn->stream().set_verify_callback(asio::ssl::host_name_verification(opt.host_));
    ec = await<error_code>(
        conn->executor(),
        [&](std::function<void(error_code)> done) {
          conn->stream().async_handshake(asio::ssl::stream_base::client, [done](const error_code& e) { done(e); });
        },
        [conn] { conn->cancel(); }, deadline, &timed_out);
    if (timed_out) return Status::Fail(ErrorCode::kTimeout, "TLS handshake with " + opt.host_ + " timed out");
    if (ec) return Status::Fail(ErrorCode::kTls, "TLS handshake with " + opt.host_ + " failed: " + ssl_error_text(ec));
  }
  *out = std::make_unique<StreamChannel<Stream>>(std::move(io), std::move(ssl), std::move(conn), opt.max_payload_,
                                                 opt.io_timeout_);
  return Status::Ok();
}

}  // namespace

Status connect(const ClientOptions& opt, std::unique_ptr<Channel>* out) {
  std::shared_ptr<asio::ssl::context> ctx;
  if (opt.tls_) {
    try {
      ctx = make_tls_context(false, opt.files_, true);
    } catch (const Error& e) {
      return Status::Fail(ErrorCode::kTls, e.what());
    }
  }
  auto io = std::make_shared<IoThread>();
  error_code ec;
  tcp::resolver resolver(io->io());
  auto endpoints = resolver.resolve(opt.host_, std::to_string(opt.port_), ec);
  if (ec) return Status::Fail(ErrorCode::kClosed, "cannot resolve " + opt.host_ + ": " + ec.message());
  auto strand = asio::make_strand(io->io());
  if (!opt.tls_)
    return connect_stream(opt, io, nullptr, std::make_shared<Conn<tcp::socket>>(tcp::socket(strand), opt.max_payload_),
                          endpoints, out);
  return connect_stream(opt, io, ctx, std::make_shared<Conn<TlsStream>>(TlsStream(strand, *ctx), opt.max_payload_),
                        endpoints, out);
}

// At most one log line a second; the lines held back are counted in the next one. A peer that
// reconnects in a loop cannot flood the log.
class LogLimiter {
 public:
  void warn(const std::string& line) {
    std::lock_guard<std::mutex> lock(mu_);
    const auto now = Clock::now();
    if (now - last_ < std::chrono::seconds(1)) {
      ++held_;
      return;
    }
    last_ = now;
    if (held_ > 0)
      spdlog::warn("{} (and {} similar lines held back)", line, held_);
    else
      spdlog::warn("{}", line);
    held_ = 0;
  }

 private:
  std::mutex mu_;
  Clock::time_point last_{};
  uint64_t held_ = 0;
};

struct Server::Impl {
  ServerOptions options;
  Handler handler;
  Server* owner = nullptr;
  std::shared_ptr<asio::ssl::context> tls;
  std::unique_ptr<IoThread> io = std::make_unique<IoThread>();
  std::optional<tcp::acceptor> acceptor;
  std::optional<asio::steady_timer> retry_timer;
  struct SessionThread {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
    std::weak_ptr<ConnBase> conn;
  };
  std::mutex mu;  // guards what follows
  std::vector<SessionThread> sessions;
  int unauthenticated = 0;
  std::map<std::string, int> unauthenticated_by_address;
  std::vector<std::weak_ptr<ConnBase>> pending;  // connections not yet handed to a session
  std::atomic<int> active{0};                    // sessions holding a slot
  std::map<std::string, uint64_t> refused;       // by cause (guarded by mu)
  std::atomic<uint64_t> next_id{1};
  LogLimiter refusals;

  Impl(ServerOptions o, Handler h) : options(std::move(o)), handler(std::move(h)) {}
  ~Impl() { io.reset(); }  // first: no handler runs on a half-destroyed server

  void accept_next() {
    acceptor->async_accept(asio::make_strand(io->io()), [this](const error_code& ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted || !acceptor->is_open()) return;
      if (!ec) {
        admit(std::move(socket));
        return accept_next();
      }
      // Out of descriptors or similar: wait a little rather than spin.
      refusals.warn("accept failed: " + ec.message());
      retry_timer->expires_after(std::chrono::milliseconds(100));
      retry_timer->async_wait([this](const error_code& e) {
        if (!e && acceptor->is_open()) accept_next();
      });
    });
  }

  // A new connection: within the limits on unauthenticated ones, it starts its handshake on the
  // I/O thread; beyond them it is closed at once.
  void admit(tcp::socket socket) {
    error_code ec;
    const auto ep = socket.remote_endpoint(ec);
    const std::string address = ec ? "?" : ep.address().to_string();
    SessionContext sc{next_id++, ec ? "?" : address + ":" + std::to_string(ep.port()), std::nullopt};
    owner->started_++;
    {
      std::lock_guard<std::mutex> lock(mu);
      int& from_address = unauthenticated_by_address[address];
      if (unauthenticated >= options.max_unauthenticated_ || from_address >= options.max_unauthenticated_per_address_) {
        refusals.warn(
            fmt::format("connection {} from {}: closed at once: {} connections not yet authenticated, {} "
                        "from this address (limits {} and {})",
                        sc.id, sc.peer, unauthenticated, from_address, options.max_unauthenticated_,
                        options.max_unauthenticated_per_address_));
        if (from_address == 0) unauthenticated_by_address.erase(address);
        owner->failed_++;
        return;
      }
      ++unauthenticated;
      ++from_address;
    }
    socket.set_option(tcp::no_delay(true), ec);
    // Until HELLO_ACK, frames are held to the small limit; the session's channel raises it.
    const uint64_t limit = options.policy_ ? kUnauthenticatedMaxPayload : options.max_payload_;
    if (tls) {
      start_pre_auth(std::make_shared<Conn<TlsStream>>(TlsStream(std::move(socket), *tls), limit), std::move(sc),
                     address);
    } else {
      start_pre_auth(std::make_shared<Conn<tcp::socket>>(std::move(socket), limit), std::move(sc), address);
    }
  }

  template <typename Stream>
  class PreAuth;
  template <typename Stream>
  void start_pre_auth(std::shared_ptr<Conn<Stream>> conn, SessionContext sc, std::string address);

  void release_unauthenticated(const std::string& address) {
    std::lock_guard<std::mutex> lock(mu);
    --unauthenticated;
    if (--unauthenticated_by_address[address] <= 0) unauthenticated_by_address.erase(address);
  }

  // An authenticated connection gets its thread.
  template <typename Stream>
  void start_session(std::shared_ptr<Conn<Stream>> conn, SessionContext sc, const Accounting& handshake) {
    auto done = std::make_shared<std::atomic<bool>>(false);
    std::lock_guard<std::mutex> lock(mu);
    reap_finished();
    std::weak_ptr<ConnBase> weak = conn;
    pending.erase(std::remove_if(pending.begin(), pending.end(),
                                 [&](const auto& w) { return !w.owner_before(weak) && !weak.owner_before(w); }),
                  pending.end());
    sessions.push_back({std::thread([this, conn, sc = std::move(sc), handshake, done]() mutable {
                          run_session(std::move(conn), sc, handshake);
                          *done = true;
                        }),
                        done, std::move(weak)});
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
    pending.erase(std::remove_if(pending.begin(), pending.end(), [](const auto& w) { return w.expired(); }),
                  pending.end());
  }

  // One line per session that ended on a failure (refused, timed out, dropped); the others continue.
  void log_end(const Channel& ch, const SessionContext& sc) {
    const Status e = ch.first_error();
    if (e.ok() || e.code == ErrorCode::kClosed) {
      if (!e.ok()) spdlog::info("session {} from {}: peer closed the connection", sc.id, sc.peer);
      return;
    }
    owner->failed_++;
    spdlog::warn("session {} from {}: closed: {} ({})", sc.id, sc.peer, error_name(e.code), e.message);
  }

  template <typename Stream>
  void run_session(std::shared_ptr<Conn<Stream>> conn, const SessionContext& sc, const Accounting& handshake) {
    try {
      StreamChannel<Stream> ch(nullptr, tls, std::move(conn), options.max_payload_, options.io_timeout_, handshake);
      handler(ch, sc);
      log_end(ch, sc);
    } catch (const std::exception& e) {
      spdlog::error("session {} from {}: ended by an error: {}", sc.id, sc.peer, e.what());
      owner->failed_++;
    } catch (...) {
      spdlog::error("session {} from {}: ended by an unknown error", sc.id, sc.peer);
      owner->failed_++;
    }
    --active;
  }
};

// A connection from accept to its session: the TLS handshake, then (with a policy) HELLO,
// CHALLENGE, AUTH and HELLO_ACK, all asynchronous on the connection's strand and all within
// ServerOptions::handshake_timeout. Frames are held to kUnauthenticatedMaxPayload, and what a
// refusal says never depends on the model.
template <typename Stream>
class Server::Impl::PreAuth : public std::enable_shared_from_this<Server::Impl::PreAuth<Stream>> {
 public:
  PreAuth(Server::Impl& srv, std::shared_ptr<Conn<Stream>> conn, SessionContext sc, std::string address)
      : srv_(srv),
        conn_(std::move(conn)),
        sc_(std::move(sc)),
        address_(std::move(address)),
        timer_(conn_->executor()) {}

  void start() {
    auto self = this->shared_from_this();
    timer_.expires_after(srv_.options.handshake_timeout_);
    timer_.async_wait([self](const error_code& ec) {
      if (!ec) self->expire();
    });
    if constexpr (std::is_same_v<Stream, TlsStream>) {
      conn_->stream().async_handshake(asio::ssl::stream_base::server, [self](const error_code& ec) {
        if (self->over_) return;
        if (ec) return self->give_up("TLS handshake failed: " + ssl_error_text(ec));
        self->next();
      });
    } else {
      next();
    }
  }

 private:
  void next() {
    if (!srv_.options.policy_) return accept(std::nullopt);
    if (!hs_) hs_.emplace(*srv_.options.policy_, sc_.id);
    auto self = this->shared_from_this();
    conn_->read_frame_async([self](Status s, Frame f) {
      if (self->over_) return;
      if (s.code == ErrorCode::kClosed) return self->give_up(s.message);
      if (!s.ok()) return self->refuse(s);
      self->accounting_.count_received(f.type, sizeof(FrameHeader) + f.payload.size());
      ServerHandshake::Reply r = self->hs_->on_frame(f);
      if (r.state == ServerHandshake::State::kRefused) return self->refuse(r.status);
      if (r.state == ServerHandshake::State::kAccepted) return self->accept(std::move(r.send));
      self->write(std::move(r.send), [self] { self->next(); });
    });
  }

  // Authenticated (or no handshake asked for): a session slot, the HELLO_ACK, the session's thread.
  void accept(std::optional<Frame> ack) {
    if (srv_.active.fetch_add(1) >= srv_.options.max_sessions_) {
      --srv_.active;
      return refuse(Status::Fail(ErrorCode::kBusy, "server is full: " + std::to_string(srv_.options.max_sessions_) +
                                                       " sessions running; try again later"));
    }
    auto self = this->shared_from_this();
    auto launch = [self] {
      if (!self->finish()) {
        --self->srv_.active;
        return;
      }
      if (self->hs_) self->sc_.hello = self->hs_->hello();
      self->srv_.start_session(self->conn_, self->sc_, self->accounting_);
    };
    if (ack) return write(std::move(*ack), launch);
    launch();
  }

  void write(Frame f, std::function<void()> then) {
    auto out = std::make_shared<Frame>(std::move(f));
    auto self = this->shared_from_this();
    conn_->write_frame_async(*out, [self, out, then](Status s) {
      if (self->over_) return;
      if (!s.ok()) return self->give_up("send failed: " + s.message);
      self->accounting_.count_sent(out->type, sizeof(FrameHeader) + out->payload.size());
      then();
    });
  }

  // Ends the pre-authentication stage once; false if it had ended already.
  bool finish() {
    if (over_) return false;
    over_ = true;
    timer_.cancel();
    srv_.release_unauthenticated(address_);
    return true;
  }

  // Tells the peer why (ERROR), reads what it still sends until it closes, then closes; a peer that
  // neither reads nor closes is cut off after a second.
  void refuse(const Status& why) {
    if (!finish()) return;
    srv_.owner->failed_++;
    {
      std::lock_guard<std::mutex> lock(srv_.mu);
      ++srv_.refused[error_name(why.code)];
    }
    srv_.refusals.warn(fmt::format("connection {} from {}: refused before authentication: {} ({})", sc_.id, sc_.peer,
                                   why.message, error_name(why.code)));
    auto out = std::make_shared<Frame>(Frame{MessageType::kError, 0, error_payload(why)});
    auto self = this->shared_from_this();
    conn_->cancel();  // a HELLO still awaited at the deadline: its read ends (ignored: over_) before the drain reads
    conn_->write_frame_async(*out, [self, out](Status) { self->conn_->drain_async(); });
    timer_.expires_after(std::chrono::seconds(1));
    timer_.async_wait([self](const error_code& ec) {
      if (!ec) self->conn_->close();
    });
  }

  void give_up(const std::string& why) {
    if (!finish()) return;
    srv_.owner->failed_++;
    {
      std::lock_guard<std::mutex> lock(srv_.mu);
      ++srv_.refused["tls or connection"];
    }
    srv_.refusals.warn(fmt::format("connection {} from {}: {}", sc_.id, sc_.peer, why));
    conn_->close();
  }

  void expire() {
    refuse(Status::Fail(ErrorCode::kTimeout,
                        "not authenticated within " + std::to_string(srv_.options.handshake_timeout_.count()) + " ms"));
  }

  Server::Impl& srv_;
  std::shared_ptr<Conn<Stream>> conn_;
  SessionContext sc_;
  std::string address_;
  asio::steady_timer timer_;
  std::optional<ServerHandshake> hs_;
  Accounting accounting_;  // the handshake's frames, handed to the session's channel
  bool over_ = false;
};

template <typename Stream>
void Server::Impl::start_pre_auth(std::shared_ptr<Conn<Stream>> conn, SessionContext sc, std::string address) {
  {
    std::lock_guard<std::mutex> lock(mu);
    pending.push_back(conn);
  }
  auto p = std::make_shared<PreAuth<Stream>>(*this, conn, std::move(sc), std::move(address));
  asio::post(conn->executor(), [p] { p->start(); });
}

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
  s.acceptor.emplace(s.io->io());
  s.acceptor->open(ep.protocol(), ec);
  if (!ec) s.acceptor->set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) s.acceptor->bind(ep, ec);
  if (!ec) s.acceptor->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    throw Error("cannot listen on " + s.options.host_ + ":" + std::to_string(s.options.port_) + ": " + ec.message(),
                "pick a free port or stop the process holding it");
  }
  port_ = s.acceptor->local_endpoint().port();
  s.retry_timer.emplace(s.io->io());
  asio::post(s.io->io(), [&s] { s.accept_next(); });
}

void Server::stop_accepting() {
  if (!impl_) return;
  Impl& s = *impl_;
  std::promise<void> done;
  asio::post(s.io->io(), [&s, &done] {
    error_code ignored;
    s.acceptor->close(ignored);
    s.retry_timer->cancel();
    done.set_value();
  });
  done.get_future().wait();
  std::lock_guard<std::mutex> lock(s.mu);
  for (auto& w : s.pending)
    if (auto c = w.lock()) c->close_async();
}

std::map<std::string, uint64_t> Server::refusals() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->refused;
}

int Server::live_sessions() const {
  return impl_->active;
}

void Server::close_sessions() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  for (auto& t : impl_->sessions)
    if (auto c = t.conn.lock()) c->close_async();
}

void Server::stop() {
  if (!impl_) return;
  stop_accepting();
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
