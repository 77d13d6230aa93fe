#pragma once
/// \file
/// `patcher`: the Patch of Load-Patch-Distribute. Bound once to a model and an adapter set, it
/// patches a unit's tensors on the compute device (`patch`), restores them bit for bit
/// (`unpatch`), and re-merges only the tensors an adapter touches when that adapter's strength
/// changes (`set_strength`).
///
/// Originals come back either from a kept copy (on `keep_device`, CPU by default) or by reloading
/// from the weight file (`restore_from::source`), which keeps no copy at all.
///
/// The patcher remembers the tensor objects it patched (handles sharing their storage), so a
/// runtime that later moves a parameter with `set_data` still has it re-merged or restored in
/// place. A caller that replaces a tensor object instead should patch the new one again.
///
/// Example:
/// \code
///   auto src = distorch::open_weights("model.safetensors");
///   distorch::adapter_set adapters{{std::make_shared<distorch::adapter>(distorch::load_adapter("style.safetensors")), 0.8}};
///   distorch::patcher patcher(src->records(), adapters, {.strict = true});
///   for (const auto& unit : inventory.units()) {
///     std::map<std::string, at::Tensor> tensors = load_unit_on(compute, unit);   // the runtime's step 1-2
///     distorch::patch(tensors, patcher, compute);                                // step 3
///     distribute(tensors);                                                       // step 4
///   }
///   patcher.set_strength(0, 0.5);   // re-merges only what adapter 0 touches
///   patcher.unpatch_all();          // originals back, bit for bit
/// \endcode

#include <ATen/core/Tensor.h>

#include <concepts>
#include <cstddef>
#include <map>
#include <memory>
#include <optional>
#include <ranges>
#include <span>
#include <string>
#include <vector>

#include "distorch/core/error.hpp"
#include "distorch/io/weight_source.hpp"
#include "distorch/lora/adapter.hpp"
#include "distorch/lora/binding.hpp"
#include "distorch/lora/merge.hpp"

namespace distorch::inline v0 {

/// A range of (name, tensor) pairs: `std::map<std::string, at::Tensor>`, a vector of pairs, ...
template <class R>
concept named_tensor_range = std::ranges::range<R> && requires(std::ranges::range_reference_t<R> e) {
  { e.first } -> std::convertible_to<std::string>;
  { e.second } -> std::convertible_to<at::Tensor>;
};

/// Where `unpatch` and re-merges take the original weights from.
enum class restore_from : std::uint8_t {
  kept_original,  ///< a copy kept at patch time on `keep_device`
  source,         ///< reloaded from `patcher_options::source` (no copy kept)
};

/// How a `patcher` binds adapters and where it gets originals back from.
/// \code
///   distorch::patcher_options o;
///   o.strict = true;                                  // unmatched keys are errors
///   o.restore = distorch::restore_from::source;       // keep no copies; reload originals
///   o.source = std::shared_ptr<const distorch::weight_source>(distorch::open_weights("model.safetensors"));
/// \endcode
struct patcher_options {
  bool strict = false;                          ///< unmatched adapter keys are a lora_error
  std::vector<prefix_rule> prefix_rules;        ///< extra key mapping rules, tried first
  restore_from restore = restore_from::kept_original;
  c10::Device keep_device = c10::Device(c10::kCPU);
  std::shared_ptr<const weight_source> source;  ///< the model file, for restore_from::source
};

/// Patches and unpatches model tensors with a bound set of adapters; see the file example.
class patcher {
 public:
  /// Binds `adapters` to the model `model` (see adapter_binding::bind for the errors). Throws
  /// `lora_error` when `restore_from::source` is asked for without a source.
  /// \code distorch::patcher p(src->records(), adapters); \endcode
  patcher(std::span<const tensor_record> model, adapter_set adapters, patcher_options options = {})
      : adapters_(std::move(adapters)), options_(std::move(options)) {
    check_options();
    binding_ = adapter_binding::bind(model, adapters_, binding_options{options_.strict, options_.prefix_rules, true});
  }
  /// Same, from names and shapes.
  patcher(std::span<const bind_target> model, adapter_set adapters, patcher_options options = {})
      : adapters_(std::move(adapters)), options_(std::move(options)) {
    check_options();
    binding_ = adapter_binding::bind(model, adapters_, binding_options{options_.strict, options_.prefix_rules, true});
  }

