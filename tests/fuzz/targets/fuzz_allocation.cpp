// Fuzzes the allocation grammar and everything a parsed string feeds: parsing must return a spec
// or throw allocation_error; its storage suffixes must be storage dtypes of devices it names; the
// spec's policy must give quotas or throw allocation_error; and planning a small fixed model must
// give a plan that survives a JSON round trip, or throw allocation_error / placement_error.
// Anything else (a crash, another exception) is a bug.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "distorch/placement/any_policy.hpp"
#include "distorch/placement/grammar.hpp"
#include "distorch/placement/plan_io.hpp"
#include "distorch/placement/planner.hpp"

namespace {

const distorch::topology& fuzz_topology() {
  static const auto topo = distorch::parse_topology("cuda:0=8GiB,cuda:1=4GiB,sim:0=2GiB,cpu=32GiB");
  return topo;
}

const distorch::inventory& fuzz_model() {
  static const auto model = [] {
    std::vector<distorch::unit> units{{"embed_tokens", {}, 64ull << 20}};
    for (int i = 0; i < 24; ++i) units.push_back({"blocks." + std::to_string(i), {}, (200ull + 7 * i) << 20});
    units.push_back({"norm", {}, 4096});
    units.push_back({"lm_head", {}, 64ull << 20});
    return distorch::inventory(std::move(units));
  }();
  return model;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  distorch::set_log_sink([](distorch::log_level, std::string_view) {});
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  distorch::allocation_spec spec;
  try {
    spec = distorch::parse_allocation(text);
  } catch (const distorch::allocation_error&) {
    return 0;
  }
  // Storage suffixes: one per suffixed entry, each a storage dtype, on a device the spec names.
  for (const auto& s : distorch::storage_of(spec)) {
    if (s.type != distorch::dtype::f8_e4m3 && s.type != distorch::dtype::f8_e5m2 && s.type != distorch::dtype::bf16 &&
        s.type != distorch::dtype::f16)
      __builtin_trap();
    const auto* e = spec.find(s.device);
    if (e == nullptr || e->storage != s.type || e->storage_column == 0 || e->storage_column > size + 1) __builtin_trap();
  }
  try {
    (void)distorch::check_against(spec, fuzz_topology(), size % 2 == 0);
  } catch (const distorch::allocation_error&) {
  }
  const auto compute = spec.mode == distorch::allocation_mode::virtual_vram ? spec.vvram_compute : distorch::device_id::cuda(0);
  try {
    const auto plan = distorch::make_plan(fuzz_model(), fuzz_topology(), compute, distorch::policy_from_spec(spec),
                                          {.tiny_ppm = 100, .head_rules = {}, .prefetch_depth = size % 4, .reserve = 0, .strict = size % 3 == 0});
    if (distorch::plan_from_json(distorch::plan_to_json(plan)) != plan) __builtin_trap();
    (void)distorch::format_plan_table(plan);
  } catch (const distorch::allocation_error&) {
  } catch (const distorch::placement_error&) {
  }
  return 0;
}
