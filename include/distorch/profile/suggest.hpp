#pragma once
/// \file
/// `suggest_allocation`: the smallest offload that fits the compute device with its streaming
/// window and activation reserve, as a bytes-mode allocation string such as
/// `cuda:0,10.5gb;cpu,*`. The planner keeps the head of the model on the compute device and
/// offloads the tail, so the candidates are the head prefixes; for each, the compute device must
/// hold the prefix + the units pinned there (tiny, head rules) + depth × the largest offloaded
/// unit + the reserve. The longest prefix that fits wins. Its quota is written as the roundest
/// size that selects exactly that prefix; in bytes mode the donor (the wildcard) gets the model
/// minus the quota, so that size is usually exact to the byte ("400mb", "1073741311b"). The
/// string is then parsed back with the grammar and planned, so what is suggested is what the
/// planner does.
///
/// Example:
/// \code
///   auto topo = distorch::parse_topology("cuda:0=24GiB,cpu=64GiB");
///   auto s = distorch::suggest_allocation(model, topo, distorch::device_id::cuda(0), {.prefetch_depth = 2});
///   std::cout << s.allocation << '\n';      // e.g. "cuda:0,21504mb;cpu,*"
///   s.plan.allotment(s.plan.compute)->placed_bytes;
/// \endcode

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "distorch/core/bytes.hpp"
#include "distorch/core/error.hpp"
#include "distorch/device/topology.hpp"
#include "distorch/model/inventory.hpp"
#include "distorch/placement/grammar.hpp"
#include "distorch/placement/plan.hpp"
#include "distorch/placement/planner.hpp"

