#pragma once
/// \file
/// The allocator protocol the runtime uses for every tensor it places, fetches or stages, and the
/// default model of it. An allocator copies a tensor onto a pool device and books the bytes there;
/// the booking travels with the copy (`held_tensor`), so dropping the copy's holder gives the
/// bytes back. A LibTorch allocation failure (out of memory) becomes a `device_error`.
///
/// The protocol (`unit_allocator`):
/// - `a.copy_to(source, pool, target, request)` returns a `held_tensor` whose `data` lives on
///   `target.torch_device`, bit-identical to `source`, and whose `booked` holds the bytes on
///   `target`'s books; a dense source keeps its strides (memory format). It throws a distorch::error and leaves nothing booked on failure.
///
/// Example:
/// \code
///   distorch::booked_copy_allocator alloc;
///   auto held = alloc.copy_to(weight, pool, pool.at(distorch::device_id::sim(0)), {.doing = "fetching fc1"});
///   held.data;            // a separate copy, accounted on sim:0
///   held.booked.bytes();  // weight.nbytes()
/// \endcode

#include <concepts>
#include <cstdint>
#include <string>
#include <string_view>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>

#include "distorch/core/bytes.hpp"
#include "distorch/core/error.hpp"
#include "distorch/device/byte_budget.hpp"
#include "distorch/memory/pinned_host_allocator.hpp"
#include "distorch/runtime/device_pool.hpp"

namespace distorch::inline v0 {

/// A tensor copy together with the bytes booked for it.
/// \code distorch::held_tensor h = alloc.copy_to(t, pool, target, {}); h.booked.bytes(); \endcode
struct held_tensor {
  at::Tensor data;
  reservation booked;
};

/// How a copy is made.
/// \code distorch::copy_request r{.pinned = false, .non_blocking = true, .doing = "fetching fc1"}; \endcode
struct copy_request {
  bool pinned = false;        ///< host copy in page-locked memory (only for a stream device to read)
  bool non_blocking = false;  ///< queue on the current stream instead of waiting
  std::string_view doing = "copying tensor";
};

/// The allocator protocol; see the file comment.
template <class A>
concept unit_allocator = requires(const A& a, const at::Tensor& t, const device_pool& pool, const pool_device& d,
                                  const copy_request& r) {
  { a.copy_to(t, pool, d, r) } -> std::same_as<held_tensor>;
};

/// Default allocator: books on the pool, then allocates through LibTorch's allocator for the
/// device (the caching allocator on CUDA, pinned host memory when asked).
struct booked_copy_allocator {
  /// \code auto held = distorch::booked_copy_allocator{}.copy_to(t, pool, pool.at(id), {}); \endcode
  held_tensor copy_to(const at::Tensor& source, const device_pool& pool, const pool_device& target,
                      const copy_request& request) const {
    const auto bytes = static_cast<std::uint64_t>(source.numel()) * source.element_size();
    // Pinned blocks are booked at the size the caching host allocator really takes for them.
    reservation booked = pool.reserve(target.id, request.pinned ? pinned_block_bytes(bytes) : bytes, request.doing);
    at::Tensor out;
    try {
      // A dense source keeps its strides (channels_last stays channels_last); others are packed.
      const auto options = source.options().device(target.torch_device).pinned_memory(request.pinned);
      out = source.is_non_overlapping_and_dense() ? at::empty_strided(source.sizes(), source.strides(), options)
                                                  : at::empty(source.sizes(), options);
      out.copy_(source, request.non_blocking);
    } catch (const c10::Error& e) {
      throw device_error({std::string(request.doing), target.id.str(), std::nullopt,
                          "LibTorch could not allocate " + format_bytes(bytes) + ": " + e.what_without_backtrace(),
                          "place less on " + target.id.str() + " or free memory there"});
    }
    return {std::move(out), std::move(booked)};
  }
};

static_assert(unit_allocator<booked_copy_allocator>);

}  // namespace distorch::inline v0
