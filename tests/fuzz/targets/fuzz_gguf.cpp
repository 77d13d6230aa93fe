// Fuzzes the whole GGUF reader: header, metadata, tensor infos, data layout, orig_shape, inventory
// records and the dequantizers. Parsing must either succeed or throw format_error; a file that
// parses must keep every promise the parser makes (tensor bytes inside the input, sizes that
// dequantize without complaint). Anything else is a bug.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "distorch/io/ggml_dequant.hpp"
#include "distorch/io/gguf.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  distorch::gguf_file file;
  try {
    file = distorch::parse_gguf(bytes, "fuzz.gguf");
  } catch (const distorch::format_error&) {
    return 0;
  }
  // From here on nothing may throw: an exception escaping is reported as a crash.
  if (file.data_offset > size || file.alignment == 0 || (file.alignment & (file.alignment - 1)) != 0) __builtin_trap();
  for (const auto& t : file.tensors) {
    if (t.file_offset > size || t.bytes > size - t.file_offset) __builtin_trap();
    if (t.numel < 0 || file.find_tensor(t.name) != &t) __builtin_trap();
    const auto span = distorch::gguf_tensor_bytes(bytes, t);
    if (distorch::ggml_can_dequantize(t.type) && t.numel <= (1 << 16)) {
      std::vector<float> out(static_cast<std::size_t>(t.numel));
      distorch::ggml_dequantize(t.type, span, out, t.name);
    }
  }
  const auto records = distorch::gguf_records(file);
  if (records.size() != file.tensors.size()) __builtin_trap();
  for (const auto& kv : file.metadata) (void)kv.value.to_string(8);
  return 0;
}
