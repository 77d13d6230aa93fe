// DistributedModule: bit-identical parity for every policy form, prefetch depths 0/1/2, three
// model shapes, with and without LoRA; transactions under injected failures; replan; re-merging
// only touched units; loading from weight files.
#include "models.hpp"

#include <unistd.h>

#include <filesystem>
#include <functional>
#include <algorithm>
#include <set>

#include "distorch/io/open.hpp"
#include "distorch/io/torch_tensor.hpp"
#include "distorch/runtime/distributed_module.hpp"

#include <doctest/doctest.h>

namespace {

using distorch::device_id;

// Models are made twice with the same seed: one to distribute, one as the reference.
template <class Make>
auto twin(Make make) {
  test_models::deterministic();
  auto a = make();
  test_models::deterministic();
  auto b = make();
  return std::make_pair(a, b);
}

// A LoRA on every other weight of dimension >= 2.
distorch::low_rank_set make_lora(torch::nn::Module& m, double strength = 0.7) {
  at::manual_seed(99);
  distorch::low_rank_adapter adapter{"test-lora", {}};
  int k = 0;
  for (const auto& p : m.named_parameters(true)) {
    const auto& w = p.value();
    if (w.dim() < 2 || p.key().find("weight") == std::string::npos || (k++ % 2) != 0) continue;
    const std::int64_t rank = 4;
    adapter.patches.emplace(p.key(), distorch::low_rank_pair{at::randn({w.size(0), rank}).mul(0.1),
                                                             at::randn({rank, w.numel() / w.size(0)}).mul(0.1), 2.0});
  }
  distorch::low_rank_set set;
  set.add(std::move(adapter), strength);
  return set;
}

void merge_into(torch::nn::Module& m, const distorch::low_rank_set& loras) {
  for (const auto& p : m.named_parameters(true)) {
    at::Tensor h = p.value();
    h.set_data(loras.patch(p.key(), h.detach().clone()));
  }
}

std::string gigabytes(std::uint64_t bytes) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.12f", static_cast<double>(bytes) / static_cast<double>(1ull << 30));
  return buffer;
}

// Every policy form, sized relative to the model so that all three devices get units.
std::vector<std::string> policy_forms(std::uint64_t model_bytes) {
  const auto b = [](std::uint64_t n) { return std::to_string(n) + "b"; };
  return {
      "sim:0," + b(model_bytes / 4) + ";sim:1," + b(model_bytes / 4) + ";cpu,*",  // bytes
      "sim:0,1%;sim:1,1%;cpu,2%",                                                 // ratio
      "sim:0,0.4;sim:1,0.5;cpu,0.5",                                               // fraction
      "sim:0;" + gigabytes(model_bytes / 2) + ";sim:1,cpu",                        // virtual VRAM
      "auto",                                                                     // auto
  };
}

template <class Module>
void check_parity(const char* shape_name, std::function<Module()> make, const at::Tensor& input) {
  auto probe = make();
  const auto probe_units = distorch::bind_units(*probe).units;
  const std::uint64_t model_bytes = probe_units.total_bytes();
  std::uint64_t largest_unit = 0;
  for (const auto& u : probe_units.units()) largest_unit = std::max(largest_unit, u.bytes);
  int streamed_forms = 0;
  for (const auto& policy : policy_forms(model_bytes)) {
    bool form_streamed = false;
    for (std::size_t depth : {0u, 1u, 2u}) {
      for (bool lora : {false, true}) {
        const std::string shape = shape_name;
        CAPTURE(shape);
        CAPTURE(policy);
        CAPTURE(depth);
        CAPTURE(lora);
        auto [model, reference] = twin(make);
        distorch::distribute_spec spec;
        spec.compute = device_id::sim(0);
        spec.streaming.prefetch_depth = depth;
        if (lora) {
          spec.adapters = make_lora(*model);
          merge_into(*reference, spec.adapters);
        }
        // auto fills the compute device first, so it gets a small one; the others leave room.
        const std::uint64_t auto_capacity = model_bytes * 6 / 10 + (depth + 1) * largest_unit;
        auto pool = test_models::sim_pool(policy == "auto" ? auto_capacity : 2 * model_bytes, model_bytes / 3);
        distorch::DistributedModule dm(model, pool, distorch::policy_from_string(policy), spec);
        const at::Tensor expected = reference->forward(input);
        for (int pass = 0; pass < 2; ++pass) CHECK(test_models::bit_identical(dm.forward(input), expected));
        bool any_streamed = false;
        for (const auto& u : dm.plan().units) any_streamed = any_streamed || u.device != device_id::sim(0);
        // Whatever the planner decided, every streamed unit was fetched while the model ran.
        CHECK((dm.stats().fetches > 0) == any_streamed);
        form_streamed = form_streamed || any_streamed;
        CHECK(pool.peak(device_id::sim(0)) <= pool.capacity(device_id::sim(0)));
      }
    }
    streamed_forms += form_streamed ? 1 : 0;
  }
  CHECK(streamed_forms >= 3);  // most forms really spread this model
}

}  // namespace

