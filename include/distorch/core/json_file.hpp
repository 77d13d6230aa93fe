#pragma once
/// \file
/// Reading a JSON file that a user named (a units list, a link profile): the one place that turns
/// "cannot open" and "not JSON" into `format_error`s naming the file, the byte offset of a syntax
/// error, and the fix the caller gives. Pure C++ (nlohmann::json), so the readers built on it stay
/// fuzzable.
///
/// Example:
/// \code
///   nlohmann::json j = distorch::detail::read_json_file("units.json", "reading units list",
///       "give the path of an existing JSON file", "write a JSON list of {\"name\", \"bytes\"} objects");
/// \endcode

#include <cstdint>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "distorch/core/error.hpp"

namespace distorch::inline v0::detail {

/// Reads and parses `path`; `doing` describes the operation, `open_fix` and `parse_fix` are the
/// fixes shown when the file cannot be opened or is not valid JSON.
inline nlohmann::json read_json_file(const std::string& path, const std::string& doing, const std::string& open_fix,
                                     const std::string& parse_fix) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw format_error({doing, path, std::nullopt, "cannot open the file", open_fix});
  std::stringstream buffer;
  buffer << in.rdbuf();
  try {
    return nlohmann::json::parse(buffer.str());
  } catch (const nlohmann::json::parse_error& e) {
    throw format_error({doing, path, error_position{"offset", static_cast<std::uint64_t>(e.byte > 0 ? e.byte - 1 : 0)},
                        std::string("invalid JSON: ") + e.what(), parse_fix});
  }
}

}  // namespace distorch::inline v0::detail
