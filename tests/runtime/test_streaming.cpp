// Streaming: nn::Streamed keeps forward signatures, donor-homed units are resident exactly while
// they run, the learned order drives prefetch, no simulated device exceeds its capacity, and
// views::streamed stages blocks of a custom loop.
#include "models.hpp"

#include <torch/nn/modules/container/any.h>

#include "distorch/placement/planner.hpp"
#include "distorch/runtime/distributed_module.hpp"
#include "distorch/runtime/streamed_view.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <set>
#include <sstream>
#include <type_traits>

using distorch::device_id;

TEST_CASE("Streamed<Impl>::forward has exactly Impl::forward's parameter and result types") {
  using S = distorch::nn::Streamed<torch::nn::LinearImpl>;
  static_assert(std::is_same_v<decltype(&S::forward), at::Tensor (S::*)(const at::Tensor&)>);
  using C = distorch::nn::Streamed<torch::nn::ConvTranspose2dImpl>;
  static_assert(std::is_same_v<decltype(&C::forward),
                               at::Tensor (C::*)(const at::Tensor&, const c10::optional<at::IntArrayRef>&)>);
  using L = distorch::nn::Streamed<torch::nn::LSTMImpl>;
  static_assert(std::is_base_of_v<torch::nn::LSTMImpl, L>);
  // Every alias names a streamed implementation of its LibTorch layer.
  static_assert(std::is_base_of_v<torch::nn::MultiheadAttentionImpl, distorch::nn::MultiheadAttention::ContainedType>);
  static_assert(std::is_base_of_v<torch::nn::BatchNorm3dImpl, distorch::nn::BatchNorm3d::ContainedType>);
  static_assert(std::is_base_of_v<torch::nn::EmbeddingBagImpl, distorch::nn::EmbeddingBag::ContainedType>);
  static_assert(std::is_base_of_v<torch::nn::TransformerImpl, distorch::nn::Transformer::ContainedType>);
  static_assert(std::is_base_of_v<torch::nn::GRUCellImpl, distorch::nn::GRUCell::ContainedType>);
  // The norm layers link and print as LibTorch prints them.
  distorch::nn::BatchNorm1d bn(4);
  distorch::nn::InstanceNorm2d in(torch::nn::InstanceNorm2dOptions(3));
  std::ostringstream text;
  text << *bn << ' ' << *in;
  CHECK(text.str() == "torch::nn::BatchNorm1d(4, eps=1e-05, momentum=0.1, affine=true, track_running_stats=true) "
                      "torch::nn::InstanceNorm2d(3, eps=1e-05, momentum=0.1, affine=false, track_running_stats=false)");
}

TEST_CASE("unattached streamed layers compute what the LibTorch layers compute, also inside Sequential and AnyModule") {
  test_models::deterministic();
  distorch::nn::Linear streamed(8, 4);
  torch::nn::Linear plain(8, 4);
  plain->weight.set_data(streamed->weight.detach().clone());
  plain->bias.set_data(streamed->bias.detach().clone());
  const at::Tensor x = at::randn({3, 8});
  CHECK(test_models::bit_identical(streamed(x), plain(x)));

  torch::nn::Sequential seq(streamed, torch::nn::ReLU());
  CHECK(test_models::bit_identical(seq->forward(x), plain(x).relu()));

  // MultiheadAttention: AnyModule fills its default arguments through the inherited declaration.
  distorch::nn::MultiheadAttention mha(torch::nn::MultiheadAttentionOptions(8, 2));
  torch::nn::AnyModule any(mha);
  const at::Tensor q = at::randn({5, 1, 8});
  auto [out, weights] = any.forward<std::tuple<at::Tensor, at::Tensor>>(q, q, q);
  auto [direct, direct_weights] = mha->forward(q, q, q, {}, true, {}, true);
  CHECK(test_models::bit_identical(out, direct));
  CHECK(test_models::bit_identical(weights, direct_weights));
}

namespace {

// A Linear that calls back at the start of its forward, to look at residency from the inside.
struct probe_linear_impl : torch::nn::LinearImpl {
  using torch::nn::LinearImpl::LinearImpl;
  std::function<void()> on_forward;
  at::Tensor forward(const at::Tensor& x) {
    if (on_forward) on_forward();
    return torch::nn::LinearImpl::forward(x);
  }
};
using probe_linear = torch::nn::ModuleHolder<distorch::nn::Streamed<probe_linear_impl>>;

struct probe_model_impl : torch::nn::Module {
  std::vector<probe_linear> layers;
  explicit probe_model_impl(int n) {
    for (int i = 0; i < n; ++i) layers.push_back(register_module("l" + std::to_string(i), probe_linear(16, 16)));
  }
  at::Tensor forward(at::Tensor x) {
    for (auto& l : layers) x = l(x).tanh();
    return x;
  }
};
TORCH_MODULE_IMPL(probe_model, probe_model_impl);

// Plan: every other unit on the donor sim:1, the rest on the compute device sim:0.
distorch::placement_plan alternate_plan(const distorch::inventory& inv) {
  distorch::placement_plan plan;
  plan.compute = device_id::sim(0);
  plan.policy = "alternate (test)";
  for (std::size_t i = 0; i < inv.size(); ++i)
    plan.units.push_back({inv[i].name, i % 2 == 1 ? device_id::sim(1) : device_id::sim(0), inv[i].bytes,
                          distorch::placement_reason::policy});
  return plan;
}

}  // namespace

