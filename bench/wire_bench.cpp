// Loopback transport: round trips of 64 KiB and 16 MiB FORWARD frames echoed by a server, plain TCP
// and TLS 1.3, next to a memcpy of the same payload. bytes_per_second counts both directions;
// the time column is the round-trip latency.
//
// The emulated links against their model (the unit tests check only that they are never faster
// and not grossly slower; how close they come is measured here): `emulated/...` is the same frame
// round trip through a LinkEmulator at 100mbit/20ms, `packet-link/...` TCP between the two ends
// of a PacketLink at the same spec (a 1-byte round trip; a 4 MiB one-way transfer). The counter
// `over_model` is the measured time's excess over the model, as a fraction.
#include <benchmark/benchmark.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <thread>
#include <vector>

#include "wire/link_emulator.h"
#include "wire/packet_link.h"
#include "wire/tcp.h"

namespace {

using namespace amaq::wire;
using namespace std::chrono_literals;

const std::string& cert_dir() {
  static std::string dir = [] {
    std::string d = (std::filesystem::temp_directory_path() / "amaq-bench-certs").string();
    std::filesystem::create_directories(d);
    std::string cmd = std::string(AMAQ_SOURCE_DIR) + "/scripts/make-test-certs.sh " + d;
    if (std::system(cmd.c_str()) != 0) std::abort();
    return d;
  }();
  return dir;
}

void BM_MemcpyPayload(benchmark::State& state) {
  std::string src(state.range(0), 'x'), dst(state.range(0), '\0');
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), src.size());
    benchmark::DoNotOptimize(dst.data());
  }
  state.SetBytesProcessed(state.iterations() * state.range(0));
}

constexpr const char* kLink = "100mbit/20ms";

// Round trips of one frame through an echo server, optionally across an emulated link.
void round_trips(benchmark::State& state, bool tls, const std::optional<LinkSpec>& link) {
  const std::string& d = cert_dir();
  ServerOptions so(0);
  if (tls) so.tls({d + "/server.pem", d + "/server.key", ""});
  Server server(so, [](Channel& ch, const SessionContext&) {
    Frame f;
    while (ch.receive(&f, 30s).ok() && f.type != MessageType::kBye) ch.send(f);
  });
  std::optional<LinkEmulator> emulator;
  if (link) emulator.emplace(0, "127.0.0.1", server.port(), *link);
  ClientOptions co("127.0.0.1", link ? emulator->port() : server.port());
  if (tls) co.tls({"", "", d + "/ca.pem"});
  std::unique_ptr<Channel> ch;
  if (!connect(co, &ch).ok()) {
    state.SkipWithError("connect failed");
    return;
  }
  Frame f{MessageType::kForward, 0, std::string(state.range(0), 'a')}, back;
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    ch->send(f);
    ch->receive(&back, 30s);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ch->send({MessageType::kBye, 0, ""});
  state.SetBytesProcessed(2 * state.iterations() * state.range(0));
  if (link) {
    // The server answers once the whole frame is in, so the model is the round-trip time plus the
    // frame's serialisation each way (the frame header's few bytes left out).
    const double model = 2e-6 * static_cast<double>(link->one_way_delay.count()) +
                         2 * 8.0 * static_cast<double>(state.range(0)) / link->rate_bits_per_second;
    state.counters["over_model"] = seconds / static_cast<double>(state.iterations()) / model - 1;
  }
}

void BM_EmulatedLink(benchmark::State& state) {
  round_trips(state, false, LinkSpec::parse(kLink));
}

bool send_all(int fd, const char* p, size_t n) {
  for (ssize_t k = 0; n > 0; p += k, n -= static_cast<size_t>(k))
    if ((k = ::send(fd, p, n, MSG_NOSIGNAL)) <= 0) return false;
  return true;
}
bool recv_all(int fd, char* p, size_t n) {
  for (ssize_t k = 0; n > 0; p += k, n -= static_cast<size_t>(k))
    if ((k = ::recv(fd, p, n, 0)) <= 0) return false;
  return true;
}

// Bytes across a PacketLink: 1 byte there and back (model: the RTT), or `bytes` one way (model: the
// link's payload rate, 1448 of every 1500 bytes on the wire, plus the last byte's one-way delay).
void BM_PacketLink(benchmark::State& state) {
  if (const std::string why = PacketLink::unavailable(); !why.empty()) {
    state.SkipWithError(why.c_str());
    return;
  }
  PacketLinkSpec spec;
  spec.link = LinkSpec::parse(kLink);
  PacketLink link("amaq-bench-" + std::to_string(::getpid()), spec);
  const auto [a, b] = link.connect_tcp();
  const size_t n = static_cast<size_t>(state.range(0));
  std::vector<char> out(n, 'x'), in(n);
  auto once = [&] {
    if (n == 1)
      return send_all(a, out.data(), 1) && recv_all(b, in.data(), 1) && send_all(b, in.data(), 1) &&
             recv_all(a, in.data(), 1);
    std::thread reader([&] { recv_all(b, in.data(), n); });
    const bool sent = send_all(a, out.data(), n);
    reader.join();
    return sent;
  };
  if (n > 1) once();  // TCP's window opens
  const double delay = 1e-6 * static_cast<double>(spec.link.one_way_delay.count());
  const double model =
      n == 1 ? 2 * delay : 8.0 * static_cast<double>(n) / (spec.link.rate_bits_per_second * 1448 / 1500) + delay;
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state)
    if (!once()) state.SkipWithError("the connection across the link broke");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  state.counters["over_model"] = seconds / static_cast<double>(state.iterations()) / model - 1;
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(n));
  ::close(a);
  ::close(b);
}

void BM_RoundTrip(benchmark::State& state, bool tls) {
  round_trips(state, tls, std::nullopt);
}

BENCHMARK(BM_MemcpyPayload)->Arg(64 << 10)->Arg(16 << 20)->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_RoundTrip, tcp, false)
    ->Arg(64 << 10)
    ->Arg(2 << 20)
    ->Arg(16 << 20)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_RoundTrip, tls, true)->Arg(64 << 10)->Arg(16 << 20)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_EmulatedLink)->Name("emulated")->Arg(64)->Arg(4 << 20)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_PacketLink)->Name("packet-link")->Arg(1)->Arg(4 << 20)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
