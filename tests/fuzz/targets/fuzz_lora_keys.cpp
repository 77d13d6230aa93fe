// Fuzzes the pure LoRA parsers: adapter key grouping and the forward key map over newline-separated
// names (the first half of the input as adapter keys, the second as model tensor names), and the
// PEFT adapter_config.json reader over the whole input. Each must return a value or throw a
// distorch::error; anything else is a bug.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "distorch/lora/adapter_keys.hpp"
#include "distorch/lora/key_map.hpp"
#include "distorch/lora/peft_config.hpp"

namespace {
std::vector<std::string> lines(std::string_view text) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (start <= text.size() && out.size() < 4096) {
    const std::size_t end = text.find('\n', start);
    const std::size_t stop = end == std::string_view::npos ? text.size() : end;
    out.emplace_back(text.substr(start, stop - start));
    if (end == std::string_view::npos) break;
    start = end + 1;
  }
  return out;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const std::size_t split = text.find('\0');
  const auto adapter_keys = lines(text.substr(0, split));
  const auto model_names = split == std::string_view::npos ? adapter_keys : lines(text.substr(split + 1));
  try {
    const auto grouping = distorch::group_adapter_keys(adapter_keys);
    const auto map = distorch::key_map::build(model_names);
    for (const auto& g : grouping.groups) {
      // A group always forms a patch or a bias diff, and a resolved target is a model tensor.
      if (!g.kind && !g.patches_bias()) __builtin_trap();
      if (auto target = map.find(g.base); target && !map.has_tensor(target->tensor)) __builtin_trap();
    }
  } catch (const distorch::error&) {
  }
  try {
    const auto cfg = distorch::parse_peft_config(text, "fuzz");
    (void)distorch::peft_scale(cfg, "blocks.0.attn.to_q", 4);
  } catch (const distorch::error&) {
  }
  return 0;
}
