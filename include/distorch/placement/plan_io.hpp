#pragma once
/// \file
/// A plan as text and as JSON. The table reads like DisTorch2's log (device, units, bytes, share
/// of the model) and adds the quota, the capacity, the streaming window and the reserve. The
/// JSON holds everything the plan holds, so `plan_from_json(plan_to_json(p)) == p`; reading
/// malformed JSON is a `format_error` naming the field.
///
/// Example:
/// \code
///   std::cout << distorch::format_plan_table(plan);
///   nlohmann::json j = distorch::plan_to_json(plan);      // or: nlohmann::json j = plan;
///   auto back = distorch::plan_from_json(j);              // back == plan
/// \endcode

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "distorch/core/bytes.hpp"
#include "distorch/core/error.hpp"
#include "distorch/device/device_id.hpp"
#include "distorch/placement/plan.hpp"

namespace distorch::inline v0 {

namespace detail {

/// "25.0%" with integer arithmetic, so the same plan prints the same text everywhere.
inline std::string share_text(std::uint64_t part, std::uint64_t whole) {
  if (whole == 0) return "0.0%";
  const auto permille = static_cast<std::uint64_t>((static_cast<unsigned __int128>(part) * 1000 + whole / 2) / whole);
  return std::to_string(permille / 10) + '.' + std::to_string(permille % 10) + '%';
}

inline std::string table_row(std::string_view device, std::string_view units, std::string_view bytes, std::string_view share,
                             std::string_view quota, std::string_view capacity) {
  char line[160];
  std::snprintf(line, sizeof line, "%-18.*s%7.*s%14.*s%9.*s%14.*s%14.*s", static_cast<int>(device.size()), device.data(),
                static_cast<int>(units.size()), units.data(), static_cast<int>(bytes.size()), bytes.data(),
                static_cast<int>(share.size()), share.data(), static_cast<int>(quota.size()), quota.data(),
                static_cast<int>(capacity.size()), capacity.data());
  std::string row(line);
  while (!row.empty() && row.back() == ' ') row.pop_back();  // rule rows leave the last columns empty
  return row + '\n';
}

}  // namespace detail

/// The plan as an aligned table: one row per device (fill order, compute first), with the units
/// kept on a device by a rule (tiny, head, override, remainder) broken out beneath it, then the
/// compute device's window and reserve and any warnings.
/// \code
///   std::cout << distorch::format_plan_table(plan);
/// \endcode
inline std::string format_plan_table(const placement_plan& plan) {
  const std::string eq(76, '='), dash(76, '-');
  std::string out = eq + '\n';
  out += "  distorch placement plan: " + std::to_string(plan.units.size()) + " units, " + format_bytes(plan.model_bytes) +
         ", compute " + plan.compute.str() + '\n';
  if (!plan.policy.empty()) out += "  policy: " + plan.policy + '\n';
  out += eq + '\n';
  out += detail::table_row("Device", "Units", "Bytes", "% Model", "Quota", "Capacity");
  out += dash + '\n';
  for (const auto& a : plan.devices) {
    out += detail::table_row(a.device.str(), std::to_string(a.units), format_bytes(a.placed_bytes),
                             detail::share_text(a.placed_bytes, plan.model_bytes), format_bytes(a.quota), format_bytes(a.capacity));
    for (auto reason : {placement_reason::tiny, placement_reason::head, placement_reason::override_, placement_reason::remainder}) {
      std::size_t count = 0;
      std::uint64_t bytes = 0;
      for (const auto& u : plan.units)
        if (u.device == a.device && u.reason == reason) ++count, bytes += u.bytes;
      if (count == 0) continue;
      const std::string label = reason == placement_reason::tiny ? "  tiny (<0.01%)" : "  " + std::string(reason_name(reason));
      out += detail::table_row(label, std::to_string(count), format_bytes(bytes), detail::share_text(bytes, plan.model_bytes), "", "");
    }
  }
  out += dash + '\n';
  if (const auto* c = plan.allotment(plan.compute)) {
    out += plan.compute.str() + " keeps free: " + format_bytes(c->window) + " streaming window + " + format_bytes(c->reserve) +
           " activation reserve; needs " + format_bytes(c->placed_bytes + c->window + c->reserve) + " of " +
           format_bytes(c->capacity) + '\n';
  }
  for (const auto& w : plan.warnings) out += "warning: " + w + '\n';
  return out;
}

/// The plan as JSON: per unit {"name","device","bytes","reason"}, per device its totals, and the
/// plan's compute device, policy, model size and warnings.
/// \code
///   std::cout << distorch::plan_to_json(plan).dump(2);
/// \endcode
inline nlohmann::json plan_to_json(const placement_plan& plan) {
  nlohmann::json units = nlohmann::json::array();
  for (const auto& u : plan.units)
    units.push_back({{"name", u.unit}, {"device", u.device.str()}, {"bytes", u.bytes}, {"reason", std::string(reason_name(u.reason))}});
  nlohmann::json devices = nlohmann::json::array();
  for (const auto& a : plan.devices)
    devices.push_back({{"device", a.device.str()},
                       {"capacity", a.capacity},
                       {"quota", a.quota},
                       {"placed_bytes", a.placed_bytes},
                       {"units", a.units},
                       {"window", a.window},
                       {"reserve", a.reserve}});
  return {{"format", "distorch-plan"}, {"version", 1u},         {"compute", plan.compute.str()},
          {"policy", plan.policy},     {"model_bytes", plan.model_bytes}, {"units", std::move(units)},
          {"devices", std::move(devices)}, {"warnings", plan.warnings}};
}

namespace detail {

struct plan_json_reader {
  [[noreturn]] static void fail(const std::string& field, std::string problem, std::string fix = "write the plan as distorch plan --json does") {
    throw format_error({"reading placement plan JSON", field, std::nullopt, std::move(problem), std::move(fix)});
  }
  static const nlohmann::json& member(const nlohmann::json& object, const std::string& path, const char* key) {
    const std::string field = path.empty() ? key : path + '.' + key;
    auto it = object.find(key);
    if (it == object.end()) fail(field, "missing field");
    return *it;
  }
  static std::string string_of(const nlohmann::json& object, const std::string& path, const char* key) {
    const auto& v = member(object, path, key);
    if (!v.is_string()) fail(path.empty() ? key : path + '.' + key, std::string("expected a string, found ") + v.type_name());
    return v.get<std::string>();
  }
  static std::uint64_t u64_of(const nlohmann::json& object, const std::string& path, const char* key) {
    const auto& v = member(object, path, key);
    // JSON built in memory holds small literals as signed integers; parsed JSON as unsigned.
    if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<std::int64_t>() >= 0)) {
      const bool negative = v.is_number_integer();
      fail(path.empty() ? key : path + '.' + key,
           negative ? "expected a non-negative integer, found a negative one" : std::string("expected a non-negative integer, found ") + v.type_name());
    }
    return v.get<std::uint64_t>();
  }
  static device_id device_of(const nlohmann::json& object, const std::string& path, const char* key) {
    const std::string text = string_of(object, path, key);
    auto id = device_id::try_parse(text);
    if (!id.ok()) fail(path.empty() ? key : path + '.' + key, "'" + text + "': " + id.problem, id.fix);
    return *id.id;
  }
  static const nlohmann::json& array_of(const nlohmann::json& object, const char* key) {
    const auto& v = member(object, "", key);
    if (!v.is_array()) fail(key, std::string("expected an array, found ") + v.type_name());
    return v;
  }
};

}  // namespace detail

