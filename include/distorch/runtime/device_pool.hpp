#pragma once
/// \file
/// `device_pool`: the devices one distributed model may put bytes on, each with its books (a
/// `byte_budget`) and the LibTorch device its bytes really live on. Simulated devices keep their
/// own capacity; real devices are booked against their total memory, so the pool can report
/// memory per device for every kind alike. Planning asks more of a real device: `topo()` reports
/// as free the smaller of what its books leave and what the device has free now (the OS for the
/// host, the CUDA runtime plus the unused blocks LibTorch's caching allocator holds for a GPU), so
/// a plan never counts on memory another program or another model already took. Every reservation the runtime makes goes through
/// `reserve()`, which first calls the optional allocation probe: tests use it to inject a failure
/// at any chosen allocation, and tools use it to trace allocations.
///
/// Example:
/// \code
///   distorch::device_pool pool;
///   pool.add(distorch::simulated_device(distorch::device_id::sim(0), 64ull << 20));   // the "GPU"
///   pool.add_host();                                                                    // cpu
///   auto held = pool.reserve(distorch::device_id::sim(0), 4096, "fetching unit blocks.0");
///   pool.used(distorch::device_id::sim(0));   // 4096
/// \endcode

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <c10/core/Device.h>

#include "distorch/core/error.hpp"
#include "distorch/device/byte_budget.hpp"
#include "distorch/device/cuda_caching_allocator.hpp"
#include "distorch/device/device.hpp"
#include "distorch/device/device_id.hpp"
#include "distorch/device/memory_info.hpp"
#include "distorch/device/topology.hpp"
#include "distorch/device/torch_device.hpp"

namespace distorch::inline v0 {

/// One device of a pool.
/// \code const distorch::pool_device& d = pool.at(distorch::device_id::sim(0)); d.budget->used(); \endcode
struct pool_device {
  device_id id;
  c10::Device torch_device{c10::DeviceType::CPU};
  std::shared_ptr<byte_budget> budget;
  bool simulated = false;
  std::string name;
  /// Real devices: the bytes free on the device now (see the file comment); empty for simulated
  /// devices, whose books are the whole truth.
  std::function<std::uint64_t()> free_now;

  /// True when copies to and from it are synchronous host copies (cpu and simulated devices).
  /// \code if (!d.host_backed()) use_streams(); \endcode
  bool host_backed() const noexcept { return torch_device.type() == c10::DeviceType::CPU; }
};

/// Called before every reservation with the device, the byte count and what is being done. It may
/// throw (a distorch::error) to make that allocation fail.
/// \code distorch::allocation_probe p = [](const auto& id, auto bytes, auto doing) { trace(id, bytes, doing); }; \endcode
using allocation_probe = std::function<void(const device_id&, std::uint64_t, std::string_view)>;

/// The devices a distributed model may use, in the order added.
/// \code distorch::device_pool pool; pool.add_host(); \endcode
class device_pool {
 public:
  /// An empty pool. \code distorch::device_pool pool; \endcode
  device_pool() = default;

  /// A pool of simulated devices, e.g. from `simulated_devices(parse_topology("sim:0=64MiB,cpu=1GiB"))`.
  /// \code auto pool = distorch::device_pool::of(distorch::simulated_devices(topo)); \endcode
  static device_pool of(const std::vector<simulated_device>& devices) {
    device_pool pool;
    for (const auto& d : devices) pool.add(d);
    return pool;
  }

  /// Adds a simulated device; the pool shares its accounting.
  /// \code pool.add(distorch::simulated_device(distorch::device_id::sim(0), 1ull << 30)); \endcode
  device_pool& add(const simulated_device& d) {
    check_new(d.id());
    devices_.push_back({d.id(), c10::Device(c10::DeviceType::CPU), d.budget(), true, d.name(), {}});
    return *this;
  }

  /// Adds a real device, booked against its total memory (unbounded when the total is unknown).
  /// `free_now` says what is free on it now for planning; by default it asks the device
  /// (`real_device::available()`, plus the CUDA caching allocator's unused blocks on a GPU).
  /// \code for (auto& info : distorch::discover().devices) pool.add(distorch::real_device(info)); \endcode
  device_pool& add(const real_device& d, std::function<std::uint64_t()> free_now = {}) {
    check_new(d.id());
    const std::uint64_t capacity = d.capacity() == 0 ? std::numeric_limits<std::uint64_t>::max() : d.capacity();
    if (!free_now) free_now = [d] { return measured_free(d); };
    devices_.push_back({d.id(), d.torch_device(), std::make_shared<byte_budget>(d.id(), capacity), false, d.name(), std::move(free_now)});
    return *this;
  }

