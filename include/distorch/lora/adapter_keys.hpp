#pragma once
/// \file
/// Adapter key groups: which tensors of an adapter file belong together and what kind of patch
/// they form. Pure C++20 over tensor names (no LibTorch), so the detection is fuzzed and reused by
/// tools that never load a tensor.
///
/// An adapter file names every tensor `<base><suffix>`: the base names one module
/// ("lora_unet_mid_block_attentions_0_proj_in", "base_model.model.blocks.0.attn.qkv") and the
/// suffix names the role ("lora_up.weight", "hada_w1_a", "alpha", ...). The kind of patch is
/// decided per base from the roles present, never per file: files mixing LoRA, LoHa and full
/// diffs on different modules are common.
///
/// Example:
/// \code
///   std::vector<std::string> names{"te.q.lora_up.weight", "te.q.lora_down.weight", "te.q.alpha"};
///   distorch::key_grouping g = distorch::group_adapter_keys(names);
///   g.groups[0].base;                                       // "te.q"
///   g.groups[0].kind == distorch::adapter_kind::lora;       // true
///   g.groups[0].name(distorch::component::alpha);           // "te.q.alpha"
/// \endcode

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "distorch/core/error.hpp"

namespace distorch::inline v0 {

/// What a key group does to its target weight.
enum class adapter_kind : std::uint8_t {
  lora,  ///< up · down (optionally up · mid · down, conv Tucker form)
  loha,  ///< (w1_a · w1_b) ⊙ (w2_a · w2_b), optionally through Tucker cores t1 / t2
  lokr,  ///< kron(w1, w2), each full or factored, w2 optionally through a Tucker core t2
  diff,  ///< a full additive difference `.diff`
  set,   ///< `.set_weight`: the weight is replaced
};

/// The kind as a word, as `distorch lora inspect` prints it.
/// \code distorch::adapter_kind_name(distorch::adapter_kind::loha);   // "loha" \endcode
constexpr std::string_view adapter_kind_name(adapter_kind k) noexcept {
  switch (k) {
    case adapter_kind::lora: return "lora";
    case adapter_kind::loha: return "loha";
    case adapter_kind::lokr: return "lokr";
    case adapter_kind::diff: return "diff";
    case adapter_kind::set: return "set";
  }
  return "?";
}

/// The role of one tensor inside a key group.
enum class component : std::uint8_t {
  lora_up, lora_down, lora_mid, alpha, dora_scale,
  hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, hada_t1, hada_t2,
  lokr_w1, lokr_w1_a, lokr_w1_b, lokr_w2, lokr_w2_a, lokr_w2_b, lokr_t2,
  diff, diff_b, set_weight,
};
/// Number of `component` values (the size of per-role arrays).
inline constexpr std::size_t component_count = 21;

/// The role as a word, e.g. "lora_up" or "hada_w1_a".
/// \code distorch::component_name(distorch::component::alpha);   // "alpha" \endcode
constexpr std::string_view component_name(component c) noexcept {
  constexpr std::array<std::string_view, component_count> names{
      "lora_up", "lora_down", "lora_mid", "alpha", "dora_scale", "hada_w1_a", "hada_w1_b",
      "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b",
      "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff", "diff_b", "set_weight"};
  return names[static_cast<std::size_t>(c)];
}

/// One suffix convention: the suffix, the role it names, and which tool family writes it.
struct adapter_suffix {
  std::string_view suffix;
  component role;
  std::string_view naming;  ///< "kohya", "peft", "diffusers", "transformers", "lycoris", "comfyui", ...
};

/// Every suffix recognized. The up/down pairs follow each trainer's own naming; LyCORIS suffixes
/// carry no ".weight".
inline constexpr std::array<adapter_suffix, 33> adapter_suffixes{{
    {".lora_up.weight", component::lora_up, "kohya"},
    {".lora_down.weight", component::lora_down, "kohya"},
    {".lora_mid.weight", component::lora_mid, "kohya"},
    {".lora_B.default.weight", component::lora_up, "peft-default"},
    {".lora_A.default.weight", component::lora_down, "peft-default"},
    {".lora_B.weight", component::lora_up, "peft"},
    {".lora_A.weight", component::lora_down, "peft"},
    {".lora.up.weight", component::lora_up, "diffusers"},
    {".lora.down.weight", component::lora_down, "diffusers"},
    {".lora_linear_layer.up.weight", component::lora_up, "transformers"},
    {".lora_linear_layer.down.weight", component::lora_down, "transformers"},
    {"_lora.up.weight", component::lora_up, "diffusers-attn"},
    {"_lora.down.weight", component::lora_down, "diffusers-attn"},
    {".lora_B", component::lora_up, "mochi"},
    {".lora_A", component::lora_down, "mochi"},
    {".alpha", component::alpha, "kohya"},
    {".dora_scale", component::dora_scale, "lycoris"},
    {".hada_w1_a", component::hada_w1_a, "lycoris"},
    {".hada_w1_b", component::hada_w1_b, "lycoris"},
    {".hada_w2_a", component::hada_w2_a, "lycoris"},
    {".hada_w2_b", component::hada_w2_b, "lycoris"},
    {".hada_t1", component::hada_t1, "lycoris"},
    {".hada_t2", component::hada_t2, "lycoris"},
    {".lokr_w1", component::lokr_w1, "lycoris"},
    {".lokr_w1_a", component::lokr_w1_a, "lycoris"},
    {".lokr_w1_b", component::lokr_w1_b, "lycoris"},
    {".lokr_w2", component::lokr_w2, "lycoris"},
    {".lokr_w2_a", component::lokr_w2_a, "lycoris"},
    {".lokr_w2_b", component::lokr_w2_b, "lycoris"},
    {".lokr_t2", component::lokr_t2, "lycoris"},
    {".diff", component::diff, "comfyui"},
    {".diff_b", component::diff_b, "comfyui"},
    {".set_weight", component::set_weight, "comfyui"},
}};

/// The tensors of one module in one adapter.
struct key_group {
  std::string base;                                   ///< the module part of the key
  std::optional<adapter_kind> kind;                   ///< the weight patch; empty when only `.diff_b`
  std::array<std::string, component_count> names{};   ///< tensor name per role, "" when absent
  std::string naming;                                 ///< naming of the weight patch ("kohya", "peft", ...)

