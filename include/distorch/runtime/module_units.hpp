#pragma once
/// \file
/// `bind_units`: the units of a live module together with the tensor handles that make them up.
/// The inventory alone names tensors; the runtime also needs the very `at::Tensor` objects the
/// module holds, because moving a unit means `set_data` on each of them. Tensors are visited
/// module by module in registration order (each module's parameters, then its buffers), so the
/// units come out in model order. A tensor registered under two names (tied weights) is one
/// handle, counted once.
///
/// Example:
/// \code
///   auto bound = distorch::bind_units(*model, {{R"(blocks\.\d+)"}});
///   bound.units.units()[0].name;     // "embed"
///   bound.handles[0].size();         // its distinct tensors
///   bound.units_under("blocks.1");   // indices of the units inside that module
/// \endcode

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include "distorch/core/error.hpp"
#include "distorch/model/dtype.hpp"
#include "distorch/model/inventory.hpp"

namespace distorch::inline v0 {

namespace detail {

/// Stored element type of a LibTorch dtype (the inventory only needs sizes and names).
inline dtype dtype_of_scalar(at::ScalarType s) {
  switch (s) {
    case at::kDouble: return dtype::f64;
    case at::kFloat: return dtype::f32;
    case at::kHalf: return dtype::f16;
    case at::kBFloat16: return dtype::bf16;
    case at::kLong: return dtype::i64;
    case at::kInt: return dtype::i32;
    case at::kShort: return dtype::i16;
    case at::kChar: return dtype::i8;
    case at::kByte: return dtype::u8;
    case at::kBool: return dtype::boolean;
    case at::kComplexFloat: return dtype::c64;
    case at::kComplexDouble: return dtype::c128;
    default: break;
  }
  throw format_error({"listing module tensors", std::string(c10::toString(s)), std::nullopt,
                      "distorch cannot place tensors of this dtype", "use a floating, integer or bool dtype"});
}

/// True when `path` is `prefix` or lies inside it ("a.b" is inside "a", not inside "a.bc").
inline bool path_within(std::string_view path, std::string_view prefix) noexcept {
  if (prefix.empty()) return true;
  return path.size() >= prefix.size() && path.substr(0, prefix.size()) == prefix &&
         (path.size() == prefix.size() || path[prefix.size()] == '.');
}

}  // namespace detail

/// A module's units and, per unit, the distinct tensor handles in it.
/// \code
///   distorch::bound_module bound = distorch::bind_units(*model);
///   bound.names[0];   // the tensor names of unit 0, one per handle
/// \endcode
struct bound_module {
  inventory units;
  std::vector<std::vector<at::Tensor>> handles;      ///< per unit, distinct tensors in unit order
  std::vector<std::vector<std::string>> names;       ///< per unit, the name of each handle
  /// Per unit, per handle: the module that registered it when it is a buffer, null for a parameter
  /// (the residency manager writes buffers back home when `forward` changed them).
  std::vector<std::vector<std::shared_ptr<torch::nn::Module>>> buffer_owners;

  /// Units that hold a tensor of the module at `path` (also under another name: a weight tied
  /// into an earlier unit belongs to every module that uses it), units named inside that module,
  /// and the unit containing the module when a grouping rule made it part of a larger unit. ""
  /// gives every unit. Costs one hash look-up per dot in `path` (see `index`).
  /// \code auto ids = bound.units_under("blocks.1"); \endcode
  std::vector<std::size_t> units_under(std::string_view path) const {
    std::vector<std::size_t> out;
    if (const auto it = by_path_.find(std::string(path)); it != by_path_.end()) out = it->second;
    for (std::string_view p = path; !p.empty();) {
      if (const auto it = by_name_.find(std::string(p)); it != by_name_.end()) out.push_back(it->second);
      const auto dot = p.rfind('.');
      p = dot == std::string_view::npos ? std::string_view() : p.substr(0, dot);
    }
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    return out;
  }

