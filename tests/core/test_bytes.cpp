#include "distorch/core/bytes.hpp"

#include <doctest/doctest.h>

using distorch::format_bytes;
using distorch::parse_bytes;
using distorch::try_parse_bytes;

TEST_CASE("parse_bytes accepts DisTorch2 and IEC spellings, binary units, any case") {
  struct row { const char* text; std::uint64_t expected; };
  const row rows[] = {
      {"2.5gb", 2684354560ull}, {"500mb", 500ull << 20}, {"3.0g", 3ull << 30}, {"1024k", 1024ull << 10},
      {"4096b", 4096}, {"1.5GiB", 1610612736ull}, {"512MiB", 512ull << 20}, {"7", 7}, {"0", 0},
      {"2.5GB", 2684354560ull}, {"1TiB", 1ull << 40}, {" 8 kb ", 8192}, {"0.5k", 512}, {".5k", 512},
      {"1.0000000000000000001gb", 1ull << 30}, {"16383pib", 16383ull << 50},
  };
  for (const auto& r : rows) {
    CAPTURE(r.text);
    CHECK(parse_bytes(r.text) == r.expected);
  }
}

TEST_CASE("parse_bytes rounds fractional bytes down") {
  CHECK(parse_bytes("1.5b") == 1);
  CHECK(parse_bytes("0.3k") == 307);  // 307.2
}

TEST_CASE("parse_bytes rejects bad sizes with allocation_error naming the column") {
  struct row { const char* text; std::size_t column; const char* problem_part; };
  const row rows[] = {
      {"-1gb", 1, "negative"},     {"abc", 1, "must start with a number"}, {"1e400gb", 2, "exponent"},
      {"gb", 1, "must start with a number"}, {"", 1, "empty"},  {"nan", 1, "not a finite"},
      {"NaNgb", 1, "not a finite"}, {"inf", 1, "not a finite"}, {"18446744073709551616", 1, "64 bits"},
      {"16384pib", 1, "64 bits"},   {"17179869184gb", 1, "64 bits"}, {"12xb", 3, "not a byte unit"},
      {"1.2.3gb", 4, "not a byte unit"}, {"5gb*", 2, "not a byte unit"},
  };
  for (const auto& r : rows) {
    CAPTURE(r.text);
    auto result = try_parse_bytes(r.text);
    REQUIRE_FALSE(result.ok());
    CHECK(result.problem.find(r.problem_part) != std::string::npos);
    CHECK(result.index + 1 == r.column);
    try {
      parse_bytes(r.text);
      FAIL("expected allocation_error");
    } catch (const distorch::allocation_error& e) {
      REQUIRE(e.info().position.has_value());
      CHECK(e.info().position->value == r.column);
      CHECK(e.info().subject == r.text);
      CHECK_FALSE(e.info().fix.empty());
    }
  }
}

TEST_CASE("largest representable size parses exactly") {
  CHECK(parse_bytes("18446744073709551615") == ~0ull);
  CHECK(parse_bytes("18446744073709551615b") == ~0ull);
}

TEST_CASE("format_bytes prints binary units with two decimals") {
  CHECK(format_bytes(0) == "0 B");
  CHECK(format_bytes(1023) == "1023 B");
  CHECK(format_bytes(1024) == "1.00 KiB");
  CHECK(format_bytes(3ull << 20) == "3.00 MiB");
  CHECK(format_bytes(2684354560ull) == "2.50 GiB");
  CHECK(format_bytes(~0ull) == "16.00 EiB");
}
