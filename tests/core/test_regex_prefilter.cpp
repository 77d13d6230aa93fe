#include "distorch/core/regex_prefilter.hpp"

#include <doctest/doctest.h>

#include <random>
#include <regex>
#include <string>
#include <vector>

#include "distorch/core/user_regex.hpp"

namespace {

using distorch::prefilter_verdict;
using distorch::regex_prefilter;

// Random patterns from the constructs the prefilter reads, and some it must refuse.
class pattern_maker {
 public:
  explicit pattern_maker(std::uint64_t seed) : rng_(seed) {}

  std::string pattern() { return alternation(0); }

 private:
  std::mt19937_64 rng_;

  std::size_t pick(std::size_t n) { return static_cast<std::size_t>(rng_() % n); }

  std::string alternation(int depth) {
    std::string s = sequence(depth);
    while (pick(4) == 0) s += "|" + sequence(depth);
    return s;
  }

  std::string sequence(int depth) {
    std::string s;
    const std::size_t n = pick(5);
    for (std::size_t i = 0; i < n; ++i) s += piece(depth);
    return s;
  }

  std::string piece(int depth) {
    std::string a = atom(depth);
    static const std::vector<std::string> quantifiers{"*", "+", "?", "{2}", "{1,2}", "{0,1}", "{1,}", "*?", "+?", "??", "{0}"};
    if (a != "^" && a != "$" && a != "\\b" && a != "\\B" && pick(4) == 0) a += quantifiers[pick(quantifiers.size())];
    return a;
  }

  std::string atom(int depth) {
    static const std::vector<std::string> literals{"a", "b", "0", "1", "_", "-", "\\.", "\\-", "\\_", "\\$", "\n", "\xc3"};
    static const std::vector<std::string> others{
        ".", "\\d", "\\w", "\\s", "\\D", "\\b", "\\B", "^", "$", "[ab]", "[0-1]", "[^a]", "[a-b.]", "[\\d.]", "[-a]",
        "[a-]", "[a-z]", "[.]", "(?=a)", "(?!b)", "\\x61", "\\n", "\\u0062", "[[:alpha:]]", "\\t"};
    const std::size_t k = pick(10);
    if (k < 6) return literals[pick(literals.size())];
    if (k < 8 || depth >= 3) return others[pick(others.size())];
    return (pick(2) == 0 ? "(" : "(?:") + alternation(depth + 1) + ")";
  }
};

std::string random_name(std::mt19937_64& rng) {
  static const std::string alphabet = "ab01._-\n\xc3";
  std::string s;
  const std::size_t n = rng() % 9;
  for (std::size_t i = 0; i < n; ++i) s += alphabet[rng() % alphabet.size()];
  return s;
}

struct agreement {
  std::size_t decided = 0;
  std::size_t checked = 0;
};

// Compares the prefilter's verdicts on `names` with std::regex_search, as override rules compile it.
void expect_agrees(const std::string& pattern, const std::vector<std::string>& names, agreement& counts) {
  const std::regex re(pattern, distorch::user_regex_flags | std::regex::optimize);
  const regex_prefilter filter(pattern);
  for (const auto& name : names) {
    const bool found = std::regex_search(name, re);
    const auto verdict = filter.check(name);
    ++counts.checked;
    if (verdict == prefilter_verdict::unknown) continue;
    ++counts.decided;
    INFO("pattern '", pattern, "' on name '", name, "'");
    CHECK(found == (verdict == prefilter_verdict::match));
  }
}

std::vector<std::string> random_names(std::uint64_t seed, std::size_t n) {
  std::mt19937_64 rng(seed);
  std::vector<std::string> names{"", "a", "b", "ab", "ba", "a\nb", "\n", "blocks.0.attn", "blocks.10.attn", "x.layer7",
                                 "layer7.x", "a.b", "a_b", "a-b"};
  while (names.size() < n) names.push_back(random_name(rng));
  return names;
}

}  // namespace

