#pragma once
/// \file
/// The inventory of a live `torch::nn::Module`. Units are the modules that own parameters or
/// buffers (leaf modules, in practice), in registration order: a module's own parameters, then its
/// own buffers, then its children depth-first, the order LibTorch registered them. Tensors that
/// share a storage (tied embedding and head weights, a submodule registered twice) carry the
/// storage's identity as `storage_key`, so `inventory::from_records` counts the storage once and
/// pulls every tensor sharing it into one unit. Grouping rules coarsen units as in inventory.hpp.
/// Undefined tensors (a `Linear` without bias registers one) are skipped.
///
/// Example:
/// \code
///   torch::nn::Sequential net(torch::nn::Linear(64, 64), torch::nn::ReLU(), torch::nn::Linear(64, 10));
///   distorch::inventory inv = distorch::inventory_of(*net);
///   inv.units()[0].name;    // "0"
///   inv.units()[1].name;    // "2"   (ReLU has no tensors)
///   inv.total_bytes();      // (64*64 + 64 + 10*64 + 10) * 4
/// \endcode

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <torch/nn/module.h>

#include "distorch/model/inventory.hpp"
#include "distorch/model/torch_dtype.hpp"

namespace distorch::inline v0 {

namespace detail {

inline tensor_record record_of(const std::string& name, const at::Tensor& t) {
  tensor_record r;
  r.name = name;
  r.type = from_scalar_type(t.scalar_type());
  r.shape.assign(t.sizes().begin(), t.sizes().end());
  r.bytes = static_cast<std::uint64_t>(t.numel()) * t.element_size();
  if (t.has_storage()) {
    // The storage object's address is its identity for as long as the module holds it.
    r.storage_key = static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(t.storage().unsafeGetStorageImpl()));
    r.storage_bytes = t.storage().nbytes();
  }
  return r;
}

inline void collect_records(const torch::nn::Module& module, const std::string& prefix, std::vector<tensor_record>& out) {
  for (const auto& p : module.named_parameters(/*recurse=*/false))
    if (p.value().defined()) out.push_back(record_of(prefix + p.key(), p.value()));
  for (const auto& b : module.named_buffers(/*recurse=*/false))
    if (b.value().defined()) out.push_back(record_of(prefix + b.key(), b.value()));
  for (const auto& child : module.named_children()) collect_records(*child.value(), prefix + child.key() + ".", out);
}

}  // namespace detail

/// Every defined parameter and buffer of `module` as a tensor record, in registration order, with
/// storage identity for tie detection. Throws `format_error` for a scalar type distorch cannot
/// place (quantized tensors).
/// \code auto records = distorch::module_records(*model); \endcode
inline std::vector<tensor_record> module_records(const torch::nn::Module& module) {
  std::vector<tensor_record> records;
  detail::collect_records(module, "", records);
  return records;
}

/// The units of a live module: leaf modules with parameters or buffers, in registration order,
/// tied storages counted once and kept in one unit, coarsened by `grouping` rules. Throws
/// `allocation_error` naming the rule for a rule that is an invalid regex or matches no tensor.
/// \code
///   auto per_block = distorch::inventory_of(*model, {distorch::grouping_rule{R"(blocks\.\d+)"}});
/// \endcode
inline inventory inventory_of(const torch::nn::Module& module, std::span<const grouping_rule> grouping = {}) {
  const auto records = module_records(module);
  return inventory::from_records(records, grouping);
}

/// Overload for a braced list of rules.
/// \code auto inv = distorch::inventory_of(*model, {{R"(layers\.\d+)"}}); \endcode
inline inventory inventory_of(const torch::nn::Module& module, std::initializer_list<grouping_rule> grouping) {
  return inventory_of(module, std::span<const grouping_rule>(grouping.begin(), grouping.size()));
}

}  // namespace distorch::inline v0
