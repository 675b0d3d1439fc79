#include "quant/spec.h"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"
#include "core/hash.h"
#include "quant/entropy.h"
#include "quant/rotation.h"

namespace amaq::quant {
namespace {

const char* kSpecHint =
    "codecs are none:fp32|bf16|fp16, "
    "fixed:bits=B|map=FILE[,shuffle=SEED][,gran=token|channel|group][,group=G][,round=nearest|stochastic]"
    "[,levels=uniform|nf|lloyd][,rot=hadamard][,ec=zstd], "
    "amaq:budget=B|auto[,floor=F,bmin=,bmax=,init=,alpha=,beta=,mode=guaranteed|penalty|stop,decay=N,gran=,group=], "
    "aqsgd:bits=B, ecsq:bits=B[,rot=hadamard,group=G]";

[[noreturn]] void bad(const std::string& text, const std::string& why) {
  throw Error("codec '" + text + "': " + why, kSpecHint);
}

double number(const std::string& text, const std::string& key, const std::string& v) {
  try {
    size_t used = 0;
    double d = std::stod(v, &used);
    if (used != v.size()) throw std::invalid_argument(v);
    return d;
  } catch (const std::exception&) {
    bad(text, key + "=" + v + " is not a number");
  }
}

// `v` as one of the named choices of key `key`.
template <typename T>
T one_of(const std::string& text, const std::string& key, const std::string& v,
         std::initializer_list<std::pair<const char*, T>> choices) {
  std::string names;
  for (const auto& [name, value] : choices) {
    if (v == name) return value;
    names += (names.empty() ? "" : ", ") + std::string(name);
  }
  bad(text, key + " must be one of " + names + ", got '" + v + "'");
}

int integer_in(const std::string& text, const std::string& key, const std::string& v, int lo, int hi) {
  double d = number(text, key, v);
  if (d != static_cast<int>(d) || d < lo || d > hi)
    bad(text, fmt::format("{}={} must be an integer in [{}, {}]", key, v, lo, hi));
  return static_cast<int>(d);
}

// FILE holds a JSON array of widths in 1..8 (as `amaq train` writes RUN/fwd_bit_map.json).
std::vector<uint8_t> read_map(const std::string& text, const std::string& path) {
  if (!file_exists(path)) bad(text, "map file " + path + " does not exist");
  const auto j = nlohmann::json::parse(read_file(path), nullptr, false);
  if (!j.is_array() || j.empty()) bad(text, "map file " + path + " is not a JSON array of bit-widths");
  std::vector<uint8_t> map;
  for (const auto& v : j) {
    if (!v.is_number_integer() || v.get<int>() < 1 || v.get<int>() > 8)
      bad(text, "map file " + path + " has " + v.dump() + ", not a width in 1..8");
    map.push_back(static_cast<uint8_t>(v.get<int>()));
  }
  return map;
}

// Fisher-Yates with the stateless stochastic-rounding hash: the same permutation everywhere.
void shuffle_map(std::vector<uint8_t>& map, uint64_t seed) {
  for (size_t i = map.size(); i > 1; --i) {
    const size_t j = std::min(i - 1, static_cast<size_t>(stochastic_uniform(seed, i) * static_cast<float>(i)));
    std::swap(map[i - 1], map[j]);
  }
}

}  // namespace

const char* codec_name(CodecId id) {
  switch (id) {
    case CodecId::kNone:
      return "none";
    case CodecId::kFixed:
      return "fixed";
    case CodecId::kAmaq:
      return "amaq";
    case CodecId::kAqsgd:
      return "aqsgd";
    case CodecId::kEcsq:
      return "ecsq";
  }
  return "?";
}

CodecSpec CodecSpec::parse(const std::string& text) {
  CodecSpec s;
  std::string name = text.substr(0, text.find(':'));
  std::string rest = text.find(':') == std::string::npos ? "" : text.substr(text.find(':') + 1);
  if (name == "none") {
    s.codec = CodecId::kNone;
    if (rest.empty() || rest == "fp32") {
      s.dtype = WireDtype::kF32;
    } else if (rest == "bf16") {
      s.dtype = WireDtype::kBF16;
    } else if (rest == "fp16") {
      s.dtype = WireDtype::kF16;
    } else {
      bad(text, "none takes fp32, bf16 or fp16, got '" + rest + "'");
    }
    return s;
  }
  if (name == "fixed") {
    s.codec = CodecId::kFixed;
  } else if (name == "amaq") {
    s.codec = CodecId::kAmaq;
  } else if (name == "aqsgd") {
    s.codec = CodecId::kAqsgd;
    s.granularity = Granularity::kChannel;
  } else if (name == "ecsq") {
    s.codec = CodecId::kEcsq;
  } else {
    bad(text, "unknown codec '" + name + "'");
  }
  std::stringstream ss(rest);
  std::string item;
  bool floor_given = false;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    auto eq = item.find('=');
    if (eq == std::string::npos) bad(text, "'" + item + "' is not key=value");
    std::string k = item.substr(0, eq), v = item.substr(eq + 1);
    const bool amaq = s.codec == CodecId::kAmaq, ecsq = s.codec == CodecId::kEcsq,
               affine = s.codec == CodecId::kFixed || amaq;
    if (k == "bits" && !amaq) {
      s.bits = integer_in(text, k, v, s.codec == CodecId::kAqsgd ? 2 : 1, 8);
    } else if (k == "map" && s.codec == CodecId::kFixed) {
      s.map_path = v;
    } else if (k == "shuffle" && s.codec == CodecId::kFixed) {
      s.shuffle = integer_in(text, k, v, 0, 1 << 30);
    } else if (k == "gran" && affine) {
      s.granularity = one_of<Granularity>(
          text, k, v,
          {{"token", Granularity::kToken}, {"channel", Granularity::kChannel}, {"group", Granularity::kGroup}});
    } else if (k == "group" && (affine || ecsq)) {
      s.group = integer_in(text, k, v, 1, 1 << 20);
      s.granularity = Granularity::kGroup;
    } else if (k == "round" && !amaq && affine) {
      s.rounding =
          one_of<Rounding>(text, k, v, {{"nearest", Rounding::kNearest}, {"stochastic", Rounding::kStochastic}});
    } else if (k == "rot" && (affine || ecsq)) {
      s.hadamard = one_of<bool>(text, k, v, {{"none", false}, {"hadamard", true}});
    } else if (k == "levels" && s.codec == CodecId::kFixed) {
      s.levels = one_of<LevelKind>(
          text, k, v,
          {{"uniform", LevelKind::kUniform}, {"nf", LevelKind::kNormalFloat}, {"lloyd", LevelKind::kLloyd}});
    } else if (k == "ec" && affine) {
      s.entropy = one_of<bool>(text, k, v, {{"none", false}, {"zstd", true}});
      if (s.entropy && !entropy_coding_built()) bad(text, "ec=zstd needs a build with libzstd (libzstd-dev)");
    } else if (k == "budget" && amaq) {
      s.auto_budget = v == "auto";
      if (!s.auto_budget) s.budget = number(text, k, v);
    } else if (k == "floor" && amaq) {
      s.budget_floor = number(text, k, v);
      floor_given = true;
    } else if (k == "bmin" && amaq) {
      s.bits_min = integer_in(text, k, v, 1, 8);
    } else if (k == "bmax" && amaq) {
      s.bits_max = integer_in(text, k, v, 1, 8);
    } else if (k == "init" && amaq) {
      s.bits_init = number(text, k, v);
    } else if (k == "alpha" && amaq) {
      s.alpha = number(text, k, v);
    } else if (k == "beta" && amaq) {
      s.beta = number(text, k, v);
    } else if (k == "decay" && amaq) {
      s.decay_steps = integer_in(text, k, v, 0, 1 << 30);
    } else if (k == "mode" && amaq) {
      s.mode = one_of<BudgetMode>(
          text, k, v,
          {{"guaranteed", BudgetMode::kGuaranteed}, {"penalty", BudgetMode::kPenalty}, {"stop", BudgetMode::kStop}});
    } else {
      bad(text, "'" + k + "' is not an option of " + name);
    }
  }
  if (s.shuffle >= 0 && s.map_path.empty()) bad(text, "shuffle needs map=FILE");
  if (s.hadamard && (s.granularity != Granularity::kGroup || !is_power_of_two(s.group)))
    bad(text, "rot=hadamard rotates range groups: it needs gran=group with a power-of-two group (e.g. group=128)");
  if (s.levels != LevelKind::kUniform) {
    if (!s.map_path.empty()) bad(text, "levels= takes one width for every channel: give bits=B, not map=");
    if (s.rounding != Rounding::kNearest) bad(text, "levels= rounds to the nearest level: drop round=stochastic");
    if (s.granularity == Granularity::kChannel)
      bad(text, "levels= needs gran=token or gran=group (one step per token or group)");
    if (s.levels == LevelKind::kNormalFloat && s.bits < 2) bad(text, "levels=nf needs bits=2 or more");
  }
  if (!s.map_path.empty()) {
    s.map = read_map(text, s.map_path);
    if (s.shuffle >= 0) shuffle_map(s.map, static_cast<uint64_t>(s.shuffle));
  }
  if (s.codec == CodecId::kAmaq) {
    if (s.bits_min > s.bits_max) bad(text, "bmin must not exceed bmax");
    if (floor_given && !s.auto_budget) bad(text, "floor is the lowest budget=auto may choose: give budget=auto");
    if (s.auto_budget) {
      if (!floor_given) s.budget_floor = std::clamp(3.0, static_cast<double>(s.bits_min), s.bits_init);
      if (s.budget_floor < s.bits_min || s.budget_floor > s.bits_init)
        bad(text, fmt::format("floor {} outside [bmin, init] = [{}, {}]", s.budget_floor, s.bits_min, s.bits_init));
      s.budget = s.bits_init;  // until the link and the compute are measured
    }
    if (s.budget < s.bits_min || s.budget > s.bits_max)
      bad(text, fmt::format("budget {} outside [bmin, bmax] = [{}, {}]", s.budget, s.bits_min, s.bits_max));
    if (s.bits_init < s.budget || s.bits_init > s.bits_max) bad(text, "init must lie in [budget, bmax]");
    if (!(s.alpha > 0)) bad(text, "alpha must be positive");
  }
  return s;
}

