#pragma once
/// \file
/// The `placement_policy` concept: what a policy is asked and what it answers. A policy turns
/// (inventory, topology, compute device) into byte quotas per device, in fill order. The planner
/// (planner.hpp) then keeps the head of the model on the compute device up to its quota and hands
/// the tail to the other devices, first-fit in fill order.
///
/// The protocol, in the style of Kokkos execution policies:
/// - `p.quotas(ctx)` returns a `quota_set`: one `device_quota` per device in fill order, plus
///   warnings for requests that were clamped to what a device has;
/// - `p.describe()` returns a short text for plans and logs (usually the allocation string);
/// - optionally `p.overrides()` returns `regex=device` rules that pin units before the quotas
///   apply (see overrides.hpp).
///
/// Example (a policy of one's own):
/// \code
///   struct everything_on_cpu {
///     distorch::quota_set quotas(const distorch::policy_context& ctx) const {
///       return {{{distorch::device_id::cpu(), ctx.model_bytes(), ctx.model_bytes()}}, {}};
///     }
///     std::string describe() const { return "everything on cpu"; }
///   };
///   static_assert(distorch::placement_policy<everything_on_cpu>);
/// \endcode

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "distorch/core/bytes.hpp"
#include "distorch/core/error.hpp"
#include "distorch/device/device_id.hpp"
#include "distorch/device/topology.hpp"
#include "distorch/model/inventory.hpp"
#include "distorch/placement/grammar.hpp"

namespace distorch::inline v0 {

/// What a policy may look at.
struct policy_context {
  const inventory& model;
  const topology& devices;
  device_id compute;
  std::uint64_t reserve = 0;          ///< activation reserve the compute device keeps free
  std::uint64_t window_estimate = 0;  ///< largest placeable unit × prefetch depth (an upper bound)
  bool strict = false;                ///< over-asking is an error instead of a clamped warning

  /// Total bytes of the model's units.
  std::uint64_t model_bytes() const noexcept { return model.total_bytes(); }
};

/// One device's quota.
struct device_quota {
  device_id device;
  std::uint64_t bytes = 0;      ///< quota after clamping to the device's free memory
  std::uint64_t requested = 0;  ///< what the policy asked before clamping
  std::string entry;            ///< the allocation entry it came from ("" when implicit)
  std::size_t column = 0;       ///< its 1-based column (0 when implicit)
  friend bool operator==(const device_quota&, const device_quota&) = default;
};

/// A policy's answer: quotas in fill order and the warnings it produced.
struct quota_set {
  std::vector<device_quota> quotas;
  std::vector<std::string> warnings;

  /// The quota of a device, or nullptr.
  /// \code
  ///   if (const auto* q = quotas.find(distorch::device_id::cpu())) use(q->bytes);
  /// \endcode
  const device_quota* find(const device_id& d) const noexcept {
    for (const auto& q : quotas)
      if (q.device == d) return &q;
    return nullptr;
  }
  friend bool operator==(const quota_set&, const quota_set&) = default;
};

/// A placement policy: see the file comment for the protocol.
template <class P>
concept placement_policy = std::copy_constructible<P> && requires(const P& p, const policy_context& ctx) {
  { p.quotas(ctx) } -> std::same_as<quota_set>;
  { p.describe() } -> std::convertible_to<std::string>;
};

/// The override rules of a policy: its `overrides()` when it has them, none otherwise.
/// \code
///   auto rules = distorch::policy_overrides(distorch::policy_from_string("a=cpu;cuda:0,1gb"));
/// \endcode
template <placement_policy P>
std::span<const override_rule> policy_overrides(const P& p) {
  if constexpr (requires { { p.overrides() } -> std::convertible_to<std::span<const override_rule>>; }) {
    return p.overrides();
  } else {
    return {};
  }
}

namespace detail {

/// Every device a policy names must be in the topology.
inline const device_info& require_device(const policy_context& ctx, const device_id& d, std::string_view entry, std::size_t column) {
  const auto* info = ctx.devices.find(d);
  if (!info)
    allocation_fail("checking allocation against devices", entry.empty() ? d.str() : entry, column,
                    "device " + d.str() + " is not present (devices: " + ctx.devices.str() + ")",
                    "name only devices of the topology, or add " + d.str() + " to it");
  return *info;
}

/// Clamps each quota to its device's free memory: an `allocation_error` in strict mode, a
/// warning otherwise. The caller has set `requested`.
inline void clamp_quotas(quota_set& set, const policy_context& ctx) {
  for (auto& q : set.quotas) {
    const auto& info = require_device(ctx, q.device, q.entry, q.column);
    q.bytes = q.requested;
    if (q.requested <= info.free_bytes) continue;
    const std::string where = q.entry.empty() ? q.device.str() : "'" + q.entry + "'";
    const std::string problem = where + " asks " + format_bytes(q.requested) + " but " + q.device.str() + " has " +
                                format_bytes(info.free_bytes) + " free";
    if (ctx.strict)
      allocation_fail("checking allocation against devices", q.entry.empty() ? q.device.str() : q.entry, q.column, problem,
                      "ask at most " + format_bytes(info.free_bytes) + " of " + q.device.str() + ", or leave strict mode to clamp");
    q.bytes = info.free_bytes;
    set.warnings.push_back(problem + "; clamped to " + format_bytes(info.free_bytes));
  }
}

inline device_quota quota_from_entry(const allocation_entry& e, std::uint64_t requested) {
  return {e.device, requested, requested, e.text, e.column};
}

/// a × b / c without overflow, rounded down; c > 0.
inline std::uint64_t mul_div(std::uint64_t a, std::uint64_t b, std::uint64_t c) noexcept {
  const unsigned __int128 r = static_cast<unsigned __int128>(a) * b / c;
  return r > static_cast<unsigned __int128>(~0ull) ? ~0ull : static_cast<std::uint64_t>(r);
}

}  // namespace detail

}  // namespace distorch::inline v0
