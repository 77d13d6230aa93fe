#pragma once
/// \file
/// `any_policy`: a type-erased placement policy, for policies chosen at run time, and
/// `policy_from_string`, which turns an allocation string into one (overrides included).
///
/// Example:
/// \code
///   distorch::any_policy p = distorch::policy_from_string("cuda:0,500mb;cuda:1,3.0g;cpu,5gb*");
///   auto quotas = p.quotas({model, topo, distorch::device_id::cuda(0)});
///   p = distorch::auto_policy{};   // any policy converts
/// \endcode

#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "distorch/placement/grammar.hpp"
#include "distorch/placement/overrides.hpp"
#include "distorch/placement/policies.hpp"
#include "distorch/placement/policy.hpp"

namespace distorch::inline v0 {

/// Holds any `placement_policy` by value. Its `overrides()` are the held policy's.
/// \code
///   distorch::any_policy p = distorch::ratio_policy{spec.entries, spec.text};
///   distorch::planner<> planner{p};   // planner<any_policy>
/// \endcode
class any_policy {
 public:
  /// Holds `auto_policy` until another policy is assigned.
  any_policy() : any_policy(auto_policy{}) {}

  /// Holds any type satisfying `placement_policy`.
  /// \code distorch::any_policy p = distorch::ratio_policy{entries, "cuda:0,8%;cpu,2%"}; \endcode
  // The any_policy test comes first: checking placement_policy<any_policy> from inside its own
  // copy constructor's overload set would recurse.
  template <class P>
    requires(!std::is_same_v<std::remove_cvref_t<P>, any_policy> && placement_policy<P>)
  any_policy(P policy)  // NOLINT: converting on purpose
      : self_(std::make_unique<holder<P>>(std::move(policy))) {}

  any_policy(const any_policy& other) : self_(other.self_->clone()), storage_(other.storage_) {}
  any_policy(any_policy&&) noexcept = default;
  any_policy& operator=(const any_policy& other) {
    if (this != &other) {
      self_ = other.self_->clone();
      storage_ = other.storage_;
    }
    return *this;
  }
  any_policy& operator=(any_policy&&) noexcept = default;

  /// The held policy's quotas.
  quota_set quotas(const policy_context& ctx) const { return self_->quotas(ctx); }
  /// The held policy's description (its allocation string).
  std::string describe() const { return self_->describe(); }
  /// The held policy's override rules (empty when it has none).
  std::span<const override_rule> overrides() const { return self_->overrides(); }
  /// The storage dtypes the allocation string's `:dtype` suffixes ask for (`storage_of`); empty
  /// for policies not made from a string. DistributedModule stores those homes narrower.
  /// \code auto homes = distorch::policy_from_string("cuda:0,8gb;cpu,*:fp8").storage();   // {{cpu, f8_e4m3}} \endcode
  std::span<const device_storage> storage() const { return storage_; }
  /// Sets what `storage()` reports (`policy_from_spec` does this from the string's suffixes).
  /// \code p.set_storage({{distorch::device_id::cpu(), distorch::dtype::bf16}}); \endcode
  void set_storage(std::vector<device_storage> storage) { storage_ = std::move(storage); }

 private:
  struct base {
    virtual ~base() = default;
    virtual quota_set quotas(const policy_context& ctx) const = 0;
    virtual std::string describe() const = 0;
    virtual std::span<const override_rule> overrides() const = 0;
    virtual std::unique_ptr<base> clone() const = 0;
  };
  template <class P>
  struct holder final : base {
    explicit holder(P p) : policy(std::move(p)) {}
    quota_set quotas(const policy_context& ctx) const override { return policy.quotas(ctx); }
    std::string describe() const override { return std::string(policy.describe()); }
    std::span<const override_rule> overrides() const override { return policy_overrides(policy); }
    std::unique_ptr<base> clone() const override { return std::make_unique<holder>(policy); }
    P policy;
  };
  std::unique_ptr<base> self_;
  std::vector<device_storage> storage_;
};

static_assert(placement_policy<any_policy>);

/// The policy of a parsed allocation spec, with its overrides in front and its storage suffixes
/// in `storage()`.
/// \code
///   auto p = distorch::policy_from_spec(distorch::parse_allocation("cuda:0,0.1;cpu,0.5"));
/// \endcode
inline any_policy policy_from_spec(const allocation_spec& spec) {
  auto wrap = [&](auto policy) -> any_policy {
    any_policy out = [&]() -> any_policy {
      if (spec.overrides.empty()) return policy;
      auto composed = with_overrides(std::move(policy), spec.overrides);
      composed.text = spec.text;
      return composed;
    }();
    out.set_storage(storage_of(spec));
    return out;
  };
  switch (spec.mode) {
    case allocation_mode::bytes: return wrap(bytes_policy{spec.entries, spec.text});
    case allocation_mode::ratio: return wrap(ratio_policy{spec.entries, spec.text});
    case allocation_mode::fraction: return wrap(fraction_policy{spec.entries, spec.text});
    case allocation_mode::virtual_vram:
      return wrap(virtual_vram_policy{spec.vvram_compute, spec.vvram_bytes, spec.entries, spec.text, spec.vvram_compute_column});
    case allocation_mode::automatic: return wrap(auto_policy{spec.text});
  }
  return auto_policy{};
}

/// Parses an allocation string into a policy; throws `allocation_error` as `parse_allocation`.
/// \code
///   auto p = distorch::policy_from_string("blocks\\.0\\..*=cuda:1;cuda:0,25%;cpu,75%");
/// \endcode
inline any_policy policy_from_string(std::string_view spec) { return policy_from_spec(parse_allocation(spec)); }

}  // namespace distorch::inline v0