  /// True when the group has a tensor in this role.
  /// \code if (g.has(distorch::component::alpha)) scale = alpha_of(g.name(distorch::component::alpha)); \endcode
  bool has(component c) const noexcept { return !names[static_cast<std::size_t>(c)].empty(); }
  /// The adapter tensor name in this role ("" when absent).
  const std::string& name(component c) const noexcept { return names[static_cast<std::size_t>(c)]; }
  /// True when the group also patches the bias (`.diff_b`).
  bool patches_bias() const noexcept { return has(component::diff_b); }
  /// True when the group carries DoRA magnitudes.
  bool dora() const noexcept { return has(component::dora_scale); }
};

/// The result of grouping an adapter's tensor names.
struct key_grouping {
  std::vector<key_group> groups;            ///< sorted by base
  std::vector<std::string> unrecognized;    ///< names no group uses (unknown suffix, incomplete group)
};

namespace detail {

/// The longest recognized suffix of `name` with a nonempty base, if any.
inline const adapter_suffix* match_adapter_suffix(std::string_view name) noexcept {
  const adapter_suffix* best = nullptr;
  for (const auto& s : adapter_suffixes) {
    if (name.size() > s.suffix.size() && name.ends_with(s.suffix) && (best == nullptr || s.suffix.size() > best->suffix.size()))
      best = &s;
  }
  return best;
}

/// The weight kind a set of roles forms, or nothing when the roles form none (or several, which
/// the caller reports). Incomplete sets (an up without a down) form nothing.
inline std::vector<adapter_kind> kinds_formed(const key_group& g) {
  std::vector<adapter_kind> kinds;
  if (g.has(component::lora_up) && g.has(component::lora_down)) kinds.push_back(adapter_kind::lora);
  if (g.has(component::hada_w1_a) && g.has(component::hada_w1_b) && g.has(component::hada_w2_a) &&
      g.has(component::hada_w2_b))
    kinds.push_back(adapter_kind::loha);
  const bool w1 = g.has(component::lokr_w1) || (g.has(component::lokr_w1_a) && g.has(component::lokr_w1_b));
  const bool w2 = g.has(component::lokr_w2) || (g.has(component::lokr_w2_a) && g.has(component::lokr_w2_b));
  if (w1 && w2) kinds.push_back(adapter_kind::lokr);
  if (g.has(component::diff)) kinds.push_back(adapter_kind::diff);
  if (g.has(component::set_weight)) kinds.push_back(adapter_kind::set);
  return kinds;
}

/// Roles the kind actually reads; anything else in the group is left unrecognized.
inline bool role_used_by(component c, std::optional<adapter_kind> kind, const key_group& g) {
  if (c == component::diff_b) return true;
  if (!kind) return false;
  switch (*kind) {
    case adapter_kind::lora:
      return c == component::lora_up || c == component::lora_down || c == component::lora_mid ||
             c == component::alpha || c == component::dora_scale;
    case adapter_kind::loha:
      // The Tucker cores count only as a pair, as both halves of the product need one.
      if (c == component::hada_t1 || c == component::hada_t2)
        return g.has(component::hada_t1) && g.has(component::hada_t2);
      return c == component::hada_w1_a || c == component::hada_w1_b || c == component::hada_w2_a ||
             c == component::hada_w2_b || c == component::alpha || c == component::dora_scale;
    case adapter_kind::lokr: {
      const bool full1 = g.has(component::lokr_w1), full2 = g.has(component::lokr_w2);
      if (c == component::lokr_w1) return true;
      if (c == component::lokr_w1_a || c == component::lokr_w1_b) return !full1;
      if (c == component::lokr_w2) return true;
      if (c == component::lokr_w2_a || c == component::lokr_w2_b) return !full2;
      if (c == component::lokr_t2) return !full2;
      return c == component::alpha || c == component::dora_scale;
    }
    case adapter_kind::diff: return c == component::diff;
    case adapter_kind::set: return c == component::set_weight;
  }
  return false;
}

}  // namespace detail

/// Groups adapter tensor names by module and detects each group's kind.
///
/// Throws `lora_error` when one module carries two patch kinds at once (an up/down pair and a
/// LoHa, say) or one role twice under two namings: applying either would silently drop the other.
/// Names with no known suffix, and groups too incomplete to form a patch, land in `unrecognized`
/// so the caller can report them with the unmatched keys.
/// \code
///   auto g = distorch::group_adapter_keys(std::vector<std::string>{"m.hada_w1_a", "m.hada_w1_b",
///                                                                  "m.hada_w2_a", "m.hada_w2_b"});
///   g.groups[0].kind == distorch::adapter_kind::loha;   // true
/// \endcode
inline key_grouping group_adapter_keys(std::span<const std::string> names) {
  std::map<std::string, key_group, std::less<>> by_base;
  key_grouping out;
  for (const auto& name : names) {
    const adapter_suffix* s = detail::match_adapter_suffix(name);
    if (s == nullptr) {
      out.unrecognized.push_back(name);
      continue;
    }
    const std::string base = name.substr(0, name.size() - s->suffix.size());
    auto& g = by_base[base];
    g.base = base;
    auto& slot = g.names[static_cast<std::size_t>(s->role)];
    if (!slot.empty())
      throw lora_error({"grouping adapter keys", name, std::nullopt,
                        "module '" + base + "' has its " + std::string(component_name(s->role)) +
                            " twice, as '" + slot + "' and '" + name + "'",
                        "keep one naming per module in the adapter file"});
    slot = name;
    if (s->role == component::lora_up || (g.naming.empty() && s->role != component::alpha &&
                                          s->role != component::dora_scale && s->role != component::diff_b))
      g.naming = std::string(s->naming);
  }
  for (auto& [base, g] : by_base) {
    const auto kinds = detail::kinds_formed(g);
    if (kinds.size() > 1) {
      std::string list;
      for (auto k : kinds) list += (list.empty() ? "" : ", ") + std::string(adapter_kind_name(k));
      throw lora_error({"grouping adapter keys", base, std::nullopt,
                        "one module carries several patch kinds (" + list + ")",
                        "split the adapter so that each module has one kind of patch"});
    }
    if (!kinds.empty()) g.kind = kinds.front();
    bool any_used = false;
    for (std::size_t c = 0; c < component_count; ++c) {
      if (g.names[c].empty()) continue;
      if (detail::role_used_by(static_cast<component>(c), g.kind, g)) {
        any_used = true;
      } else {
        out.unrecognized.push_back(g.names[c]);
        g.names[c].clear();
      }
    }
    if (!g.kind) g.naming = g.has(component::diff_b) ? "comfyui" : "";
    if (any_used) out.groups.push_back(std::move(g));
  }
  std::sort(out.unrecognized.begin(), out.unrecognized.end());
  return out;
}

}  // namespace distorch::inline v0
