#pragma once
/// \file
/// The logging sink. distorch never writes to stdout or stderr by itself: it reports progress and
/// warnings through one replaceable sink. The default prints warnings and errors to stderr.
///
/// Example:
/// \code
///   distorch::set_log_sink([](distorch::log_level level, std::string_view message) {
///     my_logger.write(distorch::level_name(level), message);
///   });
///   distorch::log(distorch::log_level::info, "planned 12 units");
/// \endcode

#include <atomic>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "distorch/core/config.hpp"

namespace distorch::inline v0 {

/// How important a message is; the sink sees the level of each message.
enum class log_level : int { debug = 0, info = 1, warning = 2, error = 3 };

/// The level as a lowercase word: "debug", "info", "warning", "error".
/// \code distorch::level_name(distorch::log_level::warning);   // "warning" \endcode
constexpr std::string_view level_name(log_level l) noexcept {
  switch (l) {
    case log_level::debug: return "debug";
    case log_level::info: return "info";
    case log_level::warning: return "warning";
    case log_level::error: return "error";
  }
  return "?";
}

/// Receives every message at or above the level set by `set_log_level`, one call per message.
using log_sink = std::function<void(log_level, std::string_view)>;

namespace detail {
struct log_state {
  std::mutex mutex;
  log_sink sink;
  std::atomic<int> threshold{static_cast<int>(log_level::warning)};
};
inline log_state& log_globals() {
  static log_state state;
  return state;
}
}  // namespace detail

/// Replaces the sink; an empty function restores the default (stderr).
inline void set_log_sink(log_sink sink) {
  auto& g = detail::log_globals();
  std::lock_guard lock(g.mutex);
  g.sink = std::move(sink);
}

/// Messages below this level are dropped before reaching the sink. Default: warning.
/// \code distorch::set_log_level(distorch::log_level::info); \endcode
inline void set_log_level(log_level level) noexcept { detail::log_globals().threshold = static_cast<int>(level); }

/// Sends one message to the sink.
inline void log(log_level level, std::string_view message) {
  auto& g = detail::log_globals();
  if (static_cast<int>(level) < g.threshold.load()) return;
  std::lock_guard lock(g.mutex);
  if (g.sink) {
    g.sink(level, message);
  } else {
    std::fprintf(stderr, "distorch %.*s: %.*s\n", static_cast<int>(level_name(level).size()), level_name(level).data(),
                 static_cast<int>(message.size()), message.data());
  }
}

}  // namespace distorch::inline v0
