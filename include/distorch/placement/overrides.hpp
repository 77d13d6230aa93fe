#pragma once
/// \file
/// Overrides: `regex=device` rules (llama.cpp `-ot` style) that pin matching units to a device
/// before a policy's quotas apply. `with_overrides(policy, rules)` composes them with any policy;
/// the planner charges pinned units to their device's quota.
///
/// A rule matches a unit when its regex is found (std::regex_search, ECMAScript) in the unit's
/// name or in the full name of one of its tensors. The first matching rule wins. Matching takes
/// polynomial time (see user_regex_flags), so a pathological pattern cannot hang a plan, and a
/// literal prefilter (core/regex_prefilter.hpp) skips the regex for names that cannot match, or
/// decides alone for literal patterns: a 100k-unit plan then spends little time in std::regex.
///
/// Example:
/// \code
///   auto policy = distorch::with_overrides(distorch::auto_policy{},
///       {{"blocks\\.(0|1)\\.", distorch::device_id::cuda(1)}});
///   distorch::policy_overrides(policy).size();   // 1
/// \endcode

#include <optional>
#include <regex>
#include <span>
#include <string>
#include <vector>

#include "distorch/core/error.hpp"
#include "distorch/core/regex_prefilter.hpp"
#include "distorch/model/inventory.hpp"
#include "distorch/placement/grammar.hpp"
#include "distorch/placement/policy.hpp"

namespace distorch::inline v0 {

/// A policy with override rules in front of it. Satisfies `placement_policy`.
template <placement_policy Policy>
struct overridden_policy {
  Policy policy;
  std::vector<override_rule> rules;
  std::string text;  ///< the whole allocation string when there is one; describe() returns it

  /// The wrapped policy's quotas; the planner charges pinned units against them.
  quota_set quotas(const policy_context& ctx) const { return policy.quotas(ctx); }
  /// The allocation string, or the rules followed by the wrapped policy's description.
  std::string describe() const {
    if (!text.empty()) return text;
    std::string s;
    for (const auto& r : rules) s += (r.text.empty() ? r.pattern + "=" + r.device.str() : r.text) + ";";
    return s + std::string(policy.describe());
  }
  /// The rules in order; the first match wins.
  std::span<const override_rule> overrides() const noexcept { return rules; }
};

/// Puts override rules in front of a policy.
/// \code
///   auto p = distorch::with_overrides(distorch::ratio_policy{entries, text}, {{"head", distorch::device_id::cpu()}});
/// \endcode
template <placement_policy Policy>
overridden_policy<Policy> with_overrides(Policy policy, std::vector<override_rule> rules) {
  return {std::move(policy), std::move(rules), {}};
}

/// Override rules compiled for matching.
class override_matcher {
 public:
  override_matcher() = default;
  /// Compiles the rules; throws `allocation_error` naming the rule for a bad regex.
  /// \code
  ///   distorch::override_matcher m(distorch::parse_allocation("blocks\\.0\\.=cpu;auto").overrides);
  ///   const distorch::override_rule* rule = m.match(unit);   // nullptr when no rule matches
  /// \endcode
  explicit override_matcher(std::span<const override_rule> rules) {
    compiled_.reserve(rules.size());
    for (const auto& r : rules) {
      if (auto p = check_user_regex(r.pattern))
        detail::allocation_fail("compiling allocation override", r.text.empty() ? r.pattern : r.text, r.column, p->problem, p->fix);
      compiled_.push_back({r, std::regex(r.pattern, user_regex_flags | std::regex::optimize), regex_prefilter(r.pattern)});
    }
  }

  /// True when there are no rules, so `match` always gives nullptr.
  /// \code
  ///   if (distorch::override_matcher(rules).empty()) { /* plan without pinning */ }
  /// \endcode
  bool empty() const noexcept { return compiled_.empty(); }

  /// The first rule matching the unit, or nullptr.
  /// \code
  ///   if (const auto* rule = m.match(u)) home = rule->device;
  /// \endcode
  const override_rule* match(const unit& u) const {
    for (const auto& c : compiled_) {
      if (c.found_in(u.name)) return &c.rule;
      for (const auto& t : u.tensors)
        if (c.found_in(t.name)) return &c.rule;
    }
    return nullptr;
  }

 private:
  struct compiled {
    override_rule rule;
    std::regex re;
    regex_prefilter filter;

    bool found_in(const std::string& name) const {
      switch (filter.check(name)) {
        case prefilter_verdict::no_match: return false;
        case prefilter_verdict::match: return true;
        case prefilter_verdict::unknown: break;
      }
      return std::regex_search(name, re);
    }
  };
  std::vector<compiled> compiled_;
};

}  // namespace distorch::inline v0
