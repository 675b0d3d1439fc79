// Training message bodies: round trips, and every malformed body refused with the field named.
#include "wire/messages.h"

#include <gtest/gtest.h>

#include <cstring>

namespace amaq::wire {
namespace {

// The bytes the sample FORWARD's views point at.
const int16_t kLabels[6] = {1, 2, 3, -100, 5, 6};
const char kMask[6] = {1, 1, 1, 1, 1, 0};
const std::string kPacket(1000, 'p');

ForwardMsg sample_forward() {
  ForwardMsg m;
  m.step = 1234567890123;
  m.micro_batch = 3;
  m.batch = 2;
  m.seq = 3;
  m.label_type = LabelType::kI16;
  m.labels = std::string_view(reinterpret_cast<const char*>(kLabels), sizeof kLabels);
  m.mask = std::string_view(kMask, sizeof kMask);
  m.sample_ids = {17, 42};
  m.packet = kPacket;
  return m;
}

TEST(Messages, RoundTrip) {
  ForwardMsg f = sample_forward(), g;
  const std::string bytes = f.encode();
  ASSERT_TRUE(ForwardMsg::decode(bytes, &g).ok());
  EXPECT_EQ(g.step, f.step);
  EXPECT_EQ(g.micro_batch, f.micro_batch);
  EXPECT_EQ(g.label_type, LabelType::kI16);
  EXPECT_EQ(g.labels, f.labels);
  EXPECT_EQ(g.mask, f.mask);
  EXPECT_EQ(g.sample_ids, f.sample_ids);
  EXPECT_EQ(g.packet, f.packet);
  // Decoding copies nothing: the views point into the payload.
  EXPECT_GE(g.packet.data(), bytes.data());
  EXPECT_LE(g.packet.data() + g.packet.size(), bytes.data() + bytes.size());
  f.labels = {};
  f.mask = {};
  f.sample_ids.clear();
  const std::string bare = f.encode();
  ASSERT_TRUE(ForwardMsg::decode(bare, &g).ok());
  EXPECT_TRUE(g.labels.empty() && g.mask.empty() && g.sample_ids.empty());
  EXPECT_EQ(g.label_type, LabelType::kNone);

  const std::string grad = "gradient bytes";
  BackwardMsg b{99, 1, 2.5f, 0.125, 0.5f, 0.25f, 0.0625f, grad}, b2;
  const std::string bb = b.encode();
  ASSERT_TRUE(BackwardMsg::decode(bb, &b2).ok());
  EXPECT_EQ(b2.step, 99u);
  EXPECT_EQ(b2.loss, 2.5f);
  EXPECT_EQ(b2.grad_sq_norm, 0.125);
  EXPECT_EQ(b2.server_seconds, 0.5f);
  EXPECT_EQ(b2.server_codec_seconds, 0.25f);
  EXPECT_EQ(b2.forward_arrival_seconds, 0.0625f);
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
  bad_mask[24 + 6 * 2] = 7;  // first mask byte, after six i16 labels
  EXPECT_NE(ForwardMsg::decode(bad_mask, &m).message.find("mask values"), std::string::npos);
  std::string bad_type = good;
  bad_type[20] = 9;  // label_type
  EXPECT_NE(ForwardMsg::decode(bad_type, &m).message.find("label_type"), std::string::npos);
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

TEST(Messages, NarrowestLabelTypeHoldsTheVocabulary) {
  // -100 (ignore) and vocab_size - 1 must fit: the bounds of each signed type.
  EXPECT_EQ(narrowest_label_type(128), LabelType::kI8);
  EXPECT_EQ(narrowest_label_type(129), LabelType::kI16);
  EXPECT_EQ(narrowest_label_type(32768), LabelType::kI16);
  EXPECT_EQ(narrowest_label_type(32769), LabelType::kI32);
  EXPECT_EQ(narrowest_label_type(128256), LabelType::kI32);
  EXPECT_EQ(label_bytes(LabelType::kI32), 4u);
}

TEST(Messages, DefaultFrameLimitFitsAForward) {
  const uint64_t limit = max_payload_for(8, 512, 4096);
  ForwardMsg m;
  m.batch = 8;
  m.seq = 512;
  const std::string labels(8 * 512 * 8, '\1'), mask(8 * 512, '\1');
  const std::string packet(size_t{8} * 512 * 4096 * 4 + 4096, 'x');  // fp32 activations plus a packet header
  m.label_type = LabelType::kI64;
  m.labels = labels;
  m.mask = mask;
  m.sample_ids.assign(8, 0);
  m.packet = packet;
  EXPECT_LE(m.encode().size(), limit);
  EXPECT_LT(limit, uint64_t{80} << 20);
}

}  // namespace
}  // namespace amaq::wire