/// Reads a plan written by `plan_to_json`; throws `format_error` naming the first bad field
/// (`units[3].device`, `devices[0].quota`, ...).
/// \code
///   auto plan = distorch::plan_from_json(nlohmann::json::parse(text));
/// \endcode
inline placement_plan plan_from_json(const nlohmann::json& j) {
  using r = detail::plan_json_reader;
  if (!j.is_object()) r::fail("(root)", std::string("expected an object, found ") + j.type_name());
  if (r::string_of(j, "", "format") != "distorch-plan") r::fail("format", "not a distorch plan", "the field must be \"distorch-plan\"");
  if (r::u64_of(j, "", "version") != 1) r::fail("version", "unsupported plan version", "this distorch reads version 1");
  placement_plan plan;
  plan.compute = r::device_of(j, "", "compute");
  plan.policy = r::string_of(j, "", "policy");
  plan.model_bytes = r::u64_of(j, "", "model_bytes");
  const auto& units = r::array_of(j, "units");
  plan.units.reserve(units.size());
  for (std::size_t i = 0; i < units.size(); ++i) {
    const std::string path = "units[" + std::to_string(i) + "]";
    const auto& u = units[i];
    if (!u.is_object()) r::fail(path, std::string("expected an object, found ") + u.type_name());
    unit_placement p;
    p.unit = r::string_of(u, path, "name");
    p.device = r::device_of(u, path, "device");
    p.bytes = r::u64_of(u, path, "bytes");
    const std::string reason = r::string_of(u, path, "reason");
    bool known = false;
    for (auto candidate : {placement_reason::tiny, placement_reason::head, placement_reason::override_, placement_reason::policy,
                           placement_reason::remainder})
      if (reason_name(candidate) == reason) p.reason = candidate, known = true;
    if (!known) r::fail(path + ".reason", "unknown reason '" + reason + "'", "use tiny, head, override, policy or remainder");
    plan.units.push_back(std::move(p));
  }
  const auto& devices = r::array_of(j, "devices");
  for (std::size_t i = 0; i < devices.size(); ++i) {
    const std::string path = "devices[" + std::to_string(i) + "]";
    const auto& d = devices[i];
    if (!d.is_object()) r::fail(path, std::string("expected an object, found ") + d.type_name());
    device_allotment a;
    a.device = r::device_of(d, path, "device");
    a.capacity = r::u64_of(d, path, "capacity");
    a.quota = r::u64_of(d, path, "quota");
    a.placed_bytes = r::u64_of(d, path, "placed_bytes");
    a.units = static_cast<std::size_t>(r::u64_of(d, path, "units"));
    a.window = r::u64_of(d, path, "window");
    a.reserve = r::u64_of(d, path, "reserve");
    plan.devices.push_back(a);
  }
  const auto& warnings = r::array_of(j, "warnings");
  for (std::size_t i = 0; i < warnings.size(); ++i) {
    if (!warnings[i].is_string()) r::fail("warnings[" + std::to_string(i) + "]", std::string("expected a string, found ") + warnings[i].type_name());
    plan.warnings.push_back(warnings[i].get<std::string>());
  }
  return plan;
}

/// nlohmann::json hooks: `nlohmann::json j = plan;` and `j.get<distorch::placement_plan>()`.
inline void to_json(nlohmann::json& j, const placement_plan& plan) { j = plan_to_json(plan); }
/// The reading hook; throws as `plan_from_json` does.
/// \code auto plan = nlohmann::json::parse(text).get<distorch::placement_plan>(); \endcode
inline void from_json(const nlohmann::json& j, placement_plan& plan) { plan = plan_from_json(j); }

}  // namespace distorch::inline v0
