#pragma once
/// \file
/// `adapter_binding`: adapters bound to one model. It resolves every key group to its model tensor
/// through the forward key map, checks every shape against the tensor it patches, and reports the
/// keys that land nowhere, all from names and shapes alone, before any weight is loaded.
///
/// Example:
/// \code
///   auto src = distorch::open_weights("model.safetensors");
///   auto binding = distorch::adapter_binding::bind(src->records(), adapters, {.strict = true});
///   for (const auto& m : binding.report().matched) std::cout << m.key << " -> " << m.tensor << '\n';
/// \endcode

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <map>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "distorch/core/error.hpp"
#include "distorch/core/log.hpp"
#include "distorch/lora/adapter.hpp"
#include "distorch/lora/key_map.hpp"
#include "distorch/model/inventory.hpp"

namespace distorch::inline v0 {

/// A model tensor as binding sees it: its name, its shape, and whether it can be patched.
struct bind_target {
  std::string name;
  std::vector<std::int64_t> shape;
  bool floating = true;
};

/// How to bind.
struct binding_options {
  /// Unmatched adapter keys are a `lora_error` instead of a warning.
  bool strict = false;
  /// Extra forward rules, tried before the built-in ones.
  std::vector<prefix_rule> prefix_rules;
  /// Log unmatched keys as a warning (off when binding one unit of a model, whose adapter keys
  /// for other units are expected to be unmatched).
  bool warn_unmatched = true;
};

/// One group of one adapter applied to one tensor.
struct bound_patch {
  std::size_t adapter_index = 0;        ///< position in the adapter_set
  const adapter_group* group = nullptr; ///< owned by the adapter, which the set keeps alive
  bool bias = false;                    ///< applies the group's `.diff_b` to the bias
};

/// One adapter key group that bound to a model tensor (a line of `distorch lora inspect`).
struct matched_key {
  std::size_t adapter_index = 0;
  std::string key;          ///< the group's module key
  std::string tensor;       ///< the model tensor it patches
  std::string kind;         ///< "lora", "loha", "lokr", "diff", "set", "diff_b"
  key_convention convention = key_convention::generic;
};

/// One adapter tensor that bound to nothing, with the reason.
struct unmatched_key {
  std::size_t adapter_index = 0;
  std::string key;          ///< the adapter tensor name
  std::string reason;
};

/// What bound where, and what did not.
struct binding_report {
  std::vector<matched_key> matched;
  std::vector<unmatched_key> unmatched;
};

namespace detail {

inline std::string unmatched_list(const std::vector<unmatched_key>& keys, std::size_t limit) {
  std::string list;
  for (std::size_t i = 0; i < keys.size() && i < limit; ++i) list += (i ? ", " : "") + keys[i].key;
  if (keys.size() > limit) list += ", and " + std::to_string(keys.size() - limit) + " more";
  return list;
}

/// The factor shapes of a group, for error messages: "lora_up [8, 4], lora_down [4, 16]".
inline std::string factor_shapes(const adapter& a, const adapter_group& g) {
  std::string out;
  for (std::size_t c = 0; c < component_count; ++c) {
    const auto role = static_cast<component>(c);
    if (!g.keys.has(role) || role == component::alpha || role == component::diff_b) continue;
    out += (out.empty() ? "" : ", ") + std::string(component_name(role)) + " " + shape_string(a.tensor(g.keys.name(role)).sizes());
  }
  return out;
}

}  // namespace detail

/// Adapters bound to one model's tensors.
class adapter_binding {
 public:
  /// Binds the adapters of `set` to the model tensors `model`.
  ///
  /// Throws `lora_error`:
  ///   - naming the key, the adapter shape and the weight shape when a group does not fit its tensor;
  ///   - when a group targets a tensor that is not floating point (quantized weights);
  ///   - when two groups of one adapter patch the same tensor;
  ///   - listing the keys when some map to no tensor and `options.strict` is set (otherwise those
  ///     keys go to the log as one warning, and to `report().unmatched`).
  /// \code
  ///   auto b = distorch::adapter_binding::bind(targets, adapters);
  ///   if (auto* p = b.patches_for("blocks.0.attn.qkv.weight")) std::cout << p->size() << " patches\n";
  /// \endcode
  static adapter_binding bind(std::span<const bind_target> model, const adapter_set& set,
                              const binding_options& options = {}) {
    adapter_binding b;
    std::vector<std::string> names;
    names.reserve(model.size());
    std::unordered_map<std::string, const bind_target*> by_name;
    for (const auto& t : model) {
      names.push_back(t.name);
      by_name.emplace(t.name, &t);
    }
    const auto map = key_map::build(names, options.prefix_rules);
    for (std::size_t i = 0; i < set.size(); ++i) {
      if (!set[i].file)
        throw lora_error({"binding adapters", "adapter " + std::to_string(i), std::nullopt, "the adapter is empty",
                          "load the adapter before binding"});
      const adapter& a = *set[i].file;
      for (const auto& key : a.unrecognized())
        b.report_.unmatched.push_back({i, key, "no adapter format uses this key (unknown suffix or incomplete group)"});
      for (const auto& g : a.groups()) {
        const auto target = map.find(g.keys.base);
        if (!target) {
          for (const auto& key : g.keys.names)
            if (!key.empty()) b.report_.unmatched.push_back({i, key, "no model tensor for module '" + g.keys.base + "'"});
          continue;
        }
        const bind_target& weight = *by_name.at(target->tensor);
        if (g.keys.kind) {
          b.check_fits(a, g, weight);
          b.add(weight.name, {i, &g, false}, a);
          b.report_.matched.push_back({i, g.keys.base, weight.name, std::string(adapter_kind_name(*g.keys.kind)),
                                       target->convention});
        }
        if (g.keys.patches_bias()) {
          const auto bias = map.bias_of(weight.name);
          if (!bias) {
            b.report_.unmatched.push_back({i, g.keys.name(component::diff_b), "the model has no bias for '" + weight.name + "'"});
            continue;
          }
          const bind_target& bt = *by_name.at(*bias);
          if (bt.shape != g.bias_shape || !bt.floating)
            throw lora_error({"binding adapter " + a.name(), g.keys.name(component::diff_b), std::nullopt,
                              "adapter shape " + detail::shape_string(g.bias_shape) + " does not fit bias '" + bt.name +
                                  "' of shape " + detail::shape_string(bt.shape) + (bt.floating ? "" : " (not floating point)"),
                              "use the adapter made for this model"});
          b.add(bt.name, {i, &g, true}, a);
          b.report_.matched.push_back({i, g.keys.base, bt.name, "diff_b", target->convention});
        }
      }
    }
    if (!b.report_.unmatched.empty()) {
      const std::string list = detail::unmatched_list(b.report_.unmatched, 50);
      if (options.strict)
        throw lora_error({"binding adapters", list, std::nullopt,
                          std::to_string(b.report_.unmatched.size()) + " adapter keys match no model tensor",
                          "use the adapter made for this model, add a prefix rule, or bind without strict mode"});
      if (options.warn_unmatched)
        log(log_level::warning, std::to_string(b.report_.unmatched.size()) + " adapter keys match no model tensor: " + list);
    }
    return b;
  }

