#pragma once
/// \file
/// `accounting_allocator<Inner>`: a decorator that charges every allocation to a per-device byte
/// budget and refuses, with a `device_error` naming the device, the request and what remains, an
/// allocation that would exceed it.
///
/// Release happens on tensor destruction, not by an explicit call: the returned tensor's storage
/// owns a deleter (its DataPtr context) that holds the inner tensor and gives the bytes back when
/// the last tensor or view sharing that storage dies, on whatever thread that happens. The
/// storage cannot be resized (`resize_` beyond its size fails); `set_data` and views work as usual.
///
/// Example:
/// \code
///   distorch::simulated_device gpu(distorch::device_id::sim(0), 64 << 20);
///   auto alloc = distorch::accounting_for(gpu);      // charges gpu's own account
///   {
///     at::Tensor w = alloc.allocate({1024, 1024}, at::kFloat);   // 4 MiB charged
///     gpu.used();                                                  // 4194304
///   }
///   gpu.used();                                                    // 0
/// \endcode

#include <cstdint>
#include <memory>
#include <utility>

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>

#include "distorch/device/byte_budget.hpp"
#include "distorch/device/device.hpp"
#include "distorch/memory/allocator.hpp"

namespace distorch::inline v0 {

/// Charges each allocation of `Inner` to a `byte_budget`; see the file comment for when bytes
/// are given back.
template <allocator Inner = device_allocator>
class accounting_allocator {
 public:
  /// Charges `budget`, which may be shared (a simulated device's, or another allocator's).
  /// \code distorch::accounting_allocator a(distorch::device_allocator(id), device.budget()); \endcode
  accounting_allocator(Inner inner, std::shared_ptr<byte_budget> budget) : inner_(std::move(inner)), budget_(std::move(budget)) {
    if (!budget_)
      throw device_error({"making an accounting allocator", inner_.device().str(), std::nullopt, "no byte budget given",
                          "pass a budget, or a byte limit"});
  }
  /// A fresh budget of `limit` bytes for the inner allocator's device.
  /// \code distorch::accounting_allocator a(distorch::device_allocator(distorch::device_id::cpu()), 1ull << 30); \endcode
  accounting_allocator(Inner inner, std::uint64_t limit)
      : inner_(std::move(inner)), budget_(std::make_shared<byte_budget>(inner_.device(), limit)) {}

  /// The inner allocator's device.
  device_id device() const { return inner_.device(); }
  /// The budget charged; shared with every allocator and device made over it.
  const std::shared_ptr<byte_budget>& budget() const noexcept { return budget_; }
  /// Bytes charged now (tensors still alive).
  std::uint64_t used() const noexcept { return budget_->used(); }
  /// Budget minus what is charged now.
  /// \code if (alloc.available() < bytes_needed) evict_one(); \endcode
  std::uint64_t available() const noexcept { return budget_->available(); }
  /// Most bytes charged at once.
  std::uint64_t peak() const noexcept { return budget_->peak(); }
  /// The allocator that makes the storage.
  const Inner& inner() const noexcept { return inner_; }

  /// An uninitialised tensor charged to the budget until its storage dies. `device_error` when
  /// the budget cannot hold it (nothing charged) or the inner allocator fails (charge undone).
  /// \code at::Tensor t = alloc.allocate({256, 256}, at::kHalf); \endcode
  at::Tensor allocate(at::IntArrayRef shape, at::ScalarType type) {
    const device_id id = inner_.device();
    const std::uint64_t bytes = tensor_bytes(shape, type, id);
    reservation held = reserve(budget_, bytes, detail::allocation_doing(shape, type) + " budget of");
    at::Tensor storage_owner = inner_.allocate(shape, type);  // on failure `held` gives the bytes back
    void* data = storage_owner.data_ptr();
    const auto options = storage_owner.options();
    // The deleter keeps the inner tensor (and so its memory) alive, and the reservation with it.
    auto keeper = std::make_shared<std::pair<at::Tensor, reservation>>(std::move(storage_owner), std::move(held));
    return at::from_blob(data, shape, [keeper](void*) mutable { keeper.reset(); }, options);
  }

 private:
  Inner inner_;
  std::shared_ptr<byte_budget> budget_;
};

/// Deduces the inner allocator type: `accounting_allocator a(device_allocator(id), limit);`.
template <class Inner>
accounting_allocator(Inner, std::uint64_t) -> accounting_allocator<Inner>;
/// Deduces the inner allocator type from an allocator and a shared budget.
template <class Inner>
accounting_allocator(Inner, std::shared_ptr<byte_budget>) -> accounting_allocator<Inner>;

/// An accounting allocator that charges a simulated device's own account and allocates on the CPU.
/// \code auto alloc = distorch::accounting_for(sim_gpu); \endcode
inline accounting_allocator<device_allocator> accounting_for(const simulated_device& device) {
  return accounting_allocator<device_allocator>(device_allocator(device.id(), device.torch_device()), device.budget());
}

static_assert(allocator<accounting_allocator<device_allocator>>);

}  // namespace distorch::inline v0
