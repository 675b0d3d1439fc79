// Codecs: fast == ref on the packed bytes, decode(encode(x)) == the sender's value, named error
// budgets, bytes accounting, and the bit map sent only when it changed.
#include "quant/codec.h"

#include <c10/util/Half.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "quant/bitpack.h"
#include "testing.h"

namespace amaq::quant {
namespace {

// Largest normalised MSE, E|x - x'|^2 / E|x|^2, of per-group (g = 128) round-to-nearest fixed
// quantization on N(0, 1) data: uniform quantization over a group's ~5.2-sigma range predicts
// 2.25 / (2^b - 1)^2 for b >= 2 (measured 0.251, 0.0461, 0.00997, ... 3.46e-5); the budgets allow
// 30% above the measured figures. 1 bit is worse than sending zeros (NMSE 3.6): min/max with two
// levels maps every value to an extreme of its group.
constexpr double kMaxNmseGaussian[9] = {0, 4.7, 0.33, 0.061, 0.0135, 0.0032, 7.7e-4, 1.9e-4, 4.7e-5};
// The same on Student-t (3 dof) data with 1% of channels scaled by 50 (outlier channels): about
// four times worse per group at every width, which is what AMAQ's per-channel bits are for.
constexpr double kMaxNmseHeavy[9] = {0, 5.7, 1.1, 0.24, 0.067, 0.017, 0.0039, 9.3e-4, 2.4e-4};

EncodeArgs with_bits(const at::Tensor& bits) {
  EncodeArgs a;
  a.bits = bits;
  return a;
}

EncodeArgs seeded(uint64_t seed) {
  EncodeArgs a;
  a.seed = seed;
  return a;
}

at::Tensor gaussian(at::Generator& gen) {
  return at::randn({4, 64, 512}, gen);
}

at::Tensor heavy_tailed(at::Generator& gen) {
  const at::Tensor t = testing::student_t3({4, 64, 512}, gen);
  at::Tensor gain = at::ones({512});
  for (int64_t c : {3, 100, 257, 400, 511}) gain[c] = 50;
  return t * gain;
}

CodecSpec fixed_spec(int bits, Granularity g = Granularity::kGroup, Rounding r = Rounding::kNearest) {
  CodecSpec s = CodecSpec::parse("fixed:bits=" + std::to_string(bits));
  s.granularity = g;
  s.rounding = r;
  return s;
}

TEST(Codec, FixedErrorBudgetsPerBitWidthAndMonotone) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1);
  at::Tensor xs[2] = {gaussian(gen), heavy_tailed(gen)};
  const double* budgets[2] = {kMaxNmseGaussian, kMaxNmseHeavy};
  for (int d = 0; d < 2; ++d) {
    double prev = 1e9;
    for (int b = 1; b <= 8; ++b) {
      Codec codec(fixed_spec(b));
      double e = testing::nmse(codec.decode(codec.encode(xs[d]).packet), xs[d]);
      std::printf("  %s %d-bit NMSE %.3g\n", d ? "heavy" : "gauss", b, e);
      EXPECT_LT(e, budgets[d][b]) << (d ? "heavy-tailed" : "gaussian") << " at " << b << " bits";
      EXPECT_LT(e, prev) << "error must fall with every extra bit";
      prev = e;
    }
  }
}

