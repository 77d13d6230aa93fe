#pragma once
/// \file
/// The key map: adapter module keys → model tensor names, built FORWARD from the model's own tensor
/// names. Each model tensor generates the keys every known trainer would write for it (kohya's
/// `lora_unet_` with dots flattened to underscores, diffusers' `unet.` / `transformer.`, PEFT's
/// `base_model.model.`, the generic names, and the user's prefix rules); an adapter key then
/// either finds its tensor by exact lookup or is unmatched. LoRA names are never parsed back into
/// module paths: `lora_unet_down_blocks_0` cannot be un-flattened reliably, but it can be
/// generated exactly from `diffusion_model.down_blocks.0`.
///
/// Pure C++20 (no LibTorch).
///
/// Example:
/// \code
///   std::vector<std::string> model{"diffusion_model.input_blocks.1.proj_in.weight"};
///   auto map = distorch::key_map::build(model);
///   map.find("lora_unet_input_blocks_1_proj_in")->tensor;   // "diffusion_model.input_blocks.1.proj_in.weight"
///   map.find("unet.input_blocks.1.proj_in")->convention;     // distorch::key_convention::diffusers
/// \endcode

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "distorch/core/error.hpp"
#include "distorch/model/inventory.hpp"

namespace distorch::inline v0 {

/// The family a key mapping rule comes from (reported by `distorch lora inspect`).
enum class key_convention : std::uint8_t { user, generic, kohya, diffusers, peft };

/// The convention as a word: "user", "generic", "kohya", "diffusers", "peft".
/// \code distorch::key_convention_name(distorch::key_convention::kohya);   // "kohya" \endcode
constexpr std::string_view key_convention_name(key_convention c) noexcept {
  switch (c) {
    case key_convention::user: return "user";
    case key_convention::generic: return "generic";
    case key_convention::kohya: return "kohya";
    case key_convention::diffusers: return "diffusers";
    case key_convention::peft: return "peft";
  }
  return "?";
}

/// One forward rule: a model module path starting with `model_prefix` is also known to adapters as
/// `adapter_prefix` + the rest of the path, with '.' turned into '_' when `flatten_dots` is set.
struct prefix_rule {
  std::string model_prefix;
  std::string adapter_prefix;
  bool flatten_dots = false;
  key_convention convention = key_convention::user;
};

/// The built-in rules, in precedence order (the first rule to claim an adapter key keeps it).
/// The model prefixes cover bare module names, ComfyUI/ldm state dicts (`diffusion_model.`,
/// `model.diffusion_model.`) and the ComfyUI text encoder names (`clip_l.`, `clip_g.`).
inline const std::vector<prefix_rule>& default_prefix_rules() {
  using c = key_convention;
  static const std::vector<prefix_rule> rules{
      // An adapter that names the model's own module paths is the most specific of all.
      {"", "", false, c::generic},
      {"diffusion_model.", "", false, c::generic},
      {"model.diffusion_model.", "", false, c::generic},
      {"", "diffusion_model.", false, c::generic},
      {"model.", "", false, c::generic},
      {"", "text_encoders.", false, c::generic},
      // kohya / sd-scripts: one flat name per module.
      {"diffusion_model.", "lora_unet_", true, c::kohya},
      {"model.diffusion_model.", "lora_unet_", true, c::kohya},
      {"", "lora_unet_", true, c::kohya},
      {"diffusion_model.", "lora_transformer_", true, c::kohya},
      {"", "lora_transformer_", true, c::kohya},
      {"diffusion_model.", "lycoris_", true, c::kohya},
      {"", "lycoris_", true, c::kohya},
      {"text_encoder.", "lora_te_", true, c::kohya},
      {"text_encoder.", "lora_te1_", true, c::kohya},
      {"text_encoder_2.", "lora_te2_", true, c::kohya},
      {"cond_stage_model.transformer.", "lora_te_", true, c::kohya},
      {"clip_l.transformer.", "lora_te_", true, c::kohya},
      {"clip_l.transformer.", "lora_te1_", true, c::kohya},
      {"clip_g.transformer.", "lora_te2_", true, c::kohya},
      {"conditioner.embedders.0.transformer.", "lora_te1_", true, c::kohya},
      // diffusers: the pipeline component name in front of the module path.
      {"", "unet.", false, c::diffusers},
      {"diffusion_model.", "unet.", false, c::diffusers},
      {"", "transformer.", false, c::diffusers},
      {"diffusion_model.", "transformer.", false, c::diffusers},
      {"clip_l.transformer.", "text_encoder.", false, c::diffusers},
      {"cond_stage_model.transformer.", "text_encoder.", false, c::diffusers},
      {"clip_g.transformer.", "text_encoder_2.", false, c::diffusers},
      // PEFT: the wrapper's own attribute path.
      {"", "base_model.model.", false, c::peft},
      {"diffusion_model.", "base_model.model.", false, c::peft},
      {"", "unet.base_model.model.", false, c::peft},
      {"diffusion_model.", "unet.base_model.model.", false, c::peft},
      {"text_encoder.", "text_encoder.base_model.model.", false, c::peft},
  };
  return rules;
}

/// Where an adapter key lands.
struct key_target {
  std::string tensor;                          ///< the model tensor the group patches ("x.weight")
  key_convention convention = key_convention::generic;
};

namespace detail {

/// The module key of a model tensor: its name without ".weight"; other tensors (biases, bare
/// parameters such as `pos_embed`) keep their full name, so a `.diff` can target them too.
inline std::string_view module_key_of(std::string_view tensor_name) noexcept {
  constexpr std::string_view weight = ".weight";
  if (tensor_name.size() > weight.size() && tensor_name.ends_with(weight))
    return tensor_name.substr(0, tensor_name.size() - weight.size());
  return tensor_name;
}

inline std::string adapter_key_for(std::string_view module_key, const prefix_rule& rule) {
  std::string key = rule.adapter_prefix;
  const std::string_view rest = module_key.substr(rule.model_prefix.size());
  const std::size_t start = key.size();
  key.append(rest);
  if (rule.flatten_dots)
    for (std::size_t i = start; i < key.size(); ++i)
      if (key[i] == '.') key[i] = '_';
  return key;
}

}  // namespace detail

/// Adapter module key → model tensor, from the model's names and the prefix rules.
///
/// The generated keys are not stored one by one (33 rules × 100k tensors would be millions of
/// strings): the map keeps, per model prefix, an index of the forward-generated module paths
/// (flattened where a rule flattens), and a lookup strips a rule's adapter prefix and looks the
/// rest up exactly. The set of keys that resolve is the same as if every key had been generated.
class key_map {
 public:
  /// Builds the map from model tensor names. User rules come first and win every collision;
  /// then the built-in rules in `default_prefix_rules()` order; within a rule, earlier model
  /// tensors win. Throws `lora_error` for a user rule whose prefixes are both empty and that
  /// flattens nothing (it would only repeat the identity rule).
  /// \code
  ///   std::vector<distorch::prefix_rule> mine{{"model.", "my_lora_", true}};
  ///   auto map = distorch::key_map::build(names, mine);
  /// \endcode
  static key_map build(std::span<const std::string> model_names, std::span<const prefix_rule> user_rules = {}) {
    key_map m;
    for (const auto& rule : user_rules) {
      if (rule.model_prefix.empty() && rule.adapter_prefix.empty() && !rule.flatten_dots)
        throw lora_error({"building the LoRA key map", "(empty prefix rule)", std::nullopt,
                          "a rule with no model prefix, no adapter prefix and no flattening maps nothing new",
                          "give the rule a model prefix or an adapter prefix"});
      prefix_rule r = rule;
      r.convention = key_convention::user;
      m.rules_.push_back(std::move(r));
    }
    for (const auto& rule : default_prefix_rules()) m.rules_.push_back(rule);
    m.names_.assign(model_names.begin(), model_names.end());
    for (std::size_t i = 0; i < m.names_.size(); ++i) {
      m.tensors_.try_emplace(m.names_[i], i);
      m.modules_.try_emplace(std::string(detail::module_key_of(m.names_[i])), i);
    }
    // One flattened index per distinct model prefix of the flattening rules.
    for (const auto& rule : m.rules_) {
      if (!rule.flatten_dots || m.flat_.count(rule.model_prefix) != 0) continue;
      auto& index = m.flat_[rule.model_prefix];
      const prefix_rule strip{rule.model_prefix, "", true, rule.convention};
      for (std::size_t i = 0; i < m.names_.size(); ++i) {
        const std::string_view module = detail::module_key_of(m.names_[i]);
        if (!module.starts_with(rule.model_prefix) || module.size() == rule.model_prefix.size()) continue;
        index.try_emplace(detail::adapter_key_for(module, strip), i);
      }
    }
    return m;
  }

