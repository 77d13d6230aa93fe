#pragma once
/// \file
/// The predictor: what a plan costs per step before anything is loaded. Given a plan, a profile
/// and a compute time per unit, it simulates one step of the streaming runtime event by event and
/// reports, per link, the bytes crossing it, the transfer time and the exposed (not overlapped)
/// time, then the step time and the slowdown against keeping every unit resident.
///
/// The model (docs/profiling.md gives the reasons):
/// - Units run in plan order, one after another, each for its compute time.
/// - A unit homed off the compute device is copied to it once per step; its copy takes
///   `latency + bytes / bandwidth` of the link between its home and the compute device.
/// - When compute reaches unit j (its entry), the runtime issues the copy of j if not issued yet,
///   then those of units j+1 .. j+depth (every unit counts toward the depth; resident ones need
///   no copy). Copies go in issue order on one copy stream of the compute device (the runtime's
///   way), or on one stream per link (`copy_streams::per_link`).
/// - Compute of a streamed unit waits until its copy is done; that wait is the exposed time and
///   is charged to the unit's link.
/// - The host issues copies when compute reaches a unit (it is not assumed to run ahead), which
///   can only overstate the step time. Copies are assumed not to slow compute down.
/// - On a host-backed compute device (cpu, sim:N) copies are synchronous on the compute thread,
///   as in the runtime: nothing overlaps and every copy is exposed.
///
/// Example:
/// \code
///   auto prediction = distorch::predict_step(plan, distorch::read_profile_file("h100.json"),
///                                            distorch::compute_time::by_bytes(400e9),
///                                            {.depth = 2});
///   std::cout << distorch::format_prediction(prediction);
///   prediction.slowdown;   // step time / all-resident step time
/// \endcode

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "distorch/core/bytes.hpp"
#include "distorch/core/error.hpp"
#include "distorch/device/device_id.hpp"
#include "distorch/placement/plan.hpp"
#include "distorch/profile/profile.hpp"
#include "distorch/runtime/streaming_stats.hpp"

namespace distorch::inline v0 {

/// Compute time per unit: given per unit, the same for every unit, or proportional to its bytes.
class compute_time {
 public:
  /// Seconds of each unit, in plan order (as many as the plan has units).
  /// \code auto t = distorch::compute_time::per_unit({0.001, 0.004, 0.004}); \endcode
  static compute_time per_unit(std::vector<double> seconds) {
    for (std::size_t i = 0; i < seconds.size(); ++i)
      if (!std::isfinite(seconds[i]) || seconds[i] < 0)
        fail("unit " + std::to_string(i), "compute time " + std::to_string(seconds[i]) + " s is negative or not finite");
    compute_time t;
    t.per_unit_ = std::move(seconds);
    t.kind_ = kind::listed;
    return t;
  }
  /// Every unit computes for `seconds`.
  /// \code auto t = distorch::compute_time::uniform(0.002); \endcode
  static compute_time uniform(double seconds) {
    if (!std::isfinite(seconds) || seconds < 0) fail(std::to_string(seconds), "compute time is negative or not finite");
    compute_time t;
    t.scale_ = seconds;
    t.kind_ = kind::uniform;
    return t;
  }
  /// A unit computes for its bytes / `bytes_per_second` (a weight-streaming rate: how fast compute
  /// consumes weights, e.g. measured as model bytes / step time of an all-resident run).
  /// \code auto t = distorch::compute_time::by_bytes(200e9); \endcode
  static compute_time by_bytes(double bytes_per_second) {
    if (!std::isfinite(bytes_per_second) || !(bytes_per_second > 0))
      fail(std::to_string(bytes_per_second), "the compute rate must be a positive number of bytes per second");
    compute_time t;
    t.scale_ = 1.0 / bytes_per_second;
    t.kind_ = kind::by_bytes;
    return t;
  }

  /// The compute seconds of unit `index`, of `bytes` bytes.
  double seconds(std::size_t index, std::uint64_t bytes) const {
    switch (kind_) {
      case kind::listed: return per_unit_.at(index);
      case kind::uniform: return scale_;
      case kind::by_bytes: return static_cast<double>(bytes) * scale_;
    }
    return 0;
  }
  /// Units this time was given for; 0 unless per unit.
  std::size_t listed_units() const noexcept { return kind_ == kind::listed ? per_unit_.size() : 0; }
  /// "1.000 ms per unit", "unit bytes / 200.0 GB/s", "given per unit".
  std::string describe() const {
    char text[96];
    if (kind_ == kind::uniform) std::snprintf(text, sizeof text, "%.3f ms per unit", scale_ * 1e3);
    else if (kind_ == kind::by_bytes) std::snprintf(text, sizeof text, "unit bytes / %.1f GB/s", 1e-9 / scale_);
    else std::snprintf(text, sizeof text, "given per unit (%zu units)", per_unit_.size());
    return text;
  }

