// Second translation unit of the ODR test: the same headers as odr_a.cpp. A function defined in a
// header without `inline` (or a non-inline variable) is then defined twice and the link fails.
#include "odr.hpp"
#include "odr_all_headers.hpp"

namespace odr_test {
tu_report report_from_b() {
  const auto spec = distorch::parse_allocation("sim:1,2.5gb;cpu,*");
  return {DISTORCH_ODR_HEADER_COUNT, std::string(distorch::version_string()), spec.entries.at(0).bytes,
          distorch::device_id::parse("cuda:1").str()};
}
}  // namespace odr_test
