// profile/profile.hpp: the line fit, JSON write and the strict reader (one case per rejected
// input class), the conservative default.
#include <cmath>
#include <limits>
#include <string>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include "distorch/profile/profile.hpp"
#include "support/test_files.hpp"

using namespace distorch;

namespace {

/// A small profile with one link of each kind that a two-GPU machine has.
profile sample_profile() {
  profile p;
  p.machine = {"measured", "box", "Some CPU", "1.13.1", "0.1.0", "2026-11-22T12:00:00Z",
               {{device_id::cpu(), "host RAM", 64ull << 30}, {device_id::cuda(0), "GPU", 24ull << 30}}};
  p.repeats = 5;
  p.warmup = 1;
  p.links.push_back({link_kind::host_memcpy, device_id::cpu(), device_id::cpu(), {{1 << 20, 1e-4}, {4 << 20, 3.5e-4}}, 1.2e10, 2e-6});
  p.links.push_back({link_kind::host_to_device_pinned, device_id::cpu(), device_id::cuda(0), {{1 << 20, 1e-4}}, 2.5e10, 1e-5});
  p.links.push_back({link_kind::device_to_host, device_id::cuda(0), device_id::cpu(), {}, 2.4e10, 0});
  p.links.push_back({link_kind::device_to_device_peer, device_id::cuda(0), device_id::cuda(1), {}, 5e10, 5e-6});
  p.absent.push_back({link_kind::host_to_device_pageable, "not measured here"});
  return p;
}

/// Expects profile_from_json to fail naming `field`.
void expect_rejected(const nlohmann::json& j, const std::string& field) {
  try {
    (void)profile_from_json(j);
    FAIL("accepted a profile with a bad ", field);
  } catch (const format_error& e) {
    CHECK(e.info().subject == field);
    CHECK(!e.info().problem.empty());
    CHECK(!e.info().fix.empty());
  }
}

}  // namespace

TEST_CASE("fit_link recovers latency and bandwidth of exact samples") {
  // t = 5 us + bytes / 10 GB/s, at three sizes.
  const double latency = 5e-6, bandwidth = 1e10;
  std::vector<link_sample> s;
  for (std::uint64_t b : {1ull << 20, 8ull << 20, 64ull << 20}) s.push_back({b, latency + static_cast<double>(b) / bandwidth});
  auto fit = fit_link(s);
  REQUIRE(fit);
  CHECK(fit->latency == doctest::Approx(latency).epsilon(1e-6));
  CHECK(fit->bandwidth == doctest::Approx(bandwidth).epsilon(1e-9));
}

TEST_CASE("fit_link clamps a negative intercept to 0 and refits through the origin") {
  // Two samples whose free line has a negative intercept: t = -1e-4 + bytes * 1e-9.
  std::vector<link_sample> s{{1'000'000, 0.0009}, {2'000'000, 0.0019}};
  auto fit = fit_link(s);
  REQUIRE(fit);
  CHECK(fit->latency == 0);
  // Least squares through the origin, by hand: slope = (1e6*9e-4 + 2e6*1.9e-3) / (1e12 + 4e12) = 9.4e-10.
  CHECK(fit->bandwidth == doctest::Approx(1.0 / 9.4e-10).epsilon(1e-12));
}

TEST_CASE("fit_link with one size is bytes over seconds; without usable samples it has no answer") {
  std::vector<link_sample> one{{4'000'000, 0.002}};
  auto fit = fit_link(one);
  REQUIRE(fit);
  CHECK(fit->latency == 0);
  CHECK(fit->bandwidth == doctest::Approx(2e9));
  CHECK(!fit_link(std::vector<link_sample>{}));
  CHECK(!fit_link(std::vector<link_sample>{{0, 1.0}}));
  CHECK(!fit_link(std::vector<link_sample>{{10, 0.0}}));
}