TEST(Codec, FastEqualsRefOnPacketsForEveryAffineVariant) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(2);
  at::Tensor x = heavy_tailed(gen).narrow(2, 0, 301).contiguous();  // odd channel count
  for (auto gran : {Granularity::kToken, Granularity::kChannel, Granularity::kGroup}) {
    for (auto round : {Rounding::kNearest, Rounding::kStochastic}) {
      for (int b : {1, 3, 4, 8}) {
        CodecSpec s = fixed_spec(b, gran, round);
        s.group = 64;
        Codec ref(s, Impl::kRef), fast(s, Impl::kFast);
        Encoded er = ref.encode(x, seeded(99)), ef = fast.encode(x, seeded(99));
        ASSERT_EQ(er.packet, ef.packet) << s.to_string();
        ASSERT_TRUE(at::equal(er.decoded, ef.decoded));
        ASSERT_TRUE(at::equal(ref.decode(ef.packet), fast.decode(er.packet)));
      }
    }
  }
  CodecSpec a = CodecSpec::parse("amaq:budget=4,group=32");
  Codec ref(a, Impl::kRef), fast(a, Impl::kFast);
  for (int k = 0; k < 3; ++k) {
    at::Tensor bits = at::randint(2, 9, {301}, gen, at::kByte);
    Encoded er = ref.encode(x, with_bits(bits)), ef = fast.encode(x, with_bits(bits));
    ASSERT_EQ(er.packet, ef.packet);
  }
  // Ranges that end at a zero (its sign is the first zero's, in order) and ranges of one value
  // (step 0): the fast path's vector lanes and selects still write the reference's bytes.
  at::Tensor z = at::rand({4, 16, 301}, gen).contiguous();
  float* zp = z.data_ptr<float>();
  for (int64_t i = 0; i < z.numel(); i += 7) zp[i] = (i / 7) % 3 ? -0.0f : 0.0f;
  z[1].fill_(0.25f);
  z[2].neg_();
  for (auto gran : {Granularity::kToken, Granularity::kGroup}) {
    for (int b : {1, 4, 8}) {
      CodecSpec s = fixed_spec(b, gran, Rounding::kNearest);
      s.group = 64;
      Codec ref(s, Impl::kRef), fast(s, Impl::kFast);
      Encoded er = ref.encode(z, seeded(5)), ef = fast.encode(z, seeded(5));
      ASSERT_EQ(er.packet, ef.packet) << s.to_string();
      ASSERT_TRUE(at::equal(er.decoded, ef.decoded)) << s.to_string();
    }
  }
}

TEST(Codec, ReceiverDecodesExactlyTheSendersValue) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  at::Tensor x = heavy_tailed(gen);
  std::vector<std::string> specs = {"none:fp32",
                                    "none:bf16",
                                    "none:fp16",
                                    "fixed:bits=3,gran=token",
                                    "fixed:bits=2,gran=channel",
                                    "fixed:bits=4,group=128,round=stochastic",
                                    "amaq:budget=3"};
  for (const auto& text : specs) {
    Codec sender(CodecSpec::parse(text)), receiver(CodecSpec::parse(text));
    EncodeArgs args;
    if (text.rfind("amaq", 0) == 0) args.bits = at::randint(2, 9, {512}, gen, at::kByte);
    for (auto dtype : {at::kFloat, at::kBFloat16}) {
      at::Tensor xin = x.to(dtype);
      Encoded e = sender.encode(xin, args);
      at::Tensor got = receiver.decode(e.packet);
      EXPECT_EQ(got.scalar_type(), dtype) << text;
      EXPECT_TRUE(at::equal(got, e.decoded)) << text;
      if (text == "none:fp32") {
        EXPECT_TRUE(at::equal(got, xin));
      }
      if (text == "none:bf16") {
        EXPECT_TRUE(at::equal(got, xin.to(at::kBFloat16).to(dtype)));
      }
    }
  }
}

// A sender that does not need the dequantized value (the server's gradients, evaluation) skips it:
// the packet is the same bytes, and the codec state (AMAQ's map, AQ-SGD's memories) moves the same.
TEST(Codec, SkippingTheDecodedCopyChangesNoByte) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  for (const char* text : {"none:bf16", "fixed:bits=3,gran=token", "amaq:budget=3", "aqsgd:bits=4"}) {
    Codec with(CodecSpec::parse(text)), without(CodecSpec::parse(text)), receiver(CodecSpec::parse(text));
    EncodeArgs args;
    args.sample_ids = {4, 9};
    if (std::string(text).rfind("amaq", 0) == 0) args.bits = at::randint(2, 9, {64}, gen, at::kByte);
    for (int round = 0; round < 3; ++round) {  // AQ-SGD: a full pass, then deltas
      const at::Tensor x = at::randn({2, 5, 64}, gen);
      EncodeArgs skip = args;
      skip.want_decoded = false;
      const Encoded a = with.encode(x, args), b = without.encode(x, skip);
      EXPECT_EQ(a.packet, b.packet) << text << " round " << round;
      EXPECT_FALSE(b.decoded.defined()) << text;
      EXPECT_TRUE(at::equal(receiver.decode(b.packet), a.decoded)) << text << " round " << round;
    }
  }
}

