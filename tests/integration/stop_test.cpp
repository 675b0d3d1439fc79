// SIGTERM to a real `amaq server`: a training client is stopped at a step boundary with both sides'
// checkpoints of that step and resumes from it; a session that never reaches a boundary is cut
// after --stop-grace; a second signal exits at once. (ctest label `integration`.)
#include <gtest/gtest.h>

#include <regex>

#include "core/fs.h"
#include "integration/process.h"
#include "model/config.h"
#include "model/part.h"
#include "quant/spec.h"
#include "testing.h"
#include "wire/handshake.h"
#include "wire/tcp.h"

namespace amaq {
namespace {

using namespace std::chrono_literals;
using testing::lines_with;
using testing::Process;
using testing::slurp;

const std::string kModel = testing::data_path("hf/llama-gqa");
const char* kToken = "stop-test-token-0123456789abcdef";

class IntegrationStop : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::write_bytes(tmp_.file("token"), std::string(kToken) + "\n");
    testing::write_bytes(tmp_.file("data.txt"), testing::english_text(8000));
  }
  std::vector<std::string> server_args(const std::string& grace) const {
    return {AMAQ_BINARY,    "server",
            "--model",      kModel,
            "--split",      "2",
            "--listen",     "127.0.0.1:0",
            "--token-file", tmp_.file("token"),
            "--run-dir",    tmp_.file("server-runs"),
            "--stop-grace", grace,
            "--fwd-codec",  "fixed:bits=8",
            "--bwd-codec",  "fixed:bits=8"};
  }
  std::vector<std::string> client_args(const std::string& port, const std::string& run_dir) const {
    return {AMAQ_BINARY,
            "client",
            "--model",
            kModel,
            "--split",
            "2",
            "--connect",
            "127.0.0.1:" + port,
            "--token-file",
            tmp_.file("token"),
            "--run-dir",
            run_dir,
            "--data",
            tmp_.file("data.txt"),
            "--tokenizer",
            "byte",
            "--batch",
            "4",
            "--seq-len",
            "64",
            "--steps",
            "200",
            "--checkpoint-every",
            "1000",
            "--retries",
            "0",
            "--fwd-codec",
            "fixed:bits=8",
            "--bwd-codec",
            "fixed:bits=8"};
  }
  // Waits up to `limit` for `p` to exit; -1 if it is still running.
  static int wait_within(Process& p, std::chrono::milliseconds limit) {
    for (auto t = 0ms; t < limit && p.alive(); t += 20ms) std::this_thread::sleep_for(20ms);
    return p.alive() ? -1 : p.wait();
  }
  testing::TempDir tmp_;
};

TEST_F(IntegrationStop, SigtermStopsAtAStepBoundaryWithBothCheckpointsAndTheRunResumes) {
  const std::string run = tmp_.file("run");
  int64_t stopped_at = -1;
  {
    Process server(server_args("10"), tmp_.file("s1.out"), tmp_.file("s1.err"));
    const std::string port = testing::wait_for_port(tmp_.file("s1.out"));
    ASSERT_FALSE(port.empty()) << slurp(tmp_.file("s1.err"));
    Process client(client_args(port, run), tmp_.file("c1.out"), tmp_.file("c1.err"));
    for (int i = 0; i < 3000 && client.alive() && lines_with(run + "/metrics.jsonl", "fwd_bits").size() < 5; ++i)
      std::this_thread::sleep_for(10ms);
    ASSERT_TRUE(client.alive()) << "the client finished before the signal: " << slurp(tmp_.file("c1.err"));
    server.signal(SIGTERM);
    EXPECT_EQ(wait_within(server, 10s), 0) << slurp(tmp_.file("s1.err"));
    EXPECT_NE(wait_within(client, 10s), 0);
    // The token file was written 0644 by SetUp: the server says so and how to fix it.
    EXPECT_NE(slurp(tmp_.file("s1.err")).find("can be read by other users (mode 644); chmod 600"), std::string::npos);
    const std::string err = slurp(tmp_.file("c1.err"));
    std::smatch m;
    ASSERT_TRUE(
        std::regex_search(err, m, std::regex("the server is stopping at step \\d+; both sides saved step (\\d+)")))
        << err;
    EXPECT_NE(err.find("--resume"), std::string::npos) << err;
    stopped_at = std::stoll(m[1]);
    // The server's own log names the step it stopped the run at: the same one.
    EXPECT_NE(slurp(tmp_.file("s1.err")).find("stopped at step " + std::to_string(stopped_at) + ":"), std::string::npos)
        << slurp(tmp_.file("s1.err"));
    EXPECT_LT(stopped_at, 200);
    EXPECT_EQ(lines_with(run + "/metrics.jsonl", "fwd_bits").size(), static_cast<size_t>(stopped_at));
    const std::string run_id = nlohmann::json::parse(read_file(run + "/run.json"))["run_id"];
    char step_dir[32];
    std::snprintf(step_dir, sizeof step_dir, "step-%08lld", static_cast<long long>(stopped_at));
    EXPECT_TRUE(file_exists(run + "/checkpoints/" + step_dir + "/state.safetensors"));
    EXPECT_TRUE(file_exists(tmp_.file("server-runs/" + run_id + "/" + step_dir + "/state.safetensors")));
  }
  // A new server; the client resumes from the step both saved and finishes.
  Process server(server_args("10"), tmp_.file("s2.out"), tmp_.file("s2.err"));
  const std::string port = testing::wait_for_port(tmp_.file("s2.out"));
  ASSERT_FALSE(port.empty()) << slurp(tmp_.file("s2.err"));
  std::vector<std::string> resume = client_args(port, run);
  resume.push_back("--resume");
  Process client(resume, tmp_.file("c2.out"), tmp_.file("c2.err"));
  ASSERT_EQ(client.wait(), 0) << slurp(tmp_.file("c2.err"));
  EXPECT_NE(slurp(tmp_.file("c2.err")).find("resumed at step " + std::to_string(stopped_at)), std::string::npos)
      << slurp(tmp_.file("c2.err"));
  auto steps = lines_with(run + "/metrics.jsonl", "fwd_bits");
  ASSERT_EQ(steps.size(), 200u);
  for (size_t i = 0; i < steps.size(); ++i) EXPECT_EQ(steps[i]["step"].get<size_t>(), i);
  server.signal(SIGTERM);
  EXPECT_EQ(wait_within(server, 10s), 0);
}

