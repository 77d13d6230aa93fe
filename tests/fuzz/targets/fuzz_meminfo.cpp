// Fuzzes the /proc/meminfo reader of device/memory_info.hpp: any text must give nullopt or figures
// with free <= total, without reading out of bounds or overflowing.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "distorch/device/memory_info.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  if (const auto m = distorch::parse_meminfo(text)) {
    if (m->free > m->total) __builtin_trap();
  }
  return 0;
}
