#pragma once
/// \file
/// A literal prefilter for user regexes. std::regex in libstdc++'s polynomial mode costs a few
/// microseconds per search, which is most of the time of a 100k-unit plan with override rules.
/// Most unit patterns are literals with a little structure (`blocks\.(0|1)\.`, `layer7$`), so
/// before any search this reads the pattern once and derives what every match must contain:
/// a set of literal strings, AND-ed and OR-ed (the idea of RE2's prefilter). A name that holds
/// none of them cannot match and skips the regex. When the whole pattern is a finite set of
/// literals, optionally anchored, the prefilter decides alone and the regex never runs.
///
/// The analysis is conservative: a construct it does not fully understand (lookahead, `\x41`,
/// POSIX classes inside brackets, ...) makes it give up, and then every verdict is `unknown`.
/// It describes ECMAScript without `icase` or `multiline`, the flags of override rules.
///
/// Example:
/// \code
///   const distorch::regex_prefilter filter(R"(blocks\.(0|1)\.)");
///   filter.check("blocks.0.attn");     // prefilter_verdict::match (decided without std::regex)
///   filter.check("blocks.10.attn");    // prefilter_verdict::no_match
///   distorch::regex_prefilter(R"(blocks\.\d+)").check("blocks.3");   // unknown: run the regex
/// \endcode

#include <algorithm>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "distorch/core/config.hpp"

namespace distorch::inline v0 {

/// What a prefilter knows about one text without running the regex.
enum class prefilter_verdict {
  no_match,  ///< the regex cannot match the text
  match,     ///< the regex matches the text
  unknown,   ///< the text may match; run the regex
};

namespace detail {

/// A necessary condition on a text: literals that must occur in it, combined by all / any.
struct literal_condition {
  enum class kind { always, literal, all, any };
  kind k = kind::always;
  std::string text;                         // kind::literal
  std::vector<literal_condition> children;  // kind::all / kind::any

  bool holds(std::string_view s) const {
    switch (k) {
      case kind::always: return true;
      case kind::literal: return s.find(text) != std::string_view::npos;
      case kind::all: return std::all_of(children.begin(), children.end(), [&](const auto& c) { return c.holds(s); });
      case kind::any: return std::any_of(children.begin(), children.end(), [&](const auto& c) { return c.holds(s); });
    }
    return true;
  }

  static literal_condition combine(kind k, std::vector<literal_condition> parts) {
    std::vector<literal_condition> kept;
    for (auto& p : parts) {
      if (p.k == kind::always) {
        // `always` is neutral in a conjunction and absorbs a disjunction.
        if (k == kind::any) return {};
        continue;
      }
      if (p.k == k) {
        for (auto& c : p.children) kept.push_back(std::move(c));
      } else {
        kept.push_back(std::move(p));
      }
    }
    if (kept.empty()) return {};
    if (kept.size() == 1) return std::move(kept.front());
    literal_condition c;
    c.k = k;
    c.children = std::move(kept);
    return c;
  }
};

/// What one piece of a pattern matches: either exactly one of a finite set of strings, or some
/// string satisfying a necessary condition.
struct literal_facts {
  bool exact = false;
  std::vector<std::string> strings;  // when exact
  literal_condition condition;       // when not exact
  bool anchor = false;               // ^, $, \b, \B: zero width, position-dependent
  char anchor_char = 0;              // '^' or '$' for those two

  static literal_facts of_strings(std::vector<std::string> s) {
    literal_facts f;
    f.exact = true;
    std::sort(s.begin(), s.end());
    s.erase(std::unique(s.begin(), s.end()), s.end());
    f.strings = std::move(s);
    return f;
  }
  static literal_facts anything() { return {}; }

