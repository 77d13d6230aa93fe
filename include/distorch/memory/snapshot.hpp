#pragma once
/// \file
/// Named memory snapshots: at checkpoints ("loaded", "after forward", "after free"), record per
/// device the bytes used and total, and LibTorch's allocated and reserved bytes where the backend
/// reports them (CUDA, in builds with `DISTORCH_WITH_CUDA`). A `memory_series` prints all of them
/// as one aligned table and as JSON, so a leak or a retention problem shows as a column that
/// does not come back down.
///
/// Example:
/// \code
///   distorch::simulated_device gpu(distorch::device_id::sim(0), 1ull << 30);
///   std::vector<distorch::simulated_device> devices{gpu};
///   distorch::memory_series series;
///   series.take("empty", devices);
///   auto held = gpu.reserve_scoped(256 << 20);
///   series.take("loaded", devices);
///   std::cout << series.table();
///   // checkpoint  device        used     total  torch allocated  torch reserved
///   // empty       sim:0          0 B  1.00 GiB                -               -
///   // loaded      sim:0   256.00 MiB  1.00 GiB                -               -
///   std::cout << series.json().dump(2);
/// \endcode

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <ranges>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "distorch/core/bytes.hpp"
#include "distorch/device/cuda_caching_allocator.hpp"
#include "distorch/device/device.hpp"
#include "distorch/device/discover.hpp"

namespace distorch::inline v0 {

/// One device at one checkpoint.
struct device_memory {
  device_id device;
  std::uint64_t used = 0;   ///< capacity minus what is available now
  std::uint64_t total = 0;  ///< capacity
  std::optional<std::uint64_t> torch_allocated;  ///< held by live tensors, where the backend says
  std::optional<std::uint64_t> torch_reserved;   ///< held by LibTorch's caching allocator
  friend bool operator==(const device_memory&, const device_memory&) = default;
};

/// All devices at one named checkpoint.
struct memory_snapshot {
  std::string name;
  std::vector<device_memory> devices;
  friend bool operator==(const memory_snapshot&, const memory_snapshot&) = default;
};

/// Measures one device now. For a real CUDA device the caching allocator's figures are added
/// where this build can read them.
/// \code distorch::device_memory m = distorch::measure(gpu); \endcode
template <device D>
device_memory measure(const D& d) {
  device_memory m;
  m.device = d.id();
  m.total = d.capacity();
  m.used = m.total - std::min<std::uint64_t>(d.available(), m.total);
  const c10::Device where = d.torch_device();
  if (where.type() == c10::DeviceType::CUDA) {
    if (auto stats = cuda_allocator_stats(where.has_index() ? where.index() : 0)) {
      m.torch_allocated = stats->allocated;
      m.torch_reserved = stats->reserved;
    }
  }
  return m;
}

/// Snapshots in the order they were taken.
class memory_series {
 public:
  /// Measures every device of `devices` (any range of `device`s) under the name `checkpoint`.
  /// \code series.take("after load", sim_devices); \endcode
  template <std::ranges::input_range R>
    requires device<std::ranges::range_value_t<R>>
  const memory_snapshot& take(std::string checkpoint, const R& devices) {
    memory_snapshot s{std::move(checkpoint), {}};
    for (const auto& d : devices) s.devices.push_back(measure(d));
    return add(std::move(s));
  }

  /// Measures every device `discover()` finds now.
  /// \code series.take("start"); \endcode
  const memory_snapshot& take(std::string checkpoint) {
    std::vector<real_device> devices;
    for (auto& info : discover().devices) devices.emplace_back(std::move(info));
    return take(std::move(checkpoint), devices);
  }

  /// Appends a snapshot made elsewhere (mixing simulated and real devices, say).
  const memory_snapshot& add(memory_snapshot snapshot) {
    snapshots_.push_back(std::move(snapshot));
    return snapshots_.back();
  }

  /// Every snapshot taken, in order.
  const std::vector<memory_snapshot>& snapshots() const noexcept { return snapshots_; }
  /// True before the first snapshot.
  bool empty() const noexcept { return snapshots_.empty(); }
  /// Forgets every snapshot.
  void clear() noexcept { snapshots_.clear(); }

  /// One aligned table, one row per (checkpoint, device); "-" where a figure is not reported.
  /// \code std::cout << series.table(); \endcode
  std::string table() const {
    constexpr std::size_t columns = 6;
    using row = std::array<std::string, columns>;
    std::vector<row> rows{{"checkpoint", "device", "used", "total", "torch allocated", "torch reserved"}};
    const auto optional_bytes = [](const std::optional<std::uint64_t>& v) { return v ? format_bytes(*v) : std::string("-"); };
    for (const auto& s : snapshots_)
      for (const auto& d : s.devices)
        rows.push_back({s.name, d.device.str(), format_bytes(d.used), format_bytes(d.total), optional_bytes(d.torch_allocated),
                        optional_bytes(d.torch_reserved)});
    std::array<std::size_t, columns> width{};
    for (const auto& r : rows)
      for (std::size_t c = 0; c < columns; ++c) width[c] = std::max(width[c], r[c].size());
    std::string out;
    for (std::size_t i = 0; i < rows.size(); ++i) {
      std::string line;
      for (std::size_t c = 0; c < columns; ++c) {
        const std::string& cell = rows[i][c];
        const std::string pad(width[c] - cell.size(), ' ');
        if (c > 0) line += "  ";
        // Names read left to right; byte figures line up on their units.
        line += c < 2 ? cell + pad : pad + cell;
      }
      while (!line.empty() && line.back() == ' ') line.pop_back();
      out += line + '\n';
    }
    return out;
  }

  /// `{"snapshots": [{"name": ..., "devices": [{"device", "used", "total", "torch_allocated",
  /// "torch_reserved"}]}]}` with exact byte counts; unreported figures are null.
  /// \code std::ofstream("memory.json") << series.json().dump(2); \endcode
  nlohmann::json json() const {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& s : snapshots_) {
      nlohmann::json devices = nlohmann::json::array();
      for (const auto& d : s.devices) {
        nlohmann::json entry{{"device", d.device.str()}, {"used", d.used}, {"total", d.total}};
        entry["torch_allocated"] = d.torch_allocated ? nlohmann::json(*d.torch_allocated) : nlohmann::json(nullptr);
        entry["torch_reserved"] = d.torch_reserved ? nlohmann::json(*d.torch_reserved) : nlohmann::json(nullptr);
        devices.push_back(std::move(entry));
      }
      list.push_back({{"name", s.name}, {"devices", std::move(devices)}});
    }
    return {{"snapshots", std::move(list)}};
  }

 private:
  std::vector<memory_snapshot> snapshots_;
};

}  // namespace distorch::inline v0
