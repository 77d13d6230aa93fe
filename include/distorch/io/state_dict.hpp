#pragma once
/// \file
/// `load_state_dict`: fills a module's parameters and buffers from a `weight_source` by name.
///
/// File names map to module names by prefix rules: strip the first matching prefix (checkpoints
/// often nest the model, e.g. ComfyUI's `model.diffusion_model.`), then prepend one. Values are
/// copied into the existing tensors under `NoGradGuard`, so every handle to a parameter (an
/// optimizer, a tied weight, a planner's inventory) stays valid. Matching is checked for every
/// tensor before any is written, and every source tensor is materialized before the first copy:
/// a load that fails leaves the module untouched.
///
/// Example:
/// \code
///   auto src = distorch::open_weights("sd15.safetensors");
///   distorch::load_options opt;
///   opt.strip_prefixes = {"model.diffusion_model."};
///   opt.only_prefixed = true;   // ignore the VAE and text encoder in the same file
///   auto report = distorch::load_state_dict(*unet, *src, opt);
/// \endcode

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <torch/nn/module.h>

#include <optional>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "distorch/core/error.hpp"
#include "distorch/io/weight_source.hpp"

namespace distorch::inline v0 {

/// How file tensor names map to module names and how values are converted.
struct load_options {
  /// Fail, before writing anything, on missing or unexpected keys or shape mismatches.
  bool strict = true;
  /// The first prefix a file name starts with is removed from it.
  std::vector<std::string> strip_prefixes;
  /// With `strip_prefixes`: file tensors matching none of them are skipped instead of unexpected.
  bool only_prefixed = false;
  /// Prepended to every file name after stripping.
  std::string add_prefix;
  /// When set, floating-point parameters and buffers are converted to this dtype (their storage
  /// is replaced in place with `set_data`; integer and bool buffers keep theirs). When unset,
  /// values are converted to each tensor's current dtype.
  std::optional<at::ScalarType> dtype;
};

/// One tensor whose shape differs between file and module.
struct shape_mismatch {
  std::string name;  ///< module name
  std::vector<std::int64_t> file_shape;
  std::vector<std::int64_t> module_shape;
};

/// What a load did, by module name (file names for `unexpected` and `skipped`).
struct load_report {
  std::vector<std::string> loaded;
  std::vector<std::string> missing;      ///< in the module, not in the file
  std::vector<std::string> unexpected;   ///< in the file, not in the module (file names)
  std::vector<std::string> skipped;      ///< filtered out by `only_prefixed` (file names)
  std::vector<shape_mismatch> mismatched;

  /// True when every module tensor was loaded and every file tensor used.
  bool complete() const noexcept { return missing.empty() && unexpected.empty() && mismatched.empty(); }
};

namespace detail {

inline std::string load_shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

inline std::string describe_load_problems(const load_report& r) {
  std::string out;
  auto list = [&](const char* what, const std::vector<std::string>& names) {
    if (names.empty()) return;
    if (!out.empty()) out += "; ";
    out += what;
    for (std::size_t i = 0; i < names.size(); ++i) out += (i ? ", " : " ") + names[i];
  };
  list("missing from the file:", r.missing);
  list("not in the module:", r.unexpected);
  if (!r.mismatched.empty()) {
    if (!out.empty()) out += "; ";
    out += "shape mismatch:";
    for (std::size_t i = 0; i < r.mismatched.size(); ++i) {
      const auto& m = r.mismatched[i];
      out += (i ? ", " : " ") + m.name + " (file " + load_shape_text(m.file_shape) + ", module " +
             load_shape_text(m.module_shape) + ")";
    }
  }
  return out;
}

}  // namespace detail

/// Loads tensors from `source` into `module`'s parameters and buffers (recursively, by dotted
/// name). In strict mode any missing or unexpected key or shape mismatch is a `format_error`
/// naming each, raised before anything is written; otherwise matching tensors are loaded and the
/// rest reported. Two file tensors mapping to one module name is always an error.
/// \code
///   auto report = distorch::load_state_dict(*model, *distorch::open_weights("m.safetensors"),
///                                           {.strict = false});
///   for (const auto& name : report.missing) std::cerr << "not in file: " << name << '\n';
/// \endcode
inline load_report load_state_dict(torch::nn::Module& module, const weight_source& source,
                                   const load_options& options = {}) {
  std::unordered_map<std::string, at::Tensor> targets;
  std::vector<std::string> target_order;
  for (const auto& item : module.named_parameters(true)) {
    targets.emplace(item.key(), item.value());
    target_order.push_back(item.key());
  }
  for (const auto& item : module.named_buffers(true)) {
    if (!item.value().defined()) continue;
    if (targets.emplace(item.key(), item.value()).second) target_order.push_back(item.key());
  }

  load_report report;
  std::vector<std::pair<std::string, std::string>> plan;  // file name, module name
  std::unordered_map<std::string, std::string> claimed;   // module name -> file name
  for (const auto& record : source.records()) {
    std::string name = record.name;
    bool stripped = false;
    for (const auto& prefix : options.strip_prefixes) {
      if (name.size() >= prefix.size() && name.compare(0, prefix.size(), prefix) == 0) {
        name.erase(0, prefix.size());
        stripped = true;
        break;
      }
    }
    if (!stripped && options.only_prefixed && !options.strip_prefixes.empty()) {
      report.skipped.push_back(record.name);
      continue;
    }
    name.insert(0, options.add_prefix);
    if (auto [it, fresh] = claimed.emplace(name, record.name); !fresh)
      throw format_error({"loading state dict from " + source.path(), record.name, std::nullopt,
                          "maps to module tensor '" + name + "', as does '" + it->second + "'",
                          "adjust strip_prefixes / add_prefix so every file tensor has its own name"});
    const auto target = targets.find(name);
    if (target == targets.end()) {
      report.unexpected.push_back(record.name);
      continue;
    }
    const auto module_shape = target->second.sizes().vec();
    if (module_shape != record.shape) {
      report.mismatched.push_back({name, record.shape, module_shape});
      continue;
    }
    plan.emplace_back(record.name, name);
  }
  std::unordered_map<std::string, bool> planned;
  for (const auto& [file_name, module_name] : plan) planned.emplace(module_name, true);
  for (const auto& name : target_order) {
    if (planned.count(name) != 0) continue;
    bool mismatched = false;
    for (const auto& m : report.mismatched) mismatched = mismatched || m.name == name;
    if (!mismatched) report.missing.push_back(name);
  }
  if (options.strict && !report.complete())
    throw format_error({"loading state dict from " + source.path(), module.name(), std::nullopt,
                        detail::describe_load_problems(report),
                        "fix the names with strip_prefixes / add_prefix, or load with strict = false"});

  // Materialize everything first so a bad tensor cannot leave the module half loaded.
  std::vector<at::Tensor> values;
  values.reserve(plan.size());
  for (const auto& [file_name, module_name] : plan) values.push_back(source.load(file_name));

  c10::NoGradGuard no_grad;
  for (std::size_t i = 0; i < plan.size(); ++i) {
    at::Tensor& target = targets.at(plan[i].second);
    if (options.dtype && target.is_floating_point() && target.scalar_type() != *options.dtype)
      target.set_data(at::empty(target.sizes(), target.options().dtype(*options.dtype)));
    target.copy_(values[i]);
    values[i] = at::Tensor();  // release the view (and its mapping) as soon as it is copied
    report.loaded.push_back(plan[i].second);
  }
  return report;
}

}  // namespace distorch::inline v0
