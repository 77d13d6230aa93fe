#pragma once
/// \file
/// The `device` concept and its two models:
/// - `real_device`: a device LibTorch can use, as `discover()` found it; its free memory is read
///   live from the OS or the CUDA runtime.
/// - `simulated_device`: CPU-backed, with a fixed capacity and its own thread-safe byte accounting,
///   so placement and streaming run (and are tested) on a machine without GPUs.
///
/// A device is a cheap handle: copies of a `simulated_device` share one `byte_budget`, so the
/// compute thread and a copy thread may each hold a copy and reserve/release concurrently.
///
/// Example:
/// \code
///   distorch::simulated_device gpu(distorch::device_id::sim(0), 512ull << 20);
///   {
///     auto held = gpu.reserve_scoped(100 << 20);   // device_error if it does not fit
///     gpu.used();                                   // 104857600
///   }
///   gpu.used();                                     // 0
///   gpu.peak();                                     // 104857600
///   static_assert(distorch::device<distorch::simulated_device>);
/// \endcode

#include <concepts>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>

#include "distorch/core/error.hpp"
#include "distorch/device/byte_budget.hpp"
#include "distorch/device/device_id.hpp"
#include "distorch/device/memory_info.hpp"
#include "distorch/device/topology.hpp"
#include "distorch/device/torch_device.hpp"

namespace distorch::inline v0 {

/// How bytes move to and from a device.
enum class copy_mode : std::uint8_t {
  synchronous,  ///< a copy completes before it returns (CPU, simulated devices)
  stream,       ///< copies are queued on a `c10::Stream` and completed through a `c10::Event`
};

/// The stream/event kind for moving bytes: which `c10::DeviceType`'s guard implementation makes
/// the streams and events (through `c10::impl::VirtualGuardImpl`), and whether copies are async.
struct transfer_kind {
  c10::DeviceType stream_device_type = c10::DeviceType::CPU;
  copy_mode mode = copy_mode::synchronous;
  friend bool operator==(const transfer_kind&, const transfer_kind&) = default;
};

/// Anything placement and streaming can put bytes on: an id, the LibTorch device it computes on,
/// its capacity, what is available now, and the stream/event kind for moving bytes.
/// \code
///   template <distorch::device D> void report(const D& d) {
///     std::cout << d.id().str() << ": " << d.available() << " of " << d.capacity() << '\n';
///   }
/// \endcode
template <class D>
concept device = requires(const D& d) {
  { d.id() } -> std::convertible_to<device_id>;
  { d.torch_device() } -> std::convertible_to<c10::Device>;
  { d.capacity() } -> std::convertible_to<std::uint64_t>;
  { d.available() } -> std::convertible_to<std::uint64_t>;
  { d.transfer() } -> std::convertible_to<transfer_kind>;
};

/// A CPU-backed device with a fixed capacity and its own accounting. Every byte placed on it must
/// be reserved (directly, or through `accounting_allocator`); exceeding the capacity is a
/// `device_error`, never a crash. Copies share the accounting.
class simulated_device {
 public:
  /// \code distorch::simulated_device d(distorch::device_id::parse("cuda:0"), 24ull << 30); \endcode
  simulated_device(device_id id, std::uint64_t capacity, std::string name = "simulated")
      : budget_(std::make_shared<byte_budget>(id, capacity)), name_(std::move(name)) {}

  /// The id it was made with (any kind: a simulated device may stand in for cuda:0).
  const device_id& id() const noexcept { return budget_->device(); }
  /// Always the CPU: a simulated device keeps its bytes in host memory, whatever its id says.
  c10::Device torch_device() const noexcept { return c10::Device(c10::DeviceType::CPU); }
  /// The fixed capacity given at construction.
  std::uint64_t capacity() const noexcept { return budget_->capacity(); }
  /// Capacity minus what is reserved.
  std::uint64_t available() const noexcept { return budget_->available(); }
  /// Copies to and from it are synchronous host copies.
  transfer_kind transfer() const noexcept { return {c10::DeviceType::CPU, copy_mode::synchronous}; }
  /// A label for tables and messages ("simulated" unless given).
  const std::string& name() const noexcept { return name_; }

