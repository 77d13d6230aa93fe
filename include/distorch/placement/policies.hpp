#pragma once
/// \file
/// One placement policy per mode of the allocation grammar: `bytes_policy`, `ratio_policy`,
/// `fraction_policy`, `virtual_vram_policy` and `auto_policy`. Each turns the model size and the
/// topology into byte quotas per device, in fill order, with DisTorch2's arithmetic done in exact
/// integers (docs/placement.md lists the formulas and the few deliberate differences).
///
/// Example:
/// \code
///   auto spec = distorch::parse_allocation("cuda:0,25%;cpu,75%");
///   distorch::ratio_policy policy{spec.entries, spec.text};
///   auto q = policy.quotas({model, topo, distorch::device_id::cuda(0)});
///   q.quotas[1].bytes;   // 3/4 of the model, rounded down
/// \endcode

#include <cstdint>
#include <string>
#include <vector>

#include "distorch/core/bytes.hpp"
#include "distorch/core/error.hpp"
#include "distorch/placement/grammar.hpp"
#include "distorch/placement/policy.hpp"

namespace distorch::inline v0 {

/// Bytes mode. Entries fill in written order, each with min(size, what is left of the model);
/// the wildcard (`*`, `N*`) takes what is left after all of them. Without a wildcard `cpu` takes
/// it: added to cpu's own entry, or as an implicit last entry.
/// \code
///   distorch::bytes_policy p{distorch::parse_allocation("cuda:0,2.5gb;cpu,*").entries};
/// \endcode
struct bytes_policy {
  std::vector<allocation_entry> entries;
  std::string text;

  /// The `placement_policy` protocol: per-device byte quotas in fill order, clamped to the
  /// topology (or an `allocation_error` in strict mode).
  quota_set quotas(const policy_context& ctx) const {
    quota_set set;
    std::uint64_t remaining = ctx.model_bytes();
    std::optional<std::size_t> wildcard;
    for (const auto& e : entries) {
      if (e.wildcard) {
        wildcard = set.quotas.size();
        set.quotas.push_back(detail::quota_from_entry(e, 0));
        continue;
      }
      const std::uint64_t q = std::min(e.bytes, remaining);
      remaining -= q;
      set.quotas.push_back(detail::quota_from_entry(e, q));
    }
    if (!wildcard) {
      for (std::size_t i = 0; i < set.quotas.size(); ++i)
        if (set.quotas[i].device.is_cpu()) wildcard = i;
      if (!wildcard && ctx.devices.contains(device_id::cpu())) {
        wildcard = set.quotas.size();
        set.quotas.push_back({device_id::cpu(), 0, 0, "", 0});
      }
    }
    if (wildcard) {
      set.quotas[*wildcard].requested += remaining;
    } else if (remaining > 0) {
      set.warnings.push_back("no wildcard and no cpu in the topology: the remaining " + format_bytes(remaining) +
                             " stay on the compute device " + ctx.compute.str());
    }
    detail::clamp_quotas(set, ctx);
    return set;
  }
  /// The allocation string it came from, for plans and messages.
  std::string describe() const { return text; }
};

/// Ratio mode: device i gets model × part_i / Σ parts, rounded down.
/// \code
///   distorch::ratio_policy p{distorch::parse_allocation("cuda:0,8%;cuda:1,8%;cpu,4%").entries};   // 40/40/20
/// \endcode
struct ratio_policy {
  std::vector<allocation_entry> entries;
  std::string text;

  /// The `placement_policy` protocol: per-device byte quotas in fill order, clamped to the
  /// topology (or an `allocation_error` in strict mode).
  quota_set quotas(const policy_context& ctx) const {
    std::uint64_t sum = 0;  // parts are below 1e18 each and few, so the sum fits
    for (const auto& e : entries) sum += e.value_e9;
    if (sum == 0)
      detail::allocation_fail("computing ratio quotas", text, 0, "ratios sum to zero", "give at least one device a positive part");
    quota_set set;
    for (const auto& e : entries) set.quotas.push_back(detail::quota_from_entry(e, detail::mul_div(ctx.model_bytes(), e.value_e9, sum)));
    detail::clamp_quotas(set, ctx);
    return set;
  }
  /// The allocation string it came from, for plans and messages.
  std::string describe() const { return text; }
};

/// Fraction mode: device i gets fraction_i × its total memory, rounded down.
/// \code
///   distorch::fraction_policy p{distorch::parse_allocation("cuda:0,0.1;cpu,0.5").entries};
/// \endcode
struct fraction_policy {
  std::vector<allocation_entry> entries;
  std::string text;

