// Entropy-coded scalar quantization (`ecsq:bits=B[,rot=hadamard,group=G]`): the codec that comes
// closest to the rate-distortion bound. One uniform step for the whole tensor, no range: a Gaussian
// costs about B bits per element after entropy coding. Tokens of other scales need no range of
// their own: entropy-coded, a uniform step gives every element the same error and spends the bits
// where the values are large, which at high rate minimises the mean squared error for the rate
// (Gish and Pierce). Each level is reconstructed at the mean of the values that rounded to it
// (MSE-optimal, non-uniform reconstruction points: Lloyd's centroid condition for these cells),
// estimated from how many fell in each of 15 equal sub-cells of the code's cell, and the codes are
// range-ANS coded (rans.h, htscodecs) a chunk at a time. What is left above the Gaussian bound is
// the uniform quantizer's own 0.25 bit (docs/amaq.md).
//
// rANS codes bytes: a code c's symbol is its coarse part c >> S (floor) plus K, where
// S = max(0, B - 6) low bits go raw (at 7 and 8 bits, where a step is a thirtieth of the RMS and
// they are all but uniform) and K = min(2^(B+1-S), 127); coarse parts outside [-K, K] are escaped
// (symbol 2K + 1).
// The table's codes are [-K 2^S, (K + 1) 2^S), code c at index c + K 2^S.
//
// Body (after the packet header, whose `scale` is the step and `bits` the target, and the dims):
//   u32 K
//   u16 lo, u16 end                         the table's code indices with a level: [lo, end)
//   (end - lo) x fp16                       per code, its level's offset from it, in steps (within
//                                           half a step); the level is the code plus the offset
//                                           (codes outside [lo, end) have offset 0)
//   u32 chunk                               elements per independently coded chunk
//   chunks x (u32 escapes, u32 bytes)       per chunk
//   escapes x i32                           the escaped codes, in order
//   ceil(n S / 8) bytes                     the low bits, S per element, least significant first
//   the chunks' rANS streams, one after another
#pragma once
#include <cstdint>
#include <string>

#include "quant/packet.h"

namespace amaq::quant {

/// The step at which N(0, rms^2) costs about `bits` bits per element: sqrt(2 pi e) * rms * 2^-bits
/// (1 for rms 0).
float ecsq_step(double rms, int bits);

/// The root mean square of x[0, n) (0 for none). Multi-threaded.
double ecsq_rms(const float* x, int64_t n);

/// Quantizes x[0, n) with `step` (codes round-half-even of x / step), appends the body to `out` and,
/// unless null, writes to `decoded` exactly what ecsq_decode will return. Multi-threaded.
void ecsq_encode(const float* x, int64_t n, float step, int bits, std::string* out, float* decoded);

/// Reads a body of n elements coded with `step` and `bits` into out[0, n); every field is checked
/// first (PacketError names what is wrong).
void ecsq_decode(ByteReader& r, int64_t n, float step, int bits, float* out);

}  // namespace amaq::quant
