// Loopback transport: round trips of 64 KiB and 16 MiB FORWARD frames echoed by a server, plain TCP
// and TLS 1.3, next to a memcpy of the same payload. bytes_per_second counts both directions;
// the time column is the round-trip latency.
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>

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

void BM_RoundTrip(benchmark::State& state, bool tls) {
  const std::string& d = cert_dir();
  ServerOptions so(0);
  if (tls) so.tls({d + "/server.pem", d + "/server.key", ""});
  Server server(so, [](Channel& ch, const SessionContext&) {
    Frame f;
    while (ch.receive(&f, 30s).ok() && f.type != MessageType::kBye) ch.send(f);
  });
  ClientOptions co("127.0.0.1", server.port());
  if (tls) co.tls({"", "", d + "/ca.pem"});
  std::unique_ptr<Channel> ch;
  if (!connect(co, &ch).ok()) {
    state.SkipWithError("connect failed");
    return;
  }
  Frame f{MessageType::kForward, 0, std::string(state.range(0), 'a')}, back;
  for (auto _ : state) {
    ch->send(f);
    ch->receive(&back, 30s);
  }
  ch->send({MessageType::kBye, 0, ""});
  state.SetBytesProcessed(2 * state.iterations() * state.range(0));
}

BENCHMARK(BM_MemcpyPayload)->Arg(64 << 10)->Arg(16 << 20)->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_RoundTrip, tcp, false)
    ->Arg(64 << 10)
    ->Arg(2 << 20)
    ->Arg(16 << 20)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_RoundTrip, tls, true)->Arg(64 << 10)->Arg(16 << 20)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace
