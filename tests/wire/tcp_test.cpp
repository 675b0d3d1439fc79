// The transport over real sockets: plain TCP and TLS 1.3 (certificates made here with the openssl
// command), the handshake, and a server that keeps 8 good sessions going while hostile clients
// send garbage, oversized frames, wrong versions, truncated frames, bad tokens and untrusted
// certificates.
#include "wire/tcp.h"

#include <gtest/gtest.h>
#include <sys/socket.h>

#include <boost/asio.hpp>
#include <chrono>
#include <cstring>
#include <future>
#include <thread>

#include "core/hash.h"
#include "model/config.h"
#include "model/part.h"
#include "testing.h"
#include "wire/handshake.h"

namespace amaq::wire {
namespace {

using namespace std::chrono_literals;

// CA, server cert (SAN 127.0.0.1, localhost) and a client cert signed by it, and a self-signed
// client cert nobody trusts. EC P-256 keys so generation takes milliseconds.
class Certs {
 public:
  Certs() {
    std::string out;
    const std::string cmd = std::string(AMAQ_SOURCE_DIR) + "/scripts/make-test-certs.sh " + dir_.path();
    if (testing::run_command(cmd, &out) != 0) throw std::runtime_error(cmd + ": " + out);
  }
  std::string f(const std::string& name) const { return dir_.file(name); }
  TlsFiles server() const { return {f("server.pem"), f("server.key"), f("ca.pem")}; }
  TlsFiles client() const { return {f("client.pem"), f("client.key"), f("ca.pem")}; }
  TlsFiles rogue() const { return {f("rogue.pem"), f("rogue.key"), f("ca.pem")}; }