TEST_CASE("regex_prefilter: literal patterns are decided alone, with anchors at the ends") {
  const regex_prefilter blocks(R"(blocks\.(0|1)\.)");
  CHECK(blocks.decides_alone());
  CHECK(blocks.check("blocks.0.attn") == prefilter_verdict::match);
  CHECK(blocks.check("model.blocks.1.mlp") == prefilter_verdict::match);
  CHECK(blocks.check("blocks.10.attn") == prefilter_verdict::no_match);

  const regex_prefilter tail("layer7$");
  CHECK(tail.decides_alone());
  CHECK(tail.check("blocks.3.layer7") == prefilter_verdict::match);
  CHECK(tail.check("blocks.3.layer7.bias") == prefilter_verdict::no_match);
  CHECK(tail.check("layer7\n") == prefilter_verdict::no_match);

  const regex_prefilter whole("^(a|b)$");
  CHECK(whole.decides_alone());
  CHECK(whole.check("a") == prefilter_verdict::match);
  CHECK(whole.check("ab") == prefilter_verdict::no_match);
}

TEST_CASE("regex_prefilter: patterns with open parts only rule names out") {
  const regex_prefilter digits(R"(blocks\.\d+\.attn)");
  CHECK_FALSE(digits.decides_alone());
  CHECK(digits.check("blocks.3.attn") == prefilter_verdict::unknown);
  CHECK(digits.check("blocks.3.mlp") == prefilter_verdict::no_match);  // lacks ".attn"
  CHECK(digits.check("layers.3.attn") == prefilter_verdict::no_match);  // lacks "blocks."

  const regex_prefilter either(R"(attn\..*|mlp\d)");
  CHECK(either.check("x.attn.q") == prefilter_verdict::unknown);
  CHECK(either.check("x.mlp") == prefilter_verdict::unknown);
  CHECK(either.check("x.norm") == prefilter_verdict::no_match);
}

TEST_CASE("regex_prefilter: constructs it does not model leave every verdict unknown") {
  for (const char* pattern : {"(?=a)a", R"(\x61)", R"(\u0061)", R"(\n)", "[[:alpha:]]", "a]", "[]a]"}) {
    const regex_prefilter filter(pattern);
    CHECK_FALSE(filter.decides_alone());
    for (const char* name : {"", "a", "b", "ab"}) CHECK(filter.check(name) == prefilter_verdict::unknown);
  }
  const regex_prefilter nothing;
  CHECK(nothing.check("a") == prefilter_verdict::unknown);
}

TEST_CASE("regex_prefilter: agrees with std::regex_search on edge-case patterns") {
  const auto names = random_names(7, 300);
  agreement counts;
  for (const char* pattern : {"^", "$", "^$", "a|", "|", "()", "a?", "a??b", "^a|b$", "a$|^b", "(^a)", "a\\b", "\\ba",
                              "[0-9]", "[ab]+", "(a|b)(0|1)", "(a|)b", "a{2}", "a{0}b", "(?:ab)?c?", "^^a", "a$$",
                              "\\.\\-\\_", "[a-]", "[-a]", "[^a]", ".", "a.b", "(a)|(b)|(0)|(1)|(_)|(-)|(\\.)",
                              "(a|b)(a|b)(a|b)(a|b)(a|b)", "\xc3", "\n", "a\nb", "^\n", "\n$"}) {
    expect_agrees(pattern, names, counts);
  }
  CHECK(counts.decided * 2 > counts.checked);  // most of these are decided without the regex
}

TEST_CASE("regex_prefilter: agrees with std::regex_search on random patterns and names") {
  pattern_maker maker(2024);
  const auto names = random_names(11, 120);
  agreement counts;
  std::size_t patterns = 0;
  while (patterns < 1500) {
    const std::string pattern = maker.pattern();
    if (distorch::check_user_regex(pattern)) continue;  // only patterns users can give
    ++patterns;
    expect_agrees(pattern, names, counts);
  }
  // The comparison means something only when the prefilter often answers alone.
  CHECK(counts.decided * 4 > counts.checked);
}
