// Reading integers out of JSON we did not write ourselves (a peer's message, a run directory's
// files): nlohmann's get<int64_t>() converts a float such as 1e300 with a cast whose result is
// undefined; this accepts JSON integers within the type's range only.
#pragma once
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>

#include "core/error.h"

namespace amaq {

/// j.at(key) as a T; throws amaq::Error naming the key unless it is a JSON integer T can hold (a
/// missing key throws nlohmann's out_of_range, as j.at does).
template <typename T>
T json_int(const nlohmann::json& j, const char* key) {
  static_assert(std::is_integral_v<T>);
  const nlohmann::json& v = j.at(key);
  using L = std::numeric_limits<T>;
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u <= static_cast<uint64_t>(L::max())) return static_cast<T>(u);
  } else if (v.is_number_integer()) {
    const int64_t i = v.get<int64_t>();
    if (i >= static_cast<int64_t>(L::min()) && (i < 0 || static_cast<uint64_t>(i) <= static_cast<uint64_t>(L::max())))
      return static_cast<T>(i);
  }
  throw Error(std::string("\"") + key + "\" must be an integer in [" + std::to_string(L::min()) + ", " +
                  std::to_string(L::max()) + "], got " + v.dump(),
              "the file, or the peer that sent it, is damaged or of another amaq version");
}

}  // namespace amaq
