#pragma once
/// \file
/// The planner: DisTorch2's placement rules made exact. Pure and deterministic: the same
/// inventory, topology, compute device, policy and options always give the same plan. Linear in
/// the number of units (times the number of devices); no model data is touched.
///
/// Rules, in order (docs/placement.md gives the reasons):
/// 1. A unit matching an override is pinned to the override's device, charged to its quota.
/// 2. A unit matching a head rule stays on the compute device, charged to its quota.
/// 3. A unit smaller than the tiny threshold (default 0.01% of the model) stays on the compute
///    device.
/// 4. The other units are visited from the tail of the model toward the head. Once the units not
///    yet visited fit in what is left of the compute device's quota, they all stay there. Until
///    then each unit goes to the first donor, in fill order, whose remaining quota holds it; a unit
///    that no donor holds stays on the compute device.
/// 5. The compute device must hold its resident units + the streaming window (largest unit homed
///    elsewhere × (prefetch depth + 1): the unit that runs and the ones fetched ahead of it) + the
///    activation reserve, and every donor its units; otherwise
///    planning fails with a `placement_error` that says what would fit.
///
/// Example:
/// \code
///   auto topo = distorch::parse_topology("cuda:0=24GiB,cpu=64GiB");
///   auto plan = distorch::make_plan(model, topo, distorch::device_id::cuda(0), "cuda:0,2.5gb;cpu,*");
///   plan.home_of("blocks.39");   // cpu: the tail is offloaded
///
///   distorch::planner<distorch::ratio_policy> p{{spec.entries, spec.text}, {.prefetch_depth = 1}};
///   auto same_kind = p.plan(model, topo, distorch::device_id::cuda(0));
/// \endcode

#include <algorithm>
#include <cstdint>
#include <optional>
#include <regex>
#include <string>
#include <string_view>
#include <vector>

#include "distorch/core/bytes.hpp"
#include "distorch/core/error.hpp"
#include "distorch/core/log.hpp"
#include "distorch/device/topology.hpp"
#include "distorch/model/inventory.hpp"
#include "distorch/placement/any_policy.hpp"
#include "distorch/placement/overrides.hpp"
#include "distorch/placement/plan.hpp"
#include "distorch/placement/policy.hpp"

namespace distorch::inline v0 {

/// DisTorch2's head rule for text encoders: embeddings stay on the compute device.
inline constexpr std::string_view text_encoder_head_rule = "embed|wte|wpe";

/// Knobs of the planner.
struct planner_options {
  /// Units smaller than this many millionths of the model stay on the compute device.
  /// 100 = 0.01%, DisTorch2's threshold; 0 turns the rule off.
  std::uint32_t tiny_ppm = 100;
  /// Regexes (ECMAScript, case-insensitive, searched in unit and tensor names) of head units
  /// that stay on the compute device, e.g. `text_encoder_head_rule`.
  std::vector<std::string> head_rules{};
  /// Units fetched ahead of the one running, as the runtime's `streaming_options::prefetch_depth`
  /// (one meaning everywhere): the compute device keeps largest streamed unit × (depth + 1) free.
  std::size_t prefetch_depth = 1;
  /// Bytes the compute device keeps free for activations.
  std::uint64_t reserve = 0;
  /// Asking a device for more than it has is an error instead of a clamped warning.
  bool strict = false;
};

namespace detail {

/// Units the streaming window holds at prefetch depth `depth`: the one running and `depth` ahead.
constexpr std::uint64_t window_slots(std::size_t depth) noexcept { return static_cast<std::uint64_t>(depth) + 1; }

inline std::uint64_t saturating_add(std::uint64_t a, std::uint64_t b) noexcept { return a > ~0ull - b ? ~0ull : a + b; }
inline std::uint64_t saturating_mul(std::uint64_t a, std::uint64_t b) noexcept {
  const unsigned __int128 r = static_cast<unsigned __int128>(a) * b;
  return r > static_cast<unsigned __int128>(~0ull) ? ~0ull : static_cast<std::uint64_t>(r);
}

inline std::vector<std::regex> compile_head_rules(const std::vector<std::string>& rules) {
  std::vector<std::regex> out;
  out.reserve(rules.size());
  for (const auto& r : rules) out.push_back(compile_user_regex(r, "compiling head rule", std::regex::icase | std::regex::optimize));
  return out;
}

inline bool matches_any(const unit& u, const std::vector<std::regex>& rules) {
  for (const auto& re : rules) {
    if (std::regex_search(u.name, re)) return true;
    for (const auto& t : u.tensors)
      if (std::regex_search(t.name, re)) return true;
  }
  return false;
}

/// The unit's size is below tiny_ppm millionths of the model.
inline bool is_tiny(std::uint64_t bytes, std::uint64_t model, std::uint32_t tiny_ppm) noexcept {
  return static_cast<unsigned __int128>(bytes) * 1'000'000u < static_cast<unsigned __int128>(model) * tiny_ppm;
}

}  // namespace detail

/// Plans the placement of `model` on `devices`, computing on `compute`, by `policy`.
/// Throws `allocation_error` for a policy that does not fit the topology (devices missing, or
/// asking too much in strict mode) and `placement_error` when a device cannot hold its units.
/// \code
///   auto plan = distorch::make_plan(model, topo, distorch::device_id::cuda(0),
///                                   distorch::policy_from_string("cuda:0,25%;cpu,75%"),
///                                   {.prefetch_depth = 2, .reserve = distorch::parse_bytes("1gb")});
/// \endcode
template <placement_policy Policy>
placement_plan make_plan(const inventory& model, const topology& devices, device_id compute, const Policy& policy,
                         const planner_options& options = {}) {
  const auto* compute_info = devices.find(compute);
  if (!compute_info)
    throw placement_error({"planning placement", compute.str(), std::nullopt,
                           "the compute device is not in the topology (devices: " + devices.str() + ")",
                           "compute on one of the topology's devices"});
  const auto& units = model.units();
  const std::size_t n = units.size();
  const std::uint64_t model_bytes = model.total_bytes();
  const std::size_t none = static_cast<std::size_t>(-1);

  placement_plan plan;
  plan.compute = compute;
  plan.policy = std::string(policy.describe());
  plan.model_bytes = model_bytes;
  plan.units.resize(n);

  // 1-3: pinned units (overrides, head, tiny). `home` indexes plan.devices; none = not yet placed.
  std::vector<std::size_t> home(n, none);
  std::vector<device_id> pinned_device(n);
  const auto rules = policy_overrides(policy);
  const override_matcher overrides(rules);
  for (const auto& r : rules) detail::require_device({model, devices, compute}, r.device, r.text.empty() ? r.pattern : r.text, r.column);
  const auto heads = detail::compile_head_rules(options.head_rules);
  std::uint64_t largest_placeable = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const auto& u = units[i];
    auto& p = plan.units[i];
    p.unit = u.name;
    p.bytes = u.bytes;
    p.device = compute;
    if (const override_rule* rule = overrides.empty() ? nullptr : overrides.match(u)) {
      p.reason = placement_reason::override_;
      p.device = rule->device;
      if (rule->device != compute) largest_placeable = std::max(largest_placeable, u.bytes);
    } else if (!heads.empty() && detail::matches_any(u, heads)) {
      p.reason = placement_reason::head;
    } else if (detail::is_tiny(u.bytes, model_bytes, options.tiny_ppm)) {
      p.reason = placement_reason::tiny;
    } else {
      p.reason = placement_reason::policy;
      largest_placeable = std::max(largest_placeable, u.bytes);
    }
  }

