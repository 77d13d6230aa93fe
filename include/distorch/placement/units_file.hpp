#pragma once
/// \file
/// A model described by its units alone: a JSON list of `{"name": ..., "bytes": ...}` in model
/// order, as `distorch plan --units FILE.json` reads it. Useful for what-if planning without
/// weight files. Grouping rules (`blocks\.\d+`) coarsen the units as they do for inventories.
///
/// Example:
/// \code
///   auto model = distorch::inventory_from_units_json(nlohmann::json::parse(
///       R"([{"name": "embed", "bytes": 1024}, {"name": "blocks.0.attn", "bytes": 4096}])"));
///   model.size();   // 2
/// \endcode

#include <cstdint>
#include <fstream>
#include <limits>
#include <span>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "distorch/core/error.hpp"
#include "distorch/core/json_file.hpp"
#include "distorch/model/inventory.hpp"

namespace distorch::inline v0 {

/// Builds an inventory from a units list. Throws `format_error` naming the field
/// (`units[2].bytes`, ...) for anything that is not such a list, and for a name given twice;
/// `allocation_error` naming the rule for a grouping rule that is invalid or matches no unit name.
/// \code
///   auto model = distorch::inventory_from_units_json(json, {{R"(blocks\.\d+)"}});
/// \endcode
inline inventory inventory_from_units_json(const nlohmann::json& j, std::span<const grouping_rule> grouping = {}) {
  constexpr std::string_view doing = "reading units list";
  constexpr std::string_view form = "write a JSON list of {\"name\": \"blocks.0\", \"bytes\": 1048576} in model order";
  auto fail = [&](std::string field, std::string problem) {
    throw format_error({std::string(doing), std::move(field), std::nullopt, std::move(problem), std::string(form)});
  };
  if (!j.is_array()) fail("(root)", std::string("expected an array, found ") + j.type_name());
  detail::grouper rules(grouping);
  std::vector<unit> units;
  std::unordered_map<std::string, std::size_t> by_group;
  std::unordered_map<std::string, std::size_t> seen;
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < j.size(); ++i) {
    const std::string path = "units[" + std::to_string(i) + "]";
    const auto& u = j[i];
    if (!u.is_object()) fail(path, std::string("expected an object, found ") + u.type_name());
    const auto name = u.find("name");
    if (name == u.end()) fail(path + ".name", "missing field");
    if (!name->is_string()) fail(path + ".name", std::string("expected a string, found ") + name->type_name());
    const auto bytes = u.find("bytes");
    if (bytes == u.end()) fail(path + ".bytes", "missing field");
    const bool non_negative = bytes->is_number_unsigned() || (bytes->is_number_integer() && bytes->get<std::int64_t>() >= 0);
    if (!non_negative)
      fail(path + ".bytes", bytes->is_number_integer() ? "negative size" : std::string("expected a non-negative integer, found ") + bytes->type_name());
    const std::string unit_name = name->get<std::string>();
    if (auto [it, fresh] = seen.try_emplace(unit_name, i); !fresh)
      fail(path + ".name", "unit '" + unit_name + "' is listed twice (first at units[" + std::to_string(it->second) + "])");
    const std::uint64_t size = bytes->get<std::uint64_t>();
    const std::string key{rules.unit_of(unit_name)};
    auto [slot, inserted] = by_group.try_emplace(key, units.size());
    if (inserted) units.push_back(unit{key, {}, 0});
    if (total > std::numeric_limits<std::uint64_t>::max() - size) fail(path + ".bytes", "model size overflows 64 bits");
    total += size;
    units[slot->second].bytes += size;
  }
  rules.check_every_rule_matched("unit name");
  return inventory(std::move(units));
}

/// Reads a units file. Throws `format_error` for an unreadable file or invalid JSON (with the
/// byte offset) and as `inventory_from_units_json` for a wrong structure.
/// \code
///   auto model = distorch::read_units_file("units.json");
/// \endcode
inline inventory read_units_file(const std::string& path, std::span<const grouping_rule> grouping = {}) {
  const nlohmann::json j = detail::read_json_file(path, "reading units list", "give the path of an existing JSON file",
                                                  "write a JSON list of {\"name\", \"bytes\"} objects");
  return inventory_from_units_json(j, grouping);
}

}  // namespace distorch::inline v0
