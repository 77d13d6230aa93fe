// Differential fuzzing of core/regex_prefilter.hpp: the input is split at the first newline into
// a pattern and a text. Whenever the pattern passes the user-regex checks (the ones override rules
// apply before compiling), the prefilter's verdict must agree with std::regex_search; a verdict of
// match / no_match that std::regex contradicts is a bug.
#include <cstddef>
#include <cstdint>
#include <regex>
#include <string>
#include <string_view>

#include "distorch/core/regex_prefilter.hpp"
#include "distorch/core/user_regex.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const auto cut = input.find('\n');
  if (cut == std::string_view::npos) return 0;
  const std::string_view pattern = input.substr(0, cut);
  const std::string text(input.substr(cut + 1));
  // Long texts make std::regex (backtracking) slow without testing anything new.
  if (pattern.size() > 64 || text.size() > 256) return 0;
  if (distorch::check_user_regex(pattern)) return 0;  // rejected before any matching
  std::regex re;
  try {
    re = std::regex(pattern.begin(), pattern.end(), distorch::user_regex_flags);
  } catch (const std::regex_error&) {
    return 0;
  }
  const distorch::regex_prefilter filter(pattern);
  const auto verdict = filter.check(text);
  if (verdict == distorch::prefilter_verdict::unknown) return 0;
  bool found = false;
  try {
    found = std::regex_search(text, re);
  } catch (const std::regex_error&) {  // complexity limits: no reference verdict
    return 0;
  }
  if (found != (verdict == distorch::prefilter_verdict::match)) __builtin_trap();
  return 0;
}
