#include "distorch/device/topology.hpp"

#include <doctest/doctest.h>

TEST_CASE("parse_topology builds simulated devices in written order") {
  const auto topo = distorch::parse_topology("cuda:0=24GiB,cuda:1=12GiB, cpu=64GiB");
  REQUIRE(topo.devices.size() == 3);
  CHECK(topo.devices[0].id == distorch::device_id::cuda(0));
  CHECK(topo.devices[0].total_bytes == 24ull << 30);
  CHECK(topo.devices[0].free_bytes == 24ull << 30);
  CHECK(topo.devices[0].simulated);
  CHECK(topo.devices[2].id == distorch::device_id::cpu());
  CHECK(topo.find(distorch::device_id::cuda(1))->total_bytes == 12ull << 30);
  CHECK(topo.find(distorch::device_id::cuda(2)) == nullptr);
  CHECK(topo.str() == "cuda:0=24.00 GiB, cuda:1=12.00 GiB, cpu=64.00 GiB");
}

TEST_CASE("parse_topology rejects bad entries naming entry and column") {
  struct row { const char* text; std::size_t column; const char* problem_part; };
  const row rows[] = {
      {"", 1, "empty topology"},          {"cuda:0", 1, "missing '=size'"},
      {"cuda:0=24GiB,,cpu=1g", 14, "empty entry"}, {"gpu=1g", 1, "unknown device type"},
      {"cuda:0=abc", 8, "must start with a number"}, {"cpu=1g,cpu=2g", 8, "named twice"},
      {"cuda:0=-1g", 8, "negative"},
  };
  for (const auto& r : rows) {
    CAPTURE(r.text);
    try {
      distorch::parse_topology(r.text);
      FAIL("expected allocation_error");
    } catch (const distorch::allocation_error& e) {
      CHECK(e.info().position->value == r.column);
      CHECK(e.info().problem.find(r.problem_part) != std::string::npos);
    }
  }
}