 private:
  enum class kind : std::uint8_t { listed, uniform, by_bytes };
  [[noreturn]] static void fail(std::string subject, std::string problem) {
    throw placement_error({"setting compute time per unit", std::move(subject), std::nullopt, std::move(problem),
                           "give a non-negative time per unit, or a positive compute rate in bytes per second"});
  }
  kind kind_ = kind::uniform;
  double scale_ = 0;
  std::vector<double> per_unit_;
};

/// Compute time measured on a real run: the step took `step_seconds`, of which the runtime's
/// `stats` (summed over `steps` steps) say how long compute waited for weights, and on a
/// host-backed compute device how long the synchronous copies took. The rest is compute, spread
/// over the plan's units by their bytes.
/// \code
///   auto t = distorch::compute_time_from_run(dm.plan(), seconds / 10, dm.stats(), 10, /*host_backed=*/false);
/// \endcode
inline compute_time compute_time_from_run(const placement_plan& plan, double step_seconds, const streaming_stats& stats,
                                          std::uint64_t steps, bool host_backed_compute) {
  if (steps == 0 || !std::isfinite(step_seconds) || step_seconds < 0)
    throw placement_error({"deriving compute time from a run", std::to_string(step_seconds), std::nullopt,
                           "the step time must be finite and non-negative, over at least one step",
                           "time whole steps and pass how many the stats cover"});
  const double n = static_cast<double>(steps);
  double overhead = stats.wait_seconds / n;
  if (host_backed_compute) overhead += stats.copy_seconds / n;
  const double compute = std::max(0.0, step_seconds - overhead);
  std::vector<double> per_unit(plan.units.size(), 0.0);
  if (plan.model_bytes > 0)
    for (std::size_t i = 0; i < per_unit.size(); ++i)
      per_unit[i] = compute * static_cast<double>(plan.units[i].bytes) / static_cast<double>(plan.model_bytes);
  else if (!per_unit.empty())
    std::fill(per_unit.begin(), per_unit.end(), compute / static_cast<double>(per_unit.size()));
  return compute_time::per_unit(std::move(per_unit));
}

/// How the runtime queues copies.
enum class copy_streams : std::uint8_t {
  shared,    ///< one copy stream on the compute device for every link (distorch's runtime)
  per_link,  ///< one stream per link: copies from different homes run at the same time
};

/// Knobs of a prediction.
struct predict_options {
  /// Units fetched ahead of the one running (the runtime's `prefetch_depth`).
  std::size_t depth = 1;
  /// CPU homes live in pinned memory (the runtime's `pinned_host`); else pageable copies.
  bool pinned_host = true;
  copy_streams streams = copy_streams::shared;
  /// Copies block compute (no overlap). Default: when the compute device is host-backed.
  std::optional<bool> synchronous_copies{};
};

/// One link's share of a step.
struct link_prediction {
  link_kind kind = link_kind::host_memcpy;
  device_id source;
  device_id destination;
  std::size_t units = 0;               ///< streamed units homed at `source`
  std::uint64_t bytes_per_step = 0;    ///< bytes crossing the link per step
  double bandwidth = 0;                ///< from the profile, bytes per second
  double latency = 0;                  ///< from the profile, seconds
  double transfer_seconds = 0;         ///< sum of the copy times
  double exposed_seconds = 0;          ///< compute waiting for this link's copies
};

/// When one unit's copy and compute happened in the simulated step (seconds from its start).
struct unit_timing {
  bool streamed = false;
  double copy_start = 0, copy_end = 0;  ///< 0 when not streamed
  double compute_start = 0, compute_end = 0;
};

/// A predicted step.
struct step_prediction {
  device_id compute;
  std::size_t depth = 0;
  bool synchronous_copies = false;
  copy_streams streams = copy_streams::shared;
  std::string profile_origin;
  std::string compute_source;          ///< compute_time::describe()
  double compute_seconds = 0;          ///< all-resident step time: the sum of compute times
  double step_seconds = 0;             ///< predicted step time
  double exposed_seconds = 0;          ///< step - compute
  std::optional<double> slowdown;      ///< step / compute; none when compute is 0 and the step is not
  std::uint64_t streamed_bytes = 0;    ///< bytes copied per step over all links
  std::vector<link_prediction> links;  ///< in order of first use
  std::vector<unit_timing> units;      ///< in plan order
};

namespace detail {

/// The profile's link that a copy from `home` to `compute` uses; device_error when it has none.
inline const link_profile& link_for(const profile& p, const device_id& home, const device_id& compute, bool pinned_host) {
  const bool from_host = home.is_host_backed(), to_host = compute.is_host_backed();
  const link_profile* found = nullptr;
  link_kind wanted = link_kind::host_memcpy;
  device_id source = home, destination = compute;
  if (from_host && to_host) {
    source = destination = device_id::cpu();
    found = p.find(wanted, source, destination);
  } else if (from_host) {
    source = device_id::cpu();
    wanted = pinned_host ? link_kind::host_to_device_pinned : link_kind::host_to_device_pageable;
    found = p.find(wanted, source, destination);
  } else if (to_host) {
    destination = device_id::cpu();
    wanted = link_kind::device_to_host;
    found = p.find(wanted, source, destination);
  } else {
    wanted = link_kind::device_to_device_peer;
    found = p.find(wanted, source, destination);
    if (!found) found = p.find(wanted = link_kind::device_to_device, source, destination);
  }
  if (!found) {
    std::string why = "the profile (" + (p.machine.origin.empty() ? std::string("no origin") : p.machine.origin) +
                      ") has no " + std::string(link_kind_name(wanted)) + " link from " + source.str() + " to " + destination.str();
    for (const auto& a : p.absent)
      if (a.kind == wanted) why += " (absent when profiled: " + a.reason + ")";
    throw device_error({"predicting step time", source.str() + " -> " + destination.str(), std::nullopt, std::move(why),
                        "profile the machine that has these devices (distorch profile --out FILE), or predict without a "
                        "profile to use the built-in conservative figures"});
  }
  return *found;
}

}  // namespace detail

/// Predicts one step of `plan` (see the file comment for the model). Throws `device_error` when
/// the profile lacks a link the plan needs and `placement_error` when compute times do not match
/// the plan.
/// \code
///   auto p = distorch::predict_step(plan, profile, distorch::compute_time::uniform(2e-3), {.depth = 2});
///   p.step_seconds; p.exposed_seconds; p.links[0].bytes_per_step;
/// \endcode
inline step_prediction predict_step(const placement_plan& plan, const profile& prof, const compute_time& compute,
                                    const predict_options& options = {}) {
  const std::size_t n = plan.units.size();
  if (compute.listed_units() != 0 && compute.listed_units() != n)
    throw placement_error({"predicting step time", "compute times", std::nullopt,
                           "given " + std::to_string(compute.listed_units()) + " compute times for a plan of " + std::to_string(n) + " units",
                           "give one compute time per unit of the plan, in plan order"});
  step_prediction out;
  out.compute = plan.compute;
  out.depth = options.depth;
  out.synchronous_copies = options.synchronous_copies.value_or(plan.compute.is_host_backed());
  out.streams = options.streams;
  out.profile_origin = prof.machine.origin;
  out.compute_source = compute.describe();
  out.units.resize(n);

  // Per unit: its compute time, and for streamed units the link and the copy time.
  const std::size_t none = static_cast<std::size_t>(-1);
  std::vector<double> work(n), copy(n, 0.0);
  std::vector<std::size_t> link_of(n, none);
  for (std::size_t i = 0; i < n; ++i) {
    const auto& u = plan.units[i];
    work[i] = compute.seconds(i, u.bytes);
    out.compute_seconds += work[i];
    if (u.device == plan.compute) continue;
    const link_profile& l = detail::link_for(prof, u.device, plan.compute, options.pinned_host);
    std::size_t k = 0;
    while (k < out.links.size() &&
           !(out.links[k].kind == l.kind && out.links[k].source == l.source && out.links[k].destination == l.destination))
      ++k;
    if (k == out.links.size()) out.links.push_back({l.kind, l.source, l.destination, 0, 0, l.bandwidth, l.latency, 0, 0});
    auto& lp = out.links[k];
    copy[i] = l.seconds_for(u.bytes);
    lp.units += 1;
    lp.bytes_per_step += u.bytes;
    lp.transfer_seconds += copy[i];
    out.streamed_bytes += u.bytes;
    link_of[i] = k;
    out.units[i].streamed = true;
  }

  // One step, event by event: entries in plan order; each entry issues copies, then compute runs.
  std::vector<double> stream_free(options.streams == copy_streams::shared ? 1 : std::max<std::size_t>(out.links.size(), 1), 0.0);
  std::vector<bool> issued(n, false);
  std::size_t next_unissued = 0;  // every unit below it has been issued (or needs no copy)
  double now = 0;
  for (std::size_t j = 0; j < n; ++j) {
    const double entry = now;
    const std::size_t last = options.depth >= n - j ? n - 1 : j + options.depth;
    for (std::size_t u = std::max(next_unissued, j); u <= last; ++u) {
      if (link_of[u] == none || issued[u]) continue;
      issued[u] = true;
      auto& t = out.units[u];
      if (out.synchronous_copies) {
        t.copy_start = now;
        now += copy[u];
        t.copy_end = now;
        out.links[link_of[u]].exposed_seconds += copy[u];
      } else {
        double& free_at = stream_free[options.streams == copy_streams::shared ? 0 : link_of[u]];
        t.copy_start = std::max(entry, free_at);
        t.copy_end = t.copy_start + copy[u];
        free_at = t.copy_end;
      }
    }
    next_unissued = std::max(next_unissued, last + 1);
    auto& t = out.units[j];
    t.compute_start = now;
    if (!out.synchronous_copies && link_of[j] != none && t.copy_end > now) {
      out.links[link_of[j]].exposed_seconds += t.copy_end - now;
      t.compute_start = t.copy_end;
    }
    t.compute_end = t.compute_start + work[j];
    now = t.compute_end;
  }
  out.step_seconds = now;
  out.exposed_seconds = std::max(0.0, out.step_seconds - out.compute_seconds);
  if (out.compute_seconds > 0) out.slowdown = out.step_seconds / out.compute_seconds;
  else if (out.step_seconds == 0) out.slowdown = 1.0;
  return out;
}

namespace detail {
inline std::string seconds_text(double s) {
  char text[32];
  if (s >= 1) std::snprintf(text, sizeof text, "%.3f s", s);
  else if (s >= 1e-3) std::snprintf(text, sizeof text, "%.3f ms", s * 1e3);
  else std::snprintf(text, sizeof text, "%.1f us", s * 1e6);
  return text;
}
}  // namespace detail

/// The prediction as text: one line per link, then the step.
/// \code std::cout << distorch::format_prediction(p); \endcode
inline std::string format_prediction(const step_prediction& p) {
  std::string out = "prediction (profile: " + (p.profile_origin.empty() ? std::string("unnamed") : p.profile_origin) +
                    "; compute: " + p.compute_source + "; prefetch depth " + std::to_string(p.depth) +
                    (p.synchronous_copies ? "; copies synchronous on " + p.compute.str() : std::string()) + ")\n";
  char line[256];
  std::snprintf(line, sizeof line, "  %-44s%7s%14s%12s%12s%12s\n", "Link", "Units", "Bytes/step", "GB/s", "Transfer", "Exposed");
  out += line;
  for (const auto& l : p.links) {
    const std::string name = l.source.str() + " -> " + l.destination.str() + " (" + std::string(link_kind_name(l.kind)) + ")";
    std::snprintf(line, sizeof line, "  %-44s%7zu%14s%12.2f%12s%12s\n", name.c_str(), l.units, format_bytes(l.bytes_per_step).c_str(),
                  l.bandwidth / 1e9, detail::seconds_text(l.transfer_seconds).c_str(), detail::seconds_text(l.exposed_seconds).c_str());
    out += line;
  }
  if (p.links.empty()) out += "  (no unit streams: every unit is resident on " + p.compute.str() + ")\n";
  out += "  step " + detail::seconds_text(p.step_seconds) + " = compute " + detail::seconds_text(p.compute_seconds) + " + exposed " +
         detail::seconds_text(p.exposed_seconds);
  if (p.slowdown) {
    std::snprintf(line, sizeof line, "; slowdown %.3fx vs all-resident\n", *p.slowdown);
    out += line;
  } else {
    out += "; slowdown unbounded (compute time is 0)\n";
  }
  return out;
}

/// The prediction as JSON (docs/profiling.md lists the fields); per-unit timings are left out.
/// \code std::cout << distorch::prediction_to_json(p).dump(2); \endcode
inline nlohmann::json prediction_to_json(const step_prediction& p) {
  nlohmann::json links = nlohmann::json::array();
  for (const auto& l : p.links)
    links.push_back({{"kind", std::string(link_kind_name(l.kind))},
                     {"source", l.source.str()},
                     {"destination", l.destination.str()},
                     {"units", l.units},
                     {"bytes_per_step", l.bytes_per_step},
                     {"bandwidth", l.bandwidth},
                     {"latency", l.latency},
                     {"transfer_seconds", l.transfer_seconds},
                     {"exposed_seconds", l.exposed_seconds}});
  return {{"compute", p.compute.str()},
          {"depth", p.depth},
          {"synchronous_copies", p.synchronous_copies},
          {"copy_streams", p.streams == copy_streams::shared ? "shared" : "per_link"},
          {"profile", p.profile_origin},
          {"compute_time", p.compute_source},
          {"compute_seconds", p.compute_seconds},
          {"step_seconds", p.step_seconds},
          {"exposed_seconds", p.exposed_seconds},
          {"slowdown", p.slowdown ? nlohmann::json(*p.slowdown) : nlohmann::json(nullptr)},
          {"streamed_bytes", p.streamed_bytes},
          {"links", std::move(links)}};
}

}  // namespace distorch::inline v0