TEST_CASE("a donor-homed unit is resident exactly while it runs, and fetch and release show in the accounting") {
  for (std::size_t depth : {0u, 1u, 2u}) {
    CAPTURE(depth);
    test_models::deterministic();
    probe_model model(6);
    probe_model reference(6);
    for (std::size_t i = 0; i < model->layers.size(); ++i) {
      reference->layers[i]->weight.set_data(model->layers[i]->weight.detach().clone());
      reference->layers[i]->bias.set_data(model->layers[i]->bias.detach().clone());
    }
    auto pool = test_models::sim_pool(1 << 20);
    distorch::distribute_spec spec;
    spec.compute = device_id::sim(0);
    spec.streaming.prefetch_depth = depth;
    const auto inv = distorch::bind_units(*model).units;
    distorch::DistributedModule<probe_model> dm(model, pool, alternate_plan(inv), spec);
    auto& manager = dm.residency();

    std::uint64_t resident_bytes = 0;
    for (std::size_t i = 0; i < inv.size(); ++i)
      if (!manager.streams(i)) resident_bytes += inv[i].bytes;
    CHECK(pool.used(device_id::sim(0)) == resident_bytes);

    int checked = 0;
    for (std::size_t i = 0; i < model->layers.size(); ++i) {
      auto* layer = model->layers[i].get();
      const std::size_t unit = dm.units_of(*layer).at(0);
      const void* home_ptr = manager.unit(unit).home_data.at(0).data.data_ptr();
      layer->on_forward = [&, unit, layer, home_ptr] {
        for (std::size_t u = 0; u < manager.size(); ++u) {
          if (!manager.streams(u)) continue;
          CHECK(manager.resident(u) == (u == unit));  // exactly the running unit is staged
        }
        if (manager.streams(unit)) {
          CHECK(layer->weight.data_ptr() != home_ptr);  // a separate copy on sim:0
          CHECK(layer->weight.device().is_cpu());
        }
        std::uint64_t fetched = 0;
        for (std::size_t u = 0; u < manager.size(); ++u)
          if (manager.streams(u) && manager.fetched(u)) fetched += inv[u].bytes;
        CHECK(pool.used(device_id::sim(0)) == resident_bytes + fetched);
        ++checked;
      };
    }
    const at::Tensor x = at::randn({4, 16});
    for (int pass = 0; pass < 2; ++pass) {
      const at::Tensor y = dm.forward(x);
      CHECK(test_models::bit_identical(y, reference->forward(x)));
      for (std::size_t u = 0; u < manager.size(); ++u) CHECK(!manager.resident(u) == manager.streams(u));
      CHECK(pool.used(device_id::sim(0)) == resident_bytes);  // everything fetched was released
    }
    CHECK(checked == 12);
    CHECK(pool.peak(device_id::sim(0)) <= pool.capacity(device_id::sim(0)));
    for (auto& l : model->layers) l->on_forward = nullptr;
  }
}

TEST_CASE("the execution order is learned on the first forward and drives prefetch on the second") {
  test_models::deterministic();
  probe_model model(8);
  auto pool = test_models::sim_pool(1 << 20);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.streaming.prefetch_depth = 1;
  const auto inv = distorch::bind_units(*model).units;
  distorch::DistributedModule<probe_model> dm(model, pool, alternate_plan(inv), spec);
  std::vector<distorch::residency_event> events;
  dm.residency().set_trace([&](distorch::residency_event e) { events.push_back(e); });

  std::size_t streamed_units = 0;
  for (std::size_t i = 0; i < inv.size(); ++i) streamed_units += dm.residency().streams(i) ? 1 : 0;
  REQUIRE(streamed_units == 4);

  const at::Tensor x = at::randn({2, 16});
  dm.forward(x);
  auto first = dm.stats();
  CHECK(first.prefetch_hits == 0);
  CHECK(first.prefetch_misses == streamed_units);
  auto order = dm.residency().learned_order();
  std::vector<std::size_t> expected(inv.size());
  for (std::size_t i = 0; i < expected.size(); ++i) expected[i] = i;
  CHECK(order == expected);
  CHECK(std::none_of(events.begin(), events.end(), [](auto e) { return e.kind == distorch::residency_event_kind::prefetch; }));

  dm.reset_stats();
  events.clear();
  dm.forward(x);
  auto second = dm.stats();
  // Every streamed unit has a predecessor in the learned order (unit 0 is compute-homed).
  CHECK(second.prefetch_hits == streamed_units);
  CHECK(second.prefetch_misses == 0);
  // Each streamed unit was prefetched while its predecessor ran, before it entered.
  for (std::size_t u = 1; u < inv.size(); u += 2) {
    auto pre = std::find_if(events.begin(), events.end(), [&](auto e) {
      return e.kind == distorch::residency_event_kind::prefetch && e.unit == u;
    });
    auto enter = std::find_if(events.begin(), events.end(), [&](auto e) {
      return e.kind == distorch::residency_event_kind::enter && e.unit == u;
    });
    auto prev_enter = std::find_if(events.begin(), events.end(), [&](auto e) {
      return e.kind == distorch::residency_event_kind::enter && e.unit == u - 1;
    });
    REQUIRE(pre != events.end());
    CHECK(prev_enter < pre);
    CHECK(pre < enter);
  }
}

