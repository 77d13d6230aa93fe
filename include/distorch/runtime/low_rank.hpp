#pragma once
/// \file
/// `low_rank_set`: plain LoRA adapters (up · down, alpha / rank) with per-adapter strengths, as
/// the runtime's patch step applies them to one unit at a time on the compute device. Several
/// adapters apply in order on one fp32 copy of the weight, which is rounded to the storage dtype
/// once, so a bf16 model loses nothing to intermediate rounding. It implements the runtime's
/// `unit_patcher` protocol (`touches`, `patch`); the full adapter zoo (LoHa, LoKr, DoRA, key
/// conventions) belongs to lora/ and plugs into the same protocol.
///
/// Adapter tensors are named `<module>.lora_up.weight`, `<module>.lora_down.weight` and optionally
/// `<module>.alpha`, where `<module>` is the model's module path; they patch `<module>.weight`.
///
/// Example:
/// \code
///   distorch::low_rank_set loras;
///   loras.add(distorch::low_rank_adapter::from_source("style", *distorch::open_weights("style.safetensors")), 0.8);
///   at::Tensor merged = loras.patch("blocks.0.fc1.weight", weight_on_compute);
///   loras.set_strength("style", 0.5);
/// \endcode

#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/mm.h>

#include "distorch/core/error.hpp"
#include "distorch/io/weight_source.hpp"

namespace distorch::inline v0 {

/// One low-rank patch of one weight.
struct low_rank_pair {
  at::Tensor up;    ///< [out, rank] (or [out, rank, 1, 1] for convolutions)
  at::Tensor down;  ///< [rank, in] (or [rank, in, kh, kw])
  double alpha = 0;  ///< 0: no alpha given, scale 1
  double scale() const { return alpha == 0 ? 1.0 : alpha / static_cast<double>(down.size(0)); }
};

/// A named adapter: patches keyed by the weight they patch.
struct low_rank_adapter {
  std::string name;
  std::map<std::string, low_rank_pair> patches;  ///< "blocks.0.fc1.weight" -> pair

  /// Reads `<module>.lora_up.weight` / `.lora_down.weight` / `.alpha` from a weight source.
  /// Throws `lora_error` for an up without a down (or the reverse) and for non-finite values.
  /// \code auto a = distorch::low_rank_adapter::from_source("style", *src); \endcode
  static low_rank_adapter from_source(std::string name, const weight_source& source) {
    low_rank_adapter adapter{std::move(name), {}};
    const std::string up_suffix = ".lora_up.weight", down_suffix = ".lora_down.weight";
    auto ends = [](const std::string& s, const std::string& t) {
      return s.size() > t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
    };
    for (const auto& r : source.records()) {
      if (!ends(r.name, up_suffix)) continue;
      const std::string module = r.name.substr(0, r.name.size() - up_suffix.size());
      if (!source.contains(module + down_suffix))
        throw lora_error({"reading adapter", adapter.name, std::nullopt, "'" + r.name + "' has no matching '" + module + down_suffix + "'",
                          "write both lora_up and lora_down for every patched module"});
      low_rank_pair pair{source.load(r.name), source.load(module + down_suffix), 0};
      if (source.contains(module + ".alpha")) pair.alpha = source.load(module + ".alpha").to(at::kDouble).item<double>();
      for (const auto* t : {&pair.up, &pair.down})
        if (!at::isfinite(*t).all().item<bool>())
          throw lora_error({"reading adapter", adapter.name, std::nullopt, "'" + module + "' holds non-finite values",
                            "retrain or re-export the adapter"});
      adapter.patches.emplace(module + ".weight", std::move(pair));
    }
    for (const auto& r : source.records())
      if (ends(r.name, down_suffix) && !source.contains(r.name.substr(0, r.name.size() - down_suffix.size()) + up_suffix))
        throw lora_error({"reading adapter", adapter.name, std::nullopt, "'" + r.name + "' has no matching lora_up",
                          "write both lora_up and lora_down for every patched module"});
    return adapter;
  }
};

/// Adapters with strengths, applied in the order added.
class low_rank_set {
 public:
  /// \code loras.add(adapter, 1.0); \endcode
  void add(low_rank_adapter adapter, double strength = 1.0) {
    for (const auto& e : entries_)
      if (e.adapter->name == adapter.name)
        throw lora_error({"adding adapter", adapter.name, std::nullopt, "an adapter of that name is already in the set",
                          "give each adapter a distinct name"});
    entries_.push_back({std::make_shared<const low_rank_adapter>(std::move(adapter)), strength});
  }

  /// Changes one adapter's strength; `lora_error` for an unknown name.
  void set_strength(std::string_view name, double strength) { find(name).strength = strength; }
  double strength(std::string_view name) const { return const_cast<low_rank_set*>(this)->find(name).strength; }

  bool empty() const noexcept { return entries_.empty(); }
  std::size_t size() const noexcept { return entries_.size(); }

  /// True when some adapter patches this tensor.
  bool touches(std::string_view tensor) const {
    for (const auto& e : entries_)
      if (e.adapter->patches.count(std::string(tensor)) != 0) return true;
    return false;
  }

  /// True when adapter `name` patches this tensor.
  bool touches(std::string_view name, std::string_view tensor) const {
    for (const auto& e : entries_)
      if (e.adapter->name == name) return e.adapter->patches.count(std::string(tensor)) != 0;
    return false;
  }

  /// The weight with every adapter that touches it merged: W + Σ strength·scale·(up·down), in fp32,
  /// rounded once to W's dtype, on W's device. An untouched weight is returned as is.
  /// Throws `lora_error` naming the tensor when a patch's shape does not fit the weight.
  at::Tensor patch(std::string_view tensor, const at::Tensor& weight) const {
    if (!touches(tensor)) return weight;
    at::Tensor merged = weight.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    for (const auto& e : entries_) {
      auto it = e.adapter->patches.find(std::string(tensor));
      if (it == e.adapter->patches.end() || e.strength == 0) continue;
      const auto& p = it->second;
      const auto rank = p.down.size(0);
      if (p.up.dim() < 2 || p.up.size(1) != rank || p.up.size(0) != weight.size(0) ||
          p.down.numel() / rank * p.up.size(0) != weight.numel())
        throw lora_error({"merging adapter", e.adapter->name, std::nullopt,
                          "patch of '" + std::string(tensor) + "' does not fit the weight's shape",
                          "use an adapter trained for this model"});
      at::Tensor up = p.up.to(weight.device(), at::kFloat).reshape({p.up.size(0), rank});
      at::Tensor down = p.down.to(weight.device(), at::kFloat).reshape({rank, -1});
      merged.add_(at::mm(up, down).reshape(weight.sizes()), e.strength * p.scale());
    }
    return merged.to(weight.scalar_type());
  }

  /// Names of the adapters, in order.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& e : entries_) out.push_back(e.adapter->name);
    return out;
  }

 private:
  struct entry {
    std::shared_ptr<const low_rank_adapter> adapter;
    double strength;
  };
  entry& find(std::string_view name) {
    for (auto& e : entries_)
      if (e.adapter->name == name) return e;
    throw lora_error({"looking up adapter", std::string(name), std::nullopt, "no adapter of that name is in the set",
                      "use one of the names given to add()"});
  }
  std::vector<entry> entries_;
};

}  // namespace distorch::inline v0
