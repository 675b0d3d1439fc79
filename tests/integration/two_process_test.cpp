// `amaq server` and `amaq client` as two processes on loopback, TLS 1.3 and a token: a 30-step
// AMAQ run; a client SIGKILLed mid-run and resumed; a client with another split refused.
// (ctest label `integration`.)
#include <gtest/gtest.h>

#include "core/fs.h"
#include "integration/process.h"
#include "model/config.h"
#include "model/peft.h"
#include "testing.h"
#include "wire/messages.h"

namespace amaq {
namespace {

using namespace std::chrono_literals;
using testing::lines_with;
using testing::Process;
using testing::slurp;

TEST(Integration, TwoProcessesOverTlsWithTokenTrainResumeAndRefuse) {
  testing::TempDir tmp;
  std::string out;
  ASSERT_EQ(testing::run_command(std::string(AMAQ_SOURCE_DIR) + "/scripts/make-test-certs.sh " + tmp.path(), &out), 0)
      << out;
  testing::write_bytes(tmp.file("token"), "integration-test-token-0123456789abcdef\n");
  testing::write_bytes(tmp.file("data.txt"), testing::english_text(8000));
  const std::string model = testing::data_path("hf/llama-gqa");
  const std::string bin = AMAQ_BINARY;
  const std::vector<std::string> codecs{"--fwd-codec", "amaq:budget=3,decay=10,gran=token", "--bwd-codec",
                                        "amaq:budget=6,bmin=4,decay=10,gran=token"};

  std::vector<std::string> server_args{bin,
                                       "server",
                                       "--model",
                                       model,
                                       "--split",
                                       "2",
                                       "--listen",
                                       "127.0.0.1:0",
                                       "--tls-cert",
                                       tmp.file("server.pem"),
                                       "--tls-key",
                                       tmp.file("server.key"),
                                       "--token-file",
                                       tmp.file("token"),
                                       "--run-dir",
                                       tmp.file("server-runs")};
  server_args.insert(server_args.end(), codecs.begin(), codecs.end());
  Process server(server_args, tmp.file("server.out"), tmp.file("server.err"));
  const std::string port = testing::wait_for_port(tmp.file("server.out"));
  ASSERT_FALSE(port.empty()) << slurp(tmp.file("server.err"));

  auto client_args = [&](const std::string& run_dir, const std::string& steps, const std::string& split) {
    std::vector<std::string> a{bin,
                               "client",
                               "--model",
                               model,
                               "--split",
                               split,
                               "--connect",
                               "127.0.0.1:" + port,
                               "--tls-ca",
                               tmp.file("ca.pem"),
                               "--token-file",
                               tmp.file("token"),
                               "--run-dir",
                               run_dir,
                               "--data",
                               tmp.file("data.txt"),
                               "--tokenizer",
                               "byte",
                               "--batch",
                               "4",
                               "--seq-len",
                               "64",
                               "--steps",
                               steps,
                               "--lr",
                               "1e-2",
                               "--checkpoint-every",
                               "5",
                               "--val-fraction",
                               "0.1",
                               "--retries",
                               "0"};
    a.insert(a.end(), codecs.begin(), codecs.end());
    return a;
  };

  // 1. A whole run: loss falls, the bytes add up on both ends, the run directory is complete.
  const std::string run = tmp.file("run");
  {
    Process client(client_args(run, "30", "2"), tmp.file("c1.out"), tmp.file("c1.err"));
    ASSERT_EQ(client.wait(), 0) << slurp(tmp.file("c1.err"));
  }
  auto steps = lines_with(run + "/metrics.jsonl", "fwd_bits");
  ASSERT_EQ(steps.size(), 30u);
  double first = 0, last = 0;
  for (int i = 0; i < 5; ++i)
    first += steps[i]["task_loss"].get<double>() / 5, last += steps[25 + i]["task_loss"].get<double>() / 5;
  EXPECT_LT(last, first - 0.1);
  EXPECT_LE(steps.back()["fwd_bits"]["mean"].get<double>(), 3.0);
  // Labels travel in the narrowest integer type for the model's vocabulary.
  const uint64_t label_bytes = wire::label_bytes(wire::narrowest_label_type(ModelConfig::load(model).vocab_size));
  for (const auto& s : steps) {
    // FORWARD frames = codec packets + framing (24 frame + 24 fields + 8 ids count + 8 packet length) + labels and
    // mask.
    EXPECT_EQ(s["forward_frame_bytes"].get<uint64_t>(),
              s["fwd_packet_bytes"].get<uint64_t>() + 64 + (label_bytes + 1) * s["cells"].get<uint64_t>());
    EXPECT_EQ(s["backward_frame_bytes"].get<uint64_t>(), s["bwd_packet_bytes"].get<uint64_t>() + 68);
  }
  auto client_session = lines_with(run + "/metrics.jsonl", "session");
  const std::string run_id = nlohmann::json::parse(read_file(run + "/run.json"))["run_id"];
  auto server_session = lines_with(tmp.file("server-runs/" + run_id + "/metrics.jsonl"), "session");
  ASSERT_EQ(client_session.size(), 1u);
  ASSERT_EQ(server_session.size(), 1u);
  EXPECT_EQ(client_session[0]["session"]["bytes_sent"], server_session[0]["session"]["bytes_received"]);
  EXPECT_EQ(client_session[0]["session"]["bytes_received"], server_session[0]["session"]["bytes_sent"]);
  EXPECT_FALSE(lines_with(run + "/metrics.jsonl", "eval").empty());
  EXPECT_TRUE(file_exists(run + "/checkpoints/step-00000030/state.safetensors"));
  EXPECT_TRUE(file_exists(tmp.file("server-runs/" + run_id + "/step-00000030/state.safetensors")));
  EXPECT_NE(slurp(tmp.file("c1.err")).find("summary: 30 steps"), std::string::npos);
  ASSERT_EQ(testing::run_command(bin + " export --run-dir " + run + " --out " + run + "/adapter", &out), 0) << out;
  DecoderPart full = full_model(ModelConfig::load(model));
  AdapterConfig ac = load_peft_adapter(full, run + "/adapter");
  EXPECT_EQ(ac.target_modules.size(), 28u);  // 7 linears x 4 layers, client's and server's

  // 2. SIGKILL the client mid-run; --resume completes it; the server logged the drop and kept serving.
  const std::string killed = tmp.file("killed");
  {
    Process client(client_args(killed, "40", "2"), tmp.file("c2.out"), tmp.file("c2.err"));
    for (int i = 0; i < 6000 && client.alive() && lines_with(killed + "/metrics.jsonl", "fwd_bits").size() < 12; ++i) {
      std::this_thread::sleep_for(5ms);
    }
    ASSERT_TRUE(client.alive()) << "the client finished before it could be killed";
    client.signal(SIGKILL);
    EXPECT_EQ(client.wait(), 128 + SIGKILL);
  }
  const size_t before = lines_with(killed + "/metrics.jsonl", "fwd_bits").size();
  EXPECT_LT(before, 40u);
  std::vector<std::string> resume = client_args(killed, "40", "2");
  resume.push_back("--resume");
  {
    Process client(resume, tmp.file("c3.out"), tmp.file("c3.err"));
    ASSERT_EQ(client.wait(), 0) << slurp(tmp.file("c3.err"));
  }
  auto resumed = lines_with(killed + "/metrics.jsonl", "fwd_bits");
  EXPECT_EQ(resumed.back()["step"].get<int64_t>(), 39);
  EXPECT_NE(slurp(tmp.file("c3.err")).find("resumed at step"), std::string::npos);
  EXPECT_TRUE(file_exists(killed + "/server_adapter/adapter_model.safetensors"));
  EXPECT_TRUE(server.alive());
  EXPECT_NE(slurp(tmp.file("server.err")).find("dropped after step"), std::string::npos)
      << slurp(tmp.file("server.err"));

  // 3. Another split: refused at the handshake, naming it.
  {
    Process client(client_args(tmp.file("wrong"), "5", "1"), tmp.file("c4.out"), tmp.file("c4.err"));
    EXPECT_EQ(client.wait(), 2);
  }
  EXPECT_NE(slurp(tmp.file("c4.err")).find("split"), std::string::npos) << slurp(tmp.file("c4.err"));
  EXPECT_TRUE(server.alive());

  server.signal(SIGTERM);
  EXPECT_EQ(server.wait(), 0) << slurp(tmp.file("server.err"));
}

}  // namespace
}  // namespace amaq