  /// The `placement_policy` protocol: per-device byte quotas in fill order, clamped to the
  /// topology (or an `allocation_error` in strict mode).
  quota_set quotas(const policy_context& ctx) const {
    quota_set set;
    for (const auto& e : entries) {
      const auto& info = detail::require_device(ctx, e.device, e.text, e.column);
      set.quotas.push_back(detail::quota_from_entry(e, detail::mul_div(info.total_bytes, e.value_e9, decimal_one)));
    }
    detail::clamp_quotas(set, ctx);
    return set;
  }
  /// The allocation string it came from, for plans and messages.
  std::string describe() const { return text; }
};

/// Virtual VRAM: move `bytes` of the model off the compute device onto the donors in order, each
/// up to its free memory. The compute device's quota is what stays: model − bytes (at least 0).
/// \code
///   auto spec = distorch::parse_allocation("cuda:0;4;cpu");
///   distorch::virtual_vram_policy p{spec.vvram_compute, spec.vvram_bytes, spec.entries, spec.text};
/// \endcode
struct virtual_vram_policy {
  device_id compute;
  std::uint64_t bytes = 0;
  std::vector<allocation_entry> donors;
  std::string text;
  std::size_t compute_column = 0;

  /// The `placement_policy` protocol: per-device byte quotas in fill order, clamped to the
  /// topology (or an `allocation_error` in strict mode).
  quota_set quotas(const policy_context& ctx) const {
    if (ctx.compute != compute)
      detail::allocation_fail("checking virtual VRAM allocation", text, compute_column,
                              "it computes on " + compute.str() + " but the plan's compute device is " + ctx.compute.str(),
                              "name the same compute device in both places");
    quota_set set;
    const std::uint64_t model = ctx.model_bytes();
    set.quotas.push_back({compute, model - std::min(model, bytes), model - std::min(model, bytes), compute.str(), compute_column});
    std::uint64_t remaining = bytes;
    for (const auto& d : donors) {
      const auto& info = detail::require_device(ctx, d.device, d.text, d.column);
      const std::uint64_t q = std::min(remaining, info.free_bytes);
      remaining -= q;
      set.quotas.push_back(detail::quota_from_entry(d, q));
    }
    const std::uint64_t needed = std::min(bytes, model);
    const std::uint64_t given = bytes - remaining;
    if (given < needed) {
      const std::string problem = "the donors hold only " + format_bytes(given) + " of the " + format_bytes(needed) + " to move";
      if (ctx.strict)
        detail::allocation_fail("checking virtual VRAM allocation", text, 0, problem, "add donors or ask less virtual VRAM");
      set.warnings.push_back(problem + "; the rest stays on " + compute.str());
    }
    detail::clamp_quotas(set, ctx);
    return set;
  }
  /// The allocation string it came from, for plans and messages.
  std::string describe() const { return text; }
};

/// Auto: the compute device keeps (free − reserve − window estimate); the other devices, GPUs in
/// topology order and then the CPU, take the rest of the model. Each donor's quota is all its
/// free memory: the planner stops offloading once the head fits the compute quota, so donors get
/// only the rest, and no unit is left on the compute device for want of a few bytes of quota.
/// \code
///   distorch::auto_policy p;   // or policy_from_string("auto")
/// \endcode
struct auto_policy {
  std::string text = "auto";

  /// The `placement_policy` protocol: per-device byte quotas in fill order, clamped to the
  /// topology (or an `allocation_error` in strict mode).
  quota_set quotas(const policy_context& ctx) const {
    const auto& compute = detail::require_device(ctx, ctx.compute, "auto", 0);
    const std::uint64_t held_back = ctx.reserve + std::min<std::uint64_t>(ctx.window_estimate, ~std::uint64_t{0} - ctx.reserve);
    const std::uint64_t keep = compute.free_bytes - std::min(compute.free_bytes, held_back);
    const std::uint64_t model = ctx.model_bytes();
    quota_set set;
    set.quotas.push_back({ctx.compute, keep, keep, "", 0});
    std::uint64_t remaining = model - std::min(model, keep);
    auto donate = [&](const device_info& d) {
      remaining -= std::min(remaining, d.free_bytes);
      set.quotas.push_back({d.id, d.free_bytes, d.free_bytes, "", 0});
    };
    for (const auto& d : ctx.devices.devices)
      if (d.id != ctx.compute && !d.id.is_cpu()) donate(d);
    for (const auto& d : ctx.devices.devices)
      if (d.id != ctx.compute && d.id.is_cpu()) donate(d);
    if (remaining > 0)
      set.warnings.push_back("auto: " + format_bytes(remaining) + " of the model fit on no device");
    detail::clamp_quotas(set, ctx);
    return set;
  }
  /// The allocation string it came from, for plans and messages.
  std::string describe() const { return text; }
};

static_assert(placement_policy<bytes_policy>);
static_assert(placement_policy<ratio_policy>);
static_assert(placement_policy<fraction_policy>);
static_assert(placement_policy<virtual_vram_policy>);
static_assert(placement_policy<auto_policy>);

}  // namespace distorch::inline v0