TEST_CASE("a decreasing time with size (noise) still gives a physical fit") {
  std::vector<link_sample> s{{1'000'000, 0.002}, {2'000'000, 0.001}};
  auto fit = fit_link(s);
  REQUIRE(fit);
  CHECK(fit->latency == 0);
  CHECK(fit->bandwidth > 0);
}

TEST_CASE("link seconds_for is latency + bytes / bandwidth") {
  link_profile l{link_kind::host_memcpy, device_id::cpu(), device_id::cpu(), {}, 2e9, 1e-5};
  CHECK(l.seconds_for(4'000'000) == doctest::Approx(1e-5 + 2e-3));
  CHECK(l.str() == "cpu -> cpu (host_memcpy)");
}

TEST_CASE("profile JSON round-trips and has the documented fields") {
  const auto p = sample_profile();
  const auto j = profile_to_json(p);
  CHECK(j["format"] == "distorch-profile");
  CHECK(j["version"] == 1);
  CHECK(j["links"][1]["kind"] == "host_to_device_pinned");
  CHECK(j["links"][1]["destination"] == "cuda:0");
  CHECK(j["absent"][0]["kind"] == "host_to_device_pageable");
  CHECK(profile_from_json(j) == p);
  CHECK(profile_from_json(nlohmann::json::parse(j.dump())) == p);
  const auto* l = p.find(link_kind::device_to_host, device_id::cuda(0), device_id::cpu());
  REQUIRE(l != nullptr);
  CHECK(l->bandwidth == 2.4e10);
  CHECK(p.find(link_kind::device_to_host, device_id::cuda(1), device_id::cpu()) == nullptr);
}

TEST_CASE("profile reader rejects a non-object, another format and another version") {
  expect_rejected(nlohmann::json::array(), "(root)");
  auto j = profile_to_json(sample_profile());
  j["format"] = "distorch-plan";
  expect_rejected(j, "format");
  j = profile_to_json(sample_profile());
  j["version"] = 2;
  expect_rejected(j, "version");
}

TEST_CASE("profile reader rejects missing and unknown fields") {
  auto j = profile_to_json(sample_profile());
  j["machine"].erase("cpu");
  expect_rejected(j, "machine.cpu");
  j = profile_to_json(sample_profile());
  j["links"][0].erase("latency");
  expect_rejected(j, "links[0].latency");
  j = profile_to_json(sample_profile());
  j["links"][2]["bandwith"] = 1.0;
  expect_rejected(j, "links[2].bandwith");
  j = profile_to_json(sample_profile());
  j["extra"] = true;
  expect_rejected(j, "extra");
}

TEST_CASE("profile reader rejects wrong types") {
  auto j = profile_to_json(sample_profile());
  j["links"] = "none";
  expect_rejected(j, "links");
  j = profile_to_json(sample_profile());
  j["links"][0]["bandwidth"] = "fast";
  expect_rejected(j, "links[0].bandwidth");
  j = profile_to_json(sample_profile());
  j["machine"]["devices"][0] = 3;
  expect_rejected(j, "machine.devices[0]");
  j = profile_to_json(sample_profile());
  j["repeats"] = -1;
  expect_rejected(j, "repeats");
  j = profile_to_json(sample_profile());
  j["machine"]["devices"][1]["total_bytes"] = 1.5;
  expect_rejected(j, "machine.devices[1].total_bytes");
}

TEST_CASE("profile reader rejects zero, negative and non-finite figures") {
  auto j = profile_to_json(sample_profile());
  j["links"][0]["bandwidth"] = 0;
  expect_rejected(j, "links[0].bandwidth");
  j = profile_to_json(sample_profile());
  j["links"][1]["latency"] = -1e-6;
  expect_rejected(j, "links[1].latency");
  j = profile_to_json(sample_profile());
  j["links"][0]["bandwidth"] = std::numeric_limits<double>::infinity();
  expect_rejected(j, "links[0].bandwidth");
  j = profile_to_json(sample_profile());
  j["links"][0]["samples"][1]["seconds"] = 0.0;
  expect_rejected(j, "links[0].samples[1].seconds");
  j = profile_to_json(sample_profile());
  j["links"][0]["samples"][0]["bytes"] = 0;
  expect_rejected(j, "links[0].samples[0].bytes");
}