  /// Bytes reserved now.
  std::uint64_t used() const noexcept { return budget_->used(); }
  /// Most bytes reserved at once since construction or the last `reset_peak()`.
  /// \code CHECK(gpu.peak() <= gpu.capacity()); \endcode
  std::uint64_t peak() const noexcept { return budget_->peak(); }
  /// Starts a new high-water mark at what is reserved now.
  void reset_peak() noexcept { budget_->reset_peak(); }

  /// Takes `bytes` or throws `device_error` naming the device, the request and what remains.
  /// \code gpu.reserve(unit_bytes, "fetching blocks.3"); \endcode
  void reserve(std::uint64_t bytes, std::string_view doing = "reserving simulated device memory") {
    budget_->reserve(bytes, doing);
  }
  /// Takes `bytes` if they fit; false otherwise.
  bool try_reserve(std::uint64_t bytes) noexcept { return budget_->try_reserve(bytes); }
  /// Gives `bytes` back; `device_error` when more is released than is in use.
  void release(std::uint64_t bytes) { budget_->release(bytes); }
  /// Reserves and returns the handle that releases on destruction.
  /// \code auto held = gpu.reserve_scoped(n); \endcode
  reservation reserve_scoped(std::uint64_t bytes, std::string_view doing = "reserving simulated device memory") {
    return ::distorch::reserve(budget_, bytes, doing);
  }

  /// The shared accounting, for allocators and reservations that must outlive this handle.
  const std::shared_ptr<byte_budget>& budget() const noexcept { return budget_; }

  /// As the planner sees it: total = capacity, free = available now.
  device_info info() const { return {id(), capacity(), available(), true, name_}; }

 private:
  std::shared_ptr<byte_budget> budget_;
  std::string name_;
};

/// One simulated device per entry of a topology (typically from `parse_topology`), keeping the
/// written ids and capacities (the free bytes of the topology are not carried over: a simulated
/// device starts empty).
/// \code
///   auto devices = distorch::simulated_devices(distorch::parse_topology("cuda:0=8GiB,cpu=32GiB"));
///   devices[0].id().str();   // "cuda:0", computing on the CPU
/// \endcode
inline std::vector<simulated_device> simulated_devices(const topology& topo) {
  std::vector<simulated_device> out;
  out.reserve(topo.devices.size());
  for (const auto& d : topo.devices) out.emplace_back(d.id, d.total_bytes, d.name.empty() ? "simulated" : d.name);
  return out;
}

/// A device LibTorch can use, as discovered. `available()` asks the OS (cpu) or the CUDA runtime
/// (cuda) each time; for other backends it is the free memory known at discovery.
class real_device {
 public:
  /// \code distorch::real_device gpu(distorch::discover().devices.at(1)); \endcode
  explicit real_device(device_info info) : info_(std::move(info)) {
    if (info_.id.kind == device_kind::sim)
      throw device_error({"making a real device", info_.id.str(), std::nullopt,
                          "a sim:N device has no real memory behind it", "use simulated_device for sim:N"});
  }

  /// The id found by discovery.
  const device_id& id() const noexcept { return info_.id; }
  /// The LibTorch device of this id.
  c10::Device torch_device() const { return to_torch_device(info_.id); }
  /// Total memory, as discovered.
  std::uint64_t capacity() const noexcept { return info_.total_bytes; }
  /// Free memory now: asked of the OS (cpu) or the CUDA runtime (cuda) each call; for other
  /// backends the free memory known at discovery.
  /// \code if (gpu.available() < needed) distorch::empty_caches(); \endcode
  std::uint64_t available() const {
    std::optional<memory_figures> now;
    if (info_.id.kind == device_kind::cpu) now = host_memory();
    else if (info_.id.kind == device_kind::cuda) now = cuda_memory(info_.id.index);
    return now ? now->free : info_.free_bytes;
  }
  /// Host copies are synchronous; accelerators copy on a stream of their device type.
  transfer_kind transfer() const noexcept {
    if (info_.id.kind == device_kind::cpu) return {c10::DeviceType::CPU, copy_mode::synchronous};
    return {torch_device_type(info_.id.kind), copy_mode::stream};
  }
  /// The name the backend reports ("NVIDIA H100 80GB HBM3", "cpu").
  const std::string& name() const noexcept { return info_.name; }
  /// As discovered (free bytes at discovery time).
  const device_info& info() const noexcept { return info_; }

 private:
  device_info info_;
};

static_assert(device<simulated_device>);
static_assert(device<real_device>);

}  // namespace distorch::inline v0