TEST(Codec, EncodedBytesAreWhatTheFormatImplies) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(4);
  at::Tensor x = at::randn({2, 10, 300}, gen);
  const int64_t header = sizeof(PacketHeader) + 3 * 4;
  Codec none(CodecSpec::parse("none:bf16"));
  EXPECT_EQ(none.encode(x).packet.size(), size_t(header + 6000 * 2));
  Codec fixed(CodecSpec::parse("fixed:bits=3,group=128"));
  const int64_t groups = 20 * 3;  // 20 tokens x ceil(300 / 128)
  EXPECT_EQ(fixed.encode(x).packet.size(), size_t(header + groups * 4 + (6000 * 3 + 7) / 8));
  Codec amaq(CodecSpec::parse("amaq:budget=3,group=128"));
  at::Tensor bits = at::randint(2, 9, {300}, gen, at::kByte);
  int64_t sum = bits.to(at::kLong).sum().item<int64_t>();
  Encoded first = amaq.encode(x, with_bits(bits));
  EXPECT_EQ(first.packet.size(), size_t(header + 150 + groups * 4 + (20 * sum + 7) / 8));
  EXPECT_NEAR(first.bits_per_element(), 8.0 * first.packet.size() / 6000, 1e-12);
}

TEST(Codec, AmaqSendsTheBitMapOnlyWhenItChanges) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  CodecSpec s = CodecSpec::parse("amaq:budget=4");
  Codec sender(s), receiver(s), late_receiver(s);
  at::Tensor x = at::randn({2, 8, 64}, gen), bits = at::randint(2, 9, {64}, gen, at::kByte);
  Encoded a = sender.encode(x, with_bits(bits));
  Encoded b = sender.encode(x, with_bits(bits));
  EXPECT_EQ(a.packet.size(), b.packet.size() + 32);  // 64 channels x 4 bits
  PacketHeader ha, hb;
  std::memcpy(&ha, a.packet.data(), sizeof ha);
  std::memcpy(&hb, b.packet.data(), sizeof hb);
  EXPECT_TRUE(ha.flags & kFlagBitMap);
  EXPECT_FALSE(hb.flags & kFlagBitMap);
  EXPECT_EQ(ha.map_id, hb.map_id);
  EXPECT_TRUE(at::equal(receiver.decode(a.packet), a.decoded));
  EXPECT_TRUE(at::equal(receiver.decode(b.packet), b.decoded));
  // A receiver that missed the map cannot silently use a wrong one.
  EXPECT_THROW(late_receiver.decode(b.packet), PacketError);
  bits[0] = bits[0].item<int>() == 8 ? 7 : 8;
  Encoded c = sender.encode(x, with_bits(bits));
  PacketHeader hc;
  std::memcpy(&hc, c.packet.data(), sizeof hc);
  EXPECT_TRUE(hc.flags & kFlagBitMap);
  EXPECT_EQ(hc.map_id, ha.map_id + 1);
  EXPECT_TRUE(at::equal(receiver.decode(c.packet), c.decoded));
}

TEST(Codec, MixedBitsFollowTheMapChannelByChannel) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(6);
  at::Tensor x = at::randn({1, 256, 8}, gen);
  at::Tensor bits = at::tensor({2, 8, 2, 8, 2, 8, 2, 8}, at::kByte);
  CodecSpec s = CodecSpec::parse("amaq:budget=5,gran=channel");
  Codec c(s);
  at::Tensor err = (c.encode(x, with_bits(bits)).decoded - x).pow(2).mean(at::IntArrayRef{0, 1});  // per channel
  for (int k = 0; k < 8; k += 2) EXPECT_GT(err[k].item<double>(), 100 * err[k + 1].item<double>()) << "channel " << k;
}

TEST(Codec, NanActivationsAreRefusedWithACause) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  at::Tensor x = at::randn({2, 4, 8}, gen);
  x[1][2][3] = std::numeric_limits<float>::quiet_NaN();
  Codec c(CodecSpec::parse("fixed:bits=4"));
  EXPECT_AMAQ_ERROR(c.encode(x), "1 NaN/Inf", "flat index 51");
}