  literal_condition as_condition() const {
    if (!exact) return condition;
    std::vector<literal_condition> parts;
    for (const auto& s : strings) {
      if (s.empty()) return {};  // the empty string occurs in every text
      literal_condition c;
      c.k = literal_condition::kind::literal;
      c.text = s;
      parts.push_back(std::move(c));
    }
    return literal_condition::combine(literal_condition::kind::any, std::move(parts));
  }
};

/// Exact sets larger than this turn into conditions, which keeps the analysis linear.
inline constexpr std::size_t max_exact_strings = 16;

inline literal_facts concatenate(const literal_facts& a, const literal_facts& b) {
  if (a.exact && b.exact && a.strings.size() * b.strings.size() <= max_exact_strings) {
    std::vector<std::string> product;
    for (const auto& x : a.strings)
      for (const auto& y : b.strings) product.push_back(x + y);
    return literal_facts::of_strings(std::move(product));
  }
  literal_facts f;
  f.condition = literal_condition::combine(literal_condition::kind::all, {a.as_condition(), b.as_condition()});
  return f;
}

inline literal_facts alternate(const literal_facts& a, const literal_facts& b) {
  if (a.exact && b.exact && a.strings.size() + b.strings.size() <= max_exact_strings) {
    auto all = a.strings;
    all.insert(all.end(), b.strings.begin(), b.strings.end());
    return literal_facts::of_strings(std::move(all));
  }
  literal_facts f;
  f.condition = literal_condition::combine(literal_condition::kind::any, {a.as_condition(), b.as_condition()});
  return f;
}

/// One top-level alternative that is a literal set, perhaps anchored: the exact test.
struct anchored_literals {
  bool at_begin = false;
  bool at_end = false;
  std::vector<std::string> strings;

  bool holds(std::string_view s) const {
    for (const auto& lit : strings) {
      if (at_begin && at_end) {
        if (s == lit) return true;
      } else if (at_begin) {
        if (s.starts_with(lit)) return true;
      } else if (at_end) {
        if (s.ends_with(lit)) return true;
      } else if (s.find(lit) != std::string_view::npos) {
        return true;
      }
    }
    return false;
  }
};

/// Recursive descent over the ECMAScript subset it understands. Every function returns nothing
/// to give up, which leaves the prefilter knowing nothing: the safe answer.
class literal_analyzer {
 public:
  explicit literal_analyzer(std::string_view pattern) : p_(pattern) {}

  struct result {
    literal_condition condition;                  // necessary for a match
    std::optional<std::vector<anchored_literals>> exact;  // when set: sufficient too
  };

  std::optional<result> run() {
    std::vector<std::vector<literal_facts>> alternatives;
    while (true) {
      auto seq = sequence();
      if (!seq) return std::nullopt;
      alternatives.push_back(std::move(*seq));
      if (at_end()) break;
      if (p_[i_] != '|') return std::nullopt;  // a stray ')'
      ++i_;
    }
    result r;
    std::vector<literal_condition> any;
    std::vector<anchored_literals> exact;
    bool all_exact = true;
    for (const auto& items : alternatives) {
      any.push_back(concatenate_all(items, 0, items.size()).as_condition());
      // ^ and $ at the ends of an alternative of literals become starts_with / ends_with.
      std::size_t first = 0, last = items.size();
      anchored_literals a;
      if (first < last && items[first].anchor && items[first].anchor_char == '^') a.at_begin = true, ++first;
      if (first < last && items[last - 1].anchor && items[last - 1].anchor_char == '$') a.at_end = true, --last;
      const auto middle = concatenate_all(items, first, last);
      if (middle.exact) {
        a.strings = middle.strings;
        exact.push_back(std::move(a));
      } else {
        all_exact = false;
      }
    }
    r.condition = literal_condition::combine(literal_condition::kind::any, std::move(any));
    if (all_exact) r.exact = std::move(exact);
    return r;
  }

 private:
  std::string_view p_;
  std::size_t i_ = 0;
  std::size_t depth_ = 0;

  bool at_end() const { return i_ >= p_.size(); }

  static literal_facts concatenate_all(const std::vector<literal_facts>& items, std::size_t from, std::size_t to) {
    auto f = literal_facts::of_strings({""});
    for (std::size_t k = from; k < to; ++k) {
      if (items[k].anchor) {
        // Zero width, but position-dependent: nothing exact survives it.
        f = concatenate(f, literal_facts::anything());
      } else {
        f = concatenate(f, items[k]);
      }
    }
    return f;
  }

  static bool is_syntax(char c) {
    return std::string_view("^$\\.*+?()[]{}|").find(c) != std::string_view::npos;
  }
  static bool is_ascii_punct(char c) {
    return (c >= '!' && c <= '/') || (c >= ':' && c <= '@') || (c >= '[' && c <= '`') || (c >= '{' && c <= '~');
  }

