// Fuzzes the JSON readers of placement/: plans (plan_from_json) and units lists
// (inventory_from_units_json). Any JSON value must give a value or a distorch::error; a plan that
// reads back must write and read again to the same plan.
#include <cstddef>
#include <cstdint>

#include <nlohmann/json.hpp>

#include "distorch/placement/plan_io.hpp"
#include "distorch/placement/units_file.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(data, data + size);
  } catch (const nlohmann::json::exception&) {
    return 0;
  }
  try {
    const auto plan = distorch::plan_from_json(j);
    if (distorch::plan_from_json(distorch::plan_to_json(plan)) != plan) __builtin_trap();
  } catch (const distorch::error&) {
  }
  try {
    (void)distorch::inventory_from_units_json(j);
  } catch (const distorch::error&) {
  }
  return 0;
}
