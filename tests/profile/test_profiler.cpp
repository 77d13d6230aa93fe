// profile/profiler.hpp on this machine: the links it measures and the ones it reports absent,
// the sizes, the progress reports, and that the fitted line is the least-squares line of the
// samples (recomputed here with plain sums). No timing is asserted.
#include "distorch/profile/profiler.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

using namespace distorch;

TEST_CASE("measure_profile times host memcpy and reports missing accelerator links as absent") {
  profiler_options options;
  options.sizes = {256ull << 10, 64ull << 10, 1ull << 20, 64ull << 10};  // unsorted, with a duplicate
  options.repeats = 3;
  options.warmup = 1;
  std::vector<progress_report> reports;
  options.progress = [&](const progress_report& r) { reports.push_back(r); };
  const auto p = measure_profile(options);

  CHECK(p.machine.origin == "measured");
  CHECK(p.repeats == 3);
  CHECK(p.warmup == 1);
  CHECK(!p.machine.date.empty());
  REQUIRE(!p.machine.devices.empty());
  CHECK(p.machine.devices.front().device == device_id::cpu());
  const auto* memcpy_link = p.find(link_kind::host_memcpy, device_id::cpu(), device_id::cpu());
  REQUIRE(memcpy_link != nullptr);
  REQUIRE(memcpy_link->samples.size() == 3);
  CHECK(memcpy_link->samples[0].bytes == 64ull << 10);
  CHECK(memcpy_link->samples[1].bytes == 256ull << 10);
  CHECK(memcpy_link->samples[2].bytes == 1ull << 20);
  for (const auto& s : memcpy_link->samples) CHECK(s.seconds > 0);

  // The fit, recomputed: least squares of t on bytes, or through the origin when the intercept
  // would be negative or the slope not positive.
  double n = 0, sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (const auto& s : memcpy_link->samples) {
    const double x = static_cast<double>(s.bytes);
    n += 1, sx += x, sy += s.seconds, sxx += x * x, sxy += x * s.seconds;
  }
  double slope = (n * sxy - sx * sy) / (n * sxx - sx * sx);
  double intercept = (sy - slope * sx) / n;
  if (slope <= 0 || intercept < 0) slope = sxy / sxx, intercept = 0;
  CHECK(memcpy_link->bandwidth == doctest::Approx(1.0 / slope).epsilon(1e-6));
  CHECK(memcpy_link->latency == doctest::Approx(intercept).epsilon(1e-6));

  if (torch_device_count(c10::DeviceType::CUDA) == 0) {
    CHECK(p.links.size() == 1);
    bool pageable_absent = false;
    for (const auto& a : p.absent) pageable_absent = pageable_absent || (a.kind == link_kind::host_to_device_pageable && !a.reason.empty());
    CHECK(pageable_absent);
    REQUIRE(reports.size() == 3);
  } else {
    CHECK(p.find(link_kind::host_to_device_pinned, device_id::cpu(), device_id::cuda(0)) != nullptr);
    CHECK(p.find(link_kind::host_to_device_pageable, device_id::cpu(), device_id::cuda(0)) != nullptr);
    CHECK(p.find(link_kind::device_to_host, device_id::cuda(0), device_id::cpu()) != nullptr);
  }
  // One report per (link, size), counting up to the total.
  REQUIRE(!reports.empty());
  CHECK(reports.size() == p.links.size() * 3);
  for (std::size_t i = 0; i < reports.size(); ++i) {
    CHECK(reports[i].done == i + 1);
    CHECK(reports[i].total == reports.size());
  }
  // A measured profile is a valid profile.
  CHECK(profile_from_json(profile_to_json(p)) == p);
}

TEST_CASE("measure_profile rejects empty sizes, zero sizes and zero repeats") {
  CHECK_THROWS_AS(measure_profile({.sizes = {}}), placement_error);
  CHECK_THROWS_AS(measure_profile({.sizes = {0}}), placement_error);
  CHECK_THROWS_AS(measure_profile({.sizes = {4096}, .repeats = 0}), placement_error);
}

TEST_CASE("a topology without CUDA devices measures host memcpy only") {
  profiler_options options;
  options.sizes = {64ull << 10};
  options.repeats = 1;
  options.devices = parse_topology("cpu=1GiB,sim:0=1GiB");
  const auto p = measure_profile(options);
  CHECK(p.links.size() == 1);
  CHECK(p.links[0].kind == link_kind::host_memcpy);
  CHECK(p.machine.devices.size() == 2);
  CHECK(!p.absent.empty());
}