TEST_CASE("no simulated device ever exceeds its capacity, even with the compute device sized to the plan") {
  for (std::size_t depth : {0u, 1u, 2u}) {
    CAPTURE(depth);
    test_models::deterministic();
    auto model = test_models::mlp_stack(64, 8);
    const auto inv = distorch::bind_units(*model).units;
    std::uint64_t largest = 0, total = inv.total_bytes();
    for (const auto& u : inv.units()) largest = std::max(largest, u.bytes);
    // Room for a quarter of the model + the window the planner asks for, and not a byte more.
    const std::uint64_t capacity = total / 4 + largest * (depth + 1) + largest;
    auto pool = test_models::sim_pool(capacity, 1 << 20);
    distorch::distribute_spec spec;
    spec.compute = device_id::sim(0);
    spec.streaming.prefetch_depth = depth;
    spec.planning.tiny_ppm = 0;
    distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0," + std::to_string(total / 4) + "b;sim:1,*"), spec);
    const at::Tensor x = at::randn({3, 64});
    for (int i = 0; i < 3; ++i) dm.forward(x);
    CHECK(pool.peak(device_id::sim(0)) <= capacity);
    CHECK(pool.peak(device_id::sim(1)) <= pool.capacity(device_id::sim(1)));
    CHECK(dm.stats().fetches > 0);
  }
}

TEST_CASE("views::streamed yields each block resident and prefetches the next ones") {
  test_models::deterministic();
  auto model = test_models::transformer();
  auto reference = test_models::transformer();
  for (const auto& p : reference->named_parameters(true)) {
    at::Tensor h = p.value();
    h.set_data(model->named_parameters(true)[p.key()].detach().clone());
  }
  auto pool = test_models::sim_pool(1 << 20);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.streaming.prefetch_depth = 1;
  spec.grouping = {{R"(blocks\.\d+)"}};
  spec.planning.tiny_ppm = 0;
  // All three blocks live on the donor.
  const auto inv = distorch::bind_units(*model, spec.grouping).units;
  distorch::placement_plan plan;
  plan.compute = device_id::sim(0);
  for (const auto& u : inv.units())
    plan.units.push_back({u.name, u.name.rfind("blocks.", 0) == 0 ? device_id::sim(1) : device_id::sim(0), u.bytes,
                          distorch::placement_reason::policy});
  distorch::DistributedModule<distorch::demo::tiny_transformer> dm(model, pool, plan, spec);

  const at::Tensor x = at::randn({1, 4, 16});
  at::Tensor expected = reference->forward(x);
  at::Tensor h = dm.module()->embed(x);
  int index = 0;
  for (auto& block : model->blocks | distorch::views::streamed(dm)) {
    const auto units = dm.units_of(*block);
    REQUIRE(units.size() == 1);
    CHECK(dm.residency().resident(units[0]));
    if (index + 1 < 3) CHECK(dm.residency().fetched(dm.units_of(*model->blocks[index + 1])[0]));  // prefetched
    h = block->as<distorch::demo::attention_block_impl>()->forward(h);
    ++index;
  }
  CHECK(index == 3);
  for (std::size_t u = 0; u < inv.size(); ++u) CHECK(dm.residency().resident(u) == !dm.residency().streams(u));
  at::Tensor y = model->head(model->norm(h));
  CHECK(test_models::bit_identical(y, expected));
  CHECK(dm.stats().prefetch_hits == 2);
  CHECK(dm.stats().prefetch_misses == 1);

  // Leaving the loop early releases the block that was running.
  for (auto& block : *model->blocks | distorch::views::streamed(dm)) {
    (void)block;
    break;
  }
  for (std::size_t u = 0; u < inv.size(); ++u) CHECK(dm.residency().resident(u) == !dm.residency().streams(u));
}
