// The link emulator against what it models: a round trip never takes less than the round-trip time
// (plus the serialisation of the bytes), nor a bulk transfer less than its bytes at the link's rate;
// neither takes grossly longer (a delay added twice, a rate off by a quarter); a byte stream arrives
// whole and in order in both directions. How close to the model the emulator comes is measured by
// `make bench` (`emulated/...`, counter over_model): on a loaded machine timer wake-ups run late by
// milliseconds, so a few-percent bound here would test the scheduler, not the emulator.
#include "wire/link_emulator.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <boost/asio.hpp>
#include <future>
#include <thread>

#include "testing.h"
#include "wire/tcp.h"

namespace amaq::wire {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

// Accepts one connection and echoes every byte back until EOF.
class EchoServer {
 public:
  EchoServer() : acceptor_(io_, {asio::ip::make_address("127.0.0.1"), 0}) {
    thread_ = std::thread([this] {
      tcp::socket s(io_);
      acceptor_.accept(s);
      std::vector<char> buf(64 << 10);
      boost::system::error_code ec;
      while (true) {
        const size_t n = s.read_some(asio::buffer(buf), ec);
        if (ec) break;
        asio::write(s, asio::buffer(buf.data(), n), ec);
        if (ec) break;
      }
    });
  }
  ~EchoServer() { thread_.join(); }
  uint16_t port() const { return acceptor_.local_endpoint().port(); }

 private:
  asio::io_context io_;
  tcp::acceptor acceptor_;
  std::thread thread_;
};

tcp::socket connect_to(asio::io_context& io, uint16_t port) {
  tcp::socket s(io);
  s.connect({asio::ip::make_address("127.0.0.1"), port});
  s.set_option(tcp::no_delay(true));
  return s;
}

TEST(LinkSpec, ParsesRateAndRoundTripAndNamesWhatIsWrong) {
  const LinkSpec s = LinkSpec::parse("100mbit/20ms");
  EXPECT_DOUBLE_EQ(s.rate_bits_per_second, 100e6);
  EXPECT_EQ(s.one_way_delay, std::chrono::milliseconds(10));
  EXPECT_EQ(s.to_string(), "100mbit/20ms");
  EXPECT_DOUBLE_EQ(LinkSpec::parse("1Gbit/2ms").rate_bits_per_second, 1e9);
  EXPECT_EQ(LinkSpec::parse("10mbit/40ms").queue_limit(), uint64_t{1} << 20);  // 2 x BDP = 100 KB < 1 MiB
  EXPECT_EQ(LinkSpec::parse("1gbit/80ms").queue_limit(), 10'000'000u);         // 2 x BDP
  EXPECT_AMAQ_ERROR(LinkSpec::parse("100mb/20ms"), "RATE/RTT", "100mbit/20ms");
  EXPECT_AMAQ_ERROR(LinkSpec::parse("0mbit/20ms"), "out of range");
}

TEST(LinkEmulator, RoundTripAndRateAreTheLinksAndBytesArriveInOrder) {
  EchoServer echo;
  const LinkSpec spec = LinkSpec::parse("100mbit/20ms");
  LinkEmulator link(0, "127.0.0.1", echo.port(), spec);
  asio::io_context io;
  tcp::socket s = connect_to(io, link.port());

  // Small messages: each round trip is the RTT (serialising 64 bytes twice adds 10 us). None may be
  // shorter; the fastest, less than 1.5 RTT (one delay too many would make it 2).
  std::vector<double> rtts;
  char byte[64] = {};
  const int round_trips = 9;
  for (int i = 0; i < round_trips; ++i) {
    const auto t0 = Clock::now();
    asio::write(s, asio::buffer(byte));
    asio::read(s, asio::buffer(byte));
    rtts.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  std::sort(rtts.begin(), rtts.end());
  EXPECT_GT(rtts.front(), 20.0 * 0.98) << rtts.front();
  EXPECT_LT(rtts.front(), 20.0 * 1.5) << rtts.front();

  // 4 MB there and back: the echo's return leg overlaps the way out, so the whole takes one
  // serialisation of 4 MB at 100 Mbit/s (0.32 s) plus the round trip; less than 1.25 times that
  // (a second serialisation, on the way back, would make it 1.9).
  const size_t n = 4'000'000;
  std::string out(n, '\0');
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<char>(i * 31 + i / 977);
  std::string back(n, '\0');
  const auto t0 = Clock::now();
  std::thread writer([&] { asio::write(s, asio::buffer(out)); });
  asio::read(s, asio::buffer(back.data(), back.size()));
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  writer.join();
  EXPECT_TRUE(back == out) << "bytes lost, changed or reordered";
  const double expected = n * 8 / spec.rate_bits_per_second + 0.020;
  EXPECT_GT(seconds, expected * 0.97) << seconds;
  EXPECT_LT(seconds, expected * 1.25) << seconds;
  EXPECT_EQ(link.bytes_forward(), n + round_trips * sizeof byte);
  EXPECT_EQ(link.bytes_backward(), n + round_trips * sizeof byte);
  s.shutdown(tcp::socket::shutdown_send);
}

// What budget=auto measures the link with (wire::Frame::arrival_seconds): a frame its receiver was
// waiting for arrives over the frame's serialisation at the link's rate, each way; a frame already
// in the socket's buffer when asked for is not timed.
TEST(LinkEmulator, AFrameWaitedForArrivesOverItsSerialisationTime) {
  using namespace std::chrono_literals;
  const size_t n = 1'000'000;
  const LinkSpec spec = LinkSpec::parse("100mbit/2ms");
  const double serialisation = (n + sizeof(FrameHeader)) * 8 / spec.rate_bits_per_second;  // 80 ms
  std::promise<double> at_server;
  Server server(ServerOptions(0), [&](Channel& ch, const SessionContext&) {
    Frame f;
    if (!ch.receive(&f, 10s).ok()) return at_server.set_value(-2);
    at_server.set_value(f.arrival_seconds);
    std::this_thread::sleep_for(50ms);  // the client is waiting by now
    ch.send({MessageType::kBackward, 0, std::string(n, 'b')});
    // Two more back to back, read only once both are in the client's buffer.
    ch.send({MessageType::kBackward, 0, std::string(n, 'c')});
    ch.send({MessageType::kBackward, 0, std::string(n, 'd')});
    ch.receive(&f, 10s);
  });
  LinkEmulator link(0, "127.0.0.1", server.port(), spec);
  std::unique_ptr<Channel> ch;
  ASSERT_TRUE(connect(ClientOptions("127.0.0.1", link.port()), &ch).ok());
  std::this_thread::sleep_for(50ms);  // the server is waiting by now
  ASSERT_TRUE(ch->send({MessageType::kForward, 0, std::string(n, 'a')}).ok());
  const double up = at_server.get_future().get();
  EXPECT_GT(up, serialisation * 0.95) << up;
  EXPECT_LT(up, serialisation * 1.10) << up;

  Frame f;
  ASSERT_TRUE(ch->receive(&f, 10s).ok());
  EXPECT_GT(f.arrival_seconds, serialisation * 0.95) << f.arrival_seconds;
  EXPECT_LT(f.arrival_seconds, serialisation * 1.10) << f.arrival_seconds;
  std::this_thread::sleep_for(500ms);  // both are here
  for (char c : {'c', 'd'}) {
    ASSERT_TRUE(ch->receive(&f, 10s).ok());
    EXPECT_EQ(f.payload[0], c);
    EXPECT_EQ(f.arrival_seconds, -1) << c;
  }
  ch->send({MessageType::kBye, 0, ""});
}

}  // namespace
}  // namespace amaq::wire
