#pragma once
/// \file
/// PEFT's `adapter_config.json`: the file that, beside a PEFT adapter, holds what the weights do not
/// (`lora_alpha`, `r`, `use_rslora`, per-module `alpha_pattern`). PEFT files carry no `.alpha`
/// tensors, so without this file their scale would silently be 1.0 (ComfyUI's default) instead of
/// lora_alpha / r. Pure C++20 over the JSON text (no LibTorch), fuzzed.
///
/// Example:
/// \code
///   auto cfg = distorch::parse_peft_config(R"({"peft_type":"LORA","r":8,"lora_alpha":16})", "adapter_config.json");
///   distorch::peft_scale(cfg, "blocks.0.attn.qkv", 8);   // 2.0
/// \endcode

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "distorch/core/error.hpp"

namespace distorch::inline v0 {

/// The fields of adapter_config.json that change the merge.
struct peft_config {
  std::string peft_type = "LORA";
  std::optional<std::int64_t> r;                             ///< the default rank (informational)
  std::optional<double> lora_alpha;                          ///< none: the adapter's own alpha rules
  bool use_rslora = false;                                   ///< scale alpha / sqrt(rank)
  std::vector<std::pair<std::string, double>> alpha_pattern; ///< module suffix → alpha, in file order
};

namespace detail {

[[noreturn]] inline void peft_fail(std::string_view path, std::string subject, std::string problem, std::string fix) {
  throw lora_error({"reading PEFT config " + std::string(path), std::move(subject), std::nullopt, std::move(problem),
                    std::move(fix)});
}

/// Deepest nesting of [ and { outside strings; nlohmann's parser recurses once per level, so a
/// hostile file of a million '[' would exhaust the stack before any error could be reported.
inline std::size_t peft_json_depth(std::string_view text) noexcept {
  std::size_t depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char ch : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (ch == '\\') escaped = true;
      else if (ch == '"') in_string = false;
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '[' || ch == '{') {
      deepest = std::max(deepest, ++depth);
    } else if ((ch == ']' || ch == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

inline double peft_number(const nlohmann::json& v, std::string_view path, const std::string& field) {
  if (!v.is_number()) peft_fail(path, field, "must be a number, found " + std::string(v.type_name()), "write a number such as 16");
  const double d = v.get<double>();
  if (!std::isfinite(d)) peft_fail(path, field, "must be finite", "write a finite number such as 16");
  return d;
}

}  // namespace detail

/// Parses adapter_config.json text. `path` only names the file in errors.
///
/// Throws `lora_error` for malformed JSON, a non-object top level, `lora_alpha` / `r` /
/// `alpha_pattern` values of the wrong type, a rank below 1, and a `peft_type` other than LORA
/// (LoHa / LoKr configs scale differently and are not read from here). Unknown fields are ignored.
/// \code
///   auto cfg = distorch::parse_peft_config(text, "lora/adapter_config.json");
///   if (cfg.use_rslora) std::cout << "rank-stabilized\n";
/// \endcode
inline peft_config parse_peft_config(std::string_view text, std::string_view path) {
  constexpr std::size_t max_depth = 64;
  if (detail::peft_json_depth(text) > max_depth)
    detail::peft_fail(path, "(document)", "JSON nested deeper than 64 levels", "pass PEFT's adapter_config.json");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::parse_error& e) {
    throw lora_error({"reading PEFT config " + std::string(path), "(document)",
                      error_position{"offset", static_cast<std::uint64_t>(e.byte)}, "malformed JSON",
                      "pass PEFT's adapter_config.json or remove the broken file"});
  } catch (const nlohmann::json::exception& e) {
    // Numbers too large for a double end up here (out_of_range), not as parse errors.
    throw lora_error({"reading PEFT config " + std::string(path), "(document)", std::nullopt,
                      std::string("unreadable JSON: ") + e.what(), "pass PEFT's adapter_config.json or remove the broken file"});
  }
  if (!j.is_object()) detail::peft_fail(path, "(document)", "top level is not a JSON object", "pass PEFT's adapter_config.json");
  peft_config cfg;
  if (auto it = j.find("peft_type"); it != j.end() && !it->is_null()) {
    if (!it->is_string()) detail::peft_fail(path, "peft_type", "must be a string", "write \"LORA\"");
    cfg.peft_type = it->get<std::string>();
    if (cfg.peft_type != "LORA")
      detail::peft_fail(path, "peft_type", "'" + cfg.peft_type + "' is not supported here; only LORA configs carry lora_alpha",
                        "remove the config file to use the adapter's own alpha tensors");
  }
  if (auto it = j.find("r"); it != j.end() && !it->is_null()) {
    if (!it->is_number_integer() && !it->is_number_unsigned())
      detail::peft_fail(path, "r", "must be an integer", "write the rank, such as 16");
    const auto r = it->get<std::int64_t>();
    if (r < 1) detail::peft_fail(path, "r", "rank " + std::to_string(r) + " is below 1", "write the rank, such as 16");
    cfg.r = r;
  }
  if (auto it = j.find("lora_alpha"); it != j.end() && !it->is_null()) cfg.lora_alpha = detail::peft_number(*it, path, "lora_alpha");
  if (auto it = j.find("use_rslora"); it != j.end() && !it->is_null()) {
    if (!it->is_boolean()) detail::peft_fail(path, "use_rslora", "must be true or false", "write true or false");
    cfg.use_rslora = it->get<bool>();
  }
  if (auto it = j.find("alpha_pattern"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) detail::peft_fail(path, "alpha_pattern", "must be an object of module → alpha", "write {\"to_q\": 8}");
    for (const auto& [key, value] : it->items()) {
      if (key.empty()) detail::peft_fail(path, "alpha_pattern", "has an empty module key", "name a module, such as to_q");
      cfg.alpha_pattern.emplace_back(key, detail::peft_number(value, path, "alpha_pattern." + key));
    }
  }
  return cfg;
}

/// The alpha PEFT uses for a module: the first `alpha_pattern` entry whose key equals the module
/// path or ends it after a '.', else `lora_alpha`. PEFT matches the keys as regular expressions;
/// distorch matches them as literal path suffixes, which is what trainers write.
/// \code auto a = distorch::peft_alpha(cfg, "down_blocks.0.attn.to_q"); \endcode
inline std::optional<double> peft_alpha(const peft_config& cfg, std::string_view module_path) {
  for (const auto& [key, alpha] : cfg.alpha_pattern) {
    if (module_path == key) return alpha;
    if (module_path.size() > key.size() && module_path.ends_with(key) && module_path[module_path.size() - key.size() - 1] == '.')
      return alpha;
  }
  return cfg.lora_alpha;
}

/// The scale PEFT applies for a module of the given rank: alpha / rank, or alpha / sqrt(rank)
/// with `use_rslora`. Without any alpha the config leaves the scale at 1.0.
/// \code distorch::peft_scale(cfg, "to_q", 16); \endcode
inline double peft_scale(const peft_config& cfg, std::string_view module_path, std::int64_t rank) {
  const auto alpha = peft_alpha(cfg, module_path);
  if (!alpha || rank < 1) return 1.0;
  return cfg.use_rslora ? *alpha / std::sqrt(static_cast<double>(rank)) : *alpha / static_cast<double>(rank);
}

}  // namespace distorch::inline v0