  /// Same, from tensor records (an inventory's or a weight file header's).
  /// \code auto b = distorch::adapter_binding::bind(src->records(), adapters); \endcode
  static adapter_binding bind(std::span<const tensor_record> records, const adapter_set& set,
                              const binding_options& options = {}) {
    std::vector<bind_target> targets;
    targets.reserve(records.size());
    for (const auto& r : records) targets.push_back({r.name, r.shape, is_floating(r.type)});
    return bind(targets, set, options);
  }

  /// The patches for one tensor, in application order, or nullptr when nothing touches it.
  const std::vector<bound_patch>* patches_for(const std::string& tensor) const {
    auto it = patches_.find(tensor);
    return it == patches_.end() ? nullptr : &it->second;
  }

  /// Every tensor some adapter patches, sorted by name.
  std::vector<std::string> targets() const {
    std::vector<std::string> out;
    out.reserve(patches_.size());
    for (const auto& [name, p] : patches_) out.push_back(name);
    return out;
  }

  /// The tensors one adapter touches, sorted by name.
  std::vector<std::string> touched_by(std::size_t adapter_index) const {
    std::vector<std::string> out;
    for (const auto& [name, list] : patches_)
      for (const auto& p : list)
        if (p.adapter_index == adapter_index) {
          out.push_back(name);
          break;
        }
    return out;
  }

  /// What bound where and what did not.
  /// \code for (const auto& u : binding.report().unmatched) std::cerr << u.key << ": " << u.reason << '\n'; \endcode
  const binding_report& report() const noexcept { return report_; }

 private:
  void add(const std::string& tensor, bound_patch p, const adapter& a) {
    auto& list = patches_[tensor];
    for (const auto& q : list)
      if (q.adapter_index == p.adapter_index)
        throw lora_error({"binding adapter " + a.name(), p.group->keys.base, std::nullopt,
                          "patches '" + tensor + "', which module '" + q.group->keys.base + "' of the same adapter already patches",
                          "keep one key naming per module in the adapter file"});
    list.push_back(p);
  }

  void check_fits(const adapter& a, const adapter_group& g, const bind_target& w) const {
    const auto& k = g.keys;
    const std::string first_key = [&] {
      for (const auto& n : k.names)
        if (!n.empty()) return n;
      return k.base;
    }();
    if (!w.floating)
      throw lora_error({"binding adapter " + a.name(), first_key, std::nullopt,
                        "targets '" + w.name + "', which is not floating point (a quantized weight cannot be patched exactly)",
                        "patch the unquantized model, or dequantize it first"});
    const bool exact = *k.kind == adapter_kind::diff || *k.kind == adapter_kind::set;
    const std::int64_t rows = w.shape.empty() ? 1 : w.shape[0];
    const bool fits = exact ? (g.shape == w.shape) : (g.rows == rows && g.rows * g.cols == detail::numel_of(w.shape));
    if (!fits) {
      const std::string adapter_shape = exact ? detail::shape_string(g.shape)
                                              : "[" + std::to_string(g.rows) + ", " + std::to_string(g.cols) + "] (" +
                                                    detail::factor_shapes(a, g) + ")";
      throw lora_error({"binding adapter " + a.name(), first_key, std::nullopt,
                        "adapter shape " + adapter_shape + " does not fit weight '" + w.name + "' of shape " +
                            detail::shape_string(w.shape),
                        "use the adapter made for this model (same base model and size)"});
    }
    if (k.dora()) {
      const auto& ds = a.tensor(g, component::dora_scale);
      const bool output_axis = detail::dora_on_output_axis(ds, rows);
      const bool input_axis = w.shape.size() >= 2 && ds.numel() == w.shape[1];
      if (!output_axis && !input_axis)
        throw lora_error({"binding adapter " + a.name(), k.name(component::dora_scale), std::nullopt,
                          "dora_scale shape " + detail::shape_string(ds.sizes()) + " fits neither the output nor the input axis of weight '" +
                              w.name + "' of shape " + detail::shape_string(w.shape),
                          "use the adapter made for this model"});
    }
  }

  std::map<std::string, std::vector<bound_patch>> patches_;
  binding_report report_;
};

}  // namespace distorch::inline v0
