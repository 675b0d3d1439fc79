// Entropy-coded scalar quantization (ecsq) and its range-ANS coder: the coder is lossless and comes
// within a hundredth of a bit of the symbols' empirical entropy; the codec's packets decode to the
// sender's copy; on Gaussian data its measured bits per element sit within 0.3 bit of the Gaussian
// rate-distortion bound at 3 and 4 bits (issue 17's goal), against 0.57 for fixed 4-bit with
// ec=zstd; malformed streams are refused by name.
#include "quant/ecsq.h"

#include <c10/util/Half.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <random>

#include "quant/codec.h"
#include "quant/entropy.h"
#include "quant/rans.h"
#include "testing.h"

namespace amaq::quant {
namespace {

double entropy_of(const std::vector<uint64_t>& counts) {
  double n = 0, h = 0;
  for (uint64_t c : counts) n += static_cast<double>(c);
  for (uint64_t c : counts)
    if (c) h -= static_cast<double>(c) / n * std::log2(static_cast<double>(c) / n);
  return h;
}

// Symbols drawn from a geometric-like law over 40 symbols (one of them never drawn).
std::vector<uint16_t> skewed_symbols(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::geometric_distribution<int> geo(0.3);
  std::vector<uint16_t> out(n);
  for (auto& s : out) {
    int v = geo(rng);
    if (v >= 39) v = 39;
    if (v == 7) v = 8;  // 7 never occurs
    s = static_cast<uint16_t>(v);
  }
  return out;
}

TEST(Rans, NormalizedTablesSumToTheScaleAndKeepEverySymbolThatOccurs) {
  const std::vector<uint64_t> counts{0, 1, 5, 1000000, 3, 0, 77};
  const auto f = rans::normalize(counts);
  uint32_t sum = 0;
  for (size_t s = 0; s < f.size(); ++s) {
    sum += f[s];
    EXPECT_EQ(f[s] == 0, counts[s] == 0) << s;
  }
  EXPECT_EQ(sum, rans::kProbScale);
  EXPECT_EQ(rans::normalize({0, 9})[1], rans::kProbScale);  // one symbol takes the whole scale
}

TEST(Rans, IsLosslessAndWithinAHundredthOfABitOfTheEntropy) {
  for (const size_t n : {size_t{1}, size_t{17}, size_t{1} << 20}) {
    std::vector<uint16_t> sym = skewed_symbols(n, n);
    if (n > 1000) sym[n / 3] = 39;  // a symbol seen once: frequency 1, the encoder's special case
    std::vector<uint64_t> counts(40, 0);
    for (uint16_t s : sym) ++counts[s];
    const auto freqs = rans::normalize(counts);
    std::string bytes;
    rans::encode(sym.data(), sym.size(), freqs, &bytes);
    std::vector<uint16_t> back(n);
    rans::Decoder(freqs).decode(bytes, back.data(), n);
    EXPECT_EQ(back, sym) << n;
    if (n < 1000) continue;
    const double coded = 8.0 * static_cast<double>(bytes.size()) / static_cast<double>(n), h = entropy_of(counts);
    std::printf("[ rans ] %zu symbols: entropy %.4f, coded %.4f bits/symbol\n", n, h, coded);
    EXPECT_LT(coded, h + 0.01);
    EXPECT_GE(coded, h - 1e-3);  // nothing codes below the entropy: the measure is honest
  }
}

TEST(Rans, DamagedStreamsAreRefusedOrDecodeToOtherSymbols) {
  const std::vector<uint16_t> sym = skewed_symbols(5000, 3);
  std::vector<uint64_t> counts(40, 0);
  for (uint16_t s : sym) ++counts[s];
  const auto freqs = rans::normalize(counts);
  std::string bytes;
  rans::encode(sym.data(), sym.size(), freqs, &bytes);
  const rans::Decoder dec(freqs);
  std::vector<uint16_t> out(sym.size());
  EXPECT_AMAQ_ERROR(dec.decode(bytes.substr(0, bytes.size() - 1), out.data(), out.size()), "stream");
  EXPECT_AMAQ_ERROR(dec.decode(bytes + "x", out.data(), out.size()), "does not end where it should");
  EXPECT_AMAQ_ERROR(dec.decode(bytes.substr(0, 3), out.data(), out.size()), "3 bytes");
  std::mt19937_64 rng(5);
  int refused = 0;
  for (int trial = 0; trial < 200; ++trial) {
    std::string p = bytes;
    p[rng() % p.size()] ^= static_cast<char>(1 + rng() % 255);
    try {
      dec.decode(p, out.data(), out.size());
      EXPECT_NE(out, sym);  // a changed byte is a changed message
    } catch (const PacketError&) {
      ++refused;
    }
  }
  EXPECT_GT(refused, 150);  // the final state catches almost every change
  std::vector<uint16_t> bad = freqs;
  bad[0] = static_cast<uint16_t>(bad[0] + 1);
  EXPECT_AMAQ_ERROR(rans::Decoder{bad}, "sums to");
}

TEST(Ecsq, PacketsDecodeToTheSendersCopyOnEveryPath) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(8);
  const at::Tensor x = at::randn({3, 70, 64}, gen) * at::rand({3, 70, 1}, gen) * 5;  // token scales differ
  for (const char* text : {"ecsq:bits=1", "ecsq:bits=3", "ecsq:bits=4,rot=hadamard,group=32", "ecsq:bits=8"}) {
    for (const at::ScalarType t : {at::kFloat, at::kBFloat16}) {
      SCOPED_TRACE(std::string(text) + " " + c10::toString(t));
      const CodecSpec spec = CodecSpec::parse(text);
      EXPECT_EQ(CodecSpec::parse(spec.to_string()).to_string(), spec.to_string());
      Codec tx(spec), rx(spec);
      const Encoded e = tx.encode(x.to(t));
      const at::Tensor d = rx.decode(e.packet);
      EXPECT_EQ(d.scalar_type(), t);
      EXPECT_TRUE(at::equal(d, e.decoded));
      // The error is within a step (a value within half a step of its code, the code's level too), times
      // sqrt(group) through a rotation, plus the bf16 rounding.
      PacketHeader h;
      std::memcpy(&h, e.packet.data(), sizeof h);
      const double worst = (d.to(at::kFloat) - x.to(t).to(at::kFloat)).abs().max().item<double>();
      const double bound = spec.hadamard ? h.scale * std::sqrt(32.0) : h.scale;
      EXPECT_LE(worst, bound * 1.0001 + (t == at::kFloat ? 0 : 5e-2 * x.abs().max().item<double>()));
    }
  }
  // An all-zero tensor and an empty one.
  Codec c(CodecSpec::parse("ecsq:bits=4"));
  const at::Tensor z = at::zeros({4, 8});
  EXPECT_TRUE(at::equal(c.decode(c.encode(z).packet), z));
  const at::Tensor empty = at::zeros({0, 8});
  EXPECT_EQ(c.decode(c.encode(empty).packet).numel(), 0);
  EXPECT_AMAQ_ERROR(c.encode(at::full({2, 8}, NAN)), "NaN");
  // A receiver that expects 32 values refuses a packet that declares more, before decoding it.
  EXPECT_AMAQ_ERROR(c.decode(c.encode(at::zeros({5, 8})).packet, at::kCPU, 32), "declares 40 values, more than the 32");
}

// The packet (its step from the tensor's rms included) is the same on one thread as on two, and
// the rms is the documented sum: per 65,536 values their squares in fp32, 16 running sums (value i
// in sum i mod 16) added in order, the chunks added in order in fp64.
TEST(Ecsq, PacketsDoNotDependOnTheThreadCount) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  const at::Tensor x = at::randn({5, 300, 100}, gen) * 3;  // 150,000 values: three chunks, the last short
  const float* p = x.data_ptr<float>();
  double sum = 0;
  for (int64_t c0 = 0; c0 < x.numel(); c0 += 65536) {
    float lanes[16] = {};
    for (int64_t i = c0; i < std::min<int64_t>(x.numel(), c0 + 65536); ++i) {
      const float sq = p[i] * p[i];
      lanes[(i - c0) % 16] += sq;
    }
    float chunk = 0;
    for (float l : lanes) chunk += l;
    sum += chunk;
  }
  EXPECT_EQ(ecsq_rms(p, x.numel()), std::sqrt(sum / static_cast<double>(x.numel())));
  Codec c(CodecSpec::parse("ecsq:bits=4"));
  const std::string two = c.encode(x).packet;
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const std::string one = c.encode(x).packet;
  at::set_num_threads(threads);
  EXPECT_EQ(one, two);
}

