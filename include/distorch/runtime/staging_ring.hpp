#pragma once
/// \file
/// `staging_ring`: a bounded set of host buffers (slots) through which pageable host tensors are
/// copied to a device. An asynchronous host-to-GPU copy needs page-locked memory; pinning every
/// CPU-homed weight would lock as much RAM as the model has, so instead the homes stay pageable
/// and each copy goes pageable → slot (a host memcpy) → device, one slot-sized chunk at a time.
///
/// Why it is built this way:
/// - The ring is generic over the host allocator (the `allocator` concept): on CUDA it is made
///   with `pinned_host_allocator`, on a CPU-only machine or in tests with plain host memory, and
///   the same code path runs.
/// - A slot is written only after the device copy that last read it has completed: on stream
///   devices each slot carries the event recorded after that copy, and the host waits on that one
///   event (not on the whole stream) before refilling the slot. On the CPU copies are synchronous,
///   so a slot is free as soon as its copy returns.
/// - A tensor larger than a slot is copied in slot-sized chunks, so the ring's size bounds the
///   pinned memory, not the largest unit.
/// - The ring is not thread-safe by itself: the residency manager uses it under its lock.
///
/// Example:
/// \code
///   distorch::device_allocator host(distorch::device_id::cpu());      // or pinned_host_allocator on CUDA
///   distorch::staging_ring ring(host, 8 << 20, 2);                     // two 4 MiB slots
///   at::Tensor out = at::empty_like(weight, weight.options().device(target));
///   ring.copy(weight, out, std::nullopt);                              // synchronous on the CPU
///   ring.stats().chunks;                                               // ceil(weight.nbytes() / 4 MiB)
/// \endcode

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <torch/csrc/api/include/torch/version.h>

#include "distorch/core/bytes.hpp"
#include "distorch/core/error.hpp"
#include "distorch/memory/allocator.hpp"

// LibTorch 2.5 and later let the host wait on one generic event (`c10::Event::synchronize`) and
// read the time between two (`elapsedTime`); 1.13 has neither.
#ifndef DISTORCH_TORCH_EVENT_TIMING
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
#define DISTORCH_TORCH_EVENT_TIMING 1
#else
#define DISTORCH_TORCH_EVENT_TIMING 0
#endif
#endif

namespace distorch::inline v0 {

namespace detail {

/// Blocks the host until `event` has completed.
inline void wait_for_event(const c10::Event& event) {
#if DISTORCH_TORCH_EVENT_TIMING
  event.synchronize();
#else
  while (!event.query()) std::this_thread::yield();
#endif
}

/// The memory a non-overlapping, dense tensor spans (contiguous, channels_last or any other
/// permutation) as a flat contiguous tensor of its dtype sharing its storage: copying these spans
/// between two tensors with the same strides copies the tensor.
inline at::Tensor dense_span(const at::Tensor& t) { return t.as_strided({t.numel()}, {1}, t.storage_offset()); }

/// The bytes of a contiguous tensor as a flat byte tensor sharing its storage.
inline at::Tensor byte_view(const at::Tensor& t) {
  return t.reshape({t.numel()}).view(at::kByte);
}

}  // namespace detail

/// What a staging ring did.
/// \code ring.stats().chunks; \endcode
struct staging_ring_stats {
  std::uint64_t chunks = 0;        ///< slot-sized pieces copied
  std::uint64_t bytes = 0;         ///< bytes copied through the ring
  std::uint64_t slot_reuses = 0;   ///< chunks written into a slot that an earlier chunk had used
  std::uint64_t slot_waits = 0;    ///< reuses that found the slot's previous copy still in flight
  friend bool operator==(const staging_ring_stats&, const staging_ring_stats&) = default;
};

/// See the file comment.
/// \code distorch::staging_ring ring(host_allocator, 64ull << 20, 2); \endcode
class staging_ring {
 public:
  /// Allocates `slots` host buffers of `bytes / slots` bytes each (together never more than
  /// `bytes`) from `host`. Throws `device_error` when the ring cannot hold one byte per slot or
  /// the allocator fails.
  /// \code distorch::staging_ring ring(pinned, 64ull << 20, 2); \endcode
  template <allocator Host>
  staging_ring(Host& host, std::uint64_t bytes, std::size_t slots = 2) {
    if (slots == 0 || bytes < slots)
      throw device_error({"making a host staging ring", format_bytes(bytes), std::nullopt,
                          "a ring of " + std::to_string(bytes) + " bytes cannot be split into " + std::to_string(slots) +
                              " slots of at least one byte",
                          "give the ring at least one slot and at least as many bytes as slots (e.g. 64mb, 2 slots)"});
    slot_bytes_ = bytes / slots;
    slots_.reserve(slots);
    for (std::size_t k = 0; k < slots; ++k)
      slots_.push_back({host.allocate({static_cast<std::int64_t>(slot_bytes_)}, at::kByte), std::nullopt, false});
  }