TEST_CASE("parity: MLP stack, bit for bit, every policy form, depths 0/1/2, with and without LoRA") {
  check_parity<torch::nn::Sequential>("mlp", [] { return test_models::mlp_stack(32, 6); }, (test_models::deterministic(), at::randn({5, 32})));
}

TEST_CASE("parity: transformer with attention, bit for bit, every policy form, depths 0/1/2, with and without LoRA") {
  check_parity<distorch::demo::tiny_transformer>("transformer", [] { return test_models::transformer(); },
                                                 (test_models::deterministic(), at::randn({2, 5, 16})));
}

TEST_CASE("parity: conv net, bit for bit, every policy form, depths 0/1/2, with and without LoRA") {
  check_parity<torch::nn::Sequential>("conv", [] { return test_models::conv_net(); },
                                      (test_models::deterministic(), at::randn({2, 3, 8, 8})));
}

TEST_CASE("load is transactional: a failure at any allocation of any unit leaves the model intact and nothing booked") {
  auto [model, reference] = twin([] { return test_models::transformer(); });
  const std::uint64_t before = test_models::checksum(*model);
  std::vector<const void*> pointers;
  for (const auto& p : model->named_parameters(true)) pointers.push_back(p.value().data_ptr());
  const std::uint64_t model_bytes = distorch::bind_units(*model).units.total_bytes();

  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.adapters = make_lora(*model);
  const std::string policy = "sim:0," + std::to_string(model_bytes / 3) + "b;sim:1," + std::to_string(model_bytes / 3) + "b;cpu,*";

  // Count the allocations of a successful load first.
  std::size_t total = 0;
  {
    auto pool = test_models::sim_pool(model_bytes, model_bytes);
    pool.set_probe([&](const device_id&, std::uint64_t, std::string_view) { ++total; });
    auto [m, r] = twin([] { return test_models::transformer(); });
    distorch::DistributedModule dm(m, pool, distorch::policy_from_string(policy), spec);
  }
  const std::size_t units = distorch::bind_units(*model).units.size();
  REQUIRE(total >= units);

  std::set<std::string> failed_units;
  for (std::size_t k = 0; k < total; ++k) {
    CAPTURE(k);
    auto pool = test_models::sim_pool(model_bytes, model_bytes);
    std::size_t n = 0;
    pool.set_probe([&](const device_id& d, std::uint64_t, std::string_view doing) {
      if (n++ == k) {
        failed_units.insert(std::string(doing));
        throw distorch::device_error({std::string(doing), d.str(), std::nullopt, "injected failure", "none: this is a test"});
      }
    });
    CHECK_THROWS_AS(distorch::DistributedModule(model, pool, distorch::policy_from_string(policy), spec), distorch::device_error);
    CHECK(test_models::checksum(*model) == before);
    std::size_t i = 0;
    for (const auto& p : model->named_parameters(true)) CHECK(p.value().data_ptr() == pointers[i++]);
    for (const auto& d : pool.devices()) CHECK(d.budget->used() == 0);
  }
  // Every unit had a failure injected into its load.
  const auto bound = distorch::bind_units(*model);
  for (const auto& u : bound.units.units()) {
    CAPTURE(u.name);
    CHECK(std::any_of(failed_units.begin(), failed_units.end(),
                      [&](const std::string& doing) { return doing.find("'" + u.name + "'") != std::string::npos; }));
  }

  // A bad adapter in the middle of the model: lora_error, model intact.
  distorch::low_rank_adapter bad{"bad", {}};
  bad.patches.emplace("blocks.1.fc1.weight", distorch::low_rank_pair{at::randn({3, 2}), at::randn({2, 5}), 1.0});
  spec.adapters = {};
  spec.adapters.add(std::move(bad));
  auto pool = test_models::sim_pool(model_bytes, model_bytes);
  CHECK_THROWS_AS(distorch::DistributedModule(model, pool, distorch::policy_from_string(policy), spec), distorch::lora_error);
  CHECK(test_models::checksum(*model) == before);
  for (const auto& d : pool.devices()) CHECK(d.budget->used() == 0);

  // And the model still loads and matches afterwards.
  spec.adapters = {};
  distorch::DistributedModule dm(model, pool, distorch::policy_from_string(policy), spec);
  const at::Tensor x = at::randn({1, 3, 16});
  CHECK(test_models::bit_identical(dm.forward(x), reference->forward(x)));
}

