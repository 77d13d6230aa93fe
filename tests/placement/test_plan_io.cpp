// Tests for placement/plan_io.hpp (table, JSON round trip, malformed JSON) and
// placement/units_file.hpp (units lists, grouping, malformed files).
#include "distorch/placement/plan_io.hpp"
#include "distorch/placement/planner.hpp"
#include "distorch/placement/units_file.hpp"

#include <doctest/doctest.h>

#include "support/test_files.hpp"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace {

using distorch_test::temp_dir;

using distorch::device_id;
using nlohmann::json;
constexpr std::uint64_t GiB = 1ull << 30;
constexpr std::uint64_t MiB = 1ull << 20;

distorch::placement_plan sample_plan() {
  std::vector<distorch::unit> us{{"embed", {}, 10}};
  for (int i = 0; i < 8; ++i) us.push_back({"blocks." + std::to_string(i), {}, GiB});
  us.push_back({"head", {}, GiB / 2});
  const distorch::inventory model(us);
  const auto topo = distorch::parse_topology("cuda:0=24GiB,cuda:1=12GiB,cpu=64GiB");
  return distorch::make_plan(model, topo, device_id::cuda(0), "blocks\\.0$=cuda:1;cuda:0,2.5gb;cpu,*",
                             {.prefetch_depth = 1, .reserve = 512 * MiB});
}

void check_bad_plan(const json& j, const std::string& field, const std::string& part) {
  CAPTURE(j.dump());
  try {
    (void)distorch::plan_from_json(j);
    FAIL("expected format_error");
  } catch (const distorch::format_error& e) {
    CHECK(e.info().subject == field);
    CHECK_MESSAGE(e.info().problem.find(part) != std::string::npos, e.what());
  }
}

void check_bad_units(const std::string& text, const std::string& field, const std::string& part) {
  CAPTURE(text);
  try {
    (void)distorch::inventory_from_units_json(json::parse(text));
    FAIL("expected format_error");
  } catch (const distorch::format_error& e) {
    CHECK(e.info().subject == field);
    CHECK_MESSAGE(e.info().problem.find(part) != std::string::npos, e.what());
  }
}

}  // namespace

TEST_CASE("plan JSON round-trips exactly") {
  const auto plan = sample_plan();
  const json j = distorch::plan_to_json(plan);
  CHECK(distorch::plan_from_json(j) == plan);
  CHECK(distorch::plan_from_json(json::parse(j.dump())) == plan);  // through text too
  const json hooked = plan;  // nlohmann hooks
  CHECK(hooked == j);
  CHECK(hooked.get<distorch::placement_plan>() == plan);
}

TEST_CASE("plan JSON round-trips random plans, warnings included") {
  std::mt19937_64 rng(11);
  distorch::set_log_sink([](distorch::log_level, std::string_view) {});
  for (int i = 0; i < 200; ++i) {
    std::vector<distorch::unit> us;
    const std::size_t n = 1 + rng() % 50;
    for (std::size_t k = 0; k < n; ++k) us.push_back({"u" + std::to_string(k), {}, rng() % (2 * GiB)});
    const distorch::inventory model(us);
    const auto topo = distorch::parse_topology("cuda:0=64GiB,cuda:1=4GiB,cpu=64GiB");
    const std::string spec = "cuda:1," + std::to_string(rng() % 100) + "%;cpu," + std::to_string(1 + rng() % 100) + '%';
    const auto plan = distorch::make_plan(model, topo, device_id::cuda(0), spec, {.prefetch_depth = rng() % 3});
    CHECK(distorch::plan_from_json(json::parse(distorch::plan_to_json(plan).dump())) == plan);
  }
  distorch::set_log_sink({});
}

