// Fuzzes the profile JSON reader (profile_from_json). Any JSON value must give a profile or a
// distorch::error; a profile that reads back must write and read again to the same profile.
#include <cstddef>
#include <cstdint>

#include <nlohmann/json.hpp>

#include "distorch/profile/profile.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(data, data + size);
  } catch (const nlohmann::json::exception&) {
    return 0;
  }
  try {
    const auto p = distorch::profile_from_json(j);
    if (distorch::profile_from_json(distorch::profile_to_json(p)) != p) __builtin_trap();
    for (const auto& l : p.links)
      if (!(l.seconds_for(1u << 20) > 0) && l.latency > 0) __builtin_trap();
    if (!p.links.empty()) {
      const auto fit = distorch::fit_link(p.links.front().samples);
      if (fit && (!(fit->bandwidth > 0) || fit->latency < 0)) __builtin_trap();
    }
  } catch (const distorch::error&) {
  }
  return 0;
}
