// Fuzzes the allowlisted unpickler of io/pickle.hpp (the data.pkl of PyTorch zip checkpoints).
// Every input must either give a description whose views lie inside their storages, or throw a
// distorch::format_error; a crash, a leak, undefined behaviour or any other exception is a bug.
#include <cstddef>
#include <cstdint>
#include <set>
#include <span>
#include <string>

#include "distorch/io/pickle.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  distorch::pickle_limits limits;  // small, so that a slow input is a finding and not a timeout
  limits.max_values = std::size_t{1} << 16;
  limits.max_total_name_bytes = std::size_t{1} << 20;
  try {
    const auto sd = distorch::unpickle_state_dict(std::as_bytes(std::span(data, size)), "fuzz.pkl", limits);
    std::set<std::string> names;
    for (const auto& t : sd.tensors) {
      if (t.storage >= sd.storages.size() || t.type != sd.storages[t.storage].type) __builtin_trap();
      if (t.name.empty() || !names.insert(t.name).second || t.shape.size() != t.stride.size()) __builtin_trap();
      // The last element the view addresses must lie inside its storage.
      __int128 last = t.storage_offset;
      bool empty = false;
      for (std::size_t d = 0; d < t.shape.size(); ++d) {
        if (t.shape[d] < 0 || t.stride[d] < 0) __builtin_trap();
        empty = empty || t.shape[d] == 0;
        last += static_cast<__int128>(t.shape[d] - 1) * t.stride[d];
      }
      const auto numel = static_cast<__int128>(sd.storages[t.storage].numel);
      if (empty ? t.storage_offset > numel : last >= numel) __builtin_trap();
    }
  } catch (const distorch::format_error&) {
  }
  return 0;
}
