// Fuzzes the small string parsers of core/ and device/: byte sizes, device names, topologies.
// Each must either return a value or throw a distorch::error; anything else is a bug.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "distorch/core/bytes.hpp"
#include "distorch/device/device_id.hpp"
#include "distorch/device/topology.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const auto n = distorch::parse_bytes(text);
    (void)distorch::format_bytes(n);
  } catch (const distorch::error&) {
  }
  try {
    const auto id = distorch::device_id::parse(text);
    if (distorch::device_id::parse(id.str()) != id) __builtin_trap();  // printing must round-trip
  } catch (const distorch::error&) {
  }
  try {
    (void)distorch::parse_topology(text);
  } catch (const distorch::error&) {
  }
  return 0;
}
