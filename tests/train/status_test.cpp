// The status page (`amaq server --status-listen`): scraped during a run over TCP, its figures agree
// with what the client measured; and the HTTP server stays up for good requests while peers send
// garbage, oversized or no requests, or lack the token.
#include "train/status.h"

#include <gtest/gtest.h>

#include <atomic>
#include <boost/asio/read.hpp>
#include <chrono>
#include <thread>

#include "http_testing.h"
#include "testing.h"
#include "train/run_testing.h"
#include "train/session.h"
#include "wire/status_http.h"
#include "wire/tcp.h"

namespace amaq::train {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using testing::http_raw;
using testing::sample;
using testing::status_code;

TEST(StatusPage, ScrapedDuringARunItShowsTheRunsStepBytesBitsAndLatency) {
  testing::TempDir tmp;
  ClientConfig c = base_config(tmp, "run");
  c.schedule.steps = 40;
  c.fwd_codec = quant::CodecSpec::parse("fixed:bits=4");
  c.bwd_codec = quant::CodecSpec::parse("fixed:bits=8");
  TrainServer srv(server_for(c, c.side));
  wire::Server server(srv.tcp_options(0),
                      [&](wire::Channel& ch, const wire::SessionContext& ctx) { srv.serve(ch, ctx); });
  wire::StatusServer page({"127.0.0.1", 0, "", 32, 5000},
                          [&](const std::string& path) { return status_response(path, status_snapshot(srv, server)); });
  RunResult r;
  std::thread client([&] {
    r = ClientTrainer(c).run([&](std::unique_ptr<wire::Channel>* out) {
      return wire::connect(wire::ClientOptions("127.0.0.1", server.port()), out);
    });
  });
  std::string during, html;
  for (int i = 0; i < 2000 && during.empty(); ++i) {
    const std::string m = testing::http_get(page.port(), "/metrics");
    ASSERT_EQ(status_code(m), 200) << m;
    if (sample(m, "amaq_run_step") >= 3 && sample(m, "amaq_runs_live") == 1) {
      during = m;
      html = testing::http_get(page.port(), "/");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  client.join();
  ASSERT_FALSE(during.empty()) << "never saw the run live at step 3 or later";
  ASSERT_EQ(r.steps.size(), 40u);

  const std::string id = nlohmann::json::parse(read_file(c.run_dir + "/run.json")).at("run_id").get<std::string>();
  const std::string run = "run=\"" + id + "\"";
  const double step = sample(during, "amaq_run_step", run);
  EXPECT_GE(step, 3);
  EXPECT_LT(step, 40);
  EXPECT_EQ(sample(during, "amaq_sessions_live"), 1);
  // Effective bits: the packets' bits per element, as the client measured them (same shapes every step).
  const StepRecord& s0 = r.steps[0];
  EXPECT_NEAR(sample(during, "amaq_run_effective_bits", run + ",direction=\"forward\""),
              8.0 * static_cast<double>(s0.fwd_packet_bytes) / static_cast<double>(s0.elements), 1e-9);
  EXPECT_NEAR(sample(during, "amaq_run_effective_bits", run + ",direction=\"backward\""),
              8.0 * static_cast<double>(s0.bwd_packet_bytes) / static_cast<double>(s0.elements), 1e-9);
  // Bytes in: at least the FORWARD frames of the steps completed (and less than all 40 steps').
  uint64_t fwd_frames = 0;
  for (int64_t s = 0; s < static_cast<int64_t>(step); ++s) fwd_frames += r.steps[s].forward_frame_bytes;
  const double in = sample(during, "amaq_run_bytes_total", run + ",direction=\"in\"");
  EXPECT_GE(in, static_cast<double>(fwd_frames));
  EXPECT_LT(in, static_cast<double>(40 * r.steps[0].fwd_wire_bytes));
  // The latency histogram: cumulative buckets ending in +Inf = count, at least one per micro-batch.
  const double count = sample(during, "amaq_microbatch_seconds_count");
  EXPECT_GE(count, step * static_cast<double>(c.schedule.micro_batches));
  EXPECT_EQ(sample(during, "amaq_microbatch_seconds_bucket", "le=\"+Inf\""), count);
  EXPECT_EQ(sample(during, "amaq_run_microbatch_seconds_count", run), count);  // the only run
  EXPECT_NEAR(sample(during, "amaq_run_microbatch_seconds_sum", run), sample(during, "amaq_microbatch_seconds_sum"),
              1e-6);
  EXPECT_GT(sample(during, "amaq_run_microbatch_seconds_max", run), 0);
  double last = 0;
  for (double b : TrainServer::Latency::kBounds) {
    const double v = sample(during, "amaq_microbatch_seconds_bucket", "le=\"" + fmt::format("{}", b) + "\"");
    EXPECT_GE(v, last) << b;
    last = v;
  }
  EXPECT_GT(sample(during, "amaq_memory_bytes", "kind=\"shared weights\""), 0);
  EXPECT_GT(sample(during, "amaq_memory_bytes", "kind=\"resident\""), 0);
  EXPECT_NE(html.find(id), std::string::npos);
  EXPECT_NE(html.find("fixed"), std::string::npos);

  const std::string after = testing::http_get(page.port(), "/metrics");
  EXPECT_EQ(sample(after, "amaq_runs_live"), 0);
  EXPECT_EQ(sample(after, "amaq_runs_peak"), 1);
  EXPECT_EQ(sample(after, "amaq_steps_served_total"), 40);
  EXPECT_EQ(sample(after, "amaq_run_step", run), -1);  // the run has left the list
  EXPECT_EQ(status_code(testing::http_get(page.port(), "/nothing")), 404);
}

TEST(StatusPage, TokenGarbageOversizedAndSilentPeersDoNotStopIt) {
  std::atomic<int> served{0};
  wire::StatusServer page({"127.0.0.1", 0, "s3cret", 4, 300}, [&](const std::string& path) {
    ++served;
    return wire::HttpResponse{200, "text/plain", "page " + path + "\n"};
  });
  const uint16_t port = page.port();
  EXPECT_EQ(status_code(testing::http_get(port, "/metrics")), 401);
  EXPECT_EQ(status_code(testing::http_get(port, "/metrics", "Authorization: Bearer wrong!\r\n")), 401);
  EXPECT_EQ(status_code(testing::http_get(port, "/metrics", "Authorization: Bearer s3cret\r\n")), 200);
  EXPECT_EQ(status_code(http_raw(port, "GARBAGE\r\n\r\n")), 400);
  EXPECT_EQ(status_code(testing::http_get(port, "/", "X-Big: " + std::string(20000, 'a') + "\r\n")), 400);
  EXPECT_EQ(status_code(http_raw(port, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")), 400);
  EXPECT_EQ(served, 1);

  // Silent peers: each is closed at the deadline, and past the cap of 4 a new one is closed at once.
  asio::io_context io;
  std::vector<tcp::socket> silent;
  for (int i = 0; i < 4; ++i) {
    silent.emplace_back(io);
    silent.back().connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(testing::http_get(port, "/", "Authorization: Bearer s3cret\r\n"), "");  // over the cap
  const auto t0 = std::chrono::steady_clock::now();
  for (auto& s : silent) {
    std::string out;
    boost::system::error_code ec;
    asio::read(s, asio::dynamic_buffer(out), ec);
    EXPECT_TRUE(ec) << "a silent connection was answered";
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(3));
  EXPECT_EQ(status_code(testing::http_get(port, "/", "Authorization: Bearer s3cret\r\n")), 200);
  EXPECT_EQ(served, 2);

  EXPECT_AMAQ_ERROR(
      wire::StatusServer({"0.0.0.0", 0, "", 4, 300}, [](const std::string&) { return wire::HttpResponse{}; }),
      "open to anyone", "--token-file");
}

}  // namespace
}  // namespace amaq::train