// A client that authenticated and then says nothing: no step boundary ever comes.
std::unique_ptr<wire::Channel> idle_session(const std::string& port) {
  wire::Hello h;
  h.model_fingerprint = model_fingerprint(ModelConfig::load(kModel), CheckpointReader(kModel));
  h.split = 2;
  h.fwd_codec = h.bwd_codec = quant::CodecSpec::parse("fixed:bits=8").to_string();
  std::unique_ptr<wire::Channel> ch;
  EXPECT_TRUE(wire::connect(wire::ClientOptions("127.0.0.1", static_cast<uint16_t>(std::stoi(port))), &ch).ok());
  wire::HelloAck ack;
  wire::Status s = wire::client_handshake(*ch, h, kToken, 5s, &ack);
  EXPECT_TRUE(s.ok()) << s.message;
  return ch;
}

TEST_F(IntegrationStop, IdleSessionsAreCutAfterTheGraceAndASecondSignalExitsAtOnce) {
  {
    Process server(server_args("1"), tmp_.file("s1.out"), tmp_.file("s1.err"));
    const std::string port = testing::wait_for_port(tmp_.file("s1.out"));
    ASSERT_FALSE(port.empty()) << slurp(tmp_.file("s1.err"));
    auto idle = idle_session(port);
    // The client's handshake ends before the server's session thread starts: signal a live session.
    ASSERT_TRUE(testing::wait_for_text(tmp_.file("s1.err"), "session 1 from")) << slurp(tmp_.file("s1.err"));
    server.signal(SIGTERM);
    EXPECT_EQ(wait_within(server, 5s), 0) << slurp(tmp_.file("s1.err"));
    EXPECT_NE(slurp(tmp_.file("s1.err")).find("still open after 1 s"), std::string::npos) << slurp(tmp_.file("s1.err"));
  }
  Process server(server_args("60"), tmp_.file("s2.out"), tmp_.file("s2.err"));
  const std::string port = testing::wait_for_port(tmp_.file("s2.out"));
  ASSERT_FALSE(port.empty()) << slurp(tmp_.file("s2.err"));
  auto idle = idle_session(port);
  ASSERT_TRUE(testing::wait_for_text(tmp_.file("s2.err"), "session 1 from")) << slurp(tmp_.file("s2.err"));
  server.signal(SIGTERM);
  std::this_thread::sleep_for(500ms);
  EXPECT_TRUE(server.alive()) << "the first signal waits for the session (grace 60 s)";
  server.signal(SIGTERM);
  EXPECT_EQ(wait_within(server, 3s), 128 + SIGTERM) << slurp(tmp_.file("s2.err"));
  EXPECT_NE(slurp(tmp_.file("s2.err")).find("exiting now"), std::string::npos) << slurp(tmp_.file("s2.err"));
}

}  // namespace
}  // namespace amaq
