#pragma once
/// \file
/// Regular expressions written by users (overrides, head rules, grouping rules). libstdc++'s
/// std::regex compiles recursively, copies states for every `{n}` repetition, reads backreference
/// digits into a signed integer without a bound, and backtracks exponentially by default. A
/// pattern from a command line could therefore overflow the stack, exhaust memory, hit undefined
/// behaviour or hang a plan. Every user pattern goes through `check_user_regex` and is compiled
/// with `user_regex_flags`.
///
/// Example:
/// \code
///   if (auto problem = distorch::check_user_regex(R"(blocks\.\d+)")) report(problem->problem);
///   std::regex re = distorch::compile_user_regex(R"(blocks\.\d+)", "compiling grouping rule");
/// \endcode

#include <algorithm>
#include <cstdint>
#include <optional>
#include <regex>
#include <string>
#include <string_view>

#include "distorch/core/error.hpp"

namespace distorch::inline v0 {

/// Limits on user patterns. Real patterns for unit names are short and flat.
inline constexpr std::size_t max_user_regex_length = 256;
/// Deepest group nesting accepted; libstdc++ compiles groups recursively.
inline constexpr std::size_t max_user_regex_nesting = 16;
/// Largest product of {n} counts accepted; libstdc++ copies states for each repetition.
inline constexpr std::uint64_t max_user_regex_repetition = 1024;

/// libstdc++'s `__polynomial` mode matches in polynomial time and refuses backreferences, which
/// unit names never need.
inline constexpr std::regex::flag_type user_regex_flags = std::regex::ECMAScript
#if defined(__GLIBCXX__)
                                                          | std::regex_constants::__polynomial
#endif
    ;

/// What is wrong with a pattern, and where (0-based index into the pattern).
struct user_regex_problem {
  std::string problem;
  std::string fix;
  std::size_t index = 0;
};

/// Checks a pattern against the limits, then compiles it once. Returns the first problem, or
/// nothing when the pattern is safe to use.
inline std::optional<user_regex_problem> check_user_regex(std::string_view pattern) {
  if (pattern.empty()) return user_regex_problem{"empty regular expression", "write a pattern such as blocks\\.\\d+", 0};
  if (pattern.size() > max_user_regex_length)
    return user_regex_problem{"regex is " + std::to_string(pattern.size()) + " characters long; the limit is " +
                                  std::to_string(max_user_regex_length),
                              "write a shorter pattern or split it into several rules", 0};
  std::size_t depth = 0;
  std::uint64_t repetition = 1;
  bool escaped = false;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (escaped) {
      escaped = false;
      continue;
    }
    if (c == '\\') {
      escaped = true;
      std::size_t digits = 0;
      while (i + 1 + digits < pattern.size() && pattern[i + 1 + digits] >= '0' && pattern[i + 1 + digits] <= '9') ++digits;
      if (digits > 2)
        return user_regex_problem{"backreference '\\" + std::string(pattern.substr(i + 1, digits)) + "' is out of range",
                                  "refer to a group by a number below 100, or write the digits as [0-9]", i};
    } else if (c == '(') {
      if (++depth > max_user_regex_nesting)
        return user_regex_problem{"regex nests groups deeper than " + std::to_string(max_user_regex_nesting), "flatten the pattern", i};
    } else if (c == ')') {
      if (depth > 0) --depth;
    } else if (c == '{') {
      // The largest count in {n}, {n,} or {n,m}; what is not a count is left to std::regex.
      std::uint64_t largest = 0, current = 0;
      for (std::size_t j = i + 1; j < pattern.size() && pattern[j] != '}'; ++j) {
        const char d = pattern[j];
        if (d >= '0' && d <= '9') {
          current = std::min(current * 10 + static_cast<std::uint64_t>(d - '0'), max_user_regex_repetition + 1);
        } else if (d == ',') {
          largest = std::max(largest, current), current = 0;
        } else {
          break;
        }
      }
      largest = std::max(largest, current);
      repetition *= std::max<std::uint64_t>(largest, 1);
      if (repetition > max_user_regex_repetition)
        return user_regex_problem{"regex repeats more than " + std::to_string(max_user_regex_repetition) + " times in all",
                                  "use * or + instead of large {n} counts", i};
    }
  }
  try {
    std::regex compiled(pattern.begin(), pattern.end(), user_regex_flags);
    (void)compiled;
  } catch (const std::regex_error& e) {
    return user_regex_problem{std::string("not a valid regular expression: ") + e.what(),
                              "write an ECMAScript regex such as blocks\\.\\d+", 0};
  }
  return std::nullopt;
}

/// Checks and compiles a user pattern; throws `allocation_error` naming the pattern, the column
/// of the problem and `doing`.
inline std::regex compile_user_regex(std::string_view pattern, std::string_view doing,
                                     std::regex::flag_type extra_flags = std::regex::optimize) {
  if (auto p = check_user_regex(pattern))
    throw allocation_error({std::string(doing), std::string(pattern), error_position{"column", p->index + 1}, p->problem, p->fix});
  return std::regex(pattern.begin(), pattern.end(), user_regex_flags | extra_flags);
}

}  // namespace distorch::inline v0