  // items until the end, '|' or ')'
  std::optional<std::vector<literal_facts>> sequence() {
    std::vector<literal_facts> items;
    while (!at_end() && p_[i_] != '|' && p_[i_] != ')') {
      auto a = atom();
      if (!a) return std::nullopt;
      auto q = quantified(std::move(*a));
      if (!q) return std::nullopt;
      items.push_back(std::move(*q));
    }
    return items;
  }

  std::optional<literal_facts> atom() {
    const char c = p_[i_];
    if (c == '^' || c == '$') {
      ++i_;
      literal_facts f;
      f.anchor = true;
      f.anchor_char = c;
      return f;
    }
    if (c == '.') {
      ++i_;
      return literal_facts::anything();
    }
    if (c == '\\') return escape();
    if (c == '[') return bracket();
    if (c == '(') return group();
    // A quantifier with nothing before it, a stray ']' or '}', or a NUL (dialects differ).
    if (is_syntax(c) || c == '\0') return std::nullopt;
    ++i_;
    return literal_facts::of_strings({std::string(1, c)});
  }

  std::optional<literal_facts> escape() {
    if (i_ + 1 >= p_.size()) return std::nullopt;
    const char c = p_[i_ + 1];
    i_ += 2;
    if (c == 'b' || c == 'B') {
      literal_facts f;
      f.anchor = true;
      return f;
    }
    if (c == 'd' || c == 'D' || c == 's' || c == 'S' || c == 'w' || c == 'W') return literal_facts::anything();
    // An escaped punctuation mark is that mark. Letters and digits mean other things (\n, \x41,
    // \cA, backreferences), so the analysis does not guess.
    if (is_ascii_punct(c)) return literal_facts::of_strings({std::string(1, c)});
    return std::nullopt;
  }

  std::optional<literal_facts> bracket() {
    ++i_;  // '['
    bool negated = false;
    if (!at_end() && p_[i_] == '^') negated = true, ++i_;
    if (at_end() || p_[i_] == ']') return std::nullopt;  // "[]" and "[]a]" read differently by dialect
    std::vector<char> members;
    bool simple = !negated;
    while (true) {
      if (at_end()) return std::nullopt;
      const char c = p_[i_];
      if (c == ']') {
        ++i_;
        break;
      }
      if (c == '[' || c == '\0') return std::nullopt;  // [:alpha:], [.a.], [=a=]
      if (c == '\\') {
        if (i_ + 1 >= p_.size()) return std::nullopt;
        const char e = p_[i_ + 1];
        if (!is_ascii_punct(e) && std::string_view("dDsSwW").find(e) == std::string_view::npos) return std::nullopt;
        simple = false;
        i_ += 2;
        continue;
      }
      if (c == '-') {
        // A dash at an edge is literal and one in the middle makes a range; not worth the risk.
        simple = false;
        ++i_;
        continue;
      }
      if (i_ + 2 < p_.size() && p_[i_ + 1] == '-' && p_[i_ + 2] != ']') {
        const char hi = p_[i_ + 2];
        if (hi == '[' || hi == '\\' || hi == '-') return std::nullopt;
        const auto lo_u = static_cast<unsigned char>(c), hi_u = static_cast<unsigned char>(hi);
        if (lo_u > hi_u) return std::nullopt;
        if (static_cast<std::size_t>(hi_u - lo_u) < max_exact_strings)
          for (unsigned v = lo_u; v <= static_cast<unsigned>(hi_u); ++v) members.push_back(static_cast<char>(v));
        else
          simple = false;
        i_ += 3;
        continue;
      }
      members.push_back(c);
      ++i_;
    }
    if (!simple || members.empty() || members.size() > max_exact_strings) return literal_facts::anything();
    std::vector<std::string> strings;
    for (char m : members) strings.emplace_back(1, m);
    return literal_facts::of_strings(std::move(strings));
  }

  std::optional<literal_facts> group() {
    ++i_;  // '('
    if (++depth_ > 64) return std::nullopt;
    if (!at_end() && p_[i_] == '?') {
      if (i_ + 1 < p_.size() && p_[i_ + 1] == ':')
        i_ += 2;
      else
        return std::nullopt;  // lookahead: not worth modelling
    }
    std::optional<literal_facts> f;
    while (true) {
      auto seq = sequence();
      if (!seq) return std::nullopt;
      // A group is used inside a larger sequence, so its anchors simply break exactness.
      auto alt = concatenate_all(*seq, 0, seq->size());
      f = f ? alternate(*f, alt) : alt;
      if (at_end()) return std::nullopt;
      if (p_[i_] == ')') break;
      ++i_;  // '|'
    }
    ++i_;  // ')'
    --depth_;
    return f;
  }

