#pragma once
// Test helper: captures the warnings distorch logs while it lives (the log sink is restored to the
// default at scope exit).

#include <string>
#include <string_view>
#include <vector>

#include "distorch/core/log.hpp"

namespace distorch_test {

/// Every warning logged while this object lives, in order.
struct captured_log {
  std::vector<std::string> warnings;
  captured_log() {
    distorch::set_log_sink([this](distorch::log_level level, std::string_view message) {
      if (level == distorch::log_level::warning) warnings.emplace_back(message);
    });
  }
  ~captured_log() { distorch::set_log_sink({}); }
  captured_log(const captured_log&) = delete;
  captured_log& operator=(const captured_log&) = delete;
};

}  // namespace distorch_test
