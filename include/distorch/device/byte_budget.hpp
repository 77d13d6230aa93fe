#pragma once
/// \file
/// `byte_budget`: a thread-safe byte account with a fixed capacity, and `reservation`, the RAII
/// handle that gives bytes back. Simulated devices and the accounting allocator keep their books
/// with it. It is lock-free, so a copy thread and the compute thread can reserve and release at
/// the same time; it is shared through `std::shared_ptr` so a tensor's deleter can outlive the
/// object that reserved its bytes. Pure C++: no LibTorch.
///
/// Example:
/// \code
///   auto budget = std::make_shared<distorch::byte_budget>(distorch::device_id::sim(0), 1 << 20);
///   {
///     distorch::reservation r = distorch::reserve(budget, 4096);   // throws device_error when full
///     budget->used();                                               // 4096
///   }
///   budget->used();                                                 // 0
/// \endcode

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "distorch/core/bytes.hpp"
#include "distorch/core/error.hpp"
#include "distorch/device/device_id.hpp"

namespace distorch::inline v0 {

/// Bytes in use on one device against a fixed capacity, with the high-water mark.
class byte_budget {
 public:
  /// \code distorch::byte_budget b(distorch::device_id::sim(0), 8ull << 30); \endcode
  byte_budget(device_id device, std::uint64_t capacity) noexcept : device_(device), capacity_(capacity) {}
  byte_budget(const byte_budget&) = delete;
  byte_budget& operator=(const byte_budget&) = delete;

  /// The device whose bytes this budget counts.
  const device_id& device() const noexcept { return device_; }
  /// Bytes the device may hold in all.
  std::uint64_t capacity() const noexcept { return capacity_; }
  /// Bytes reserved now.
  std::uint64_t used() const noexcept { return used_.load(std::memory_order_acquire); }
  /// Capacity minus what is reserved now.
  /// \code if (budget.available() < unit_bytes) plan_elsewhere(); \endcode
  std::uint64_t available() const noexcept { return capacity_ - used(); }
  /// Most bytes ever in use at once since construction or the last `reset_peak()`.
  std::uint64_t peak() const noexcept { return peak_.load(std::memory_order_acquire); }
  /// Starts a new high-water mark at what is in use now.
  void reset_peak() noexcept { peak_.store(used(), std::memory_order_release); }

  /// Takes `bytes` if they fit; false (and nothing taken) otherwise.
  /// \code if (!budget.try_reserve(n)) evict_something(); \endcode
  bool try_reserve(std::uint64_t bytes) noexcept {
    std::uint64_t current = used_.load(std::memory_order_relaxed);
    do {
      if (bytes > capacity_ - current) return false;
    } while (!used_.compare_exchange_weak(current, current + bytes, std::memory_order_acq_rel, std::memory_order_relaxed));
    raise_peak(current + bytes);
    return true;
  }

  /// Takes `bytes` or throws `device_error` naming the device, the request and what remains.
  /// \code budget.reserve(n, "fetching unit blocks.3"); \endcode
  void reserve(std::uint64_t bytes, std::string_view doing = "reserving device memory") {
    if (try_reserve(bytes)) return;
    const std::uint64_t remaining = available();
    throw device_error({std::string(doing), device_.str(), std::nullopt,
                        "requested " + format_bytes(bytes) + " (" + std::to_string(bytes) + " bytes) but only " +
                            format_bytes(remaining) + " (" + std::to_string(remaining) + " bytes) of " +
                            format_bytes(capacity_) + " remain",
                        "free memory on " + device_.str() + ", give it a larger capacity, or place less on it"});
  }

  /// Gives `bytes` back; false (and nothing changed) when more is returned than is in use, which
  /// means the caller's books are wrong. Never throws, so deleters may call it.
  bool try_release(std::uint64_t bytes) noexcept {
    std::uint64_t current = used_.load(std::memory_order_relaxed);
    do {
      if (bytes > current) return false;
    } while (!used_.compare_exchange_weak(current, current - bytes, std::memory_order_acq_rel, std::memory_order_relaxed));
    return true;
  }

  /// Gives `bytes` back or throws `device_error` when more is returned than is in use.
  /// \code budget.release(n); \endcode
  void release(std::uint64_t bytes) {
    if (try_release(bytes)) return;
    throw device_error({"releasing device memory", device_.str(), std::nullopt,
                        "released " + std::to_string(bytes) + " bytes but only " + std::to_string(used()) + " are in use",
                        "release exactly what was reserved, once"});
  }

 private:
  void raise_peak(std::uint64_t value) noexcept {
    std::uint64_t seen = peak_.load(std::memory_order_relaxed);
    while (value > seen && !peak_.compare_exchange_weak(seen, value, std::memory_order_acq_rel, std::memory_order_relaxed)) {
    }
  }

  device_id device_;
  std::uint64_t capacity_;
  std::atomic<std::uint64_t> used_{0};
  std::atomic<std::uint64_t> peak_{0};
};

/// Bytes held from a `byte_budget`, given back when the reservation is destroyed or `reset()`.
/// Move-only; it keeps the budget alive.
class reservation {
 public:
  reservation() = default;
  /// Adopts `bytes` already taken from `budget`; they go back when the reservation goes.
  reservation(std::shared_ptr<byte_budget> budget, std::uint64_t bytes) noexcept : budget_(std::move(budget)), bytes_(bytes) {}
  reservation(reservation&& other) noexcept : budget_(std::move(other.budget_)), bytes_(std::exchange(other.bytes_, 0)) {}
  reservation& operator=(reservation&& other) noexcept {
    if (this != &other) {
      reset();
      budget_ = std::move(other.budget_);
      bytes_ = std::exchange(other.bytes_, 0);
    }
    return *this;
  }
  reservation(const reservation&) = delete;
  reservation& operator=(const reservation&) = delete;
  ~reservation() { reset(); }

  /// Bytes held (0 once released or moved from).
  std::uint64_t bytes() const noexcept { return bytes_; }
  /// True while it holds bytes.
  explicit operator bool() const noexcept { return budget_ != nullptr && bytes_ != 0; }

  /// Gives the bytes back now.
  void reset() noexcept {
    if (budget_ && bytes_ != 0) budget_->try_release(bytes_);
    budget_.reset();
    bytes_ = 0;
  }

 private:
  std::shared_ptr<byte_budget> budget_;
  std::uint64_t bytes_ = 0;
};

/// Reserves `bytes` on `budget` and returns the handle that gives them back; throws
/// `device_error` when they do not fit.
/// \code auto r = distorch::reserve(device.budget(), unit.bytes); \endcode
inline reservation reserve(const std::shared_ptr<byte_budget>& budget, std::uint64_t bytes,
                           std::string_view doing = "reserving device memory") {
  budget->reserve(bytes, doing);
  return reservation(budget, bytes);
}

}  // namespace distorch::inline v0