TEST_CASE("replan moves units without reloading, keeps parity, and rolls back on failure") {
  auto [model, reference] = twin([] { return test_models::mlp_stack(32, 6); });
  const std::uint64_t model_bytes = distorch::bind_units(*model).units.total_bytes();
  auto pool = test_models::sim_pool(model_bytes, model_bytes);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0," + std::to_string(model_bytes / 2) + "b;cpu,*"), spec);
  const at::Tensor x = at::randn({4, 32});
  const at::Tensor expected = reference->forward(x);
  CHECK(test_models::bit_identical(dm.forward(x), expected));
  const auto first = dm.plan();

  dm.replan(distorch::policy_from_string("sim:0," + std::to_string(model_bytes / 4) + "b;sim:1,*"));
  CHECK(dm.plan() != first);
  CHECK(test_models::bit_identical(dm.forward(x), expected));
  std::uint64_t on_sim1 = 0, on_cpu = 0;
  for (const auto& u : dm.plan().units) {
    if (u.device == device_id::sim(1)) on_sim1 += u.bytes;
    if (u.device == device_id::cpu()) on_cpu += u.bytes;
  }
  CHECK(on_sim1 > 0);
  CHECK(on_cpu == 0);
  CHECK(pool.used(device_id::sim(1)) == on_sim1);
  CHECK(pool.used(device_id::cpu()) == 0);

  // A failure half way through a replan: no unit moved, nothing leaked, still correct.
  const auto before_plan = dm.plan();
  const auto used0 = pool.used(device_id::sim(0)), used1 = pool.used(device_id::sim(1));
  std::size_t n = 0;
  pool.set_probe([&](const device_id& d, std::uint64_t, std::string_view doing) {
    if (n++ == 2) throw distorch::device_error({std::string(doing), d.str(), std::nullopt, "injected", "none"});
  });
  CHECK_THROWS_AS(dm.replan(distorch::policy_from_string("sim:0,1%;cpu,3%")), distorch::device_error);
  pool.set_probe({});
  CHECK(dm.plan() == before_plan);
  CHECK(pool.used(device_id::sim(0)) == used0);
  CHECK(pool.used(device_id::sim(1)) == used1);
  CHECK(pool.used(device_id::cpu()) == 0);
  CHECK(test_models::bit_identical(dm.forward(x), expected));
}

