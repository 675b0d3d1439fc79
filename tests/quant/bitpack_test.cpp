// Bit packing: the definition on a hand-worked example, then fast == ref, bit for bit, for every
// width 1..8 and random mixed maps, odd sizes included; the portable path (CPUs without fast BMI2)
// the same.
#include "quant/bitpack.h"

#include <gtest/gtest.h>

namespace amaq::quant {
namespace {

at::Tensor random_codes(int64_t rows, const at::Tensor& bits, at::Generator& gen) {
  at::Tensor hi = at::pow(2, bits.to(at::kLong)).view({1, -1}).expand({rows, bits.numel()});
  return (at::rand({rows, bits.numel()}, gen) * hi.to(at::kFloat)).floor().clamp_max(255).to(at::kByte).contiguous();
}

TEST(BitPack, HandWorkedExample) {
  // Channel widths 3 and 5, codes 5 (101b) and 17 (10001b), LSB first: stream 1,0,1, 1,0,0,0,1.
  at::Tensor bits = at::tensor({3, 5}, at::kByte);
  at::Tensor codes = at::tensor({5, 17}, at::kByte).view({1, 2});
  std::string ref = pack_ref(codes, bits);
  ASSERT_EQ(ref.size(), 1u);
  EXPECT_EQ(static_cast<uint8_t>(ref[0]), 1 + 4 + 8 + 128);
  // Two rows of 3 + 2 bits cross a byte boundary: 10 bits -> 2 bytes, the rest zero.
  bits = at::tensor({3, 2}, at::kByte);
  codes = at::tensor({7, 0, 0, 3}, at::kByte).view({2, 2});
  ref = pack_ref(codes, bits);
  ASSERT_EQ(ref.size(), 2u);
  EXPECT_EQ(static_cast<uint8_t>(ref[0]), 0b00000111);
  EXPECT_EQ(static_cast<uint8_t>(ref[1]), 0b00000011);
}

TEST(BitPack, FastEqualsRefForEveryWidthAndMixedMaps) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  for (int64_t rows : {1, 3, 7, 8, 9, 63, 64, 65, 257, 1000, 4099}) {
    for (int64_t cols : {1, 3, 5, 8, 17, 130, 2048}) {
      if (cols == 2048 && rows > 65) continue;  // a model's width, a few rows: the reference is slow
      std::vector<at::Tensor> maps;
      for (int b = 1; b <= 8; ++b) maps.push_back(at::full({cols}, b, at::kByte));
      for (int k = 0; k < 3; ++k) maps.push_back(at::randint(1, 9, {cols}, gen, at::kByte));
      for (const auto& bits : maps) {
        at::Tensor codes = random_codes(rows, bits, gen);
        std::string ref = pack_ref(codes, bits);
        ASSERT_EQ(static_cast<int64_t>(ref.size()), packed_bytes(rows, bits));
        std::string fast(ref.size(), '\x55');  // junk the packer must overwrite
        pack_fast(codes, bits, reinterpret_cast<uint8_t*>(fast.data()));
        ASSERT_EQ(fast, ref) << rows << "x" << cols << " bits " << bits;
        std::string portable(ref.size(), '\x55');
        pack_portable(codes, bits, reinterpret_cast<uint8_t*>(portable.data()));
        ASSERT_EQ(portable, ref) << rows << "x" << cols << " bits " << bits;
        const auto* p = reinterpret_cast<const uint8_t*>(ref.data());
        ASSERT_TRUE(at::equal(unpack_ref(p, static_cast<int64_t>(ref.size()), rows, bits), codes));
        ASSERT_TRUE(at::equal(unpack_fast(p, static_cast<int64_t>(ref.size()), rows, bits), codes));
        ASSERT_TRUE(at::equal(unpack_portable(p, static_cast<int64_t>(ref.size()), rows, bits), codes));
      }
    }
  }
}

TEST(BitPack, BlocksPackedInAnyOrderMakeTheWholeStream) {
  // A producer packs a few rows at a time (the CPU encoder, 16 rows): blocks of 8k rows, the last
  // one short, packed last to first into junk, give pack_ref's stream.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(8);
  for (int64_t rows : {5, 8, 37, 64, 1001}) {
    for (int64_t cols : {3, 130, 301}) {
      std::vector<at::Tensor> maps = {at::full({cols}, 4, at::kByte), at::full({cols}, 3, at::kByte),
                                      at::full({cols}, 1, at::kByte), at::randint(1, 9, {cols}, gen, at::kByte)};
      for (const auto& bits : maps) {
        const at::Tensor codes = random_codes(rows, bits, gen);
        const std::string ref = pack_ref(codes, bits);
        std::string blocks(ref.size(), '\x55');
        const BlockPacker packer(bits, rows);
        for (const int64_t block : {8, 16, 24}) {
          const int64_t last = (rows - 1) / block * block;
          for (int64_t r0 = last; r0 >= 0; r0 -= block) {
            const int64_t r1 = std::min(rows, r0 + block);
            const at::Tensor part = codes.slice(0, r0, r1).contiguous();
            packer.pack(part.data_ptr<uint8_t>(), r0, r1, reinterpret_cast<uint8_t*>(blocks.data()));
          }
          ASSERT_EQ(blocks, ref) << rows << "x" << cols << " blocks of " << block << " bits " << bits;
        }
      }
    }
  }
  const at::Tensor bits = at::full({3}, 4, at::kByte);
  const BlockPacker packer(bits, 20);
  std::vector<uint8_t> codes(60), out(30);
  EXPECT_THROW(packer.pack(codes.data(), 4, 12, out.data()), c10::Error);   // not on a byte
  EXPECT_THROW(packer.pack(codes.data(), 8, 12, out.data()), c10::Error);   // ends mid-stream off a multiple of 8
  EXPECT_THROW(packer.pack(codes.data(), 16, 24, out.data()), c10::Error);  // past the last row
}

TEST(BitPack, RefusesWidthsOutsideOneToEight) {
  at::Tensor codes = at::zeros({2, 2}, at::kByte);
  EXPECT_THROW(pack_ref(codes, at::tensor({0, 3}, at::kByte)), c10::Error);
  EXPECT_THROW(pack_ref(codes, at::tensor({9, 3}, at::kByte)), c10::Error);
  EXPECT_THROW(pack_ref(at::full({1, 1}, 8, at::kByte), at::tensor({3}, at::kByte)), c10::Error);  // 8 needs 4 bits
}

}  // namespace
}  // namespace amaq::quant
