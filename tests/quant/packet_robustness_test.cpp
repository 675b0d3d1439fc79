// Malformed packets: every one refused with a PacketError naming the cause, none read out of
// bounds. Built twice: in the unit tests and, under AddressSanitizer + UBSan, as amaq_asan_tests.
#include <gtest/gtest.h>

#include <random>

#include "quant/codec.h"
#include "quant/entropy.h"

namespace amaq::quant {
namespace {

struct Case {
  std::string spec;
  std::string packet;
};

std::vector<Case> valid_packets() {
  std::vector<Case> out;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  at::Tensor x = at::randn({2, 5, 37}, gen);
  for (std::string s : {"none:bf16", "fixed:bits=3,group=16", "fixed:bits=5,gran=channel", "amaq:budget=4,group=8"}) {
    Codec c(CodecSpec::parse(s));
    EncodeArgs a;
    a.bits = at::randint(2, 9, {37}, gen, at::kByte);
    out.push_back({s, c.encode(x, a).packet});
  }
  // Entropy-coded codes (large enough that zstd shrinks them) and rotated groups.
  const at::Tensor y = at::randn({4, 64, 32}, gen);
  for (std::string s : {"fixed:bits=3,gran=token,ec=zstd", "amaq:budget=4,group=8,rot=hadamard,ec=zstd"}) {
    if (s.find("ec=zstd") != std::string::npos && !entropy_coding_built()) continue;
    Codec c(CodecSpec::parse(s));
    EncodeArgs a;
    a.bits = at::randint(2, 9, {32}, gen, at::kByte);
    out.push_back({s, c.encode(y, a).packet});
    EXPECT_TRUE(out.back().packet[7] & kFlagEntropy) << s;
  }
  // Entropy-coded scalar quantization, plain and rotated.
  for (const auto& [s, t] :
       {std::pair<std::string, at::Tensor>{"ecsq:bits=3", x}, {"ecsq:bits=4,rot=hadamard,group=8", y}}) {
    Codec c(CodecSpec::parse(s));
    out.push_back({s, c.encode(t).packet});
  }
  // Non-uniform levels: NormalFloat on tokens, a fitted codebook on rotated groups with zstd.
  for (const auto& [s, t] : {std::pair<std::string, at::Tensor>{"fixed:bits=3,levels=nf,gran=token", x},
                             {"fixed:bits=4,levels=lloyd,group=8,rot=hadamard,ec=zstd", y}}) {
    if (s.find("ec=zstd") != std::string::npos && !entropy_coding_built()) continue;
    Codec c(CodecSpec::parse(s));
    out.push_back({s, c.encode(t).packet});
  }
  Codec aq(CodecSpec::parse("aqsgd:bits=3"));
  EncodeArgs a;
  a.sample_ids = {1, 2};
  out.push_back({"aqsgd:bits=3", aq.encode(x, a).packet});
  return out;
}

void expect_refused(const std::string& spec, const std::string& packet, const char* cause) {
  Codec c(CodecSpec::parse(spec));
  try {
    c.decode(packet);
    ADD_FAILURE() << spec << ": accepted a packet with " << cause;
  } catch (const PacketError& e) {
    EXPECT_NE(std::string(e.what()).find(cause), std::string::npos) << e.what();
  }
}

template <typename T>
std::string with(std::string p, size_t offset, T value) {
  p.replace(offset, sizeof(T), reinterpret_cast<const char*>(&value), sizeof(T));
  return p;
}

TEST(PacketRobustness, EveryTruncationIsRefused) {
  for (const auto& [spec, packet] : valid_packets()) {
    Codec ok(CodecSpec::parse(spec));
    if (spec.rfind("aqsgd", 0) != 0) {
      ASSERT_NO_THROW(ok.decode(packet)) << spec;
    }
    for (size_t n = 0; n < packet.size(); ++n) {
      Codec c(CodecSpec::parse(spec));
      EXPECT_THROW(c.decode(std::string_view(packet).substr(0, n)), PacketError) << spec << " cut at " << n;
    }
    Codec c(CodecSpec::parse(spec));
    expect_refused(spec, packet + "xx", "trailing");
  }
}

TEST(PacketRobustness, NamedCauses) {
  auto packets = valid_packets();
  const std::string& fixed = packets[1].packet;
  const std::string& amaq = packets[3].packet;
  expect_refused("fixed:bits=3", with<uint32_t>(fixed, 0, 0x12345678), "magic");
  expect_refused("fixed:bits=3", with<uint8_t>(fixed, 4, 9), "version 9");
  expect_refused("fixed:bits=3", amaq, "configured for fixed");
  expect_refused("fixed:bits=3", with<uint8_t>(fixed, offsetof(PacketHeader, bits), 0), "bit-width 0");
  expect_refused("fixed:bits=3", with<uint8_t>(fixed, offsetof(PacketHeader, bits), 9), "bit-width 9");
  expect_refused("fixed:bits=3", with<float>(fixed, offsetof(PacketHeader, scale), std::nanf("")), "scale");
  expect_refused("fixed:bits=3", with<uint8_t>(fixed, offsetof(PacketHeader, ndim), 0), "ndim 0");
  expect_refused("fixed:bits=3", with<uint8_t>(fixed, offsetof(PacketHeader, granularity), 7), "granularity 7");
  // Dims 2^31 x 2^31 x 37: the product overflows the element limit before any allocation.
  std::string big =
      with<uint32_t>(with<uint32_t>(fixed, sizeof(PacketHeader), 1u << 31), sizeof(PacketHeader) + 4, 1u << 31);
  expect_refused("fixed:bits=3", big, "exceeds");
  // A range made NaN (fp16 0x7e00) right after the dims.
  expect_refused("fixed:bits=3", with<uint16_t>(fixed, sizeof(PacketHeader) + 12, 0x7e00), "NaN");
  // Bit map nibbles 0 and 9..15 are not bit-widths (the map follows the dims).
  expect_refused("amaq:budget=4", with<uint8_t>(amaq, sizeof(PacketHeader) + 12, 0x30), "bit-width 0");
  expect_refused("amaq:budget=4", with<uint8_t>(amaq, sizeof(PacketHeader) + 12, 0x3c), "bit-width 12");
}

TEST(PacketRobustness, RandomMutationsNeverCrash) {
  std::mt19937_64 rng(1234);
  int refused = 0, accepted = 0;
  for (const auto& [spec, packet] : valid_packets()) {
    const int64_t elements = Codec(CodecSpec::parse(spec)).decode(packet).numel();
    for (int trial = 0; trial < 400; ++trial) {
      std::string p = packet;
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int f = 0; f < flips; ++f) p[rng() % p.size()] = static_cast<char>(rng());
      if (rng() % 4 == 0) p.resize(rng() % (p.size() + 1));
      Codec c(CodecSpec::parse(spec));
      try {
        at::Tensor t = c.decode(p, at::kCPU, elements);  // what a receiver expects
        ++accepted;                                      // a flip in the codes or a range is a different valid packet
      } catch (const PacketError&) {
        ++refused;
      } catch (const c10::Error& e) {
        ADD_FAILURE() << spec << ": internal check instead of a PacketError: " << e.what_without_backtrace();
      }
    }
  }
  EXPECT_GT(refused, 0);
  EXPECT_GT(accepted, 0);
}

}  // namespace
}  // namespace amaq::quant
