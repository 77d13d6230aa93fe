#pragma once
/// \file
/// Progress reports for long work (loading and distributing a model, merging an adapter into a
/// file, profiling links). The library never draws anything: long operations take an optional
/// `progress_callback` in their options and call it as work completes; a program decides how to
/// show it (the `distorch` tool draws a bar on a terminal and nothing when piped).
///
/// Example:
/// \code
///   distorch::progress_callback on_progress = [](const distorch::progress_report& p) {
///     std::fprintf(stderr, "\r%.*s %llu/%llu", int(p.task.size()), p.task.data(),
///                  (unsigned long long)p.done, (unsigned long long)p.total);
///   };
///   distorch::report_progress(on_progress, "loading", 3, 12);
/// \endcode

#include <cstdint>
#include <functional>
#include <string_view>

#include "distorch/core/config.hpp"

namespace distorch::inline v0 {

/// One report: `done` of `total` steps of `task` finished. `unit` names what a step counts
/// ("units", "bytes", "tensors"); `total` is 0 when unknown.
struct progress_report {
  std::string_view task;
  std::uint64_t done = 0;
  std::uint64_t total = 0;
  std::string_view unit = "steps";
};

/// Called on the thread doing the work. It must not throw; keep it cheap (it may be called once
/// per tensor).
using progress_callback = std::function<void(const progress_report&)>;

/// Calls `callback` when one is set; the one place operations report through.
/// \code distorch::report_progress(options.progress, "merging", i + 1, n, "tensors"); \endcode
inline void report_progress(const progress_callback& callback, std::string_view task, std::uint64_t done,
                            std::uint64_t total, std::string_view unit = "steps") {
  if (callback) callback(progress_report{task, done, total, unit});
}

}  // namespace distorch::inline v0
