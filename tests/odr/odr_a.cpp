// First translation unit of the ODR test, with main: includes every public header (the generated
// odr_all_headers.hpp), as odr_b.cpp does, and checks that both units saw the same, complete set
// of headers (the headers under $DISTORCH_SOURCE_ROOT/include/distorch) and compute the same.
#include <cstdlib>
#include <filesystem>
#include <iostream>

#include "odr.hpp"
#include "odr_all_headers.hpp"

namespace odr_test {
tu_report report_from_a() {
  const auto spec = distorch::parse_allocation("sim:1,2.5gb;cpu,*");
  return {DISTORCH_ODR_HEADER_COUNT, std::string(distorch::version_string()), spec.entries.at(0).bytes,
          distorch::device_id::parse("cuda:1").str()};
}
}  // namespace odr_test

int main() {
  const char* root = std::getenv("DISTORCH_SOURCE_ROOT");
  if (root == nullptr) {
    std::cerr << "odr: DISTORCH_SOURCE_ROOT is not set (meson test sets it)\n";
    return 1;
  }
  int on_disk = 0;
  for (const auto& e : std::filesystem::recursive_directory_iterator(std::filesystem::path(root) / "include" / "distorch"))
    if (e.is_regular_file() && (e.path().extension() == ".hpp" || e.path().extension() == ".h")) ++on_disk;

  const auto a = odr_test::report_from_a();
  const auto b = odr_test::report_from_b();
  std::cout << "odr: " << a.headers << " headers in each of two translation units, " << on_disk << " on disk\n";
  int failures = 0;
  auto check = [&](bool ok, const char* what) {
    if (!ok) {
      std::cerr << "odr: " << what << '\n';
      ++failures;
    }
  };
  check(a.headers == on_disk, "the translation units do not include every header under include/distorch");
  check(a.headers == b.headers, "the two translation units saw different header lists");
  check(a.version == b.version && a.version == DISTORCH_VERSION_STRING, "the units disagree on the version");
  check(a.parsed_bytes == b.parsed_bytes, "the units parse \"2.5gb\" differently");
  check(a.device == b.device, "the units print a device_id differently");
  if (failures == 0) std::cout << "odr: ok\n";
  return failures == 0 ? 0 : 1;
}
