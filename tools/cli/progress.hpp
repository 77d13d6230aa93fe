#pragma once
// The CLI's progress bar: drawn on stderr only when stderr is a terminal, so piped and captured
// output (and --json on stdout) stay clean. It renders distorch::progress_report values, so a
// library operation's `progress` option can be pointed straight at it.

#include <chrono>
#include <cstdio>
#include <string>
#include <string_view>

#include <unistd.h>

#include "distorch/core/progress.hpp"

namespace distorch::cli {

class progress_bar {
 public:
  /// `enabled` defaults to "stderr is a terminal"; tests can force it.
  explicit progress_bar(bool enabled = ::isatty(STDERR_FILENO) == 1) : enabled_(enabled) {}
  progress_bar(const progress_bar&) = delete;
  progress_bar& operator=(const progress_bar&) = delete;
  ~progress_bar() { finish(); }

  /// A callback for library options: `options.progress = bar.callback();`
  distorch::progress_callback callback() {
    return [this](const distorch::progress_report& r) { update(r); };
  }

  void update(const distorch::progress_report& r) {
    if (!enabled_) return;
    const auto now = std::chrono::steady_clock::now();
    // Redraw at most ~20 times a second, but always draw the final step.
    const bool last = r.total != 0 && r.done >= r.total;
    if (drawn_ && !last && now - last_draw_ < std::chrono::milliseconds(50)) return;
    last_draw_ = now;
    drawn_ = true;
    constexpr int width = 30;
    std::string line = "\r" + std::string(r.task) + " ";
    if (r.total != 0) {
      const double f = static_cast<double>(r.done > r.total ? r.total : r.done) / static_cast<double>(r.total);
      const int filled = static_cast<int>(f * width);
      line += "[" + std::string(static_cast<std::size_t>(filled), '#') +
              std::string(static_cast<std::size_t>(width - filled), ' ') + "] ";
      char pct[16];
      std::snprintf(pct, sizeof pct, "%3d%% ", static_cast<int>(f * 100.0));
      line += pct;
      line += std::to_string(r.done) + "/" + std::to_string(r.total);
    } else {
      line += std::to_string(r.done);
    }
    line += " " + std::string(r.unit) + "\x1b[K";  // clear the rest of the line
    std::fputs(line.c_str(), stderr);
    std::fflush(stderr);
  }

  /// Ends the bar's line (called by the destructor too).
  void finish() {
    if (enabled_ && drawn_) {
      std::fputs("\n", stderr);
      std::fflush(stderr);
    }
    drawn_ = false;
  }

 private:
  bool enabled_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point last_draw_{};
};

}  // namespace distorch::cli