TEST_CASE("set_strengths and set_adapters re-merge only the units the adapters touch") {
  auto [model, reference] = twin([] { return test_models::mlp_stack(32, 6); });
  const std::uint64_t model_bytes = distorch::bind_units(*model).units.total_bytes();
  auto pool = test_models::sim_pool(model_bytes, model_bytes);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.adapters = make_lora(*model, 0.5);
  distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0," + std::to_string(model_bytes / 2) + "b;sim:1,*"), spec);
  const at::Tensor x = at::randn({4, 32});

  dm.set_strengths({{"test-lora", 1.25}});
  std::vector<std::size_t> touched;
  for (std::size_t i = 0; i < dm.units().size(); ++i)
    for (const auto& t : dm.units()[i].tensors)
      if (spec.adapters.touches(t.name)) touched.push_back(i);
  CHECK(dm.last_remerged() == touched);
  CHECK(touched.size() < dm.units().size());
  auto merged = make_lora(*reference, 1.25);
  test_models::deterministic();
  auto [unused, fresh] = twin([] { return test_models::mlp_stack(32, 6); });
  merge_into(*fresh, merged);
  CHECK(test_models::bit_identical(dm.forward(x), fresh->forward(x)));

  // Removing every adapter restores the unpatched weights bit for bit.
  dm.set_adapters({});
  CHECK(dm.last_remerged() == touched);
  auto [unused2, plain] = twin([] { return test_models::mlp_stack(32, 6); });
  CHECK(test_models::bit_identical(dm.forward(x), plain->forward(x)));
}

TEST_CASE("weights load from safetensors files unit by unit; a missing tensor fails before anything moves") {
  auto [generated, reference] = twin([] { return test_models::transformer(); });
  const auto dir = std::filesystem::temp_directory_path() / ("distorch-runtime-test-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "model.safetensors").string();
  distorch::save_safetensors(path, distorch::demo::named_tensors(*generated));
  std::shared_ptr<const distorch::weight_source> source = distorch::open_weights(path);

  at::manual_seed(5);
  auto model = test_models::transformer();  // different values: they must come from the file
  const std::uint64_t model_bytes = distorch::bind_units(*model).units.total_bytes();
  auto pool = test_models::sim_pool(model_bytes, model_bytes);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.weights = {source};
  spec.streaming.prefetch_depth = 2;
  {
    distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0,30%;sim:1,30%;cpu,40%"), spec);
    const at::Tensor x = at::randn({2, 4, 16});
    CHECK(test_models::bit_identical(dm.forward(x), reference->forward(x)));
    // Peak on the compute device: its resident units + at most one unit in flight (+ the window).
    std::uint64_t resident = 0, largest = 0;
    for (const auto& u : dm.plan().units) {
      if (u.device == device_id::sim(0)) resident += u.bytes;
      largest = std::max(largest, u.bytes);
    }
    CHECK(pool.peak(device_id::sim(0)) <= resident + 3 * largest);
    CHECK(pool.peak(device_id::sim(0)) < model_bytes);
  }

  // A file that lacks a tensor: format_error naming it, model untouched.
  auto tensors = distorch::demo::named_tensors(*generated);
  tensors.erase(tensors.begin() + 3);
  const std::string missing_name = distorch::demo::named_tensors(*generated)[3].first;
  const std::string partial = (dir / "partial.safetensors").string();
  distorch::save_safetensors(partial, tensors);
  at::manual_seed(6);
  auto other = test_models::transformer();
  const auto before = test_models::checksum(*other);
  spec.weights = {distorch::open_weights(partial)};
  try {
    distorch::DistributedModule dm(other, pool, distorch::policy_from_string("sim:0,30%;cpu,70%"), spec);
    FAIL("expected format_error");
  } catch (const distorch::format_error& e) {
    CHECK(e.info().subject == missing_name);
  }
  CHECK(test_models::checksum(*other) == before);
  for (const auto& d : pool.devices()) CHECK(d.budget->used() == 0);
  std::filesystem::remove_all(dir);
}
