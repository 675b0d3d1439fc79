// Codec configuration, written as `name:key=value,...` on the command line:
//   none:fp32 | none:bf16 | none:fp16
//   fixed:bits=4,gran=group,group=128,round=nearest|stochastic[,rot=hadamard]
//   fixed:map=FILE[,shuffle=SEED],...   one width per channel from FILE (a JSON array), optionally
//                                       permuted by SEED: the same histogram on random channels
//   amaq:budget=4,bmin=2,bmax=8,init=8,gran=group,group=128,alpha=1,beta=1,mode=guaranteed|penalty|stop,decay=200
//   amaq:budget=auto[,floor=3],...   the budget chosen from the measured link and compute (train/auto_budget.h),
//                                    never below the floor
//   rot=hadamard (fixed, amaq): each range group of channels Hadamard-rotated first (quant/rotation.h);
//                               needs gran=group with a power-of-two group
//   ec=zstd (fixed, amaq): the codes entropy-coded (quant/entropy.h) where that makes the packet smaller
//   levels=nf|lloyd (fixed): non-uniform levels, one step per range group (quant/levels.h): QLoRA's
//                            NormalFloat over the group's max |x|, or Lloyd-Max levels fitted to the
//                            tensor over the group's root mean square; needs gran=token or group
//   aqsgd:bits=4
//   ecsq:bits=4[,rot=hadamard,group=128]   entropy-coded scalar quantization at about `bits` bits per
//                                         element on Gaussian data (quant/ecsq.h)
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "quant/affine.h"
#include "quant/levels.h"

namespace amaq::quant {

enum class CodecId : uint8_t { kNone = 0, kFixed = 1, kAmaq = 2, kAqsgd = 3, kEcsq = 4 };
enum class WireDtype : uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2 };
/// How AMAQ meets its bit budget.
enum class BudgetMode : uint8_t {
  kPenalty = 0,     ///< the paper's loss beta * mean(sigmoid(alpha q)^2), nothing else
  kStop = 1,        ///< the same, switched off while the mean bit-width is at or below the budget
  kGuaranteed = 2,  ///< the penalty plus a projection of the gates onto the budget after each step
};

struct CodecSpec {
  CodecId codec = CodecId::kNone;
  WireDtype dtype = WireDtype::kF32;  ///< none: the wire dtype
  int bits = 4;                       ///< fixed, aqsgd; ecsq: the rate aimed at
  // fixed with a per-channel map: the widths (1..8) read from map_path when the spec is parsed.
  std::string map_path;
  int64_t shuffle = -1;  ///< >= 0: the map's widths permuted over the channels with this seed
  std::vector<uint8_t> map;
  Granularity granularity = Granularity::kGroup;
  int64_t group = 128;
  Rounding rounding = Rounding::kNearest;
  bool hadamard = false;                   ///< rot=hadamard: rotate each range group before quantizing
  bool entropy = false;                    ///< ec=zstd: entropy-code the codes
  LevelKind levels = LevelKind::kUniform;  ///< fixed: levels=nf|lloyd
  // amaq
  double budget = 4.0;  ///< target mean bits per element (fractional allowed)
  /// budget=auto: `budget` is chosen while training (starting at bits_init), never below budget_floor.
  bool auto_budget = false;
  double budget_floor = 3.0;
  int bits_min = 2;
  int bits_max = 8;
  double bits_init = 8.0;  ///< initial bit-width of every channel
  double alpha = 1.0;      ///< gate sharpness in sigmoid(alpha * q)
  double beta = 1.0;       ///< weight of the bit regularizer
  BudgetMode mode = BudgetMode::kGuaranteed;
  int64_t decay_steps = 200;  ///< steps over which the budget walks from bits_init to `budget`

  /// Parses `name:key=value,...`; errors name the bad key and list the valid ones.
  static CodecSpec parse(const std::string& text);
  /// The canonical form both sides compare in the handshake: every setting spelled out, a map
  /// named by the hash of its widths (`map=sha256:<16 hex>`), not by its file.
  std::string to_string() const;
  /// Mean bits per element the codec aims at (nominal; packets report the measured figure).
  double nominal_bits() const;
  /// budget=auto: a chosen budget within this codec's own range, [budget_floor, bits_max].
  double within_budget_range(double budget) const;
};

const char* codec_name(CodecId id);

}  // namespace amaq::quant
