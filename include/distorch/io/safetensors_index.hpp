#pragma once
/// \file
/// The sharded-checkpoint index, `model.safetensors.index.json`: pure C++20, no LibTorch. It maps
/// every tensor name to the shard file that holds it ({"metadata": {...}, "weight_map": {name:
/// file}}). io/safetensors_source.hpp opens the shards and presents them as one source.
///
/// Shard names are paths relative to the index's folder; absolute paths and `..` components are
/// rejected, so an index can never make the reader open files outside its folder.
///
/// Example:
/// \code
///   auto index = distorch::parse_safetensors_index(text, "model.safetensors.index.json");
///   for (const auto& shard : index.shards()) std::cout << shard << '\n';
/// \endcode

#include <algorithm>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "distorch/core/error.hpp"
#include "distorch/io/safetensors.hpp"

namespace distorch::inline v0 {

/// A parsed `model.safetensors.index.json`.
struct safetensors_index {
  /// "metadata" as strings; non-string values (such as total_size) are printed as JSON.
  std::map<std::string, std::string> metadata;
  /// tensor name → shard file, in the order of the index.
  std::vector<std::pair<std::string, std::string>> weight_map;

  /// The distinct shard files, sorted by name (model-00001-of-00003 first).
  std::vector<std::string> shards() const {
    std::vector<std::string> out;
    for (const auto& [tensor, shard] : weight_map) out.push_back(shard);
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    return out;
  }
};

/// Largest index file the reader accepts; real ones are kilobytes to a few megabytes.
inline constexpr std::uint64_t safetensors_max_index_bytes = 256ull << 20;

namespace detail {

[[noreturn]] inline void index_fail(std::string_view path, std::string subject, std::optional<error_position> pos,
                                    std::string problem, std::string fix) {
  throw format_error({"reading safetensors index " + std::string(path), std::move(subject), std::move(pos),
                      std::move(problem), std::move(fix)});
}

/// True when a shard name stays inside the index's folder.
inline bool safe_relative_path(std::string_view p) noexcept {
  if (p.empty() || p.front() == '/' || p.find('\0') != std::string_view::npos) return false;
  std::size_t start = 0;
  while (start <= p.size()) {
    const auto slash = p.find('/', start);
    const auto part = p.substr(start, slash == std::string_view::npos ? std::string_view::npos : slash - start);
    if (part == ".." || part.empty()) return false;
    if (slash == std::string_view::npos) break;
    start = slash + 1;
  }
  return true;
}

}  // namespace detail

/// Parses and validates an index file's text. `path` names it in errors. Throws `format_error`
/// for invalid UTF-8 or JSON, a missing or malformed `weight_map`, a duplicate tensor name, or a
/// shard path that leaves the index's folder.
/// \code
///   auto index = distorch::parse_safetensors_index(R"({"weight_map": {"w": "a.safetensors"}})", "x.index.json");
/// \endcode
inline safetensors_index parse_safetensors_index(std::string_view text, std::string_view path) {
  const auto bytes = std::as_bytes(std::span(text.data(), text.size()));
  if (const auto bad = detail::first_invalid_utf8(bytes))
    detail::index_fail(path, "", error_position{"offset", *bad}, "index is not valid UTF-8",
                       "the index must be UTF-8 JSON; the file is corrupt");
  if (detail::json_nesting_depth(text) > detail::safetensors_max_json_depth)
    detail::index_fail(path, "", std::nullopt, "index JSON nests too deeply", "the file is corrupt");
  nlohmann::ordered_json doc;
  try {
    doc = detail::parse_json_unique_keys(text, 0, path, "index");
  } catch (const format_error& e) {
    detail::index_fail(path, e.info().subject, e.info().position, e.info().problem,
                       "write the index as {\"metadata\": {...}, \"weight_map\": {tensor: shard file}}");
  }
  if (!doc.is_object())
    detail::index_fail(path, "", std::nullopt, "index is not a JSON object",
                       "write the index as {\"metadata\": {...}, \"weight_map\": {tensor: shard file}}");
  safetensors_index index;
  if (const auto m = doc.find("metadata"); m != doc.end() && !m->is_null()) {
    if (!m->is_object())
      detail::index_fail(path, "metadata", std::nullopt, "metadata is not an object", "write metadata as an object");
    for (const auto& [k, v] : m->items()) index.metadata.emplace(k, v.is_string() ? v.get<std::string>() : v.dump());
  }
  const auto wm = doc.find("weight_map");
  if (wm == doc.end() || !wm->is_object())
    detail::index_fail(path, "weight_map", std::nullopt, "the index has no weight_map object",
                       "a sharded checkpoint index maps each tensor name to its shard in \"weight_map\"");
  for (const auto& [tensor, shard] : wm->items()) {
    if (!shard.is_string())
      detail::index_fail(path, tensor, std::nullopt, "weight_map value is not a file name",
                         "map each tensor to its shard's file name");
    const auto file = shard.get<std::string>();
    if (!detail::safe_relative_path(file))
      detail::index_fail(path, tensor, std::nullopt, "shard path '" + file + "' leaves the index's folder",
                         "name shards relative to the index's folder, without '..' or a leading '/'");
    index.weight_map.emplace_back(tensor, file);
  }
  return index;
}

}  // namespace distorch::inline v0
