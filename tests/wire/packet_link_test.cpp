// The packet-level link: TCP between its two namespaces sees the round-trip time, the rate and the
// loss it was given: never a shorter RTT or a higher rate, nor grossly worse ones (how close they
// come is measured by `make bench`, `packet-link/...`: timer wake-ups on a loaded machine run late
// by milliseconds). Skips, naming why, where namespaces or TUN devices are not available.
#include "wire/packet_link.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <vector>

namespace amaq::wire {
namespace {

using Clock = std::chrono::steady_clock;
using End = PacketLink::End;

bool send_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    const ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
    if (k <= 0) return false;
    p += k, n -= static_cast<size_t>(k);
  }
  return true;
}

bool recv_all(int fd, char* p, size_t n) {
  while (n > 0) {
    const ssize_t k = ::recv(fd, p, n, 0);
    if (k <= 0) return false;
    p += k, n -= static_cast<size_t>(k);
  }
  return true;
}

// Seconds for `bytes` to go from A to B, from the first send to the last byte received.
double one_way_transfer(int cs, int ss, size_t bytes) {
  std::vector<char> out(bytes, 'x'), in(bytes);
  const auto t0 = Clock::now();
  std::thread reader([&] { EXPECT_TRUE(recv_all(ss, in.data(), bytes)); });
  EXPECT_TRUE(send_all(cs, out.data(), bytes));
  reader.join();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

TEST(PacketLink, TcpSeesTheRoundTripTimeAndTheRate) {
  if (const std::string why = PacketLink::unavailable(); !why.empty()) GTEST_SKIP() << why;
  PacketLinkSpec spec;
  spec.link = LinkSpec::parse("100mbit/20ms");
  PacketLink link("amaq-test-" + std::to_string(::getpid()), spec);
  auto [cs, ss] = link.connect_tcp();
  // Round trip: a byte there and back, 20 times. None may be shorter than the RTT; the fastest,
  // less than 1.5 RTT (one delay too many would make it 2).
  std::vector<double> rtt;
  char b = 'p';
  for (int i = 0; i < 20; ++i) {
    const auto t0 = Clock::now();
    ASSERT_TRUE(send_all(cs, &b, 1));
    ASSERT_TRUE(recv_all(ss, &b, 1));
    ASSERT_TRUE(send_all(ss, &b, 1));
    ASSERT_TRUE(recv_all(cs, &b, 1));
    rtt.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(rtt.begin(), rtt.end());
  const double median = rtt[rtt.size() / 2];
  EXPECT_GT(rtt.front(), 0.020 * 0.97) << rtt.front();
  EXPECT_LT(rtt.front(), 0.020 * 1.5) << rtt.front();
  // Rate, once TCP's window has opened: 4 MB of payload. Each 1500-byte packet carries at most 1448
  // bytes of it (IP and TCP headers with timestamps), so the payload rate is at most 96.5 Mbit/s (and
  // more than three quarters of that).
  one_way_transfer(cs, ss, 2 << 20);
  const size_t bytes = 4 << 20;
  const double seconds = one_way_transfer(cs, ss, bytes) - 0.010;  // the last byte's one-way delay
  const double payload_rate = 8.0 * static_cast<double>(bytes) / seconds;
  std::printf("packet link: RTT min %.2f ms, median %.2f ms, payload rate %.1f Mbit/s\n", 1e3 * rtt.front(),
              1e3 * median, payload_rate / 1e6);
  EXPECT_GT(payload_rate, 100e6 * 1448 / 1500 * 0.75);
  EXPECT_LT(payload_rate, 100e6 * 1448 / 1500 * 1.01);
  ::close(cs);
  ::close(ss);
}

TEST(PacketLink, OnePercentLossIsDroppedAndTcpStillDelivers) {
  if (const std::string why = PacketLink::unavailable(); !why.empty()) GTEST_SKIP() << why;
  PacketLinkSpec spec;
  spec.link = LinkSpec::parse("100mbit/20ms");
  spec.loss = 0.01;
  PacketLink link("amaq-test-" + std::to_string(::getpid()), spec);
  auto [cs, ss] = link.connect_tcp();
  const double seconds = one_way_transfer(cs, ss, 4 << 20);
  const double dropped = static_cast<double>(link.dropped()),
               share = dropped / (dropped + static_cast<double>(link.delivered()));
  std::printf("packet link at 1%% loss: 4 MiB in %.2f s, %.0f packets dropped (%.2f%%)\n", seconds, dropped,
              100 * share);
  EXPECT_GT(share, 0.005);
  EXPECT_LT(share, 0.02);
  ::close(cs);
  ::close(ss);
}

TEST(PacketLink, RefusesALossOutsideZeroToOne) {
  PacketLinkSpec spec;
  spec.loss = 1.5;
  EXPECT_ANY_THROW(PacketLink("amaq-bad", spec));
}

}  // namespace
}  // namespace amaq::wire