 private:
  testing::TempDir dir_;
};

const Certs& certs() {
  static Certs c;
  return c;
}

ServerPolicy policy() {
  ServerPolicy p;
  p.model_fingerprint = model_fingerprint(ModelConfig::load(testing::data_path("hf/llama-gqa")),
                                          CheckpointReader(testing::data_path("hf/llama-gqa")));
  p.split = 2;
  p.fwd_codec = "amaq:budget=4";
  p.bwd_codec = "fixed:bits=8";
  p.token = "s3cret-token";
  return p;
}

Hello hello_for(const ServerPolicy& p) {
  Hello h;
  h.model_fingerprint = p.model_fingerprint;
  h.split = p.split;
  h.fwd_codec = p.fwd_codec;
  h.bwd_codec = p.bwd_codec;
  return h;
}

// The test server: handshake (unless the server ran it before the session), then answer each
// FORWARD with a BACKWARD carrying the payload reversed.
Server::Handler echo_handler(const ServerPolicy& p) {
  return [p](Channel& ch, const SessionContext& ctx) {
    Hello hello;
    if (!ctx.hello && !server_handshake(ch, p, ctx.id, 2s, &hello).ok()) return;
    Frame f;
    while (true) {
      Status s = ch.receive(&f, 5s);
      if (!s.ok()) {
        refuse(ch, s);
        return;
      }
      if (f.type == MessageType::kBye) return;
      std::reverse(f.payload.begin(), f.payload.end());
      f.type = MessageType::kBackward;
      if (!ch.send(f).ok()) return;
    }
  };
}

// A full good session: handshake, `rounds` FORWARD/BACKWARD round trips, BYE.
Status good_session(const ClientOptions& opt, const ServerPolicy& p, int rounds, size_t bytes) {
  std::unique_ptr<Channel> ch;
  Status s = connect(opt, &ch);
  if (!s.ok()) return s;
  HelloAck ack;
  s = client_handshake(*ch, hello_for(p), p.token, 5s, &ack);
  if (!s.ok()) return s;
  std::string payload(bytes, '\0');
  for (size_t i = 0; i < bytes; ++i) payload[i] = static_cast<char>(i * 7 + ack.session_id);
  for (int r = 0; r < rounds; ++r) {
    payload[0] = static_cast<char>(r);
    s = ch->send({MessageType::kForward, 0, payload});
    if (!s.ok()) return s;
    Frame back;
    s = ch->receive(&back, 10s);
    if (!s.ok()) return s;
    std::string want(payload.rbegin(), payload.rend());
    if (back.type != MessageType::kBackward || back.payload != want)
      return Status::Fail(ErrorCode::kBadMessage, "wrong echo");
  }
  return ch->send({MessageType::kBye, 0, ""});
}

TEST(Tcp, EveryMessageTypeRoundTripsPlainAndTls) {
  for (bool tls : {false, true}) {
    ServerOptions so(0);
    if (tls) so.tls(certs().server());
    Server server(so, [](Channel& ch, const SessionContext&) {
      Frame f;
      while (ch.receive(&f, 5s).ok() && f.type != MessageType::kBye) ch.send(f);
    });
    ClientOptions co("127.0.0.1", server.port());
    if (tls) co.tls({"", "", certs().f("ca.pem")});
    std::unique_ptr<Channel> ch;
    ASSERT_TRUE(connect(co, &ch).ok());
    double waited = 0;  // wall time inside receive(), which bounds the time the channel says it was blocked
    for (uint8_t t = 1; t <= kMaxMessageType; ++t) {
      // BYE ends the echo; HEARTBEAT is consumed by receive() (see the Heartbeat test).
      if (static_cast<MessageType>(t) == MessageType::kBye || static_cast<MessageType>(t) == MessageType::kHeartbeat)
        continue;
      Frame f{static_cast<MessageType>(t), t, std::string(t == 5 ? (16 << 20) : 100 * t, static_cast<char>(t))};
      ASSERT_TRUE(ch->send(f).ok());
      Frame back;
      const auto t0 = std::chrono::steady_clock::now();
      ASSERT_TRUE(ch->receive(&back, 10s).ok()) << (tls ? "tls " : "tcp ") << message_name(f.type);
      waited += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      EXPECT_EQ(back.type, f.type);
      EXPECT_EQ(back.flags, f.flags);
      EXPECT_TRUE(back.payload == f.payload);
    }
    ch->send({MessageType::kBye, 0, ""});
    EXPECT_EQ(ch->accounting().bytes_sent(), ch->accounting().bytes_received() + sizeof(FrameHeader));
    // A 16 MiB frame arrives in hundreds of reads: each adds its own wait, not the time since the
    // frame began (which counted the same seconds over and over).
    EXPECT_GT(ch->accounting().seconds_blocked, 0.0);
    EXPECT_LE(ch->accounting().seconds_blocked, waited + 1e-3) << (tls ? "tls" : "tcp");
  }
}

TEST(Handshake, AgreesOrNamesTheDifference) {
  const ServerPolicy p = policy();
  auto attempt = [&](Hello h, const std::string& token) {
    auto [client, server] = make_in_process_pair(1 << 20);
    auto srv = std::async(std::launch::async, [&, s = server.get()] {
      Hello got;
      return server_handshake(*s, p, 42, 2s, &got);
    });
    HelloAck ack;
    Status st = client_handshake(*client, h, token, 2s, &ack);
    srv.get();
    if (st.ok()) {
      EXPECT_EQ(ack.session_id, 42u);
    }
    return st;
  };
  EXPECT_TRUE(attempt(hello_for(p), p.token).ok());
  Status s = attempt(hello_for(p), "wrong-token");
  EXPECT_EQ(s.code, ErrorCode::kBadAuth) << s.message;
  EXPECT_EQ(attempt(hello_for(p), "").code, ErrorCode::kBadAuth);
  Hello h = hello_for(p);
  h.split = 3;
  s = attempt(h, p.token);
  EXPECT_EQ(s.code, ErrorCode::kSplitMismatch);
  EXPECT_NE(s.message.find("client 3, server 2"), std::string::npos) << s.message;
  h = hello_for(p);
  h.model_fingerprint = model_fingerprint(ModelConfig::load(testing::data_path("hf/qwen2-tied")),
                                          CheckpointReader(testing::data_path("hf/qwen2-tied")));
  EXPECT_EQ(attempt(h, p.token).code, ErrorCode::kModelMismatch);
  h = hello_for(p);
  h.fwd_codec = "fixed:bits=4";
  s = attempt(h, p.token);
  EXPECT_EQ(s.code, ErrorCode::kCodecMismatch);
  EXPECT_NE(s.message.find("fixed:bits=4"), std::string::npos) << s.message;
  h = hello_for(p);
  h.protocol = 9;
  EXPECT_EQ(attempt(h, p.token).code, ErrorCode::kBadVersion);
}

TEST(Handshake, ClientRefusesAnImpostorServer) {
  // A server that accepts any AUTH but does not know the token cannot produce the proof.
  auto [client, server] = make_in_process_pair(1 << 20);
  std::thread impostor([s = server.get()] {
    Frame f;
    s->receive(&f, 2s);
    s->send({MessageType::kChallenge, 0, nlohmann::json{{"server_nonce", random_hex(32)}}.dump()});
    s->receive(&f, 2s);
    s->send({MessageType::kHelloAck, 0, nlohmann::json{{"session_id", 1}, {"proof", "00"}}.dump()});
  });
  HelloAck ack;
  EXPECT_EQ(client_handshake(*client, hello_for(policy()), "s3cret-token", 2s, &ack).code, ErrorCode::kBadAuth);
  impostor.join();
}

// Raw bytes to the server, then the ERROR frame it answers with (kClosed if none came).
Status hostile_raw(uint16_t port, const std::string& bytes, bool then_wait) {
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket sock(io);
  sock.connect({boost::asio::ip::make_address("127.0.0.1"), port});
  // The server may refuse on the header and close before the rest is written: no error of ours.
  boost::system::error_code ec;
  boost::asio::write(sock, boost::asio::buffer(bytes), ec);
  if (!then_wait) sock.shutdown(boost::asio::ip::tcp::socket::shutdown_send, ec);
  FrameDecoder d(1 << 20);
  char buf[4096];
  Frame f;
  while (!d.next(&f)) {
    size_t n = sock.read_some(boost::asio::buffer(buf), ec);
    if (ec) return Status::Fail(ErrorCode::kClosed, "closed without an ERROR frame");
    d.feed(std::string_view(buf, n));
  }
  EXPECT_EQ(f.type, MessageType::kError);
  return parse_error_payload(f.payload);
}

std::string header_bytes(uint32_t magic, uint16_t version, uint8_t type, uint64_t length) {
  FrameHeader h;
  h.magic = magic;
  h.version = version;
  h.type = type;
  h.length = length;
  return std::string(reinterpret_cast<const char*>(&h), sizeof h);
}

TEST(Server, GoodSessionsCompleteWhileHostileClientsAreRefused) {
  const ServerPolicy p = policy();
  ServerOptions plain_opt(0);
  plain_opt.max_payload(1 << 20).io_timeout(2s).handshake_timeout(2s).handshake(p);
  Server plain(plain_opt, echo_handler(p));
  ServerOptions tls_opt(0);
  tls_opt.tls(certs().server(), /*require_client_cert=*/true).max_payload(1 << 20).handshake_timeout(2s).handshake(p);
  Server tls(tls_opt, echo_handler(p));

  // 8 good sessions on each server, running while the hostile clients below do their worst.
  std::vector<std::future<Status>> good;
  for (int i = 0; i < 8; ++i) {
    good.push_back(std::async(std::launch::async,
                              [&] { return good_session(ClientOptions("127.0.0.1", plain.port()), p, 30, 64 << 10); }));
    good.push_back(std::async(std::launch::async, [&] {
      return good_session(ClientOptions("127.0.0.1", tls.port()).tls(certs().client()), p, 30, 64 << 10);
    }));
  }

  std::string junk(300, '\0');
  for (size_t i = 0; i < junk.size(); ++i) junk[i] = static_cast<char>(i * 131 + 7);
  EXPECT_EQ(hostile_raw(plain.port(), junk, false).code, ErrorCode::kBadMagic);
  EXPECT_EQ(hostile_raw(plain.port(), header_bytes(kFrameMagic, kProtocolVersion, 1, uint64_t{1} << 60), true).code,
            ErrorCode::kTooLarge);
  EXPECT_EQ(hostile_raw(plain.port(), header_bytes(0xDEADBEEF, kProtocolVersion, 1, 4) + "abcd", false).code,
            ErrorCode::kBadMagic);
  EXPECT_EQ(hostile_raw(plain.port(), header_bytes(kFrameMagic, 7, 1, 4) + "abcd", false).code, ErrorCode::kBadVersion);
  // Truncated frame, then silence: the server gives up at its deadline and says so.
  Status trunc = hostile_raw(plain.port(), header_bytes(kFrameMagic, kProtocolVersion, 1, 100) + "only part", true);
  EXPECT_EQ(trunc.code, ErrorCode::kTimeout) << trunc.message;
  // Bad token, over TLS with a trusted client certificate.
  {
    std::unique_ptr<Channel> ch;
    ASSERT_TRUE(connect(ClientOptions("127.0.0.1", tls.port()).tls(certs().client()), &ch).ok());
    HelloAck ack;
    EXPECT_EQ(client_handshake(*ch, hello_for(p), "guess", 5s, &ack).code, ErrorCode::kBadAuth);
  }
  // A TLS client whose certificate no CA of the server signed: no session, no frame.
  {
    std::unique_ptr<Channel> ch;
    Status s = connect(ClientOptions("127.0.0.1", tls.port()).tls(certs().rogue()), &ch);
    if (s.ok()) {
      HelloAck ack;
      s = client_handshake(*ch, hello_for(p), p.token, 5s, &ack);
    }
    EXPECT_FALSE(s.ok());
    EXPECT_TRUE(s.code == ErrorCode::kTls || s.code == ErrorCode::kClosed) << s.message;
  }
  // A client that does not trust the server's certificate refuses it.
  {
    std::unique_ptr<Channel> ch;
    Status s = connect(ClientOptions("127.0.0.1", tls.port())
                           .tls({certs().f("client.pem"), certs().f("client.key"), certs().f("rogue.pem")}),
                       &ch);
    EXPECT_EQ(s.code, ErrorCode::kTls) << s.message;
  }

  for (auto& g : good) {
    Status s = g.get();
    EXPECT_TRUE(s.ok()) << error_name(s.code) << ": " << s.message;
  }
  plain.stop();
  tls.stop();
  EXPECT_GE(plain.sessions_started(), 13u);
  // Every hostile session was logged as failed: 5 frame-level on the plain server; the bad token,
  // the untrusted certificate and the client that distrusted the server on the TLS server.
  EXPECT_EQ(plain.sessions_failed(), 5u);
  EXPECT_EQ(tls.sessions_failed(), 3u);
}

// A TCP connection from `source` (any 127.0.0.0/8 address is this host) that sends nothing.
boost::asio::ip::tcp::socket silent_connection(boost::asio::io_context& io, uint16_t port, const char* source) {
  namespace ip = boost::asio::ip;
  ip::tcp::socket sock(io);
  sock.open(ip::tcp::v4());
  sock.bind({ip::make_address(source), 0});
  sock.connect({ip::make_address("127.0.0.1"), port});
  return sock;
}

// What a connection hears within `wait`: kClosed for a close without a frame, the ERROR it was
// sent, or kTimeout when it is still open.
Status heard(boost::asio::ip::tcp::socket& sock, std::chrono::milliseconds wait) {
  const int fd = sock.native_handle();
  timeval tv{static_cast<time_t>(wait.count() / 1000), static_cast<suseconds_t>((wait.count() % 1000) * 1000)};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  FrameDecoder d(1 << 20);
  Frame f;
  char buf[4096];
  while (!d.next(&f)) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return Status::Fail(ErrorCode::kTimeout, "still open");
    if (n <= 0) return Status::Fail(ErrorCode::kClosed, "closed without an ERROR frame");
    d.feed(std::string_view(buf, static_cast<size_t>(n)));
  }
  return f.type == MessageType::kError ? parse_error_payload(f.payload) : Status::Ok();
}

TEST(Server, SilentAndOversizedPeersLockNobodyOutAndCostNoMemory) {
  const ServerPolicy p = policy();
  ServerOptions opt(0);
  opt.handshake(p).max_sessions(1).max_unauthenticated(12, 4).handshake_timeout(3s);
  Server server(opt, echo_handler(p));
  boost::asio::io_context io;
  // 20 silent connections from two addresses: 4 from each hold a place until the deadline, the
  // other 12 are closed at once; none holds a session slot (the cap is 1 session).
  std::vector<boost::asio::ip::tcp::socket> silent;
  for (int i = 0; i < 20; ++i)
    silent.push_back(silent_connection(io, server.port(), i % 2 ? "127.0.0.2" : "127.0.0.3"));
  int closed_at_once = 0;
  for (auto& s : silent) closed_at_once += heard(s, 300ms).code == ErrorCode::kClosed;
  EXPECT_EQ(closed_at_once, 12);
  // A client from another address authenticates and trains while they wait.
  Status good = good_session(ClientOptions("127.0.0.1", server.port()), p, 5, 4096);
  EXPECT_TRUE(good.ok()) << good.message;
  // A HELLO longer than the pre-authentication limit is refused on its header: the answer names
  // that limit, not anything about the model (the session frame limit is 1 GiB).
  {
    auto sock = silent_connection(io, server.port(), "127.0.0.4");
    boost::asio::write(sock, boost::asio::buffer(header_bytes(kFrameMagic, kProtocolVersion,
                                                              static_cast<uint8_t>(MessageType::kHello), 270 << 20)));
    Status s = heard(sock, 2s);
    EXPECT_EQ(s.code, ErrorCode::kTooLarge) << s.message;
    EXPECT_NE(s.message.find(std::to_string(kUnauthenticatedMaxPayload)), std::string::npos) << s.message;
    EXPECT_EQ(s.message.find(std::to_string(uint64_t{1} << 30)), std::string::npos) << s.message;
  }
  // The ones that stayed silent are told at the deadline and closed.
  int timed_out = 0;
  for (auto& s : silent) timed_out += heard(s, 5s).code == ErrorCode::kTimeout;
  EXPECT_EQ(timed_out, 8);
  // The session cap counts authenticated sessions: with one open, the next client is told the
  // server is busy after it authenticated, and gets in once the first has ended.
  std::unique_ptr<Channel> first;
  ASSERT_TRUE(connect(ClientOptions("127.0.0.1", server.port()), &first).ok());
  HelloAck ack;
  ASSERT_TRUE(client_handshake(*first, hello_for(p), p.token, 5s, &ack).ok());
  Status busy = good_session(ClientOptions("127.0.0.1", server.port()), p, 1, 16);
  EXPECT_EQ(busy.code, ErrorCode::kBusy) << busy.message;
  first->send({MessageType::kBye, 0, ""});
  first.reset();
  Status later = Status::Fail(ErrorCode::kBusy, "");
  for (int i = 0; i < 50 && later.code == ErrorCode::kBusy; ++i) {
    std::this_thread::sleep_for(50ms);
    later = good_session(ClientOptions("127.0.0.1", server.port()), p, 1, 16);
  }
  EXPECT_TRUE(later.ok()) << later.message;
}

TEST(Server, PlainTcpOffLoopbackNeedsInsecure) {
  EXPECT_AMAQ_ERROR(Server(ServerOptions(0).host("0.0.0.0"), [](Channel&, const SessionContext&) {}), "plain TCP",
                    "--insecure");
  Server ok(ServerOptions(0).host("0.0.0.0").insecure(true), [](Channel&, const SessionContext&) {});
  EXPECT_GT(ok.port(), 0);
  EXPECT_TRUE(is_loopback("127.0.0.1") && is_loopback("::1") && is_loopback("localhost") && !is_loopback("10.1.2.3"));
}

}  // namespace
}  // namespace amaq::wire
