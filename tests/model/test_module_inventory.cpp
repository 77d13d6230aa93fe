// Tests of model/module_inventory.hpp: units of live LibTorch modules. Expected sizes are computed
// here from the shapes each module is built with, not read back from the module.
#include "distorch/model/module_inventory.hpp"
#include "distorch/runtime/module_units.hpp"

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <ATen/ops/ones.h>

#include <doctest/doctest.h>

namespace nn = torch::nn;

namespace {

constexpr std::uint64_t f32 = 4;

std::uint64_t linear_bytes(std::int64_t in, std::int64_t out, bool bias = true) {
  return static_cast<std::uint64_t>(in * out + (bias ? out : 0)) * f32;
}

std::vector<std::string> unit_names(const distorch::inventory& inv) {
  std::vector<std::string> names;
  for (const auto& u : inv.units()) names.push_back(u.name);
  return names;
}

std::vector<std::string> tensor_names(const distorch::unit& u) {
  std::vector<std::string> names;
  for (const auto& t : u.tensors) names.push_back(t.name);
  return names;
}

struct BlockImpl : nn::Module {
  BlockImpl(std::int64_t width) {
    norm = register_module("norm", nn::LayerNorm(nn::LayerNormOptions({width})));
    attn = register_module("attn", nn::Linear(width, 3 * width));
    mlp = register_module("mlp", nn::Sequential(nn::Linear(width, 4 * width), nn::GELU(), nn::Linear(4 * width, width)));
  }
  nn::LayerNorm norm{nullptr};
  nn::Linear attn{nullptr};
  nn::Sequential mlp{nullptr};
};
TORCH_MODULE(Block);

struct TinyLmImpl : nn::Module {
  TinyLmImpl(std::int64_t vocab, std::int64_t width, int depth, bool tie) {
    embed = register_module("embed", nn::Embedding(vocab, width));
    blocks = register_module("blocks", nn::ModuleList());
    for (int i = 0; i < depth; ++i) blocks->push_back(Block(width));
    head = register_module("head", nn::Linear(nn::LinearOptions(width, vocab).bias(false)));
    if (tie) head->weight.set_data(embed->weight);  // one storage behind both parameters
  }
  nn::Embedding embed{nullptr};
  nn::ModuleList blocks{nullptr};
  nn::Linear head{nullptr};
};
TORCH_MODULE(TinyLm);

std::uint64_t block_bytes(std::int64_t w) {
  return static_cast<std::uint64_t>(2 * w) * f32 + linear_bytes(w, 3 * w) + linear_bytes(w, 4 * w) + linear_bytes(4 * w, w);
}

}  // namespace

TEST_CASE("module_inventory: a Sequential gives one unit per layer with tensors, in order") {
  nn::Sequential net(nn::Linear(16, 32), nn::ReLU(), nn::Linear(32, 8), nn::Linear(nn::LinearOptions(8, 2).bias(false)));
  const auto inv = distorch::inventory_of(*net);
  CHECK(unit_names(inv) == std::vector<std::string>{"0", "2", "3"});
  CHECK(inv[0].bytes == linear_bytes(16, 32));
  CHECK(inv[1].bytes == linear_bytes(32, 8));
  CHECK(inv[2].bytes == linear_bytes(8, 2, false));
  CHECK(tensor_names(inv[0]) == std::vector<std::string>{"0.weight", "0.bias"});
  CHECK(tensor_names(inv[2]) == std::vector<std::string>{"3.weight"});  // the undefined bias is skipped
  CHECK(inv.total_bytes() == linear_bytes(16, 32) + linear_bytes(32, 8) + linear_bytes(8, 2, false));
  const auto& w = inv[0].tensors[0];
  CHECK(w.shape == std::vector<std::int64_t>{32, 16});
  CHECK(w.type == distorch::dtype::f32);
  CHECK(w.bytes == 32u * 16u * f32);
}

TEST_CASE("module_inventory: nested modules are walked depth-first in registration order") {
  Block block(8);
  const auto inv = distorch::inventory_of(*block);
  CHECK(unit_names(inv) == std::vector<std::string>{"norm", "attn", "mlp.0", "mlp.2"});
  CHECK(inv[0].bytes == 2u * 8u * f32);
  CHECK(inv[1].bytes == linear_bytes(8, 24));
  CHECK(inv[2].bytes == linear_bytes(8, 32));
  CHECK(inv[3].bytes == linear_bytes(32, 8));
  CHECK(inv.total_bytes() == block_bytes(8));
}

TEST_CASE("module_inventory: buffers belong to their module's unit") {
  nn::Sequential net(nn::Linear(4, 6), nn::BatchNorm1d(6));
  const auto inv = distorch::inventory_of(*net);
  REQUIRE(inv.size() == 2);
  CHECK(inv[1].name == "1");
  CHECK(tensor_names(inv[1]) ==
        std::vector<std::string>{"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"});
  // weight, bias, running mean and var are 6 floats each; num_batches_tracked is one int64.
  CHECK(inv[1].bytes == 4u * 6u * f32 + 8u);
  const auto* counter = &inv[1].tensors.back();
  CHECK(counter->type == distorch::dtype::i64);
  CHECK(counter->shape.empty());
}

