#include "distorch/core/error.hpp"

#include <doctest/doctest.h>

TEST_CASE("every error is a distorch::error with a one-line message naming input, position and fix") {
  distorch::error_info info{"parsing allocation string", "cuda:0,abc", distorch::error_position{"column", 8},
                            "'abc' is not a byte size", "write a size such as 2.5gb"};
  const distorch::allocation_error e(info);
  const std::string message = e.what();
  CHECK(message == "allocation_error: parsing allocation string 'cuda:0,abc' at column 8: 'abc' is not a byte size "
                   "(fix: write a size such as 2.5gb)");
  CHECK(message.find('\n') == std::string::npos);
  CHECK(e.category() == "allocation_error");
  const distorch::error& base = e;
  CHECK(base.info().subject == "cuda:0,abc");
}

TEST_CASE("each error category has its own type") {
  auto throws = [](auto error_object) {
    try {
      throw error_object;
    } catch (const distorch::error& e) {
      return std::string(e.category());
    }
  };
  CHECK(throws(distorch::placement_error({})) == "placement_error");
  CHECK(throws(distorch::format_error({})) == "format_error");
  CHECK(throws(distorch::lora_error({})) == "lora_error");
  CHECK(throws(distorch::device_error({})) == "device_error");
  CHECK(throws(distorch::retention_error({})) == "retention_error");
  CHECK_THROWS_AS(throw distorch::format_error({}), std::runtime_error);
}
