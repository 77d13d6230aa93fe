#pragma once
/// \file
/// `choose_host_staging`: decides, before anything is loaded, how CPU-homed units reach the compute
/// device: pinned homes, a bounded staging ring, or plain pageable copies. Pinned RAM never
/// silently doubles the model: pinning every CPU home is chosen only when those homes fit under the
/// pinned limit (half the host's RAM unless `streaming_options::pinned_limit` says otherwise) and
/// in the RAM free now. When they do not fit, the homes stay pageable and a staging ring of
/// 2 × the largest CPU-homed unit (at least 2 MiB, at most 256 MiB) takes their place, with a
/// warning in the log: the model still runs, with a bounded amount of pinned memory. The decision
/// is a value, so a caller can print it or refuse it.
///
/// Example:
/// \code
///   auto choice = distorch::choose_host_staging(spec.streaming, compute_is_cuda && distorch::pinned_available(),
///                                               cpu_home_bytes, largest_cpu_unit, distorch::host_memory());
///   spec.streaming.staging_ring_bytes = choice.ring_bytes;
///   bool pin = choice.pin_homes;
/// \endcode

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include "distorch/core/bytes.hpp"
#include "distorch/core/log.hpp"
#include "distorch/device/memory_info.hpp"
#include "distorch/runtime/residency.hpp"

namespace distorch::inline v0 {

/// How CPU homes are staged, and why.
/// \code if (!choice.pin_homes) spec.streaming.staging_ring_bytes = choice.ring_bytes; \endcode
struct host_staging_choice {
  bool pin_homes = false;          ///< place CPU homes in page-locked memory
  std::uint64_t ring_bytes = 0;    ///< staging ring size to use (0 = none)
  std::string reason;
  friend bool operator==(const host_staging_choice&, const host_staging_choice&) = default;
};

/// Smallest and largest ring `choose_host_staging` falls back to.
/// \code static_assert(distorch::fallback_ring_min <= distorch::fallback_ring_max); \endcode
inline constexpr std::uint64_t fallback_ring_min = 2ull << 20;
/// Largest ring `choose_host_staging` falls back to (see `fallback_ring_min`).
inline constexpr std::uint64_t fallback_ring_max = 256ull << 20;

/// Most host bytes pinned homes may take: `options.pinned_limit`, else half the host's RAM (0 when
/// the host's RAM is unknown: nothing is pinned then).
/// \code auto limit = distorch::pinned_limit_of(spec.streaming, distorch::host_memory()); \endcode
inline std::uint64_t pinned_limit_of(const streaming_options& options, const std::optional<memory_figures>& host) noexcept {
  return options.pinned_limit != 0 ? options.pinned_limit : host ? host->total / 2 : 0;
}

/// See the file comment. `async_reads` is whether the compute device copies from pinned memory
/// asynchronously (a CUDA device with pinned memory available); `host` is the host's RAM
/// (`host_memory()`), nullopt when unknown (then pinning everything is not risked).
/// \code auto c = distorch::choose_host_staging(options, true, 6ull << 30, 256ull << 20, distorch::host_memory()); \endcode
inline host_staging_choice choose_host_staging(const streaming_options& options, bool async_reads, std::uint64_t cpu_home_bytes,
                                               std::uint64_t largest_cpu_unit, const std::optional<memory_figures>& host) {
  if (options.staging_ring_bytes != 0)
    return {false, options.staging_ring_bytes, "a staging ring of " + format_bytes(options.staging_ring_bytes) + " was asked for"};
  if (cpu_home_bytes == 0) return {false, 0, "no unit is homed on the CPU"};
  if (!options.pinned_host) return {false, 0, "pinned host memory is off"};
  if (!async_reads) return {false, 0, "the compute device does not copy from pinned memory asynchronously"};
  const std::uint64_t limit = pinned_limit_of(options, host);
  const bool fits = host.has_value() && cpu_home_bytes <= limit && cpu_home_bytes <= host->free;
  if (fits)
    return {true, 0, "pinning " + format_bytes(cpu_home_bytes) + " of CPU homes fits (limit " + format_bytes(limit) + ", free " +
                         format_bytes(host->free) + ")"};
  const std::uint64_t ring = std::clamp<std::uint64_t>(2 * largest_cpu_unit, fallback_ring_min, fallback_ring_max);
  host_staging_choice choice{false, ring,
                             "pinning " + format_bytes(cpu_home_bytes) + " of CPU homes does not fit (" +
                                 (host ? "limit " + format_bytes(limit) + ", free " + format_bytes(host->free)
                                       : std::string("host memory unknown")) +
                                 "): a " + format_bytes(ring) + " staging ring is used instead"};
  log(log_level::warning, choice.reason);
  return choice;
}

}  // namespace distorch::inline v0
