#pragma once
/// \file
/// `placement_plan`: the result of planning, a plain comparable value. It maps every unit to its
/// home device and records, per device, the quota, the bytes placed, the streaming window and
/// the activation reserve. plan_io.hpp prints it as a table and converts it to and from JSON.
///
/// Example:
/// \code
///   const distorch::placement_plan& plan = planner_result;
///   distorch::device_id home = plan.home_of("blocks.3");   // where blocks.3 lives between uses
///   bool streamed = home != plan.compute;                   // fetched just in time when true
/// \endcode

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "distorch/core/error.hpp"
#include "distorch/device/device_id.hpp"

namespace distorch::inline v0 {

/// Why a unit went where it did.
enum class placement_reason : std::uint8_t {
  tiny,       ///< below the tiny threshold: stays on the compute device
  head,       ///< matched a head rule: stays on the compute device
  override_,  ///< pinned by a regex override
  policy,     ///< assigned to a donor by the policy's quotas (tail-first)
  remainder,  ///< no donor had room: stays on the compute device
};

/// The reason as a word, as plan tables and JSON print it: "tiny", "head", "override", ...
/// \code distorch::reason_name(distorch::placement_reason::remainder);   // "remainder" \endcode
constexpr std::string_view reason_name(placement_reason r) noexcept {
  switch (r) {
    case placement_reason::tiny: return "tiny";
    case placement_reason::head: return "head";
    case placement_reason::override_: return "override";
    case placement_reason::policy: return "policy";
    case placement_reason::remainder: return "remainder";
  }
  return "?";
}

/// One unit's placement.
struct unit_placement {
  std::string unit;  ///< unit name from the inventory
  device_id device;  ///< home device
  std::uint64_t bytes = 0;
  placement_reason reason = placement_reason::policy;
  friend bool operator==(const unit_placement&, const unit_placement&) = default;
};

/// One device's share of the plan.
struct device_allotment {
  device_id device;
  std::uint64_t capacity = 0;      ///< total bytes of the device in the topology
  std::uint64_t quota = 0;         ///< bytes the policy allowed (after clamping)
  std::uint64_t placed_bytes = 0;  ///< bytes of the units homed here
  std::size_t units = 0;           ///< number of units homed here
  std::uint64_t window = 0;        ///< compute device only: largest streamed unit × prefetch depth
  std::uint64_t reserve = 0;       ///< compute device only: bytes kept free for activations
  friend bool operator==(const device_allotment&, const device_allotment&) = default;
};

/// The whole plan. Units are in inventory order; devices in fill order, compute device first.
struct placement_plan {
  device_id compute = device_id::cpu();
  std::string policy;  ///< the allocation string or policy description it came from
  std::vector<unit_placement> units;
  std::vector<device_allotment> devices;
  std::uint64_t model_bytes = 0;
  std::vector<std::string> warnings;  ///< clamped quotas and similar non-strict adjustments

  /// Home of a unit; throws `placement_error` for an unknown name.
  device_id home_of(std::string_view unit_name) const {
    for (const auto& u : units)
      if (u.unit == unit_name) return u.device;
    throw placement_error({"looking up unit in plan", std::string(unit_name), std::nullopt,
                           "no unit of that name is in the plan", "use a unit name from the model's inventory"});
  }

  /// The allotment of a device, or nullptr.
  const device_allotment* allotment(const device_id& d) const noexcept {
    for (const auto& a : devices)
      if (a.device == d) return &a;
    return nullptr;
  }

  friend bool operator==(const placement_plan&, const placement_plan&) = default;
};

}  // namespace distorch::inline v0
