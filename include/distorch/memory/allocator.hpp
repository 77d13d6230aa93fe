#pragma once
/// \file
/// The `allocator` concept and `device_allocator`, LibTorch's own allocator on one device.
/// An allocator makes uninitialised tensor storage on its device and accounts for it. A failed
/// allocation (out of memory, a shape that overflows, a device LibTorch lacks) is a
/// `device_error`, never a crash or a raw `c10::Error`.
///
/// Example:
/// \code
///   distorch::device_allocator on_cpu(distorch::device_id::cpu());
///   at::Tensor w = on_cpu.allocate({4096, 4096}, at::kFloat);
///   static_assert(distorch::allocator<distorch::device_allocator>);
/// \endcode

#include <concepts>
#include <cstdint>
#include <exception>
#include <limits>
#include <new>
#include <string>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "distorch/core/bytes.hpp"
#include "distorch/core/error.hpp"
#include "distorch/device/device_id.hpp"
#include "distorch/device/torch_device.hpp"

namespace distorch::inline v0 {

/// Makes tensor storage on one device: `device()` names it, `allocate(shape, dtype)` returns an
/// uninitialised contiguous tensor there or throws `device_error`.
/// \code
///   template <distorch::allocator A> at::Tensor staging(A& a) { return a.allocate({1 << 20}, at::kByte); }
/// \endcode
template <class A>
concept allocator = requires(A& a, const A& ca, at::IntArrayRef shape, at::ScalarType type) {
  { ca.device() } -> std::convertible_to<device_id>;
  { a.allocate(shape, type) } -> std::same_as<at::Tensor>;
};

namespace detail {

inline std::string allocation_shape_string(at::IntArrayRef shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

inline std::string allocation_doing(at::IntArrayRef shape, at::ScalarType type) {
  return std::string("allocating a ") + c10::toString(type) + " tensor of shape " + allocation_shape_string(shape) + " on";
}

}  // namespace detail

/// Bytes a contiguous tensor of this shape and dtype needs. Throws `device_error` for a negative
/// dimension or a size that does not fit in 63 bits (LibTorch counts bytes in int64).
/// \code distorch::tensor_bytes({1024, 1024}, at::kHalf);   // 2097152 \endcode
inline std::uint64_t tensor_bytes(at::IntArrayRef shape, at::ScalarType type, const device_id& device = device_id::cpu()) {
  const auto fail = [&](std::string problem) {
    throw device_error({detail::allocation_doing(shape, type), device.str(), std::nullopt, std::move(problem),
                        "pass a shape with non-negative dimensions whose size fits in 63 bits"});
  };
  constexpr std::uint64_t limit = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
  std::uint64_t bytes = c10::elementSize(type);
  bool empty = false;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) fail("dimension " + std::to_string(i) + " is negative");
    if (shape[i] == 0) empty = true;
  }
  if (empty) return 0;
  for (const std::int64_t dim : shape) {
    const auto d = static_cast<std::uint64_t>(dim);
    if (bytes > limit / d) fail("the tensor's size overflows 63 bits");
    bytes *= d;
  }
  return bytes;
}

/// LibTorch's allocator on one device (the caching allocator on CUDA). `sim:N` allocates on the CPU.
class device_allocator {
 public:
  /// \code distorch::device_allocator gpu(distorch::device_id::cuda(0)); \endcode
  explicit device_allocator(device_id device) : device_(device), target_(to_torch_device(device)) {}
  /// Named `device` but allocating on `backing`: how a simulated device that plays `cuda:0` in a
  /// what-if topology keeps its bytes on the CPU.
  /// \code distorch::device_allocator a(sim.id(), sim.torch_device()); \endcode
  device_allocator(device_id device, c10::Device backing) : device_(device), target_(backing) {}

  /// The device it allocates for (the name; see `backing` for where the bytes live).
  const device_id& device() const noexcept { return device_; }
  /// Where the memory really is.
  const c10::Device& backing() const noexcept { return target_; }

  /// An uninitialised contiguous tensor; `device_error` when it cannot be made.
  /// \code at::Tensor t = alloc.allocate({16, 64}, at::kBFloat16); \endcode
  at::Tensor allocate(at::IntArrayRef shape, at::ScalarType type) const {
    const std::uint64_t bytes = tensor_bytes(shape, type, device_);
    try {
      return at::empty(shape, at::TensorOptions().dtype(type).device(target_));
    } catch (const std::bad_alloc&) {
      fail(shape, type, bytes, "out of host memory");
    } catch (const c10::Error& e) {
      fail(shape, type, bytes, first_line(e.what_without_backtrace()));
    }
  }

 private:
  static std::string first_line(const char* text) {
    std::string s = text ? text : "";
    const auto nl = s.find('\n');
    return nl == std::string::npos ? s : s.substr(0, nl);
  }

  [[noreturn]] void fail(at::IntArrayRef shape, at::ScalarType type, std::uint64_t bytes, std::string why) const {
    throw device_error({detail::allocation_doing(shape, type), device_.str(), std::nullopt,
                        "LibTorch could not allocate " + format_bytes(bytes) + " (" + std::to_string(bytes) +
                            " bytes): " + why,
                        "free memory on " + device_.str() + ", place less on it, or check that LibTorch supports it"});
  }

  device_id device_;
  c10::Device target_;
};

static_assert(allocator<device_allocator>);

}  // namespace distorch::inline v0