  // Quotas, in fill order.
  const policy_context ctx{model, devices, compute, options.reserve,
                           detail::saturating_mul(largest_placeable, detail::window_slots(options.prefetch_depth)), options.strict};
  const quota_set quotas = policy.quotas(ctx);
  for (const auto& q : quotas.quotas)  // the library's policies check this; a policy of one's own may not
    detail::require_device(ctx, q.device, q.entry, q.column);

  // Devices: compute first, then the policy's fill order, then devices only overrides name.
  auto index_of = [&](const device_id& d) {
    for (std::size_t k = 0; k < plan.devices.size(); ++k)
      if (plan.devices[k].device == d) return k;
    return none;
  };
  auto add_device = [&](const device_id& d, std::uint64_t quota) {
    const auto* info = devices.find(d);
    device_allotment a;
    a.device = d;
    a.capacity = info ? info->total_bytes : 0;
    a.quota = quota;
    plan.devices.push_back(a);
  };
  const auto* compute_quota = quotas.find(compute);
  add_device(compute, compute_quota ? compute_quota->bytes : 0);
  for (const auto& q : quotas.quotas)
    if (q.device != compute && index_of(q.device) == none) add_device(q.device, q.bytes);
  const std::size_t policy_devices = plan.devices.size();
  for (const auto& r : rules)
    if (index_of(r.device) == none) add_device(r.device, 0);

  // Charge pinned units to their device's quota.
  std::vector<std::uint64_t> left(plan.devices.size());
  for (std::size_t k = 0; k < plan.devices.size(); ++k) left[k] = plan.devices[k].quota;
  for (std::size_t i = 0; i < n; ++i) {
    const auto& p = plan.units[i];
    if (p.reason == placement_reason::override_ || p.reason == placement_reason::head) {
      home[i] = index_of(p.device);
      left[home[i]] -= std::min(left[home[i]], p.bytes);
    } else if (p.reason == placement_reason::tiny) {
      home[i] = 0;
    }
  }