  patcher(const patcher&) = delete;  // the binding points into adapters_
  patcher& operator=(const patcher&) = delete;

  /// Which adapter patches which tensor (and the report of what did not bind).
  /// \code p.binding().report().matched.size(); \endcode
  const adapter_binding& binding() const noexcept { return binding_; }
  /// The adapters, with their strengths, in the order they are applied.
  const adapter_set& adapters() const noexcept { return adapters_; }
  /// True when some adapter patches the tensor.
  bool targets(const std::string& name) const { return binding_.patches_for(name) != nullptr; }

  /// Patches one tensor in place (any device; merged in float32 on `compute_device`). Returns
  /// whether anything touched it. Patching a tensor this patcher already patched starts again from
  /// its original, so it never applies an adapter twice.
  /// \code p.patch_tensor("blocks.0.attn.qkv.weight", w, at::kCPU); \endcode
  bool patch_tensor(const std::string& name, const at::Tensor& tensor, c10::Device compute_device) {
    const auto* patches = binding_.patches_for(name);
    if (patches == nullptr) return false;
    auto it = live_.find(name);
    if (it != live_.end() && it->second.tensor.is_same(tensor)) {
      restore(name, it->second);
    } else {
      live_entry e{tensor, {}, compute_device};
      if (options_.restore == restore_from::kept_original)
        e.original = tensor.to(options_.keep_device, tensor.scalar_type(), false, /*copy=*/true);
      it = live_.insert_or_assign(name, std::move(e)).first;
    }
    it->second.compute = compute_device;
    merge_or_restore(name, it->second);
    return true;
  }

  /// Patches every tensor of `weights` that an adapter targets: the per-unit step of
  /// Load-Patch-Distribute. Returns how many were patched.
  /// \code std::size_t n = p.patch(unit_tensors, c10::Device(c10::kCUDA, 0)); \endcode
  template <named_tensor_range W>
  std::size_t patch(W& weights, c10::Device compute_device) {
    std::size_t n = 0;
    for (auto&& e : weights) n += patch_tensor(std::string(e.first), e.second, compute_device) ? 1 : 0;
    return n;
  }

  /// Restores the tensors of `weights` this patcher patched, bit for bit, and forgets them.
  /// Returns how many were restored.
  /// \code p.unpatch(unit_tensors); \endcode
  template <named_tensor_range W>
  std::size_t unpatch(W& weights) {
    std::size_t n = 0;
    for (auto&& e : weights) {
      const std::string name(e.first);
      auto it = live_.find(name);
      if (it == live_.end() || !it->second.tensor.is_same(e.second)) continue;
      restore(name, it->second);
      live_.erase(it);
      ++n;
    }
    return n;
  }

  /// Restores every tensor this patcher patched. Returns how many.
  /// \code p.unpatch_all(); \endcode
  std::size_t unpatch_all() {
    std::size_t n = 0;
    for (auto& [name, e] : live_) {
      restore(name, e);
      ++n;
    }
    live_.clear();
    return n;
  }

  /// Changes one adapter's strengths and re-merges, from their originals, exactly the patched
  /// tensors that adapter touches. Returns how many were re-merged. Tensors not patched yet simply
  /// get the new strength when they are. Throws `lora_error` for an index out of range.
  /// \code p.set_strength(1, 0.25); \endcode
  std::size_t set_strength(std::size_t adapter_index, double strength, std::optional<double> strength_model = std::nullopt) {
    if (adapter_index >= adapters_.size())
      throw lora_error({"changing adapter strength", std::to_string(adapter_index), std::nullopt,
                        "there are only " + std::to_string(adapters_.size()) + " adapters",
                        "pass an index below the number of adapters"});
    adapters_[adapter_index].strength = strength;
    if (strength_model) adapters_[adapter_index].strength_model = *strength_model;
    std::size_t n = 0;
    for (const auto& name : binding_.touched_by(adapter_index)) {
      auto it = live_.find(name);
      if (it == live_.end()) continue;
      restore(name, it->second);
      merge_or_restore(name, it->second);
      ++n;
    }
    return n;
  }