  /// What a real device has free now: the OS's or the runtime's figure, plus on a GPU the blocks
  /// LibTorch's caching allocator keeps but no tensor uses (they are free to this process).
  /// \code std::uint64_t f = distorch::device_pool::measured_free(distorch::real_device(info)); \endcode
  static std::uint64_t measured_free(const real_device& d) {
    std::uint64_t free = d.available();
    if (d.id().kind == device_kind::cuda)
      if (const auto s = cuda_allocator_stats(d.id().index); s && s->reserved > s->allocated) free += s->reserved - s->allocated;
    return free;
  }

  /// Adds the host (`cpu`) with its RAM as capacity.
  /// \code pool.add_host(); \endcode
  device_pool& add_host() {
    const auto ram = host_memory();
    const std::uint64_t total = ram ? ram->total : 0;
    return add(real_device(device_info{device_id::cpu(), total, ram ? ram->free : 0, false, "host RAM"}));
  }

  /// True when the pool has this device. \code if (pool.contains(distorch::device_id::cpu())) ...; \endcode
  bool contains(const device_id& id) const noexcept { return find(id) != nullptr; }

  /// The device with this id, or null. \code if (auto* d = pool.find(id)) d->budget->used(); \endcode
  const pool_device* find(const device_id& id) const noexcept {
    for (const auto& d : devices_)
      if (d.id == id) return &d;
    return nullptr;
  }

  /// The device with this id; `device_error` naming it when the pool has no such device.
  /// \code pool.at(distorch::device_id::sim(0)).torch_device; \endcode
  const pool_device& at(const device_id& id) const {
    if (const auto* d = find(id)) return *d;
    throw device_error({"looking up device in the device pool", id.str(), std::nullopt,
                        "the pool has no such device (it has " + names() + ")",
                        "add the device to the pool, or plan with the devices the pool has"});
  }

  /// Every device, in the order added. \code for (const auto& d : pool.devices()) d.id.str(); \endcode
  const std::vector<pool_device>& devices() const noexcept { return devices_; }

  /// The pool as the planner sees it: total = capacity, free = what is not booked, and on a real
  /// device no more than it has free now (see the file comment).
  /// \code auto plan = distorch::make_plan(inv, pool.topo(), compute, policy); \endcode
  topology topo() const {
    topology t;
    for (const auto& d : devices_) {
      std::uint64_t free = d.budget->available();
      if (d.free_now) free = std::min(free, d.free_now());
      t.devices.push_back({d.id, d.budget->capacity(), free, d.simulated, d.name});
    }
    return t;
  }

  /// Bytes booked on a device now. \code pool.used(distorch::device_id::sim(0)); \endcode
  std::uint64_t used(const device_id& id) const { return at(id).budget->used(); }
  /// Most bytes booked there at once. \code CHECK(pool.peak(id) <= pool.capacity(id)); \endcode
  std::uint64_t peak(const device_id& id) const { return at(id).budget->peak(); }
  /// What the device's books allow. \code pool.capacity(distorch::device_id::sim(0)); \endcode
  std::uint64_t capacity(const device_id& id) const { return at(id).budget->capacity(); }

  /// Installs (or with an empty function removes) the allocation probe.
  /// \code pool.set_probe([&](auto&, auto, auto) { if (++n == 3) throw distorch::device_error({...}); }); \endcode
  /// Copies of a pool share one probe, so a probe set after a model took its copy still applies.
  void set_probe(allocation_probe probe) { *probe_ = std::move(probe); }

  /// Books `bytes` on a device after the probe had its say; throws `device_error` when they do not
  /// fit. The returned reservation gives them back.
  reservation reserve(const device_id& id, std::uint64_t bytes, std::string_view doing) const {
    const auto& d = at(id);
    if (*probe_) (*probe_)(id, bytes, doing);
    return ::distorch::reserve(d.budget, bytes, doing);
  }

  /// The device names, comma-separated. \code pool.names();   // "sim:0, cpu" \endcode
  std::string names() const {
    std::string s;
    for (const auto& d : devices_) s += (s.empty() ? "" : ", ") + d.id.str();
    return s.empty() ? "no devices" : s;
  }

 private:
  void check_new(const device_id& id) const {
    if (contains(id))
      throw device_error({"adding device to the device pool", id.str(), std::nullopt, "the device is already in the pool",
                          "add each device once"});
  }

  std::vector<pool_device> devices_;
  std::shared_ptr<allocation_probe> probe_ = std::make_shared<allocation_probe>();
};

}  // namespace distorch::inline v0