TEST(Codec, ScalesSurviveValuesOutsideFp16Range) {
  // Gradients far below fp16's smallest normal and activations far above its largest value.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(12);
  for (double mag : {1e-9, 1e6}) {
    at::Tensor x = at::randn({2, 16, 64}, gen) * mag;
    Codec c(CodecSpec::parse("fixed:bits=8,group=64"));
    EXPECT_LT(testing::nmse(c.decode(c.encode(x).packet), x), kMaxNmseGaussian[8]) << mag;
  }
}

TEST(CodecSpec, ParsesAndRefuses) {
  EXPECT_EQ(CodecSpec::parse("fixed:bits=3,group=64").to_string(), "fixed:bits=3,gran=group,group=64,round=nearest");
  EXPECT_EQ(CodecSpec::parse(CodecSpec::parse("amaq:budget=2.5,bmin=1").to_string()).to_string(),
            CodecSpec::parse("amaq:budget=2.5,bmin=1").to_string());
  EXPECT_AMAQ_ERROR(CodecSpec::parse("fixed:bits=9"), "bits=9");
  EXPECT_AMAQ_ERROR(CodecSpec::parse("zstd:level=3"), "unknown codec 'zstd'");
  EXPECT_AMAQ_ERROR(CodecSpec::parse("amaq:budget=1,bmin=2"), "budget 1");
  EXPECT_AMAQ_ERROR(CodecSpec::parse("amaq:bits=4"), "'bits' is not an option of amaq");
  EXPECT_AMAQ_ERROR(CodecSpec::parse("aqsgd:bits=1"), "bits=1");

  // budget=auto starts at init, with a floor of 3 unless given, and keeps "auto" in its canonical form.
  const CodecSpec a = CodecSpec::parse("amaq:budget=auto,init=7");
  EXPECT_TRUE(a.auto_budget);
  EXPECT_EQ(a.budget, 7);
  EXPECT_EQ(a.budget_floor, 3);
  const CodecSpec f = CodecSpec::parse(CodecSpec::parse("amaq:budget=auto,floor=4.5,bmin=4").to_string());
  EXPECT_TRUE(f.auto_budget);
  EXPECT_EQ(f.budget_floor, 4.5);
  EXPECT_NE(f.to_string().find("budget=auto,floor=4.5"), std::string::npos) << f.to_string();
  EXPECT_EQ(CodecSpec::parse("amaq:budget=auto,bmin=5").budget_floor, 5);
  EXPECT_AMAQ_ERROR(CodecSpec::parse("amaq:budget=4,floor=3"), "floor", "budget=auto");
  EXPECT_AMAQ_ERROR(CodecSpec::parse("amaq:budget=auto,floor=1,bmin=2"), "floor 1");
}