TEST_CASE("plan JSON holds per-unit name and device and per-device totals") {
  const auto plan = sample_plan();
  const json j = distorch::plan_to_json(plan);
  CHECK(j["format"] == "distorch-plan");
  CHECK(j["compute"] == "cuda:0");
  CHECK(j["model_bytes"] == plan.model_bytes);
  REQUIRE(j["units"].size() == 10);
  CHECK(j["units"][0] == json{{"name", "embed"}, {"device", "cuda:0"}, {"bytes", 10}, {"reason", "tiny"}});
  CHECK(j["units"][1]["device"] == "cuda:1");
  CHECK(j["units"][1]["reason"] == "override");
  CHECK(j["units"][9]["device"] == "cpu");
  REQUIRE(j["devices"].size() == 3);
  CHECK(j["devices"][0]["device"] == "cuda:0");
  CHECK(j["devices"][0]["reserve"] == 512 * MiB);
  CHECK(j["devices"][0]["window"] == 2 * GiB);
  std::uint64_t sum = 0;
  for (const auto& d : j["devices"]) sum += d["placed_bytes"].get<std::uint64_t>();
  CHECK(sum == plan.model_bytes);
}

TEST_CASE("plan table reads like DisTorch2's log") {
  const auto table = distorch::format_plan_table(sample_plan());
  CAPTURE(table);
  CHECK(table.find("distorch placement plan: 10 units, 8.50 GiB, compute cuda:0") != std::string::npos);
  CHECK(table.find("policy: blocks\\.0$=cuda:1;cuda:0,2.5gb;cpu,*") != std::string::npos);
  CHECK(table.find("Device              Units         Bytes  % Model         Quota      Capacity") != std::string::npos);
  // cuda:0: embed (tiny) + blocks.1 and blocks.2 (within its 2.5 GiB quota) = 2 GiB + 10 B
  CHECK(table.find("cuda:0                  3      2.00 GiB    23.5%      2.50 GiB     24.00 GiB") != std::string::npos);
  CHECK(table.find("  tiny (<0.01%)         1          10 B     0.0%\n") != std::string::npos);
  CHECK(table.find("remainder") == std::string::npos);
  CHECK(table.find("cpu                     6      5.50 GiB    64.7%      6.00 GiB     64.00 GiB") != std::string::npos);
  CHECK(table.find("cuda:1                  1      1.00 GiB    11.8%           0 B     12.00 GiB") != std::string::npos);
  CHECK(table.find("  override              1      1.00 GiB    11.8%") != std::string::npos);
  CHECK(table.find("cuda:0 keeps free: 2.00 GiB streaming window + 512.00 MiB activation reserve; needs 4.50 GiB of 24.00 GiB") !=
        std::string::npos);
}

TEST_CASE("plan table lists warnings") {
  auto plan = sample_plan();
  plan.warnings = {"something was clamped"};
  CHECK(distorch::format_plan_table(plan).find("warning: something was clamped\n") != std::string::npos);
}

TEST_CASE("malformed plan JSON names the field") {
  const json good = distorch::plan_to_json(sample_plan());
  check_bad_plan(json::array(), "(root)", "expected an object");
  auto j = good;
  j.erase("policy");
  check_bad_plan(j, "policy", "missing field");
  j = good;
  j["format"] = "other";
  check_bad_plan(j, "format", "not a distorch plan");
  j = good;
  j["version"] = 2;
  check_bad_plan(j, "version", "unsupported");
  j = good;
  j["compute"] = "gpu:0";
  check_bad_plan(j, "compute", "unknown device type");
  j = good;
  j["model_bytes"] = -1;
  check_bad_plan(j, "model_bytes", "negative");
  j = good;
  j["model_bytes"] = 1.5;
  check_bad_plan(j, "model_bytes", "non-negative integer");
  j = good;
  j["units"] = json::object();
  check_bad_plan(j, "units", "expected an array");
  j = good;
  j["units"][3] = 7;
  check_bad_plan(j, "units[3]", "expected an object");
  j = good;
  j["units"][3].erase("device");
  check_bad_plan(j, "units[3].device", "missing field");
  j = good;
  j["units"][2]["name"] = 5;
  check_bad_plan(j, "units[2].name", "expected a string");
  j = good;
  j["units"][1]["reason"] = "luck";
  check_bad_plan(j, "units[1].reason", "unknown reason");
  j = good;
  j["devices"][1]["quota"] = "lots";
  check_bad_plan(j, "devices[1].quota", "non-negative integer");
  j = good;
  j["warnings"] = json::array({1});
  check_bad_plan(j, "warnings[0]", "expected a string");
}

