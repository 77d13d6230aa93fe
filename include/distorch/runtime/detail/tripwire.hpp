#pragma once
/// \file
/// Internal (included by runtime/residency.hpp). Strict simulated devices: on a GPU, computing
/// with a weight that was never fetched is a device-mismatch error; on a simulated compute device
/// (a CPU tensor like its home copy) it would silently compute with the home copy. So between
/// uses the handles of a streamed unit point at a *tripwire*: a tensor over the very same storage
/// as the home copy, whose dispatch key set carries one extra functionality key. A boxed fallback
/// registered for that key turns every operator on it into a `device_error` naming the unit and
/// the compute device; only the metadata operators distorch itself needs (`set_data`, `detach`,
/// `alias`, shape queries) pass through. The key is LibTorch's `TESTING_ONLY_GenericWrapper`, a
/// functionality key reserved for out-of-tree dispatcher tests: no LibTorch kernel uses it, and it
/// ranks above autograd, so the fallback runs before anything reads the bytes.
///
/// Example:
/// \code
///   at::Tensor wire = distorch::detail::make_tripwire(home, "head", "sim:0");
///   handle.set_data(wire);     // any op on `handle` now throws device_error naming "head"
///   handle.set_data(fetched);  // staged: the handle computes normally
///   distorch::detail::forget_tripwire(wire);
/// \endcode

#include <array>
#include <cstddef>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/TensorImpl.h>
#include <torch/library.h>

#include "distorch/core/error.hpp"

namespace distorch::inline v0 {
namespace detail {

inline constexpr c10::DispatchKey tripwire_key = c10::DispatchKey::TESTING_ONLY_GenericWrapper;

struct tripwire_entry {
  std::string unit;
  std::string compute;
  std::size_t count = 0;
};

struct tripwire_registry {
  std::mutex mutex;
  std::unordered_map<const void*, tripwire_entry> by_storage;  // StorageImpl of the home copy
};

inline tripwire_registry& tripwires() {
  static tripwire_registry r;
  return r;
}

// Operators that only read or change metadata: distorch switches handles with them.
inline bool tripwire_passes(std::string_view op) noexcept {
  static constexpr std::array<std::string_view, 12> allowed = {
      "aten::set_data", "aten::_has_compatible_shallow_copy_type", "aten::detach", "aten::alias", "aten::requires_grad_",
      "aten::is_same_size", "aten::size", "aten::stride", "aten::dim", "aten::_version", "aten::is_floating_point",
      "aten::is_complex"};
  for (auto a : allowed)
    if (a == op) return true;
  return false;
}

inline const void* tripped_storage(const c10::IValue& v) {
  if (v.isTensor()) {
    const auto& t = v.toTensor();
    if (t.defined() && t.key_set().has(tripwire_key) && t.has_storage()) return t.storage().unsafeGetStorageImpl();
  } else if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorVector())
      if (t.defined() && t.key_set().has(tripwire_key) && t.has_storage()) return t.storage().unsafeGetStorageImpl();
  }
  return nullptr;
}

inline void tripwire_fallback(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const std::string& name = op.schema().name();
  if (tripwire_passes(name)) {
    op.redispatchBoxed(keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, tripwire_key), stack);
    return;
  }
  const std::size_t args = op.schema().arguments().size();
  const void* storage = nullptr;
  for (std::size_t k = stack->size() >= args ? stack->size() - args : 0; k < stack->size() && !storage; ++k)
    storage = tripped_storage((*stack)[k]);
  std::string unit = "a streamed unit", compute = "the compute device";
  {
    auto& r = tripwires();
    std::lock_guard lock(r.mutex);
    if (const auto it = r.by_storage.find(storage); storage && it != r.by_storage.end()) {
      unit = "unit '" + it->second.unit + "'";
      compute = it->second.compute;
    }
  }
  throw device_error({"running " + name + " on a tensor of " + unit, unit, std::nullopt,
                      "the unit is not staged on " + compute +
                          ": on a GPU this op would read the copy at home (a device mismatch), so the simulated device refuses it",
                      "stage it: build the model from distorch::nn layers, drive blocks with views::streamed, or wrap the call in "
                      "dm.stage(module) (docs/streaming.md, \"Make your model stream\")"});
}

inline void install_tripwire_fallback() {
  // One registration per program (a function-local static of an inline function), made on first
  // use and given back at exit, before LibTorch's dispatcher itself goes.
  struct registration {
    torch::Library library{torch::Library::IMPL, "_", tripwire_key, __FILE__, __LINE__};
    registration() { library.fallback(torch::CppFunction::makeFromBoxedFunction<&tripwire_fallback>()); }
  };
  static registration once;
  (void)once;
}

/// A tensor over `home`'s storage (same sizes, strides and offset) that refuses every operator.
inline at::Tensor make_tripwire(const at::Tensor& home, const std::string& unit, const std::string& compute) {
  install_tripwire_fallback();
  {
    auto& r = tripwires();
    std::lock_guard lock(r.mutex);
    auto& e = r.by_storage[home.storage().unsafeGetStorageImpl()];
    e.unit = unit;
    e.compute = compute;
    ++e.count;
  }
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(home.storage()), home.key_set() | c10::DispatchKeySet(tripwire_key),
                                                   home.dtype());
  impl->set_sizes_and_strides(home.sizes(), home.strides(), home.storage_offset());
  return at::Tensor(std::move(impl));
}

/// Drops the registry entry `make_tripwire` made for `wire`'s storage.
inline void forget_tripwire(const at::Tensor& wire) noexcept {
  if (!wire.defined() || !wire.has_storage()) return;
  auto& r = tripwires();
  std::lock_guard lock(r.mutex);
  const auto it = r.by_storage.find(wire.storage().unsafeGetStorageImpl());
  if (it != r.by_storage.end() && --it->second.count == 0) r.by_storage.erase(it);
}

/// True when `t` is (or a handle now points at) a tripwire.
inline bool is_tripwire(const at::Tensor& t) noexcept { return t.defined() && t.key_set().has(tripwire_key); }

}  // namespace detail
}  // namespace distorch::inline v0
