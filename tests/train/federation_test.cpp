// SplitFed on one server (--federation): the members share one server side and average their client
// sides. One member trains exactly as a normal run; two members on the same data train exactly as one
// run (g/2 + g/2 = g); two members on different data end with the same adapters on both sides.
#include "train/federation.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <thread>

#include "core/fs.h"
#include "core/safetensors.h"
#include "testing.h"
#include "train/options.h"
#include "train/run_testing.h"
#include "train/session.h"

namespace amaq::train {
namespace {

TEST(FederationAverage, OneMemberIsItselfAndMoreAreTheWeightedSum) {
  torch::manual_seed(3);
  const std::map<std::string, at::Tensor> a{{"x", at::randn({4, 3})}, {"y", at::randn({5})}},
      b{{"x", at::randn({4, 3})}, {"y", at::randn({5})}}, c{{"x", at::randn({4, 3})}, {"y", at::randn({5})}};
  const auto one = weighted_average({a}, {1.0});
  for (const auto& [k, t] : a) {
    EXPECT_TRUE(at::equal(one.at(k), t)) << k;
    EXPECT_NE(one.at(k).data_ptr(), t.data_ptr()) << k;  // a copy: the member's tensor is not shared
  }
  const auto same = weighted_average({a, a}, {0.5, 0.5});
  for (const auto& [k, t] : a) EXPECT_TRUE(at::equal(same.at(k), t)) << k;  // exact: halving is exact
  const std::vector<double> w{0.2, 0.3, 0.5};
  const auto mix = weighted_average({a, b, c}, w);
  for (const auto& [k, t] : a) {
    const at::Tensor expected =
        (a.at(k).to(at::kDouble) * w[0] + b.at(k).to(at::kDouble) * w[1] + c.at(k).to(at::kDouble) * w[2]);
    EXPECT_TRUE(at::allclose(mix.at(k).to(at::kDouble), expected, 1e-6, 1e-6)) << k;
  }
}

TEST(FederationAverage, ScheduleCarriesTheFederationAndRefusesBadNames) {
  ScheduleRequest r{"0123456789abcdef", -1, 2, 16, Schedule{}, "team-a.1", 3};
  const ScheduleRequest back = ScheduleRequest::from_json(r.to_json());
  EXPECT_EQ(back.federation, "team-a.1");
  EXPECT_EQ(back.fed_clients, 3);
  ScheduleRequest plain = r;
  plain.federation.clear();
  EXPECT_FALSE(plain.to_json().contains("federation"));
  EXPECT_EQ(ScheduleRequest::from_json(plain.to_json()).federation, "");
  nlohmann::json j = r.to_json();
  j["federation"]["name"] = "a/b";
  EXPECT_AMAQ_ERROR(ScheduleRequest::from_json(j), "federation name");
  j["federation"] = {{"name", "a"}, {"clients", 0}};
  EXPECT_AMAQ_ERROR(ScheduleRequest::from_json(j), "federation clients");
  j["federation"] = {{"name", "a"}};
  EXPECT_AMAQ_ERROR(ScheduleRequest::from_json(j), "SCHEDULE");
}

ClientConfig fed_config(const testing::TempDir& tmp, const std::string& name, const std::string& federation,
                        int64_t clients) {
  ClientConfig c = base_config(tmp, name);
  c.schedule.steps = 6;
  c.checkpoint_every = 3;
  c.federation = federation;
  c.fed_clients = clients;
  c.fed_every = 2;
  return c;
}

std::string server_root(const std::string& server_dir, const ClientConfig& c) {
  return join_path(server_dir, run_id_of(c.run_dir));
}

std::map<std::string, at::Tensor> adapter_of(const ClientConfig& c) {
  return load_safetensors(join_path(c.run_dir, "server_adapter/adapter_model.safetensors"));
}

void expect_same_tensors(const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [k, t] : a) EXPECT_TRUE(at::equal(t, b.at(k))) << k;
}

// Two members of federation `name` with `normal`'s data and seed, on a server `sc` (normal's, its
// run directory aside): each trains exactly as `expected`, normal's own run, on both sides.
void expect_two_members_train_as(const testing::TempDir& tmp, const ClientConfig& normal, const RunResult& expected,
                                 ServerConfig sc, const std::string& name) {
  std::vector<ClientConfig> members;
  for (const char* dir : {"m0", "m1"}) {
    ClientConfig c = normal;
    c.run_dir = tmp.file(dir);
    c.federation = name;
    c.fed_clients = 2;
    members.push_back(c);
  }
  sc.run_dir = tmp.file("fed-server");
  TrainServer server(sc);
  std::vector<std::string> errors;
  const std::vector<RunResult> results = run_concurrently(server, members, &errors);
  for (size_t i = 0; i < members.size(); ++i) {
    SCOPED_TRACE(members[i].run_dir);
    ASSERT_EQ(errors[i], "");
    expect_same_steps(expected, results[i]);
    for (int64_t step : {3, 6}) {
      expect_same_checkpoint(normal.run_dir + "/checkpoints", members[i].run_dir + "/checkpoints", step);
      expect_same_checkpoint(server_root(normal.run_dir + "-server", normal), server_root(sc.run_dir, members[i]),
                             step);
    }
    expect_same_tensors(adapter_of(normal), adapter_of(members[i]));
  }
}

// A federation of one (`name`, on a server `sc` made for it) stopped after step 4 and resumed ends as
// `expected`, normal's uninterrupted run.
void expect_member_resumes_as(const testing::TempDir& tmp, const ClientConfig& normal, const RunResult& expected,
                              const std::function<ServerConfig(const ClientConfig&)>& server_of,
                              const std::string& name) {
  ClientConfig fed = normal;
  fed.run_dir = tmp.file("fed");
  fed.federation = name;
  fed.stop_after = 4;  // checkpoints at 3 and 4
  TrainServer server(server_of(fed));
  EXPECT_EQ(run_in_process(server, fed).completed_steps, 4);
  fed.stop_after = -1;
  fed.resume = true;
  const RunResult resumed = run_in_process(server, fed);
  expect_same_steps(expected, resumed);
  expect_same_checkpoint(normal.run_dir + "/checkpoints", fed.run_dir + "/checkpoints", 6);
  expect_same_checkpoint(server_root(normal.run_dir + "-server", normal), server_root(fed.run_dir + "-server", fed), 6);
}

// A federation of one is a normal run: the same losses, bits, evaluation and tensors on both sides.
TEST(Federation, OfOneClientTrainsAsANormalRun) {
  testing::TempDir tmp;
  ClientConfig normal = fed_config(tmp, "normal", "", 1);
  normal.fwd_codec = quant::CodecSpec::parse("amaq:budget=3,decay=4,gran=token");
  normal.bwd_codec = quant::CodecSpec::parse("fixed:bits=6");
  normal.val_fraction = 0.2;
  ClientConfig fed = normal;
  fed.run_dir = tmp.file("fed");
  fed.federation = "solo";
  const SideOptions side = base_config(tmp, "x").side;
  TrainServer a(server_for(normal, side)), b(server_for(fed, side));
  const RunResult ra = run_in_process(a, normal), rb = run_in_process(b, fed);
  ASSERT_EQ(ra.steps.size(), 6u);
  expect_same_steps(ra, rb);
  for (int64_t step : {3, 6}) {
    expect_same_checkpoint(normal.run_dir + "/checkpoints", fed.run_dir + "/checkpoints", step);
    expect_same_checkpoint(server_root(normal.run_dir + "-server", normal), server_root(fed.run_dir + "-server", fed),
                           step);
  }
  expect_same_tensors(adapter_of(normal), adapter_of(fed));
}

// Two members with the same data and seed: each one's gradient is the normal run's, the round's
// weighted sum g/2 + g/2 is g, the average of two equal client sides is that side: both members
// train exactly as the one normal run, and end with the same adapters.
TEST(Federation, TwoClientsOnTheSameDataTrainAsOneNormalRun) {
  testing::TempDir tmp;
  ClientConfig normal = fed_config(tmp, "normal", "", 1);
  normal.fwd_codec = quant::CodecSpec::parse("fixed:bits=4");
  normal.bwd_codec = quant::CodecSpec::parse("fixed:bits=8");
  const SideOptions side = base_config(tmp, "x").side;
  TrainServer alone(server_for(normal, side));
  const RunResult expected = run_in_process(alone, normal);

  expect_two_members_train_as(tmp, normal, expected, server_for(normal, side), "pair");
}

// Two members on different data: their client sides are averaged at the end, and they share the
// server side, so both end with the same adapters on both sides, which neither run alone reaches.
TEST(Federation, TwoClientsOnDifferentDataEndWithTheSameAdapters) {
  testing::TempDir tmp;
  std::string other = corpus();
  std::reverse(other.begin(), other.end());
  testing::write_bytes(tmp.file("other.txt"), other);
  std::vector<ClientConfig> members{fed_config(tmp, "m0", "mixed", 2), fed_config(tmp, "m1", "mixed", 2)};
  members[1].data = tmp.file("other.txt");
  members[1].schedule.seed = 7;
  members[0].schedule.steps = members[1].schedule.steps = 5;  // the last average is at the end, not at an interval
  members[0].checkpoint_every = members[1].checkpoint_every = 0;
  members[1].fwd_codec = quant::CodecSpec::parse("fixed:bits=4");  // codecs are each member's own
  ServerConfig sc = server_for(members[0], base_config(tmp, "x").side);
  sc.client_codecs = true;
  TrainServer server(sc);
  std::vector<std::string> errors;
  const std::vector<RunResult> results = run_concurrently(server, members, &errors);
  ASSERT_EQ(errors[0], "");
  ASSERT_EQ(errors[1], "");
  EXPECT_NE(results[0].steps[0].task_loss, results[1].steps[0].task_loss);  // they did see different data
  expect_same_checkpoint(members[0].run_dir + "/checkpoints", members[1].run_dir + "/checkpoints", 5);
  expect_same_checkpoint(server_root(sc.run_dir, members[0]), server_root(sc.run_dir, members[1]), 5);
  expect_same_tensors(adapter_of(members[0]), adapter_of(members[1]));

  // Alone, the second member ends elsewhere.
  ClientConfig alone = members[1];
  alone.run_dir = tmp.file("alone");
  alone.federation.clear();
  ServerConfig own = server_for(alone, base_config(tmp, "x").side);
  own.client_codecs = true;
  TrainServer dedicated(own);
  run_in_process(dedicated, alone);
  const auto a = load_safetensors(checkpoint_path(alone.run_dir + "/checkpoints", 5) + "/state.safetensors"),
             m = load_safetensors(checkpoint_path(members[1].run_dir + "/checkpoints", 5) + "/state.safetensors");
  bool differs = false;
  for (const auto& [k, t] : a)
    if (k.find("lora_") != std::string::npos) differs |= !at::equal(t, m.at(k));
  EXPECT_TRUE(differs);
}

// A member that drops and resumes rejoins: with one member, whose federation is forgotten when it
// leaves, the run resumes from its own checkpoint and ends exactly as the uninterrupted normal run.
TEST(Federation, AMemberResumesFromItsCheckpointAsANormalRunDoes) {
  testing::TempDir tmp;
  ClientConfig normal = fed_config(tmp, "normal", "", 1);
  const SideOptions side = base_config(tmp, "x").side;
  TrainServer alone(server_for(normal, side));
  const RunResult expected = run_in_process(alone, normal);
  expect_member_resumes_as(
      tmp, normal, expected, [&](const ClientConfig& c) { return server_for(c, side); }, "solo");
}

// U-shaped (--tail-split): a member's gradients are installed around each TAIL_BACKWARD, with
// micro-batches in flight and AMAQ at both cuts (the server's gates at M are each member's own).
// Two members on the same data and seed train exactly as the one normal U-shaped run, on both sides.
ClientConfig ushaped_config(const testing::TempDir& tmp, const std::string& name) {
  ClientConfig c = tail_config(tmp, name);
  c.schedule.steps = 6;
  c.checkpoint_every = 3;
  c.fed_every = 2;
  c.in_flight = 2;
  c.fwd_codec = quant::CodecSpec::parse("amaq:budget=4,decay=4");
  c.bwd_codec = quant::CodecSpec::parse("fixed:bits=8");
  c.tail_fwd_codec = quant::CodecSpec::parse("amaq:budget=4,decay=4,gran=token");
  c.tail_bwd_codec = quant::CodecSpec::parse("fixed:bits=6");
  c.val_fraction = 0.2;
  return c;
}

TEST(Federation, UShapedMembersOnTheSameDataTrainAsOneNormalUShapedRun) {
  testing::TempDir tmp;
  const ClientConfig normal = ushaped_config(tmp, "normal");
  TrainServer alone(tail_server_for(normal));
  const RunResult expected = run_in_process(alone, normal);
  ASSERT_EQ(expected.steps.size(), 6u);

  expect_two_members_train_as(tmp, normal, expected, tail_server_for(normal), "u");
}

// A U-shaped member stopped after step 4 and resumed (its gates at M restored from the server's
// checkpoint) ends as the uninterrupted normal U-shaped run.
TEST(Federation, AUShapedMemberResumesAsANormalUShapedRunDoes) {
  testing::TempDir tmp;
  const ClientConfig normal = ushaped_config(tmp, "normal");
  TrainServer alone(tail_server_for(normal));
  const RunResult expected = run_in_process(alone, normal);
  expect_member_resumes_as(tmp, normal, expected, tail_server_for, "solo-u");
}

// U-shaped members on different data: the head and tail are averaged with the rest of the client
// side, the body is shared, so both end with the same tensors on both sides.
TEST(Federation, UShapedMembersOnDifferentDataEndWithTheSameTensors) {
  testing::TempDir tmp;
  std::string other = corpus();
  std::reverse(other.begin(), other.end());
  testing::write_bytes(tmp.file("other.txt"), other);
  std::vector<ClientConfig> members{tail_config(tmp, "m0"), tail_config(tmp, "m1")};
  for (ClientConfig& c : members) {
    c.schedule.steps = 5;
    c.federation = "mixed-u";
    c.fed_clients = 2;
    c.fed_every = 2;
    c.fwd_codec = c.tail_bwd_codec = quant::CodecSpec::parse("fixed:bits=6");
  }
  members[1].data = tmp.file("other.txt");
  members[1].schedule.seed = 7;
  TrainServer server(tail_server_for(members[0]));
  std::vector<std::string> errors;
  const std::vector<RunResult> results = run_concurrently(server, members, &errors);
  ASSERT_EQ(errors[0], "");
  ASSERT_EQ(errors[1], "");
  EXPECT_NE(results[0].steps[0].task_loss, results[1].steps[0].task_loss);
  expect_same_checkpoint(members[0].run_dir + "/checkpoints", members[1].run_dir + "/checkpoints", 5);
  const std::string sr = members[0].run_dir + "-server";
  expect_same_checkpoint(server_root(sr, members[0]), server_root(sr, members[1]), 5);
  expect_same_tensors(adapter_of(members[0]), adapter_of(members[1]));
  const auto state = load_safetensors(checkpoint_path(members[0].run_dir + "/checkpoints", 5) + "/state.safetensors");
  bool tail_lora = false;  // the tail's layers are among what was averaged
  for (const auto& [k, t] : state)
    tail_lora |= k.find("layers.3.") != std::string::npos && k.find("lora_") != std::string::npos;
  EXPECT_TRUE(tail_lora);
}

// Members out of phase (here: averaging every 2 and every 3 steps; after a resume, any phase) do not
// wait for each other forever: a member waiting for an average sits the server's rounds out.
TEST(Federation, MembersOutOfPhaseBothFinish) {
  testing::TempDir tmp;
  std::vector<ClientConfig> members{fed_config(tmp, "m0", "phase", 2), fed_config(tmp, "m1", "phase", 2)};
  members[1].fed_every = 3;
  ServerConfig sc = server_for(members[0], base_config(tmp, "x").side);
  sc.idle_timeout = std::chrono::seconds(20);  // a deadlock fails the test instead of hanging it
  TrainServer server(sc);
  std::vector<std::string> errors;
  const std::vector<RunResult> results = run_concurrently(server, members, &errors);
  for (size_t i = 0; i < members.size(); ++i) {
    EXPECT_EQ(errors[i], "");
    EXPECT_EQ(results[i].completed_steps, 6);
  }
}

// Members must agree on how many they are; a federation whose other members never come fails
// with a message that says so, rather than waiting forever.
TEST(Federation, DisagreementsAndAbsentMembersAreRefusedByName) {
  testing::TempDir tmp;
  ServerConfig sc = server_for(fed_config(tmp, "x", "", 1), base_config(tmp, "x").side);
  sc.idle_timeout = std::chrono::seconds(3);
  TrainServer server(sc);
  ClientConfig waiting = fed_config(tmp, "waiting", "trio", 3), wrong = fed_config(tmp, "wrong", "trio", 2);
  std::string waiting_error;
  std::thread first([&] {
    try {
      run_in_process(server, waiting);
    } catch (const std::exception& e) {
      waiting_error = e.what();
    }
  });
  // Once the first member computes, it has joined.
  while (server.status().runs.empty() || server.status().runs[0].micro_batches == 0)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(server.status().runs[0].federation, "trio");  // as the status page shows it
  EXPECT_AMAQ_ERROR(run_in_process(server, wrong), "federation trio waits for 3 clients, this run for 2",
                    "same --fed-clients");
  first.join();
  EXPECT_NE(waiting_error.find("federation trio"), std::string::npos) << waiting_error;
  EXPECT_NE(waiting_error.find("did not happen within 3 s"), std::string::npos) << waiting_error;
  EXPECT_NE(waiting_error.find("1 of 3 clients joined"), std::string::npos) << waiting_error;
}

}  // namespace
}  // namespace amaq::train