  std::optional<literal_facts> quantified(literal_facts f) {
    if (at_end()) return f;
    const char c = p_[i_];
    if (c != '*' && c != '+' && c != '?' && c != '{') return f;
    if (f.anchor) return std::nullopt;
    std::size_t minimum = 0;
    bool optional_only = false;  // exactly {0,1}
    if (c == '*') {
      ++i_;
    } else if (c == '+') {
      minimum = 1, ++i_;
    } else if (c == '?') {
      optional_only = true, ++i_;
    } else {
      ++i_;
      const auto lo = number();
      if (!lo) return std::nullopt;
      minimum = *lo;
      if (!at_end() && p_[i_] == ',') {
        ++i_;
        if (!at_end() && p_[i_] != '}' && !number()) return std::nullopt;
      }
      if (at_end() || p_[i_] != '}') return std::nullopt;
      ++i_;
    }
    if (!at_end() && p_[i_] == '?') ++i_;  // lazy: same set of matches
    if (!at_end() && (p_[i_] == '*' || p_[i_] == '+' || p_[i_] == '?' || p_[i_] == '{')) return std::nullopt;
    if (optional_only && f.exact) {
      auto s = f.strings;
      s.emplace_back();
      if (s.size() <= max_exact_strings) return literal_facts::of_strings(std::move(s));
    }
    if (minimum == 0) return literal_facts::anything();
    literal_facts g;
    g.condition = f.as_condition();  // at least one repetition occurs
    return g;
  }

  std::optional<std::size_t> number() {
    std::size_t v = 0, digits = 0;
    while (!at_end() && p_[i_] >= '0' && p_[i_] <= '9') {
      v = std::min<std::size_t>(v * 10 + static_cast<std::size_t>(p_[i_] - '0'), 1u << 20);
      ++i_, ++digits;
    }
    if (digits == 0) return std::nullopt;
    return v;
  }
};

}  // namespace detail

/// The literal prefilter of one ECMAScript pattern (case-sensitive, not multiline).
/// Never throws: a pattern it cannot analyse gives a prefilter whose every verdict is `unknown`.
/// \code
///   const distorch::regex_prefilter filter("layer7$");
///   if (filter.check(name) == distorch::prefilter_verdict::unknown) matched = std::regex_search(name, re);
///   else matched = filter.check(name) == distorch::prefilter_verdict::match;
/// \endcode
class regex_prefilter {
 public:
  /// Knows nothing: every verdict is `unknown`.
  regex_prefilter() = default;

  /// Analyses `pattern` once.
  /// \code
  ///   distorch::regex_prefilter f(R"(^blocks\.0\.)");   // decides alone: starts_with "blocks.0."
  /// \endcode
  explicit regex_prefilter(std::string_view pattern) {
    auto r = detail::literal_analyzer(pattern).run();
    if (!r) return;
    known_ = true;
    condition_ = std::move(r->condition);
    exact_ = std::move(r->exact);
  }

  /// What the pattern's search would return on `text`, as far as literals tell.
  /// \code
  ///   distorch::regex_prefilter("a|b").check("xbx");   // prefilter_verdict::match
  /// \endcode
  prefilter_verdict check(std::string_view text) const {
    if (!known_) return prefilter_verdict::unknown;
    if (exact_) {
      for (const auto& alternative : *exact_)
        if (alternative.holds(text)) return prefilter_verdict::match;
      return prefilter_verdict::no_match;
    }
    return condition_.holds(text) ? prefilter_verdict::unknown : prefilter_verdict::no_match;
  }

  /// True when `check` never answers `unknown`: the pattern is a finite set of literals.
  /// \code
  ///   distorch::regex_prefilter(R"(blocks\.(0|1)\.)").decides_alone();   // true
  /// \endcode
  bool decides_alone() const noexcept { return known_ && exact_.has_value(); }

 private:
  bool known_ = false;
  detail::literal_condition condition_;
  std::optional<std::vector<detail::anchored_literals>> exact_;
};

}  // namespace distorch::inline v0