TEST_CASE("profile reader rejects unknown kinds, bad devices and devices that do not suit the kind") {
  auto j = profile_to_json(sample_profile());
  j["links"][0]["kind"] = "carrier_pigeon";
  expect_rejected(j, "links[0].kind");
  j = profile_to_json(sample_profile());
  j["absent"][0]["kind"] = "teleport";
  expect_rejected(j, "absent[0].kind");
  j = profile_to_json(sample_profile());
  j["links"][1]["destination"] = "gpu:0";
  expect_rejected(j, "links[1].destination");
  j = profile_to_json(sample_profile());
  j["links"][1]["destination"] = "cpu";  // host_to_device must end at an accelerator
  expect_rejected(j, "links[1].destination");
  j = profile_to_json(sample_profile());
  j["links"][0]["source"] = "cuda:0";  // host_memcpy starts at cpu
  expect_rejected(j, "links[0].source");
  j = profile_to_json(sample_profile());
  j["links"][3]["destination"] = "cuda:0";  // device_to_device joins two devices
  expect_rejected(j, "links[3].destination");
}

TEST_CASE("profile reader rejects a link listed twice") {
  auto j = profile_to_json(sample_profile());
  j["links"].push_back(j["links"][1]);
  expect_rejected(j, "links[4]");
}

TEST_CASE("read_profile_file: missing file and invalid JSON are format errors; a written file reads back") {
  distorch_test::temp_dir dir("profile");
  CHECK_THROWS_AS(read_profile_file(dir / "missing.json"), format_error);
  const auto bad = dir.write("bad.json", "{\"format\": ");
  try {
    (void)read_profile_file(bad);
    FAIL("accepted invalid JSON");
  } catch (const format_error& e) {
    REQUIRE(e.info().position.has_value());
    CHECK(e.info().position->kind == "offset");
  }
  const auto p = sample_profile();
  write_profile_file(p, dir / "p.json");
  CHECK(read_profile_file(dir / "p.json") == p);
  CHECK_THROWS_AS(write_profile_file(p, dir / "no-such-folder/p.json"), device_error);
}

TEST_CASE("conservative profile covers every link of a topology and reads back") {
  const auto p = conservative_profile(parse_topology("cuda:0=24GiB,cuda:1=12GiB,sim:0=1GiB,cpu=64GiB"));
  CHECK(p.machine.origin == "built-in conservative default");
  CHECK(p.find(link_kind::host_memcpy, device_id::cpu(), device_id::cpu()) != nullptr);
  for (int g : {0, 1}) {
    CHECK(p.find(link_kind::host_to_device_pinned, device_id::cpu(), device_id::cuda(g)) != nullptr);
    CHECK(p.find(link_kind::host_to_device_pageable, device_id::cpu(), device_id::cuda(g)) != nullptr);
    CHECK(p.find(link_kind::device_to_host, device_id::cuda(g), device_id::cpu()) != nullptr);
    CHECK(p.find(link_kind::device_to_device, device_id::cuda(g), device_id::cuda(1 - g)) != nullptr);
  }
  // Simulated devices are host memory: no host->device link for them.
  CHECK(p.find(link_kind::host_to_device_pinned, device_id::cpu(), device_id::sim(0)) == nullptr);
  const auto* pinned = p.find(link_kind::host_to_device_pinned, device_id::cpu(), device_id::cuda(0));
  const auto* pageable = p.find(link_kind::host_to_device_pageable, device_id::cpu(), device_id::cuda(0));
  CHECK(pinned->bandwidth > pageable->bandwidth);
  CHECK(profile_from_json(profile_to_json(p)) == p);
}
