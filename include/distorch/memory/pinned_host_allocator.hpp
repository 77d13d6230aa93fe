#pragma once
/// \file
/// `pinned_host_allocator`: page-locked host memory, from which a GPU copies asynchronously and at
/// full link bandwidth. LibTorch makes pinned memory through its CUDA backend, so it exists only
/// where LibTorch has a CUDA device; elsewhere `allocate` is a `device_error` that says so, and
/// `pinned_available()` lets a caller choose plain host memory up front.
///
/// Example:
/// \code
///   if (distorch::pinned_available()) {
///     distorch::pinned_host_allocator pinned;
///     at::Tensor staging = pinned.allocate({64 << 20}, at::kByte);
///   }
/// \endcode

#include <bit>
#include <cstdint>
#include <new>
#include <string>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "distorch/device/discover.hpp"
#include "distorch/memory/allocator.hpp"

namespace distorch::inline v0 {

/// Whether pinned host memory can be made here (LibTorch reports a CUDA device).
/// \code bool pin = options.pin && distorch::pinned_available(); \endcode
inline bool pinned_available() noexcept { return torch_device_count(c10::DeviceType::CUDA) > 0; }

/// Bytes LibTorch's caching host allocator takes for a pinned block of `bytes`: it rounds every
/// block up to a power of two (its default; `pinned_max_round_threshold` can only lower that), so
/// pinned memory is booked at this size and the books match what is really page-locked.
/// \code distorch::pinned_block_bytes(3 << 20);   // 4 MiB \endcode
constexpr std::uint64_t pinned_block_bytes(std::uint64_t bytes) noexcept { return bytes == 0 ? 0 : std::bit_ceil(bytes); }

/// Page-locked CPU tensors through LibTorch's pinned-memory allocator.
class pinned_host_allocator {
 public:
  /// Pinned memory is host memory: the device is the CPU.
  device_id device() const noexcept { return device_id::cpu(); }

  /// An uninitialised pinned CPU tensor; `device_error` when pinned memory is unavailable here or
  /// the allocation fails.
  /// \code at::Tensor t = distorch::pinned_host_allocator{}.allocate({1024}, at::kFloat); \endcode
  at::Tensor allocate(at::IntArrayRef shape, at::ScalarType type) const {
    const std::uint64_t bytes = tensor_bytes(shape, type, device());
    if (!pinned_available())
      throw device_error({detail::allocation_doing(shape, type) + " pinned host memory of", device().str(), std::nullopt,
                          "pinned memory needs CUDA, and this LibTorch reports no CUDA device",
                          "use device_allocator(cpu) for plain host memory, or turn pinned host memory off"});
    try {
      return at::empty(shape, at::TensorOptions().dtype(type).device(c10::DeviceType::CPU).pinned_memory(true));
    } catch (const std::bad_alloc&) {
      fail(shape, type, bytes, "out of host memory");
    } catch (const c10::Error& e) {
      std::string why = e.what_without_backtrace();
      fail(shape, type, bytes, why.substr(0, why.find('\n')));
    }
  }

 private:
  [[noreturn]] static void fail(at::IntArrayRef shape, at::ScalarType type, std::uint64_t bytes, std::string why) {
    throw device_error({detail::allocation_doing(shape, type) + " pinned host memory of", "cpu", std::nullopt,
                        "could not pin " + format_bytes(bytes) + " (" + std::to_string(bytes) + " bytes): " + why,
                        "pin less (use a bounded staging ring) or raise the locked-memory limit (ulimit -l)"});
  }
};

static_assert(allocator<pinned_host_allocator>);

}  // namespace distorch::inline v0
