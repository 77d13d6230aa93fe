// The retention registry: unload_all unloads exactly the models not kept, is a strict no-op when
// there is nothing to unload, free checks retention, and snapshots print as one series. A
// property test runs thousands of random add/keep/unload/free sequences.
#include "models.hpp"

#include <map>
#include <random>

#include "distorch/runtime/distributed_module.hpp"
#include "distorch/runtime/registry.hpp"

#include <doctest/doctest.h>

namespace {

using distorch::device_id;
using small_model = distorch::DistributedModule<torch::nn::Sequential>;

std::shared_ptr<small_model> make_small(const distorch::device_pool& pool, int seed) {
  at::manual_seed(static_cast<std::uint64_t>(seed));
  torch::nn::Sequential seq(distorch::nn::Linear(4, 4), torch::nn::ReLU(), distorch::nn::Linear(4, 4));
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.planning.tiny_ppm = 0;
  // First layer on the compute device, second on the donor.
  return std::make_shared<small_model>(seq, pool, distorch::policy_from_string("sim:0,80b;sim:1,*"), spec);
}

std::map<device_id, std::uint64_t> usage(const distorch::device_pool& pool) {
  std::map<device_id, std::uint64_t> out;
  for (const auto& d : pool.devices()) out[d.id] = d.budget->used();
  return out;
}

}  // namespace

TEST_CASE("free unloads exactly the models not kept and checks the kept ones") {
  test_models::deterministic();
  auto pool = test_models::sim_pool(1 << 20, 1 << 20);
  distorch::model_registry registry(pool);
  auto a = make_small(pool, 1);
  auto b = make_small(pool, 2);
  registry.add("a", a);
  registry.add("b", b, /*keep_loaded=*/true);
  CHECK_THROWS_AS(registry.add("a", a), distorch::placement_error);
  const auto b_before = b->fingerprint();
  registry.snapshot("loaded");
  const at::Tensor x = at::randn({2, 4});
  const at::Tensor ya = a->forward(x);

  auto report = registry.free();
  CHECK((report.unloaded == std::vector<std::string>{"a"}));
  CHECK(!a->loaded());
  CHECK(b->loaded());
  CHECK((b->fingerprint() == b_before));
  registry.snapshot("after free");
  // a's bytes left the simulated devices; b's stayed.
  const auto& s = registry.memory().snapshots();
  REQUIRE(s.size() == 2);
  CHECK(s[1].devices[0].used < s[0].devices[0].used);
  const std::string table = registry.memory().table();
  CHECK(table.find("after free") != std::string::npos);
  CHECK(table.find("sim:1") != std::string::npos);

  // An unloaded model reloads on use and computes the same.
  CHECK(test_models::bit_identical(a->forward(x), ya));
  CHECK(a->loaded());
}

TEST_CASE("unload_all with nothing to unload is a strict no-op") {
  test_models::deterministic();
  auto pool = test_models::sim_pool(1 << 20, 1 << 20);
  distorch::model_registry registry(pool);
  auto a = make_small(pool, 1);
  auto b = make_small(pool, 2);
  registry.add("a", a, true);
  registry.add("b", b, true);
  const auto fa = a->fingerprint(), fb = b->fingerprint();
  const auto used = usage(pool);
  std::size_t allocations = 0;
  pool.set_probe([&](const device_id&, std::uint64_t, std::string_view) { ++allocations; });
  CHECK(registry.unload_all().empty());
  CHECK(registry.free().unloaded.empty());
  CHECK(allocations == 0);
  CHECK((usage(pool) == used));
  CHECK((a->fingerprint() == fa));
  CHECK((b->fingerprint() == fb));
  pool.set_probe({});
}

TEST_CASE("the retention check names a kept model whose tensor moved or was lost") {
  test_models::deterministic();
  auto pool = test_models::sim_pool(1 << 20, 1 << 20);
  distorch::model_registry registry(pool);
  auto kept = make_small(pool, 3);
  registry.add("kept", kept, true);
  const auto before = registry.snapshot_kept();
  kept->replan(distorch::policy_from_string("sim:0,1mb"));  // moves its donor unit: a retention bug
  try {
    registry.verify(before);
    FAIL("expected retention_error");
  } catch (const distorch::retention_error& e) {
    CHECK(e.info().doing.find("'kept'") != std::string::npos);
    CHECK(e.info().problem.find("moved") != std::string::npos);
  }
}

TEST_CASE("property: random add/keep/unload/free sequences never touch a kept model") {
  test_models::deterministic();
  std::mt19937 rng(20261122);
  int frees = 0, noop_frees = 0;
  for (int sequence = 0; sequence < 2000; ++sequence) {
    auto pool = test_models::sim_pool(1 << 20, 1 << 20);
    distorch::model_registry registry(pool);
    std::vector<std::pair<std::string, std::shared_ptr<small_model>>> models;
    const int steps = 4 + static_cast<int>(rng() % 6);
    for (int step = 0; step < steps; ++step) {
      const unsigned op = models.empty() ? 0 : rng() % 5;
      if (op == 0 && models.size() < 4) {  // add
        const std::string name = "m" + std::to_string(step);
        auto m = make_small(pool, step);
        registry.add(name, m, rng() % 2 == 0);
        models.emplace_back(name, m);
      } else if (op == 1) {  // flip a keep flag
        const auto& name = models[rng() % models.size()].first;
        registry.keep_loaded(name, !registry.is_kept(name));
      } else {  // unload_all or free
        std::map<std::string, distorch::tensor_fingerprint> kept_before;
        std::size_t to_unload = 0;
        for (const auto& [name, m] : models) {
          if (registry.is_kept(name)) kept_before[name] = m->fingerprint();
          else if (m->loaded()) ++to_unload;
        }
        const auto used = usage(pool);
        std::vector<std::string> unloaded;
        if (op == 2) {
          unloaded = registry.unload_all();
        } else {
          ++frees;
          CHECK_NOTHROW(unloaded = registry.free().unloaded);
        }
        CHECK(unloaded.size() == to_unload);
        if (to_unload == 0) {
          CHECK((usage(pool) == used));
          if (op != 2) ++noop_frees;
        }
        for (const auto& [name, m] : models) {
          if (registry.is_kept(name)) {
            CHECK((m->fingerprint() == kept_before[name]));
          } else {
            CHECK(!m->loaded());
          }
        }
      }
    }
  }
  CHECK(frees > 500);
  CHECK(noop_frees > 50);
}
