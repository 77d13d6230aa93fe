#pragma once
/// \file
/// `streaming_stats`: what the residency manager did to keep weights where compute needs them.
/// Copy time is host time spent making copies: on CPU and simulated devices the copies themselves,
/// on stream devices (CUDA, XPU, ...) the time to queue them. Wait time is host time a unit's
/// entry spent making it resident (a synchronous fetch after a prefetch miss). On stream devices a
/// prefetch whose copy was still in flight when compute reached the unit is counted as late; the
/// compute stream then waits on that unit's event only.
///
/// Example:
/// \code
///   const distorch::streaming_stats& s = dm.stats();
///   std::cout << s.str() << '\n';   // "fetched 12 units (48.00 MiB) in 0.010 s; hits 11, misses 1, ..."
///   double hit_rate = s.hit_rate();
/// \endcode

#include <cstdint>
#include <cstdio>
#include <string>

#include "distorch/core/bytes.hpp"

namespace distorch::inline v0 {

struct streaming_stats {
  std::uint64_t fetches = 0;          ///< units copied to the compute device
  std::uint64_t bytes_fetched = 0;    ///< bytes of those copies
  std::uint64_t releases = 0;         ///< units sent back to their home
  std::uint64_t prefetch_hits = 0;    ///< entries that found the unit already fetched ahead
  std::uint64_t prefetch_misses = 0;  ///< entries that had to fetch synchronously
  std::uint64_t late_prefetches = 0;  ///< stream devices: hits whose copy had not finished yet
  double copy_seconds = 0;            ///< host time spent copying (or queueing copies)
  double wait_seconds = 0;            ///< host time compute waited for a unit to become resident

  /// Hits over all entries of donor-homed units; 0 when there were none.
  double hit_rate() const noexcept {
    const auto entries = prefetch_hits + prefetch_misses;
    return entries == 0 ? 0.0 : static_cast<double>(prefetch_hits) / static_cast<double>(entries);
  }

  /// One line for logs and the demo.
  /// \code std::puts(dm.stats().str().c_str()); \endcode
  std::string str() const {
    char buffer[320];
    std::snprintf(buffer, sizeof buffer,
                  "fetched %llu units (%s) in %.6f s; prefetch hits %llu, misses %llu, late %llu; "
                  "compute waited %.6f s; released %llu",
                  static_cast<unsigned long long>(fetches), format_bytes(bytes_fetched).c_str(), copy_seconds,
                  static_cast<unsigned long long>(prefetch_hits), static_cast<unsigned long long>(prefetch_misses),
                  static_cast<unsigned long long>(late_prefetches), wait_seconds,
                  static_cast<unsigned long long>(releases));
    return buffer;
  }

  friend bool operator==(const streaming_stats&, const streaming_stats&) = default;
};

}  // namespace distorch::inline v0
