// Entropy-coded codes (`ec=zstd` on fixed and amaq): the quantized codes are far from uniform (a
// Gaussian's middle levels carry most of them), so after quantizing they go through zstd, whose
// literals are Huffman-coded with a table per block: close to the codes' empirical entropy. A packet
// whose codes do not shrink is sent as plain packed codes (the flag says which).
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace amaq::quant {

/// Whether this build has libzstd.
bool entropy_coding_built();

/// codes (rows, C) uint8, each below 2^bits[c]: per width present, a u32 size and one zstd frame of
/// that width's channels, channel by channel, two codes a byte where the width is at most 4.
std::string entropy_encode(const at::Tensor& codes, const at::Tensor& bits);

/// The same from the codes packed at `bits` (`size` bytes, as pack_fast writes them): where every
/// channel has width 4 or 8 the packed bytes are the stream entropy_encode compresses, so they are
/// not unpacked; otherwise they are, first.
std::string entropy_encode_packed(const uint8_t* packed, int64_t size, int64_t rows, const at::Tensor& bits);

/// The (rows, C) codes back from a frame of `size` bytes; throws PacketError when the frame is
/// malformed, does not hold exactly rows x C codes, or holds a code too wide for its channel's width.
at::Tensor entropy_decode(const uint8_t* data, int64_t size, int64_t rows, const at::Tensor& bits);

/// The empirical entropy of the codes, in bits per code (what an ideal coder would need).
double code_entropy_bits(const at::Tensor& codes);

}  // namespace amaq::quant