  /// The tensors one adapter touches (patched or not yet), sorted by name.
  std::vector<std::string> touched_by(std::size_t adapter_index) const { return binding_.touched_by(adapter_index); }

  /// The tensors currently patched, sorted by name.
  std::vector<std::string> patched() const {
    std::vector<std::string> out;
    for (const auto& [name, e] : live_) out.push_back(name);
    return out;
  }

  /// The merge steps for one tensor at the current strengths (empty when nothing targets it).
  std::vector<merge_step> steps_for(const std::string& name) const {
    std::vector<merge_step> steps;
    if (const auto* patches = binding_.patches_for(name))
      for (const auto& p : *patches) {
        const auto& use = adapters_[p.adapter_index];
        steps.push_back({use.file.get(), p.group, p.bias, use.strength, use.strength_model});
      }
    return steps;
  }

 private:
  struct live_entry {
    at::Tensor tensor;    // shares the caller's tensor object
    at::Tensor original;  // kept_original only
    c10::Device compute;
  };

  void check_options() const {
    if (options_.restore == restore_from::source && !options_.source)
      throw lora_error({"creating LoRA patcher", "restore_from::source", std::nullopt, "no weight source was given to reload from",
                        "set patcher_options::source to the opened model file, or keep originals"});
  }

  void restore(const std::string& name, const live_entry& e) const {
    if (options_.restore == restore_from::kept_original) {
      e.tensor.copy_(e.original);
    } else {
      const at::Tensor fresh = options_.source->load(name);
      if (fresh.sizes() != e.tensor.sizes())
        throw lora_error({"restoring original weight", name, std::nullopt,
                          "the source holds shape " + detail::shape_string(fresh.sizes()) + ", the tensor has " +
                              detail::shape_string(e.tensor.sizes()),
                          "restore from the file the model was loaded from"});
      e.tensor.copy_(fresh);
    }
  }

  // A merge that fails halfway (out of memory on the compute device, ...) leaves the original, not
  // a half-patched weight.
  void merge_or_restore(const std::string& name, const live_entry& e) {
    const auto steps = steps_for(name);
    try {
      merge_into(e.tensor, steps, e.compute);
    } catch (...) {
      restore(name, e);
      live_.erase(name);
      throw;
    }
  }

  adapter_set adapters_;
  patcher_options options_;
  adapter_binding binding_;
  std::map<std::string, live_entry> live_;
};

/// The per-unit step the runtime calls inside Load-Patch-Distribute: patches `weights` (a unit's
/// tensors, on the compute device) through `p`, in place. Returns how many tensors were patched.
/// \code distorch::patch(unit_tensors, patcher, compute_device); \endcode
template <named_tensor_range W>
std::size_t patch(W& weights, patcher& p, c10::Device compute_device) {
  return p.patch(weights, compute_device);
}

/// Stateless form: binds `adapters` to the names and shapes of `weights` alone and merges them in
/// place. Nothing is kept, so there is no unpatch; adapter keys for tensors outside `weights` are
/// not reported (they belong to other units). Throws `lora_error` for shape mismatches.
/// \code
///   std::map<std::string, at::Tensor> unit{{"proj.weight", w}};
///   distorch::patch(unit, adapters, at::kCPU);
/// \endcode
template <named_tensor_range W>
std::size_t patch(W& weights, const adapter_set& adapters, c10::Device compute_device,
                  std::vector<prefix_rule> prefix_rules = {}) {
  std::vector<bind_target> targets;
  for (auto&& e : weights) targets.push_back({std::string(e.first), e.second.sizes().vec(), e.second.is_floating_point()});
  const auto binding = adapter_binding::bind(targets, adapters, binding_options{false, std::move(prefix_rules), false});
  std::size_t n = 0;
  for (auto&& e : weights) {
    const auto* patches = binding.patches_for(std::string(e.first));
    if (patches == nullptr) continue;
    std::vector<merge_step> steps;
    for (const auto& p : *patches) {
      const auto& use = adapters[p.adapter_index];
      steps.push_back({use.file.get(), p.group, p.bias, use.strength, use.strength_model});
    }
    merge_into(e.second, steps, compute_device);
    ++n;
  }
  return n;
}

}  // namespace distorch::inline v0
