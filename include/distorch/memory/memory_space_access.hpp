#pragma once
/// \file
/// Relations between device kinds as traits, after Kokkos' `MemorySpaceAccess`: whether code on
/// one kind can read another kind's memory in place, whether moving bytes between them is a real
/// copy, and whether that copy can be asynchronous. The streaming engine asks these to pick a
/// synchronous copy, a stream copy from pinned memory, or a device-to-device copy. Pure C++.
///
/// Example:
/// \code
///   using distorch::device_kind;
///   static_assert(distorch::memory_space_access<device_kind::sim, device_kind::cpu>::accessible);
///   static_assert(!distorch::memory_space_access<device_kind::cuda, device_kind::cpu>::accessible);
///   distorch::access_between(device_kind::cpu, device_kind::cuda).async_copy;   // true (from pinned memory)
/// \endcode

#include "distorch/device/device_id.hpp"

namespace distorch::inline v0 {

/// How code running on `to` relates to memory living on `from`.
struct memory_access {
  bool accessible = false;  ///< `to` can read `from`'s memory in place, without a copy
  bool same_memory = false; ///< both are host RAM: a move changes only the accounting, not the bytes' place
  bool async_copy = false;  ///< a copy between them can run on a stream, overlapped with compute
  friend constexpr bool operator==(const memory_access&, const memory_access&) = default;
};

/// True for kinds whose memory is host RAM.
constexpr bool host_backed(device_kind kind) noexcept { return kind == device_kind::cpu || kind == device_kind::sim; }

/// The relation between two distinct devices of these kinds (a device always reaches its own
/// memory). Between accelerators it is a stream copy: peer access, where enabled, is a property of
/// two devices rather than two kinds, so `accessible` is false. Host-to-accelerator copies are
/// asynchronous only from pinned host memory.
/// \code auto a = distorch::access_between(distorch::device_kind::cuda, distorch::device_kind::cuda); \endcode
constexpr memory_access access_between(device_kind from, device_kind to) noexcept {
  const bool host_from = host_backed(from);
  const bool host_to = host_backed(to);
  if (host_from && host_to) return {true, true, false};
  // MPS shares unified memory with the host, but LibTorch still moves tensors by copy.
  return {false, false, true};
}

/// `access_between` as a compile-time trait for code templated on device kinds.
template <device_kind From, device_kind To>
struct memory_space_access {
  static constexpr memory_access value = access_between(From, To);
  static constexpr bool accessible = value.accessible;
  static constexpr bool same_memory = value.same_memory;
  static constexpr bool async_copy = value.async_copy;
};

}  // namespace distorch::inline v0
