// profile/suggest.hpp against the planner: the suggestion must be the plan with the most bytes
// kept on the compute device among all bytes-mode quotas that plan without error, found here by
// planning every candidate quota.
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "distorch/placement/grammar.hpp"
#include "distorch/placement/planner.hpp"
#include "distorch/profile/suggest.hpp"

using namespace distorch;

namespace {

inventory model_of(const std::vector<std::uint64_t>& sizes, const std::vector<std::string>& names = {}) {
  std::vector<unit> units;
  for (std::size_t i = 0; i < sizes.size(); ++i) units.push_back({i < names.size() ? names[i] : "blocks." + std::to_string(i), {}, sizes[i]});
  return inventory(std::move(units));
}

/// Brute force: plan "compute,Qb;cpu,*" for every Q from 0 to the model size in steps that hit
/// every prefix boundary, and keep the largest compute placement that plans.
std::optional<std::uint64_t> best_resident(const inventory& model, const topology& topo, device_id compute, const planner_options& options) {
  std::optional<std::uint64_t> best;
  std::vector<std::uint64_t> candidates{0};
  std::uint64_t sum = 0;
  for (const auto& u : model.units()) candidates.push_back(sum += u.bytes);
  for (auto q : candidates) {
    try {
      const auto plan = make_plan(model, topo, compute, compute.str() + "," + std::to_string(q) + "b;cpu,*", options);
      const auto placed = plan.allotment(compute)->placed_bytes;
      if (!best || placed > *best) best = placed;
    } catch (const placement_error&) {
    }
  }
  return best;
}

}  // namespace

TEST_CASE("suggest keeps the longest head that fits with window and reserve") {
  // 10 units of 100 MiB; cuda:0 has 600 MiB; depth 0 window 100 MiB (the unit that runs); reserve 50 MiB:
  // 4 resident (400) + 100 + 50 = 550 fits, 5 resident = 650 does not.
  const auto model = model_of(std::vector<std::uint64_t>(10, 100ull << 20));
  const auto topo = parse_topology("cuda:0=600MiB,cpu=16GiB");
  const planner_options options{.prefetch_depth = 0, .reserve = 50ull << 20};
  const auto s = suggest_allocation(model, topo, device_id::cuda(0), options);
  CHECK(s.allocation == "cuda:0,400mb;cpu,*");
  CHECK(s.donor == device_id::cpu());
  CHECK(s.offloaded_bytes == 600ull << 20);
  CHECK(s.needed_bytes == 550ull << 20);
  CHECK(s.plan.allotment(device_id::cuda(0))->units == 4);
  // The string is valid grammar, bytes mode, and plans to the same plan.
  const auto spec = parse_allocation(s.allocation);
  CHECK(spec.mode == allocation_mode::bytes);
  CHECK(make_plan(model, topo, device_id::cuda(0), s.allocation, options) == s.plan);
  CHECK(best_resident(model, topo, device_id::cuda(0), options) == 400ull << 20);
}

TEST_CASE("suggest with everything fitting offloads nothing") {
  const auto model = model_of({1000, 2000, 3000});
  const auto topo = parse_topology("cuda:0=1MiB,cpu=1GiB");
  const auto s = suggest_allocation(model, topo, device_id::cuda(0), {.prefetch_depth = 1});
  CHECK(s.offloaded_bytes == 0);
  CHECK(s.plan.allotment(device_id::cuda(0))->placed_bytes == 6000);
  CHECK(parse_allocation(s.allocation).entries[0].bytes >= 6000);
}

TEST_CASE("suggest fails with the reason when even a full offload does not fit") {
  const auto model = model_of({100ull << 20, 100ull << 20});
  const auto topo = parse_topology("cuda:0=150MiB,cpu=1GiB");
  try {
    (void)suggest_allocation(model, topo, device_id::cuda(0), {.prefetch_depth = 1});
    FAIL("suggested an allocation that cannot fit");
  } catch (const placement_error& e) {
    CHECK(e.info().subject == "cuda:0");
    CHECK(!e.info().fix.empty());
  }
  CHECK_THROWS_AS(suggest_allocation(model, parse_topology("cuda:0=1GiB"), device_id::cuda(0)), placement_error);
  CHECK_THROWS_AS(suggest_allocation(model, topo, device_id::cuda(3)), placement_error);
}

TEST_CASE("suggest fails when the donor cannot take the offload") {
  const auto model = model_of(std::vector<std::uint64_t>(4, 100ull << 20));
  const auto topo = parse_topology("cuda:0=250MiB,cpu=150MiB");
  CHECK_THROWS_AS(suggest_allocation(model, topo, device_id::cuda(0), {.prefetch_depth = 0}), placement_error);
}

TEST_CASE("suggest honours head rules and tiny units as the planner does") {
  const auto model = model_of({4096, 50ull << 20, 50ull << 20, 50ull << 20, 10}, {"embed", "blocks.0", "blocks.1", "blocks.2", "norm"});
  const auto topo = parse_topology("cuda:0=130MiB,cpu=1GiB");
  planner_options options{.head_rules = {"embed"}, .prefetch_depth = 0};
  const auto s = suggest_allocation(model, topo, device_id::cuda(0), options);
  CHECK(s.plan.home_of("embed") == device_id::cuda(0));
  CHECK(s.plan.home_of("norm") == device_id::cuda(0));  // tiny
  CHECK(s.plan.home_of("blocks.0") == device_id::cuda(0));
  CHECK(s.plan.home_of("blocks.2") == device_id::cpu());
  CHECK(best_resident(model, topo, device_id::cuda(0), options) == s.plan.allotment(device_id::cuda(0))->placed_bytes);
}

TEST_CASE("random models: the suggestion is the best plan the planner can make") {
  std::mt19937_64 rng(6);
  for (int trial = 0; trial < 150; ++trial) {
    const std::size_t n = 1 + rng() % 12;
    std::vector<std::uint64_t> sizes(n);
    for (auto& s : sizes) s = (1 + rng() % 64) << 20;
    const auto model = model_of(sizes);
    const std::uint64_t gpu_bytes = (16 + rng() % 512) << 20;
    const auto topo = parse_topology("cuda:0=" + std::to_string(gpu_bytes) + "b,cpu=64GiB");
    const planner_options options{.tiny_ppm = 0, .prefetch_depth = rng() % 4, .reserve = (rng() % 32) << 20};
    const auto best = best_resident(model, topo, device_id::cuda(0), options);
    INFO("trial " << trial);
    if (!best) {
      CHECK_THROWS_AS(suggest_allocation(model, topo, device_id::cuda(0), options), placement_error);
      continue;
    }
    const auto s = suggest_allocation(model, topo, device_id::cuda(0), options);
    CHECK(s.plan.allotment(device_id::cuda(0))->placed_bytes == *best);
    CHECK(make_plan(model, topo, device_id::cuda(0), s.allocation, options) == s.plan);
  }
}