TEST_CASE("module_inventory: tied embedding and head weights are counted once, in one unit") {
  constexpr std::int64_t vocab = 50, width = 8;
  TinyLm untied(vocab, width, 2, false);
  TinyLm tied(vocab, width, 2, true);
  REQUIRE(tied->head->weight.data_ptr() == tied->embed->weight.data_ptr());
  const std::uint64_t embedding = static_cast<std::uint64_t>(vocab * width) * f32;

  const auto a = distorch::inventory_of(*untied);
  CHECK(unit_names(a) == std::vector<std::string>{"embed", "blocks.0.norm", "blocks.0.attn", "blocks.0.mlp.0",
                                                  "blocks.0.mlp.2", "blocks.1.norm", "blocks.1.attn", "blocks.1.mlp.0",
                                                  "blocks.1.mlp.2", "head"});
  CHECK(a.total_bytes() == 2 * embedding + 2 * block_bytes(width));

  const auto b = distorch::inventory_of(*tied);
  const auto names = unit_names(b);
  CHECK(std::find(names.begin(), names.end(), "head") == names.end());  // pulled into the embedding's unit
  REQUIRE(b[0].name == "embed");
  CHECK(tensor_names(b[0]) == std::vector<std::string>{"embed.weight", "head.weight"});
  CHECK(b[0].bytes == embedding);
  CHECK(b.total_bytes() == embedding + 2 * block_bytes(width));
  CHECK(b.unit_of_tensor("head.weight") == &b[0]);
}

TEST_CASE("module_inventory: a submodule registered twice is one storage and one unit") {
  nn::Linear shared(6, 6);
  nn::Sequential net(shared, nn::ReLU(), shared);
  const auto inv = distorch::inventory_of(*net);
  REQUIRE(inv.size() == 1);
  CHECK(inv[0].name == "0");
  CHECK(inv[0].tensors.size() == 4);
  CHECK(inv[0].bytes == linear_bytes(6, 6));
}

TEST_CASE("module_inventory: tensors viewing part of a larger storage count the whole storage once") {
  nn::Module root;
  const at::Tensor big = at::ones({10, 4});
  root.register_parameter("a", big.slice(0, 0, 5), false);
  root.register_parameter("b", big.slice(0, 5, 10), false);
  const auto records = distorch::module_records(root);
  REQUIRE(records.size() == 2);
  CHECK(records[0].storage_key == records[1].storage_key);
  CHECK(records[0].storage_bytes == 40u * f32);
  CHECK(records[0].bytes == 20u * f32);
  const auto inv = distorch::inventory_of(root);
  REQUIRE(inv.size() == 1);
  CHECK(inv[0].name == "");
  CHECK(inv[0].bytes == 40u * f32);
}

TEST_CASE("module_inventory: grouping rules coarsen units into blocks") {
  TinyLm model(20, 8, 3, false);
  const auto inv = distorch::inventory_of(*model, {distorch::grouping_rule{R"(blocks\.\d+)"}});
  CHECK(unit_names(inv) == std::vector<std::string>{"embed", "blocks.0", "blocks.1", "blocks.2", "head"});
  for (int i = 1; i <= 3; ++i) {
    CHECK(inv[static_cast<std::size_t>(i)].bytes == block_bytes(8));
    CHECK(inv[static_cast<std::size_t>(i)].tensors.size() == 8);
  }
  CHECK(inv.total_bytes() == distorch::inventory_of(*model).total_bytes());
  const std::vector<distorch::grouping_rule> mlp_only{{R"(blocks\.\d+\.mlp)"}};
  const auto mlp = distorch::inventory_of(*model, mlp_only);
  CHECK(mlp.index_of("blocks.1.mlp") >= 0);
  CHECK(mlp.index_of("blocks.1.attn") >= 0);
  CHECK(mlp.index_of("blocks.1.mlp.0") < 0);
}

TEST_CASE("module_inventory: an invalid grouping regex is an allocation_error") {
  TinyLm model(10, 4, 1, false);
  CHECK_THROWS_AS(distorch::inventory_of(*model, {distorch::grouping_rule{"blocks\\.(\\d+"}}), distorch::allocation_error);
}

TEST_CASE("module_inventory: a grouping rule that matches no module is an allocation_error naming it") {
  TinyLm model(10, 4, 2, false);
  CHECK_THROWS_WITH_AS(distorch::inventory_of(*model, {distorch::grouping_rule{R"(blocks\d+)"}}),
                       doctest::Contains("grouping rule 'blocks\\d+'"), distorch::allocation_error);
  CHECK_THROWS_AS(distorch::bind_units(*model, std::vector<distorch::grouping_rule>{{R"(layers\.\d+)"}}),
                  distorch::allocation_error);
}

TEST_CASE("module_inventory: dtypes other than float32 are sized by their element size") {
  nn::Linear layer(8, 4);
  layer->to(at::kBFloat16);
  auto inv = distorch::inventory_of(*layer);
  REQUIRE(inv.size() == 1);
  CHECK(inv[0].name == "");
  CHECK(inv[0].tensors[0].type == distorch::dtype::bf16);
  CHECK(inv[0].bytes == (8u * 4u + 4u) * 2u);
  layer->to(at::kDouble);
  inv = distorch::inventory_of(*layer);
  CHECK(inv[0].bytes == (8u * 4u + 4u) * 8u);
}

TEST_CASE("module_inventory: a module without tensors has an empty inventory") {
  nn::Sequential net{nn::ReLU(), nn::GELU()};
  CHECK(distorch::inventory_of(*net).empty());
}