  // 4: tail-first. `head_bytes` is the size of the placeable units not yet visited.
  std::uint64_t head_bytes = 0;
  for (std::size_t i = 0; i < n; ++i)
    if (home[i] == none) head_bytes += plan.units[i].bytes;
  for (std::size_t i = n; i-- > 0;) {
    if (home[i] != none) continue;
    if (head_bytes <= left[0]) {
      for (std::size_t j = 0; j <= i; ++j)
        if (home[j] == none) home[j] = 0;  // reason stays `policy`: the policy's compute quota holds them
      break;
    }
    auto& p = plan.units[i];
    head_bytes -= p.bytes;
    std::size_t chosen = 0;
    for (std::size_t k = 1; k < policy_devices; ++k) {
      if (left[k] >= p.bytes) {
        chosen = k;
        left[k] -= p.bytes;
        break;
      }
    }
    home[i] = chosen;
    if (chosen == 0) p.reason = placement_reason::remainder;
  }

  // Totals, window and reserve.
  std::uint64_t largest_streamed = 0;
  for (std::size_t i = 0; i < n; ++i) {
    auto& p = plan.units[i];
    auto& a = plan.devices[home[i]];
    p.device = a.device;
    a.placed_bytes += p.bytes;
    ++a.units;
    if (home[i] != 0) largest_streamed = std::max(largest_streamed, p.bytes);
  }
  auto& c = plan.devices[0];
  c.window = detail::saturating_mul(largest_streamed, detail::window_slots(options.prefetch_depth));
  c.reserve = options.reserve;
  plan.warnings = quotas.warnings;

  // 5: every device must hold what it was given.
  const std::uint64_t need = detail::saturating_add(detail::saturating_add(c.placed_bytes, c.window), c.reserve);
  if (need > compute_info->free_bytes) {
    const std::uint64_t held_back = detail::saturating_add(c.window, c.reserve);
    const std::uint64_t room = compute_info->free_bytes - std::min(compute_info->free_bytes, held_back);
    std::uint64_t donor_room = 0;
    for (std::size_t k = 1; k < policy_devices; ++k) donor_room = detail::saturating_add(donor_room, left[k]);
    std::string problem = compute.str() + " has " + format_bytes(compute_info->free_bytes) + " free but must hold " +
                          format_bytes(c.placed_bytes) + " of resident units + " + format_bytes(c.window) +
                          " streaming window (" + std::to_string(detail::window_slots(options.prefetch_depth)) + " x " + format_bytes(largest_streamed) +
                          ") + " + format_bytes(c.reserve) + " activation reserve = " + format_bytes(need);
    std::string fix = room == 0 ? "the window and reserve alone exceed " + compute.str() + "; lower the prefetch depth or the reserve"
                                : "at most " + format_bytes(room) + " of units fit resident on " + compute.str() +
                                      "; move at least " + format_bytes(c.placed_bytes - std::min(c.placed_bytes, room)) +
                                      " more to donors (their quotas have " + format_bytes(donor_room) +
                                      " left), e.g. with a larger donor share or virtual VRAM " + compute.str() + ";GB;cpu";
    throw placement_error({"planning placement", compute.str(), std::nullopt, std::move(problem), std::move(fix)});
  }
  for (std::size_t k = 1; k < plan.devices.size(); ++k) {
    const auto& a = plan.devices[k];
    const auto* info = devices.find(a.device);
    if (a.placed_bytes > info->free_bytes)
      throw placement_error({"planning placement", a.device.str(), std::nullopt,
                             a.device.str() + " has " + format_bytes(info->free_bytes) + " free but is given " + format_bytes(a.placed_bytes),
                             "pin fewer units to " + a.device.str() + " with overrides, or give it a smaller quota"});
  }
  for (const auto& w : plan.warnings) log(log_level::warning, w);
  return plan;
}

/// Plans with an allocation string (overrides included).
/// \code
///   auto plan = distorch::make_plan(model, topo, distorch::device_id::cuda(0), "cuda:0;4;cpu");
/// \endcode
inline placement_plan make_plan(const inventory& model, const topology& devices, device_id compute, std::string_view spec,
                                const planner_options& options = {}) {
  return make_plan(model, devices, compute, policy_from_string(spec), options);
}

/// A planner bound to one policy and one set of options; the policy is a defaulted template
/// parameter, so `planner<>` plans with any policy chosen at run time.
/// \code
///   distorch::planner<> p{distorch::policy_from_string("cuda:0,0.1;cpu,0.5")};
///   auto plan = p.plan(model, topo, distorch::device_id::cuda(0));
/// \endcode
template <placement_policy Policy = any_policy>
class planner {
 public:
  /// Binds the policy and the options used by every `plan` call.
  explicit planner(Policy policy, planner_options options = {}) : policy_(std::move(policy)), options_(std::move(options)) {}

  /// `make_plan` with the bound policy and options; same errors.
  placement_plan plan(const inventory& model, const topology& devices, device_id compute) const {
    return make_plan(model, devices, compute, policy_, options_);
  }

  /// The bound policy.
  const Policy& policy() const noexcept { return policy_; }
  /// The bound options.
  const planner_options& options() const noexcept { return options_; }

 private:
  Policy policy_;
  planner_options options_;
};

}  // namespace distorch::inline v0