// Issue 17's goal: at equal NMSE, within 0.3 bit of the Gaussian bound 0.5 log2(1 / NMSE) at 3 and
// 4 bits, every byte of the packet counted. Beside it, what fixed codes with zstd need.
TEST(Ecsq, MeasuredBitsAreWithinThreeTenthsOfTheGaussianBound) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(4);
  const at::Tensor x = at::randn({4096, 1024}, gen);
  for (const int bits : {3, 4}) {
    Codec c(CodecSpec::parse("ecsq:bits=" + std::to_string(bits)));
    const Encoded e = c.encode(x);
    const double err = testing::nmse(e.decoded, x), bound = 0.5 * std::log2(1.0 / err);
    const double measured = e.bits_per_element();
    std::printf("[ ecsq:bits=%d ] %.4f bits/element at NMSE %.5f; Gaussian bound %.4f (+%.3f)\n", bits, measured, err,
                bound, measured - bound);
    EXPECT_LE(measured - bound, 0.3) << bits;
    EXPECT_NEAR(measured, bits, 0.1) << bits;  // the step puts a Gaussian at about `bits` bits
  }
  if (!entropy_coding_built()) return;
  Codec f(CodecSpec::parse("fixed:bits=4,group=128,ec=zstd"));
  const Encoded e = f.encode(x);
  const double err = testing::nmse(e.decoded, x);
  std::printf("[ fixed:bits=4,group=128,ec=zstd ] %.4f bits/element at NMSE %.5f (+%.3f)\n", e.bits_per_element(), err,
              e.bits_per_element() - 0.5 * std::log2(1.0 / err));
}