std::string CodecSpec::to_string() const {
  const char* gran = granularity == Granularity::kToken     ? "token"
                     : granularity == Granularity::kChannel ? "channel"
                                                            : "group";
  std::string g =
      granularity == Granularity::kGroup ? fmt::format("gran=group,group={}", group) : fmt::format("gran={}", gran);
  if (hadamard) g += ",rot=hadamard";
  if (entropy) g += ",ec=zstd";
  switch (codec) {
    case CodecId::kNone:
      return std::string("none:") + (dtype == WireDtype::kF32 ? "fp32" : dtype == WireDtype::kBF16 ? "bf16" : "fp16");
    case CodecId::kFixed: {
      // A map is named by its content (the widths after any shuffle), not by its path: two sides
      // with the same widths in files of different names agree, edited files with the same name do not.
      const std::string widths =
          map.empty()
              ? fmt::format("bits={}", bits)
              : "map=sha256:" +
                    sha256_hex(std::string_view(reinterpret_cast<const char*>(map.data()), map.size())).substr(0, 16);
      const char* lv = levels == LevelKind::kNormalFloat ? ",levels=nf"
                       : levels == LevelKind::kLloyd     ? ",levels=lloyd"
                                                         : "";
      return fmt::format("fixed:{},{},round={}{}", widths, g, rounding == Rounding::kNearest ? "nearest" : "stochastic",
                         lv);
    }
    case CodecId::kAmaq:
      return fmt::format("amaq:budget={},bmin={},bmax={},init={},alpha={},beta={},mode={},decay={},{}",
                         auto_budget ? fmt::format("auto,floor={}", budget_floor) : fmt::format("{}", budget), bits_min,
                         bits_max, bits_init, alpha, beta,
                         mode == BudgetMode::kPenalty ? "penalty"
                         : mode == BudgetMode::kStop  ? "stop"
                                                      : "guaranteed",
                         decay_steps, g);
    case CodecId::kAqsgd:
      return fmt::format("aqsgd:bits={}", bits);
    case CodecId::kEcsq:
      return fmt::format("ecsq:bits={}", bits) + (hadamard ? fmt::format(",group={},rot=hadamard", group) : "");
  }
  return "?";
}

double CodecSpec::within_budget_range(double b) const {
  return std::clamp(b, budget_floor, static_cast<double>(bits_max));
}

double CodecSpec::nominal_bits() const {
  switch (codec) {
    case CodecId::kNone:
      return dtype == WireDtype::kF32 ? 32 : 16;
    case CodecId::kFixed:
      if (!map.empty()) {
        double sum = 0;
        for (uint8_t b : map) sum += b;
        return sum / static_cast<double>(map.size());
      }
      return bits;
    case CodecId::kAqsgd:
    case CodecId::kEcsq:
      return bits;
    case CodecId::kAmaq:
      return budget;  // budget=auto: the one chosen last
  }
  return 0;
}

}  // namespace amaq::quant