// fixed:map=FILE (the random-map ablation): widths per channel from a file, optionally shuffled with
// the histogram kept; its packets decode exactly as amaq's with the same map, and the map travels once.
TEST(CodecSpec, FixedMapFromAFileShuffledWithItsHistogram) {
  testing::TempDir tmp;
  std::vector<int> widths;
  for (int c = 0; c < 64; ++c) widths.push_back(c < 8 ? 8 : c < 24 ? 4 : 2);
  testing::write_bytes(tmp.file("map.json"), nlohmann::json(widths).dump());
  const CodecSpec plain = CodecSpec::parse("fixed:map=" + tmp.file("map.json") + ",gran=token");
  EXPECT_EQ(std::vector<int>(plain.map.begin(), plain.map.end()), widths);
  EXPECT_DOUBLE_EQ(plain.nominal_bits(), (8 * 8 + 16 * 4 + 40 * 2) / 64.0);
  const CodecSpec shuffled = CodecSpec::parse("fixed:map=" + tmp.file("map.json") + ",shuffle=3,gran=token");
  // The handshake's form names the widths by their hash, not the file: a copy elsewhere agrees, an
  // edited file under the same name does not, and the shuffle is in the widths.
  EXPECT_EQ(shuffled.to_string().rfind("fixed:map=sha256:", 0), 0u) << shuffled.to_string();
  EXPECT_EQ(shuffled.to_string().find(tmp.file("map.json")), std::string::npos);
  testing::write_bytes(tmp.file("copy.json"), nlohmann::json(widths).dump());
  EXPECT_EQ(CodecSpec::parse("fixed:map=" + tmp.file("copy.json") + ",shuffle=3,gran=token").to_string(),
            shuffled.to_string());
  EXPECT_NE(plain.to_string(), CodecSpec::parse("fixed:map=" + tmp.file("map.json") + ",gran=group").to_string());
  EXPECT_NE(plain.to_string(), shuffled.to_string());
  std::vector<int> edited = widths;
  edited[0] = 7;
  testing::write_bytes(tmp.file("copy.json"), nlohmann::json(edited).dump());
  EXPECT_NE(CodecSpec::parse("fixed:map=" + tmp.file("copy.json") + ",gran=token").to_string(), plain.to_string());
  EXPECT_EQ(CodecSpec::parse("fixed:map=" + tmp.file("map.json") + ",shuffle=3,gran=token").map,
            shuffled.map);  // deterministic
  EXPECT_NE(shuffled.map, plain.map);
  auto sorted = [](std::vector<uint8_t> v) {
    std::sort(v.begin(), v.end());
    return v;
  };
  EXPECT_EQ(sorted(shuffled.map), sorted(plain.map));

  auto gen = at::make_generator<at::CPUGeneratorImpl>(4);
  const at::Tensor x = at::randn({2, 5, 64}, gen);
  Codec tx(shuffled), rx(shuffled), amaq_rx(CodecSpec::parse("amaq:budget=4,gran=token"));
  Codec amaq_tx(CodecSpec::parse("amaq:budget=4,gran=token"));
  EncodeArgs a;
  a.bits = at::from_blob(const_cast<uint8_t*>(shuffled.map.data()), {64}, at::kByte).clone();
  const Encoded first = tx.encode(x), second = tx.encode(x);
  EXPECT_EQ(first.packet.size(), second.packet.size() + 32);  // the 4-bit map, once
  EXPECT_TRUE(at::equal(rx.decode(first.packet), amaq_rx.decode(amaq_tx.encode(x, a).packet)));
  EXPECT_TRUE(at::equal(rx.decode(second.packet), first.decoded));

  EXPECT_AMAQ_ERROR(Codec(shuffled).encode(at::randn({2, 32}, gen)), "64 widths", "32 channels");
  EXPECT_AMAQ_ERROR(CodecSpec::parse("fixed:shuffle=1"), "shuffle needs map");
  EXPECT_AMAQ_ERROR(CodecSpec::parse("fixed:map=" + tmp.file("none.json")), "does not exist");
  testing::write_bytes(tmp.file("bad.json"), "[4, 9]");
  EXPECT_AMAQ_ERROR(CodecSpec::parse("fixed:map=" + tmp.file("bad.json")), "9", "1..8");
}

}  // namespace
}  // namespace amaq::quant

namespace amaq::quant {
namespace {

// Gradient-like input (small values, a few large) with a mixed 6-8 bit map per token: every element
// within half a step of its channel's grid, as the receiver decodes it.
TEST(Codec, MixedMapOnSmallGradientsStaysWithinHalfAStep) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  at::Tensor x = at::randn({32, 22, 128}, gen) * 1e-4;
  x.select(2, 7).mul_(50);
  at::Tensor bits = at::randint(6, 9, {128}, gen, at::kByte);
  CodecSpec s = CodecSpec::parse("amaq:budget=7,bmin=6,gran=token");
  Codec sender(s), receiver(s);
  Encoded e = sender.encode(x, with_bits(bits));
  at::Tensor got = receiver.decode(e.packet);
  ASSERT_TRUE(at::equal(got, e.decoded));
  at::Tensor xr = x.reshape({-1, 128});
  at::Tensor range = std::get<0>(xr.max(1, true)) - std::get<0>(xr.min(1, true));  // (rows, 1)
  at::Tensor step = range / (at::pow(2.0, bits.to(at::kFloat)) - 1);               // (rows, C)
  at::Tensor err = (got.reshape({-1, 128}) - xr).abs();
  EXPECT_LE((err / step).max().item<double>(), 0.51 + 1e-3);
}

}  // namespace
}  // namespace amaq::quant