  /// Builds the look-up `units_under` uses; `bind_units` calls it, and so must anyone who fills
  /// `units` by hand. \code bound.index(); \endcode
  void index() {
    by_path_.clear();
    by_name_.clear();
    auto add_prefixes = [&](std::string_view name, std::size_t i) {
      for (std::string_view p = name;;) {
        auto& list = by_path_[std::string(p)];
        if (list.empty() || list.back() != i) list.push_back(i);
        if (p.empty()) break;
        const auto dot = p.rfind('.');
        p = dot == std::string_view::npos ? std::string_view() : p.substr(0, dot);
      }
    };
    for (std::size_t i = 0; i < units.size(); ++i) {
      const auto& u = units.units()[i];
      by_name_.emplace(u.name, i);
      add_prefixes(u.name, i);
      for (const auto& t : u.tensors) add_prefixes(t.name, i);
    }
  }

 private:
  std::unordered_map<std::string, std::vector<std::size_t>> by_path_;  // path -> units inside it
  std::unordered_map<std::string, std::size_t> by_name_;                // unit name -> unit
};

/// Binds a module's parameters and buffers into units under `grouping`. Undefined tensors (an
/// absent bias) are skipped.
/// \code auto bound = distorch::bind_units(*seq); \endcode
inline bound_module bind_units(torch::nn::Module& module, std::span<const grouping_rule> grouping = {}) {
  std::vector<tensor_record> records;
  std::unordered_map<std::string, at::Tensor> by_name;
  std::unordered_map<const void*, std::string> first_name;  // TensorImpl -> first name
  std::unordered_map<const void*, std::uint64_t> storage_keys;
  std::unordered_map<const void*, std::shared_ptr<torch::nn::Module>> owner_of_buffer;  // TensorImpl -> module
  auto add = [&](const std::string& name, const at::Tensor& t, const std::shared_ptr<torch::nn::Module>& buffer_owner = nullptr) {
    if (!t.defined()) return;
    tensor_record r;
    r.name = name;
    r.type = detail::dtype_of_scalar(t.scalar_type());
    r.shape.assign(t.sizes().begin(), t.sizes().end());
    r.bytes = static_cast<std::uint64_t>(t.numel()) * t.element_size();
    const void* storage = t.storage().unsafeGetStorageImpl();
    auto [it, fresh] = storage_keys.try_emplace(storage, storage_keys.size() + 1);
    r.storage_key = it->second;
    r.storage_bytes = t.storage().nbytes();
    records.push_back(std::move(r));
    by_name.emplace(name, t);
    first_name.try_emplace(t.unsafeGetTensorImpl(), name);
    if (buffer_owner) owner_of_buffer.try_emplace(t.unsafeGetTensorImpl(), buffer_owner);
  };
  for (const auto& item : module.named_modules("", true)) {
    const std::string prefix = item.key().empty() ? std::string() : item.key() + ".";
    for (const auto& p : item.value()->named_parameters(false)) add(prefix + p.key(), p.value());
    for (const auto& b : item.value()->named_buffers(false)) add(prefix + b.key(), b.value(), item.value());
  }
  // Only tensors that share a storage with another tensor keep a storage key; the rest are alone.
  std::unordered_map<std::uint64_t, int> sharing;
  for (const auto& r : records) ++sharing[r.storage_key];
  for (auto& r : records)
    if (sharing[r.storage_key] == 1) r.storage_key = 0, r.storage_bytes = 0;

  bound_module bound;
  bound.units = inventory::from_records(records, grouping);
  for (const auto& u : bound.units.units()) {
    std::vector<at::Tensor> handles;
    std::vector<std::string> names;
    std::vector<std::shared_ptr<torch::nn::Module>> owners;
    for (const auto& t : u.tensors) {
      const at::Tensor& h = by_name.at(t.name);
      if (first_name.at(h.unsafeGetTensorImpl()) != t.name) continue;  // a second name of one tensor
      handles.push_back(h);
      names.push_back(t.name);
      const auto owner = owner_of_buffer.find(h.unsafeGetTensorImpl());
      owners.push_back(owner == owner_of_buffer.end() ? nullptr : owner->second);
    }
    bound.handles.push_back(std::move(handles));
    bound.names.push_back(std::move(names));
    bound.buffer_owners.push_back(std::move(owners));
  }
  bound.index();
  return bound;
}

}  // namespace distorch::inline v0
