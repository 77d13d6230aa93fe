#pragma once
/// \file
/// `streaming_stats`: what the residency manager did to keep weights where compute needs them.
/// Copy time is the time the copies took: on CPU and simulated devices the host time of the
/// synchronous copies; on stream devices (CUDA, XPU, ...) the device time between timing events
/// recorded around each fetch on the copy stream (LibTorch 2.5 and later), or, where LibTorch cannot
/// time events, from queueing to the moment the host first saw them complete. `bytes_fetched`
/// counts the bytes that crossed the link (a unit kept quantized at home counts its stored bytes,
/// not the dequantized ones). A unit re-entered while still staged in the same pass is counted in
/// `reentries`, neither as a hit nor as a miss. Wait time is host time a unit's
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

/// Counters and times of one residency manager; see the file comment.
/// \code auto s = dm.stats(); s.fetches; s.copy_seconds; \endcode
struct streaming_stats {
  std::uint64_t fetches = 0;          ///< units copied to the compute device
  std::uint64_t bytes_fetched = 0;    ///< bytes of those copies (as stored at home)
  std::uint64_t releases = 0;         ///< units sent back to their home
  std::uint64_t prefetch_hits = 0;    ///< entries that found the unit already fetched ahead
  std::uint64_t prefetch_misses = 0;  ///< entries that had to fetch synchronously
  std::uint64_t late_prefetches = 0;  ///< stream devices: hits whose copy had not finished yet
  std::uint64_t reentries = 0;        ///< entries that found their unit still staged in the same pass (no copy)
  std::uint64_t ring_chunks = 0;      ///< slot-sized pieces copied through the host staging ring
  std::uint64_t ring_bytes = 0;       ///< bytes copied through the host staging ring
  std::uint64_t buffers_written_back = 0;  ///< buffers forward changed on the compute device, copied back home at release
  double copy_seconds = 0;            ///< time the copies took (see the file comment)
  double wait_seconds = 0;            ///< host time compute waited for a unit to become resident

  /// Hits over all entries of donor-homed units; 0 when there were none.
  /// \code double r = dm.stats().hit_rate(); \endcode
  double hit_rate() const noexcept {
    const auto entries = prefetch_hits + prefetch_misses;
    return entries == 0 ? 0.0 : static_cast<double>(prefetch_hits) / static_cast<double>(entries);
  }

  /// One line for logs and the demo.
  /// \code std::puts(dm.stats().str().c_str()); \endcode
  std::string str() const {
    char buffer[400];
    std::snprintf(buffer, sizeof buffer,
                  "fetched %llu units (%s) in %.6f s; prefetch hits %llu, misses %llu, late %llu; "
                  "compute waited %.6f s; released %llu; re-entered %llu; buffers written back %llu",
                  static_cast<unsigned long long>(fetches), format_bytes(bytes_fetched).c_str(), copy_seconds,
                  static_cast<unsigned long long>(prefetch_hits), static_cast<unsigned long long>(prefetch_misses),
                  static_cast<unsigned long long>(late_prefetches), wait_seconds,
                  static_cast<unsigned long long>(releases), static_cast<unsigned long long>(reentries),
                  static_cast<unsigned long long>(buffers_written_back));
    return buffer;
  }

  friend bool operator==(const streaming_stats&, const streaming_stats&) = default;
};

}  // namespace distorch::inline v0
