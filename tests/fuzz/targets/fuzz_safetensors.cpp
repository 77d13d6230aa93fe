// Fuzzes the safetensors header parser and the sharded-index parser. Each input must either parse
// into a header whose invariants hold or raise a distorch::format_error; anything else (a crash,
// an out-of-bounds read, another exception) is a bug.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "distorch/io/safetensors.hpp"
#include "distorch/io/safetensors_index.hpp"
#include "distorch/io/safetensors_writer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  try {
    const auto h = distorch::parse_safetensors(bytes, "fuzz");
    // Accepted headers tile the data buffer exactly, in order, inside the input.
    std::uint64_t expected = 0;
    for (const auto& t : h.tensors) {
      if (t.begin != expected || t.end < t.begin) __builtin_trap();
      expected = t.end;
    }
    if (expected != h.data_bytes || h.data_offset + h.data_bytes != size) __builtin_trap();
    (void)h.records();
    // Whatever the writer can express must survive a write and a re-read unchanged.
    std::vector<distorch::safetensors_entry> entries;
    bool writable = true;
    for (const auto& t : h.tensors) {
      writable = writable && !distorch::safetensors_dtype_name(t.type).empty() && t.type != distorch::dtype::opaque;
      entries.push_back({t.name, t.type, t.shape, bytes.subspan(h.data_offset + t.begin, t.bytes())});
    }
    if (writable) {
      const auto again = distorch::parse_safetensors(distorch::serialize_safetensors(entries, h.metadata), "rewritten");
      if (again.tensors.size() != h.tensors.size() || again.metadata != h.metadata) __builtin_trap();
      for (const auto& t : again.tensors) {
        const auto* original = h.find(t.name);
        if (original == nullptr || original->shape != t.shape || original->type != t.type) __builtin_trap();
      }
    }
  } catch (const distorch::format_error&) {
  }
  try {
    const auto index = distorch::parse_safetensors_index(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
    for (const auto& [tensor, shard] : index.weight_map)
      if (shard.empty() || shard.front() == '/') __builtin_trap();
  } catch (const distorch::format_error&) {
  }
  return 0;
}
