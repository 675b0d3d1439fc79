// Entropy-coded scalar quantization (`ecsq:bits=B[,rot=hadamard,group=G]`): the codec that comes
// closest to the rate-distortion bound. One uniform step for the whole tensor, no range: a Gaussian
// costs about B bits per element after entropy coding. Tokens of other scales need no range of
// their own: entropy-coded, a uniform step gives every element the same error and spends the bits
// where the values are large, which at high rate minimises the mean squared error for the rate
// (Gish and Pierce). Each level is reconstructed at the mean of the values
// that rounded to it (MSE-optimal, non-uniform reconstruction points: Lloyd's centroid condition for
// these cells), and the codes are range-ANS coded (rans.h) with one table per packet. What is left
// above the Gaussian bound is the uniform quantizer's own 0.25 bit (docs/amaq.md).
//
// Body (after the packet header, whose `scale` is the step and `bits` the target, and the dims):
//   u32 K = 2^(bits+1)                      codes in [-K, K] are table symbols (symbol = code + K),
//                                           others escaped (symbol 2K + 1)
//   u16 lo, u16 end                         the table symbols that may occur: [lo, end)
//   (end - lo) x u16 frequencies, u16 escape frequency    the rANS table, summing to 2^15
//   per symbol in [lo, end) with a nonzero frequency: its level's offset from its code, in steps,
//   as fp16 (within half a step); the level is the code plus the offset
//   u32 chunk                               elements per independently coded chunk
//   chunks x (u32 escapes, u32 bytes)       per chunk
//   escapes x i32                           the escaped codes, in order
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
