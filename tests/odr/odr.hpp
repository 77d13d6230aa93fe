#pragma once
// What each of the two ODR translation units offers the other: each includes every public header
// and computes the same things, so the program can compare them.
#include <cstdint>
#include <string>

namespace odr_test {
struct tu_report {
  int headers = 0;              // DISTORCH_ODR_HEADER_COUNT as this TU saw it
  std::string version;          // distorch::version_string()
  std::uint64_t parsed_bytes = 0;  // an allocation string's first entry
  std::string device;           // a device_id round trip
};
tu_report report_from_a();
tu_report report_from_b();
}  // namespace odr_test
