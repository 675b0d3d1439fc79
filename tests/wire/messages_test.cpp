// Training message bodies: round trips, and every malformed body refused with the field named.
#include <gtest/gtest.h>

#include <cstring>

#include "wire/messages.h"

namespace amaq::wire {
namespace {

ForwardMsg sample_forward() {
  ForwardMsg m;
  m.step = 1234567890123;
  m.micro_batch = 3;
  m.batch = 2;
  m.seq = 3;
  m.labels = {1, 2, 3, -100, 5, 6};
  m.mask = {1, 1, 1, 1, 1, 0};
  m.sample_ids = {17, 42};
  m.packet = std::string(1000, 'p');
  return m;
}

TEST(Messages, RoundTrip) {
  ForwardMsg f = sample_forward(), g;
  ASSERT_TRUE(ForwardMsg::decode(f.encode(), &g).ok());
  EXPECT_EQ(g.step, f.step);
  EXPECT_EQ(g.micro_batch, f.micro_batch);
  EXPECT_EQ(g.labels, f.labels);
  EXPECT_EQ(g.mask, f.mask);
  EXPECT_EQ(g.sample_ids, f.sample_ids);
  EXPECT_EQ(g.packet, f.packet);
  f.labels.clear();
  f.mask.clear();
  f.sample_ids.clear();
  ASSERT_TRUE(ForwardMsg::decode(f.encode(), &g).ok());
  EXPECT_TRUE(g.labels.empty() && g.mask.empty() && g.sample_ids.empty());

  BackwardMsg b{99, 1, 2.5f, 0.125, 0.5f, "gradient bytes"}, b2;
  ASSERT_TRUE(BackwardMsg::decode(b.encode(), &b2).ok());
  EXPECT_EQ(b2.step, 99u);
  EXPECT_EQ(b2.loss, 2.5f);
  EXPECT_EQ(b2.grad_sq_norm, 0.125);
  EXPECT_EQ(b2.server_seconds, 0.5f);
  EXPECT_EQ(b2.packet, b.packet);
  ControlMsg c{ControlKind::kBitSync, R"({"budget":3.5})", ""}, c2;
  ASSERT_TRUE(ControlMsg::decode(c.encode(), &c2).ok());
  EXPECT_EQ(c2.kind, ControlKind::kBitSync);
  EXPECT_EQ(c2.json, c.json);
  EXPECT_TRUE(c2.blob.empty());
  ControlMsg d{ControlKind::kCheckpoint, R"({"step":4})", std::string("\0adapter\xff", 9)}, d2;
  ASSERT_TRUE(ControlMsg::decode(d.encode(), &d2).ok());
  EXPECT_EQ(d2.json, d.json);
  EXPECT_EQ(d2.blob, d.blob);

  EvalResultMsg e{7, {{1.5, 3, 2}, {0.25, 1, 1}}}, e2;
  ASSERT_TRUE(EvalResultMsg::decode(e.encode(), &e2).ok());
  EXPECT_EQ(e2.step, 7u);
  ASSERT_EQ(e2.rows.size(), 2u);
  EXPECT_EQ(e2.rows[0].nll_sum, 1.5);
  EXPECT_EQ(e2.rows[1].tokens, 1u);
  EXPECT_EQ(e2.rows[0].correct, 2u);
}

TEST(Messages, MalformedBodiesNameTheField) {
  const std::string good = sample_forward().encode();
  ForwardMsg m;
  for (size_t n = 0; n < good.size(); ++n) EXPECT_FALSE(ForwardMsg::decode(good.substr(0, n), &m).ok()) << n;
  std::string huge = good;
  const uint32_t big = 0xFFFFFFFF;
  std::memcpy(huge.data() + 12, &big, 4);  // batch = 2^32 - 1: labels cannot fit
  Status s = ForwardMsg::decode(huge, &m);
  EXPECT_EQ(s.code, ErrorCode::kBadMessage);
  EXPECT_NE(s.message.find("labels"), std::string::npos) << s.message;
  std::string bad_mask = good;
  bad_mask[24 + 48] = 7;  // first mask byte
  EXPECT_NE(ForwardMsg::decode(bad_mask, &m).message.find("mask values"), std::string::npos);
  EXPECT_NE(ForwardMsg::decode(good + "x", &m).message.find("packet"), std::string::npos);
  ControlMsg c;
  EXPECT_FALSE(ControlMsg::decode(std::string("\x09\x00\x00\x00\x00\x00\x00\x00", 8), &c).ok());
  ControlMsg too_long{ControlKind::kSchedule, "{}", ""};
  std::string cl = too_long.encode();
  cl[4] = 50;  // json_len past the end
  EXPECT_NE(ControlMsg::decode(cl, &c).message.find("json_len"), std::string::npos);
  BackwardMsg b;
  EXPECT_FALSE(BackwardMsg::decode("short", &b).ok());
  EvalResultMsg e;
  const std::string eval = EvalResultMsg{1, {{1.0, 2, 3}}}.encode();  // correct > tokens
  EXPECT_NE(EvalResultMsg::decode(eval, &e).message.find("correct"), std::string::npos);
  EXPECT_NE(EvalResultMsg::decode(eval.substr(0, eval.size() - 1), &e).message.find("rows"), std::string::npos);
}

TEST(Messages, DefaultFrameLimitFitsAForward) {
  const uint64_t limit = max_payload_for(8, 512, 4096);
  ForwardMsg m;
  m.batch = 8;
  m.seq = 512;
  m.labels.assign(8 * 512, 1);
  m.mask.assign(8 * 512, 1);
  m.sample_ids.assign(8, 0);
  m.packet.assign(size_t{8} * 512 * 4096 * 4 + 4096, 'x');  // fp32 activations plus a packet header
  EXPECT_LE(m.encode().size(), limit);
  EXPECT_LT(limit, uint64_t{80} << 20);
}

}  // namespace
}  // namespace amaq::wire
