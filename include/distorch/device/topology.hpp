#pragma once
/// \file
/// `topology`: the devices a plan may use, each with total and free bytes. Real topologies come
/// from `discover()` (device/discover.hpp); what-if topologies come from strings such as
/// `cuda:0=24GiB,cuda:1=12GiB,cpu=64GiB`, where every device is simulated with that capacity.
/// Pure C++: no LibTorch.
///
/// Example:
/// \code
///   auto topo = distorch::parse_topology("cuda:0=24GiB,cpu=64GiB");
///   topo.find(distorch::device_id::cuda(0))->total;   // 25769803776
/// \endcode

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "distorch/core/bytes.hpp"
#include "distorch/device/device_id.hpp"

namespace distorch::inline v0 {

/// One device as the planner sees it.
struct device_info {
  device_id id;
  std::uint64_t total_bytes = 0;  ///< capacity
  std::uint64_t free_bytes = 0;   ///< available now (== total for simulated devices)
  bool simulated = false;         ///< capacity given by the user, backed by CPU memory
  std::string name;               ///< "NVIDIA H100 80GB HBM3", "host RAM", "simulated"

  friend bool operator==(const device_info&, const device_info&) = default;
};

/// The devices available to a plan, in discovery (or written) order.
struct topology {
  std::vector<device_info> devices;

  /// The device with this id, or nullptr.
  const device_info* find(const device_id& id) const noexcept {
    auto it = std::find_if(devices.begin(), devices.end(), [&](const device_info& d) { return d.id == id; });
    return it == devices.end() ? nullptr : &*it;
  }
  /// True when the topology has this device.
  /// \code if (!topo.contains(distorch::device_id::cuda(1))) use_one_gpu(); \endcode
  bool contains(const device_id& id) const noexcept { return find(id) != nullptr; }

  /// "cuda:0=24.00 GiB, cpu=64.00 GiB"
  std::string str() const {
    std::string s;
    for (const auto& d : devices) {
      if (!s.empty()) s += ", ";
      s += d.id.str() + '=' + format_bytes(d.total_bytes);
    }
    return s;
  }

  friend bool operator==(const topology&, const topology&) = default;
};

/// Parses `device=size[,device=size...]` into a topology of simulated devices whose total and free
/// bytes are the given size. Throws `allocation_error` naming the entry and its column.
/// \code
///   auto topo = distorch::parse_topology("cuda:0=24GiB,cuda:1=12GiB,cpu=64GiB");
/// \endcode
inline topology parse_topology(std::string_view text) {
  topology topo;
  auto fail = [&](std::size_t column, std::string entry, std::string problem, std::string fix) {
    throw allocation_error({"parsing device topology", std::move(entry), error_position{"column", column + 1},
                            std::move(problem), std::move(fix)});
  };
  constexpr std::string_view form = "write device=size entries separated by ',', e.g. cuda:0=24GiB,cpu=64GiB";
  if (text.find_first_not_of(" \t") == std::string_view::npos) fail(0, std::string(text), "empty topology", std::string(form));
  std::size_t start = 0;
  while (start <= text.size()) {
    std::size_t comma = text.find(',', start);
    if (comma == std::string_view::npos) comma = text.size();
    std::string_view entry = text.substr(start, comma - start);
    std::size_t lead = 0;
    while (lead < entry.size() && entry[lead] == ' ') ++lead;
    entry.remove_prefix(lead);
    const std::size_t column = start + lead;
    if (entry.find_first_not_of(' ') == std::string_view::npos) fail(column, std::string(entry), "empty entry", std::string(form));
    const std::size_t eq = entry.find('=');
    if (eq == std::string_view::npos) fail(column, std::string(entry), "missing '=size'", std::string(form));
    std::string_view name = entry.substr(0, eq);
    while (!name.empty() && name.back() == ' ') name.remove_suffix(1);
    auto id = device_id::try_parse(name);
    if (!id.ok()) fail(column + id.index, std::string(entry), id.problem, id.fix);
    auto size = try_parse_bytes(entry.substr(eq + 1));
    if (!size.ok()) fail(column + eq + 1 + size.index, std::string(entry), size.problem, size.fix);
    if (topo.contains(*id.id)) fail(column, std::string(entry), "device " + id.id->str() + " is named twice", "name each device once");
    topo.devices.push_back({*id.id, size.value, size.value, true, "simulated"});
    start = comma + 1;
  }
  return topo;
}

}  // namespace distorch::inline v0