  staging_ring(const staging_ring&) = delete;
  staging_ring& operator=(const staging_ring&) = delete;
  staging_ring(staging_ring&&) = default;
  staging_ring& operator=(staging_ring&&) = default;

  /// Bytes the ring holds: slots × slot size, never more than asked for.
  /// \code CHECK(ring.bytes() <= asked); \endcode
  std::uint64_t bytes() const noexcept { return slot_bytes_ * slots_.size(); }
  /// Bytes of one slot: the chunk size. \code auto chunks = (n + ring.slot_bytes() - 1) / ring.slot_bytes(); \endcode
  std::uint64_t slot_bytes() const noexcept { return slot_bytes_; }
  /// Number of slots. \code ring.slots(); \endcode
  std::size_t slots() const noexcept { return slots_.size(); }
  /// The slot buffers (host tensors of `slot_bytes()` bytes), for inspection.
  /// \code ring.slot(0).is_pinned(); \endcode
  const at::Tensor& slot(std::size_t k) const { return slots_.at(k).buffer; }
  /// What the ring did since it was made. \code ring.stats().slot_reuses; \endcode
  const staging_ring_stats& stats() const noexcept { return stats_; }

  /// Copies the bytes of `source` (a contiguous host tensor) into `destination` (a contiguous
  /// tensor of the same byte size on any device) through the ring. With a `stream`, the
  /// slot-to-device copies are queued there without blocking and each slot is guarded by an
  /// event recorded on it; without one they are synchronous. Throws `device_error` on a size or
  /// layout mismatch (nothing is copied then).
  /// \code ring.copy(home, fetched, copy_stream); \endcode
  void copy(const at::Tensor& source, const at::Tensor& destination, const std::optional<c10::Stream>& stream) {
    const auto bytes = static_cast<std::uint64_t>(source.numel()) * source.element_size();
    const auto out_bytes = static_cast<std::uint64_t>(destination.numel()) * destination.element_size();
    if (!source.device().is_cpu() || !source.is_contiguous() || !destination.is_contiguous() || bytes != out_bytes)
      throw device_error({"copying through the host staging ring", std::to_string(bytes) + " bytes", std::nullopt,
                          "the ring copies a contiguous host tensor into a contiguous tensor of the same byte size",
                          "pass contiguous tensors of equal byte size with the source in host memory"});
    if (bytes == 0) return;
    const auto* from = static_cast<const unsigned char*>(source.data_ptr());
    const at::Tensor to = detail::byte_view(destination);
    for (std::uint64_t offset = 0; offset < bytes; offset += slot_bytes_) {
      const std::uint64_t n = std::min<std::uint64_t>(slot_bytes_, bytes - offset);
      slot_state& s = slots_[next_];
      next_ = (next_ + 1) % slots_.size();
      if (s.used) ++stats_.slot_reuses;
      if (s.read_done) {
        if (!s.read_done->query()) ++stats_.slot_waits;
        detail::wait_for_event(*s.read_done);  // the copy that last read this slot has finished
        s.read_done.reset();
      }
      std::memcpy(s.buffer.data_ptr(), from + offset, n);
      const auto count = static_cast<std::int64_t>(n);
      to.narrow(0, static_cast<std::int64_t>(offset), count).copy_(s.buffer.narrow(0, 0, count), stream.has_value());
      if (stream) {
        c10::Event done(stream->device_type());
        done.record(*stream);
        s.read_done.emplace(std::move(done));
      }
      s.used = true;
      ++stats_.chunks;
      stats_.bytes += n;
    }
  }

  /// Waits until no queued copy reads any slot any more.
  /// \code ring.drain();   // before the slots' memory may be freed \endcode
  void drain() {
    for (auto& s : slots_)
      if (s.read_done) {
        detail::wait_for_event(*s.read_done);
        s.read_done.reset();
      }
  }

  ~staging_ring() {
    try {
      drain();  // freeing a slot that a queued copy still reads would corrupt that copy
    } catch (...) {  // a destructor must not throw
    }
  }

 private:
  struct slot_state {
    at::Tensor buffer;
    std::optional<c10::Event> read_done;
    bool used = false;
  };

  std::vector<slot_state> slots_;
  std::uint64_t slot_bytes_ = 0;
  std::size_t next_ = 0;
  staging_ring_stats stats_;
};

}  // namespace distorch::inline v0