TEST_CASE("units lists build inventories, optionally grouped") {
  const auto model = distorch::inventory_from_units_json(
      json::parse(R"([{"name": "embed", "bytes": 1024}, {"name": "blocks.0.attn", "bytes": 4096},
                      {"name": "blocks.0.mlp", "bytes": 8192}, {"name": "blocks.1.attn", "bytes": 4096}])"));
  REQUIRE(model.size() == 4);
  CHECK(model[1].name == "blocks.0.attn");
  CHECK(model[1].bytes == 4096);
  CHECK(model.total_bytes() == 17408);
  const std::vector<distorch::grouping_rule> rules{{R"(blocks\.\d+)"}};
  const auto grouped = distorch::inventory_from_units_json(
      json::parse(R"([{"name": "embed", "bytes": 1024}, {"name": "blocks.0.attn", "bytes": 4096},
                      {"name": "blocks.0.mlp", "bytes": 8192}, {"name": "blocks.1.attn", "bytes": 4096}])"),
      rules);
  REQUIRE(grouped.size() == 3);
  CHECK(grouped[1].name == "blocks.0");
  CHECK(grouped[1].bytes == 12288);
  CHECK(grouped[2].name == "blocks.1");
  CHECK(distorch::inventory_from_units_json(json::array()).empty());
  // A rule that matches no unit name is a mistake, reported with the rule, not a plan of leaf units.
  const std::vector<distorch::grouping_rule> typo{{R"(blocks\d+)"}};
  CHECK_THROWS_WITH_AS(distorch::inventory_from_units_json(json::parse(R"([{"name": "blocks.0.attn", "bytes": 1}])"), typo),
                       doctest::Contains("grouping rule 'blocks\\d+' at rule 1: it matches no unit name"),
                       distorch::allocation_error);
}

TEST_CASE("malformed units lists name the field") {
  check_bad_units(R"({"name": "a", "bytes": 1})", "(root)", "expected an array");
  check_bad_units(R"([3])", "units[0]", "expected an object");
  check_bad_units(R"([{"bytes": 1}])", "units[0].name", "missing field");
  check_bad_units(R"([{"name": 1, "bytes": 1}])", "units[0].name", "expected a string");
  check_bad_units(R"([{"name": "a"}])", "units[0].bytes", "missing field");
  check_bad_units(R"([{"name": "a", "bytes": -1}])", "units[0].bytes", "negative");
  check_bad_units(R"([{"name": "a", "bytes": 1.5}])", "units[0].bytes", "non-negative integer");
  check_bad_units(R"([{"name": "a", "bytes": "1gb"}])", "units[0].bytes", "non-negative integer");
  check_bad_units(R"([{"name": "a", "bytes": 1}, {"name": "a", "bytes": 2}])", "units[1].name", "listed twice");
  check_bad_units(R"([{"name": "a", "bytes": 18446744073709551615}, {"name": "b", "bytes": 1}])", "units[1].bytes", "overflows");
}

TEST_CASE("units files: read, unreadable and invalid JSON") {
  const temp_dir dir{"placement"};
  const auto good = dir.write("units.json", R"([{"name": "a", "bytes": 10}, {"name": "b", "bytes": 20}])");
  CHECK(distorch::read_units_file(good).total_bytes() == 30);
  CHECK_THROWS_AS(distorch::read_units_file((dir.path / "missing.json").string()), distorch::format_error);
  const auto bad = dir.write("bad.json", "[{\"name\": \"a\", \"bytes\": 10},");
  try {
    (void)distorch::read_units_file(bad);
    FAIL("expected format_error");
  } catch (const distorch::format_error& e) {
    REQUIRE(e.info().position.has_value());
    CHECK(e.info().position->kind == "offset");
    CHECK(e.info().problem.find("invalid JSON") != std::string::npos);
  }
}