// Heavy tails and outlier channels need no range: one step from the RMS, the rare large values go as
// escapes, and the peaked bulk costs few bits. Fixed codes stretch each group's range around its
// outlier: fixed 4-bit with groups of 128 (and zstd) spends more bits for ten times the error. A
// rotation makes the data more Gaussian, whose entropy is the largest for its variance: with ecsq it
// costs bits instead of saving them.
TEST(Ecsq, HeavyTailsCostFewBitsAndRotationDoesNotHelpIt) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(6);
  const at::Tensor x = testing::with_outlier_channels(testing::student_t3({1024, 1024}, gen));
  std::map<std::string, std::pair<double, double>> measured;  // bits/element, NMSE
  for (const char* text : {"ecsq:bits=4", "ecsq:bits=4,rot=hadamard,group=128", "fixed:bits=4,group=128,ec=zstd"}) {
    if (std::string(text).find("zstd") != std::string::npos && !entropy_coding_built()) continue;
    Codec c(CodecSpec::parse(text));
    const Encoded e = c.encode(x);
    measured[text] = {e.bits_per_element(), testing::nmse(e.decoded, x)};
    std::printf("[ %s, Student-t(3) + outlier channels ] %.4f bits/element at NMSE %.5f\n", text, measured[text].first,
                measured[text].second);
    EXPECT_TRUE(at::equal(Codec(CodecSpec::parse(text)).decode(e.packet), e.decoded)) << text;
  }
  const auto plain = measured["ecsq:bits=4"], rotated = measured["ecsq:bits=4,rot=hadamard,group=128"];
  EXPECT_LT(plain.first, 2.5);
  EXPECT_LT(plain.second, 0.01);
  EXPECT_GT(rotated.first, plain.first + 1);  // the same step, about the same error, far more bits
  EXPECT_NEAR(rotated.second, plain.second, 0.5 * plain.second);
  if (measured.count("fixed:bits=4,group=128,ec=zstd")) {
    const auto fixed = measured["fixed:bits=4,group=128,ec=zstd"];
    EXPECT_GT(fixed.first, plain.first);
    EXPECT_GT(fixed.second, 5 * plain.second);
  }
}

TEST(Ecsq, NamedRefusals) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  Codec c(CodecSpec::parse("ecsq:bits=3"));
  const std::string p = c.encode(at::randn({64, 64}, gen)).packet;
  const size_t body = sizeof(PacketHeader) + 2 * 4;  // header, two dims
  auto with = [&](size_t at, auto v) {
    std::string q = p;
    std::memcpy(q.data() + at, &v, sizeof v);
    return q;
  };
  EXPECT_AMAQ_ERROR(c.decode(with(body, uint32_t{8})), "table of 8 codes a side, expected 16");
  uint16_t lo = 0, end = 0;  // the table symbols in use
  std::memcpy(&lo, p.data() + body + 4, 2);
  std::memcpy(&end, p.data() + body + 6, 2);
  ASSERT_LT(lo, end);
  EXPECT_AMAQ_ERROR(c.decode(with(body + 6, uint16_t{40})), "ecsq symbols [");
  EXPECT_AMAQ_ERROR(c.decode(with(body + 8, uint16_t{1})), "sums to");
  const size_t levels = body + 8 + 2 * (end - lo) + 2;  // after the frequencies and the escape's
  EXPECT_AMAQ_ERROR(c.decode(with(levels, c10::Half(0.75f))), "not within half a step");
  EXPECT_AMAQ_ERROR(Codec(CodecSpec::parse("ecsq:bits=3,rot=hadamard,group=64")).encode(at::randn({2, 96}, gen)),
                    "multiple of 64");
}

}  // namespace
}  // namespace amaq::quant