namespace distorch::inline v0 {

/// A suggested allocation and the plan it gives.
struct allocation_suggestion {
  std::string allocation;           ///< bytes form, e.g. "cuda:0,10.5gb;cpu,*"
  device_id donor;                  ///< the wildcard device that takes the offload
  std::uint64_t offloaded_bytes = 0;  ///< bytes homed off the compute device
  std::uint64_t needed_bytes = 0;     ///< resident + window + reserve on the compute device
  placement_plan plan;              ///< the planner's plan of `allocation`
};

namespace detail {

/// The roundest bytes-mode size in [low, high] (gb, mb, kb with 0-2 decimals, then bytes), as text.
inline std::string roundest_size(std::uint64_t low, std::uint64_t high) {
  static constexpr const char* units[] = {"gb", "mb", "kb"};
  static constexpr std::uint64_t scales[] = {1ull << 30, 1ull << 20, 1ull << 10};
  for (std::size_t u = 0; u < 3; ++u) {
    std::uint64_t tenths = 1;
    for (int places = 0; places <= 2; ++places, tenths *= 10) {
      // The largest value with this many decimals not above `high`; parsing rounds it down.
      const auto steps = static_cast<std::uint64_t>(static_cast<unsigned __int128>(high) * tenths / scales[u]);
      if (steps == 0) continue;
      std::string text = std::to_string(steps / tenths);
      if (places > 0) {
        std::string frac = std::to_string(steps % tenths);
        frac.insert(0, static_cast<std::size_t>(places) - frac.size(), '0');
        text += '.' + frac;
      }
      text += units[u];
      const auto r = try_parse_bytes(text);
      if (r.ok() && r.value >= low && r.value <= high) return text;
    }
  }
  return std::to_string(low) + "b";
}

}  // namespace detail

/// Suggests the smallest offload from `compute` onto `donor` (default: cpu, else the first other
/// device of the topology) that fits, and returns it with its plan. `options` are the planner's
/// (prefetch depth, reserve, tiny threshold, head rules). Throws `placement_error` when even
/// offloading every placeable unit does not fit, or when the donor cannot take the offload.
/// \code
///   auto s = distorch::suggest_allocation(model, topo, distorch::device_id::cuda(0),
///                                         {.prefetch_depth = 1, .reserve = distorch::parse_bytes("2gb")});
/// \endcode
inline allocation_suggestion suggest_allocation(const inventory& model, const topology& devices, device_id compute,
                                                const planner_options& options = {}, std::optional<device_id> donor = std::nullopt) {
  constexpr std::string_view doing = "suggesting an allocation";
  const auto* info = devices.find(compute);
  if (!info)
    throw placement_error({std::string(doing), compute.str(), std::nullopt,
                           "the compute device is not in the topology (devices: " + devices.str() + ")",
                           "compute on one of the topology's devices"});
  if (!donor) {
    if (compute != device_id::cpu() && devices.contains(device_id::cpu())) donor = device_id::cpu();
    else
      for (const auto& d : devices.devices)
        if (d.id != compute && !donor) donor = d.id;
  }
  if (!donor || *donor == compute || !devices.contains(*donor))
    throw placement_error({std::string(doing), donor ? donor->str() : compute.str(), std::nullopt,
                           "there is no other device in the topology to offload to",
                           "add a donor such as cpu=64GiB to the devices"});

  // Classify as the planner does: tiny and head units stay on the compute device, charged or not.
  const auto& units = model.units();
  const std::uint64_t model_bytes = model.total_bytes();
  const auto heads = detail::compile_head_rules(options.head_rules);
  std::uint64_t head_charge = 0, pinned = 0;
  std::vector<std::uint64_t> placeable;  // sizes of the units the policy places, in model order
  for (const auto& u : units) {
    if (!heads.empty() && detail::matches_any(u, heads)) {
      head_charge += u.bytes;
      pinned += u.bytes;
    } else if (detail::is_tiny(u.bytes, model_bytes, options.tiny_ppm)) {
      pinned += u.bytes;
    } else {
      placeable.push_back(u.bytes);
    }
  }
  const std::size_t m = placeable.size();
  std::vector<std::uint64_t> prefix(m + 1, 0), tail_max(m + 1, 0);
  for (std::size_t k = 0; k < m; ++k) prefix[k + 1] = prefix[k] + placeable[k];
  for (std::size_t k = m; k-- > 0;) tail_max[k] = std::max(tail_max[k + 1], placeable[k]);

  // The longest head prefix whose residents + window + reserve fit what the compute device has free.
  std::optional<std::size_t> keep;
  std::uint64_t need = 0;
  for (std::size_t k = m + 1; k-- > 0;) {
    const std::uint64_t window = detail::saturating_mul(tail_max[k], detail::window_slots(options.prefetch_depth));
    need = detail::saturating_add(detail::saturating_add(pinned + prefix[k], window), options.reserve);
    if (need <= info->free_bytes) {
      keep = k;
      break;
    }
  }
  if (!keep)
    throw placement_error({std::string(doing), compute.str(), std::nullopt,
                           "even with every placeable unit offloaded, " + compute.str() + " must hold " + format_bytes(need) +
                               " (units kept there + " + std::to_string(detail::window_slots(options.prefetch_depth)) + " x the largest unit + reserve) but has " +
                               format_bytes(info->free_bytes) + " free",
                           "lower the prefetch depth or the reserve, coarsen fewer units together, or compute on a larger device"});

  // In bytes mode the quotas add up to the model (the wildcard donor gets model - quota), so the
  // quota must hold the kept head plus the charged head units (low) and leave the donor room for
  // every offloaded unit (high); only tiny units, which no quota is charged for, give slack.
  // Capped at the free bytes so the planner never clamps the quota (and warns).
  const std::uint64_t low = head_charge + prefix[*keep];
  const std::uint64_t high = std::max(low, std::min(pinned + prefix[*keep], info->free_bytes));
  allocation_suggestion s;
  s.donor = *donor;
  s.allocation = compute.str() + ',' + detail::roundest_size(low, high) + ';' + donor->str() + ",*";
  s.plan = make_plan(model, devices, compute, policy_from_spec(parse_allocation(s.allocation)), options);
  const auto* c = s.plan.allotment(compute);
  s.offloaded_bytes = model_bytes - c->placed_bytes;
  s.needed_bytes = c->placed_bytes + c->window + c->reserve;
  if (s.offloaded_bytes != prefix[m] - prefix[*keep])
    throw placement_error({std::string(doing), s.allocation, std::nullopt,
                           donor->str() + " cannot take the " + format_bytes(prefix[m] - prefix[*keep]) + " to offload (the planner placed " +
                               format_bytes(s.offloaded_bytes) + " there)",
                           "give " + donor->str() + " more memory in the devices, or name another donor"});
  return s;
}

/// The suggestion as JSON: allocation, donor, offloaded and needed bytes.
/// \code std::cout << distorch::suggestion_to_json(s).dump(2); \endcode
inline nlohmann::json suggestion_to_json(const allocation_suggestion& s) {
  return {{"allocation", s.allocation},
          {"donor", s.donor.str()},
          {"offloaded_bytes", s.offloaded_bytes},
          {"needed_bytes", s.needed_bytes}};
}

}  // namespace distorch::inline v0
