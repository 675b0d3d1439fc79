// A codec turns a tensor that must cross the split, activations (B, T, C) or their gradients, into
// a self-describing packet and back. One Codec object serves one direction on one side: the sender
// calls encode, the receiver decode; both keep the state their codec needs (AMAQ's last bit map,
// AQ-SGD's per-sample memory).
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "quant/affine.h"
#include "quant/aqsgd.h"
#include "quant/packet.h"
#include "quant/spec.h"

namespace amaq::quant {

/// Which kernels a codec uses on the CPU: the plain reference or the fast multi-threaded path. Both
/// write the same bytes (tested). Tensors on a GPU (and decodes to a GPU) take the CUDA kernels.
enum class Impl { kFast, kRef };

/// Whether this build has the CUDA kernels (a libtorch with CUDA and nvcc were found).
bool cuda_codecs_built();

struct EncodeArgs {
  at::Tensor bits;                  ///< amaq: (C,) uint8 bit map to use
  std::vector<int64_t> sample_ids;  ///< aqsgd: one id per batch row
  uint64_t seed = 0;                ///< stochastic rounding
  bool want_decoded = true;         ///< false: Encoded::decoded is left undefined where that saves a copy
  bool want_gate_slope = false;     ///< amaq with gates: Encoded::gate_slope where the encoder can give it
};

struct Encoded {
  std::string packet;
  at::Tensor decoded;  ///< exactly what decode(packet) returns on the other side, in the input dtype
                       ///< (undefined when EncodeArgs::want_decoded is false, except where it is free)
  AffineQuant quant;   ///< fixed, amaq: codes and ranges (for the gates' gradient); CUDA: ranges only
  AffineLayout layout;
  at::Tensor bits;             ///< (C,) uint8 bit-width per channel used (quantizing codecs)
  int64_t rotation_block = 0;  ///< rot=hadamard: quant and codes are of x's groups rotated by this block
  /// With EncodeArgs::want_gate_slope, from the fast CPU encoder with nearest rounding and ranges
  /// along rows (else undefined): (rows, C) fp32, each value's term of the gates' gradient, which
  /// fake_quant otherwise computes from the codes (the same numbers).
  at::Tensor gate_slope;
  int64_t elements = 0;
  double bits_per_element() const { return 8.0 * static_cast<double>(packet.size()) / static_cast<double>(elements); }
};

struct AqsgdOptions {
  int64_t max_memory_bytes = int64_t{1} << 30;
  std::string spill_path;  ///< empty: a unique file under $TMPDIR, removed with the buffer
};

class Codec {
 public:
  explicit Codec(CodecSpec spec, Impl impl = Impl::kFast, AqsgdOptions aqsgd = {});
  /// x (..., C) fp32/bf16/fp16, finite. Refuses NaN/Inf with an error naming the count.
  Encoded encode(const at::Tensor& x, const EncodeArgs& args = {});
  /// Validates every field before use; throws PacketError naming the problem. The result lands on
  /// `device`; a CUDA device decodes with the CUDA kernels. A packet declaring more than
  /// `max_elements` values is refused before anything is allocated (a receiver that knows the shape it
  /// expects passes its size: entropy-coded packets can be tiny for any shape).
  at::Tensor decode(std::string_view packet, at::Device device = at::kCPU, int64_t max_elements = kMaxPacketElements);

  const CodecSpec& spec() const { return spec_; }
  /// amaq receiver: the bit map of the last packet decoded (undefined before the first).
  const at::Tensor& received_map() const { return recv_map_; }
  /// AQ-SGD's per-sample memory on this side (nullptr for other codecs).
  AqsgdBuffer* aqsgd_buffer() { return buffer_.get(); }

 private:
  Encoded encode_dispatch(const at::Tensor& x, const EncodeArgs& args);
  at::Tensor decode_dispatch(ByteReader& r, const PacketHeader& h, const std::vector<int64_t>& shape, int64_t numel,
                             at::Device device);
  Encoded encode_affine(const at::Tensor& x, const at::Tensor& bits, const EncodeArgs& args);
  Encoded encode_aqsgd(const at::Tensor& x, const EncodeArgs& args);
  // Symmetric codes of the deltas (nd, T, C) with per (sample, channel) steps, added into the memories; packed.
  std::string quantize_sym_cpu(const at::Tensor& deltas, const std::vector<float>& steps,
                               std::vector<at::Tensor>& memory, int levels);
  at::Tensor decode_affine(ByteReader& r, const PacketHeader& h, const std::vector<int64_t>& shape, at::Device device);
  at::Tensor decode_aqsgd(ByteReader& r, const PacketHeader& h, const std::vector<int64_t>& shape, at::Device device);
  Encoded encode_ecsq(const at::Tensor& x, const EncodeArgs& args);
  Encoded encode_levels(const at::Tensor& x, const EncodeArgs& args);
  /// The host-side codecs (ecsq, levels): x as contiguous fp32 on the CPU, its groups rotated with rot=hadamard.
  at::Tensor host_input(const at::Tensor& x) const;
  /// Their sender's copy (when `decoded` is defined) rotated back and cast to x's device and dtype,
  /// and the packet's uniform width and rotation.
  void finish_host_encoding(Encoded& e, at::Tensor& decoded, const at::Tensor& x) const;
  at::Tensor decode_levels(ByteReader& r, const PacketHeader& h, const std::vector<int64_t>& shape, at::Device device);
  /// rot=hadamard: refuses a channel count that is not a multiple of the group, naming both.
  void check_rotation_fits(int64_t channels) const;
  at::Tensor decode_ecsq(ByteReader& r, const PacketHeader& h, const std::vector<int64_t>& shape, at::Device device);

  CodecSpec spec_;
  Impl impl_;
  at::Tensor sent_map_;  // amaq sender: the map the receiver has
  uint32_t sent_map_id_ = 0;
  at::Tensor recv_map_;  // amaq receiver
  uint32_t recv_map_id_ = 0;
  std::unique_ptr<AqsgdBuffer> buffer_;
};

/// Mean of a (C,) bit map.
double mean_bits(const at::Tensor& bits);

}  // namespace amaq::quant