  /// Same, from the records of an inventory or a weight file header.
  static key_map build(std::span<const tensor_record> records, std::span<const prefix_rule> user_rules = {}) {
    std::vector<std::string> names;
    names.reserve(records.size());
    for (const auto& r : records) names.push_back(r.name);
    return build(names, user_rules);
  }

  /// The target of an adapter module key, or nothing when the model has none.
  /// \code if (auto t = map.find("lora_unet_out_0")) std::cout << t->tensor; \endcode
  std::optional<key_target> find(std::string_view adapter_key) const {
    for (const auto& rule : rules_) {
      if (!adapter_key.starts_with(rule.adapter_prefix) || adapter_key.size() == rule.adapter_prefix.size()) continue;
      const std::string_view rest = adapter_key.substr(rule.adapter_prefix.size());
      if (rule.flatten_dots) {
        // A flattened key holds no dots; one that does was not generated by this rule.
        if (rest.find('.') != std::string_view::npos) continue;
        auto index = flat_.find(rule.model_prefix);
        if (index == flat_.end()) continue;
        auto it = index->second.find(std::string(rest));
        if (it != index->second.end()) return key_target{names_[it->second], rule.convention};
      } else {
        std::string module = rule.model_prefix;
        module.append(rest);
        auto it = modules_.find(module);
        if (it != modules_.end()) return key_target{names_[it->second], rule.convention};
      }
    }
    return std::nullopt;
  }

  /// The bias that belongs to a weight target ("x.weight" → "x.bias"), when the model has it.
  /// \code auto bias = map.bias_of("blocks.0.proj.weight"); \endcode
  std::optional<std::string> bias_of(std::string_view weight_tensor) const {
    constexpr std::string_view weight = ".weight";
    if (!weight_tensor.ends_with(weight)) return std::nullopt;
    std::string bias{weight_tensor.substr(0, weight_tensor.size() - weight.size())};
    bias += ".bias";
    if (!has_tensor(bias)) return std::nullopt;
    return bias;
  }

  /// True when the model has a tensor of this exact name.
  bool has_tensor(std::string_view name) const { return tensors_.find(std::string(name)) != tensors_.end(); }

  /// The rules in the order they are tried.
  const std::vector<prefix_rule>& rules() const noexcept { return rules_; }

 private:
  std::vector<prefix_rule> rules_;
  std::vector<std::string> names_;
  std::unordered_map<std::string, std::size_t> tensors_;
  std::unordered_map<std::string, std::size_t> modules_;
  std::unordered_map<std::string, std::unordered_map<std::string, std::size_t>> flat_;
};

}  // namespace distorch::inline v0
