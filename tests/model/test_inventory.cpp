#include "distorch/model/inventory.hpp"

#include <doctest/doctest.h>

using distorch::dtype;
using distorch::inventory;
using distorch::tensor_record;

namespace {
std::vector<tensor_record> sample_records() {
  return {
      {"embed.weight", dtype::f32, {100, 16}},
      {"blocks.0.attn.weight", dtype::f32, {16, 16}},
      {"blocks.0.attn.bias", dtype::f32, {16}},
      {"blocks.0.mlp.weight", dtype::bf16, {64, 16}},
      {"blocks.1.attn.weight", dtype::f32, {16, 16}},
      {"blocks.10.attn.weight", dtype::f32, {16, 16}},
      {"norm.weight", dtype::f16, {16}},
      {"scale", dtype::f32, {}},
  };
}
}  // namespace

TEST_CASE("leaf-module units in order of first appearance, bytes from dtype and shape") {
  const auto records = sample_records();
  const auto inv = inventory::from_records(records);
  std::vector<std::string> names;
  for (const auto& u : inv.units()) names.push_back(u.name);
  CHECK(names == std::vector<std::string>{"embed", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.10.attn", "norm", ""});
  CHECK(inv[0].bytes == 100 * 16 * 4);
  CHECK(inv[1].bytes == (16 * 16 + 16) * 4);
  CHECK(inv[2].bytes == 64 * 16 * 2);
  CHECK(inv[6].bytes == 4);  // 0-d tensor at the root
  CHECK(inv.total_bytes() == 6400 + 1088 + 2048 + 1024 + 1024 + 32 + 4);
  CHECK(inv.index_of("norm") == 5);
  CHECK(inv.unit_of_tensor("blocks.0.attn.bias")->name == "blocks.0.attn");
}

TEST_CASE("a grouping rule coarsens units at component boundaries only") {
  const auto records = sample_records();
  const distorch::grouping_rule rules[] = {{R"(blocks\.\d+)"}};
  const auto inv = inventory::from_records(records, rules);
  std::vector<std::string> names;
  for (const auto& u : inv.units()) names.push_back(u.name);
  CHECK(names == std::vector<std::string>{"embed", "blocks.0", "blocks.1", "blocks.10", "norm", ""});
  CHECK(inv[1].tensors.size() == 3);
  CHECK(inv[1].bytes == 1088 + 2048);

  // "blocks\.1" must not swallow "blocks.10".
  const distorch::grouping_rule partial[] = {{R"(blocks\.1)"}};
  const auto inv2 = inventory::from_records(records, partial);
  CHECK(inv2.index_of("blocks.1") >= 0);
  CHECK(inv2.index_of("blocks.10.attn") >= 0);
}

TEST_CASE("tied storages are counted once and pull their units together") {
  std::vector<tensor_record> records{
      {"embed.weight", dtype::f32, {10, 4}, 0, 7},
      {"body.weight", dtype::f32, {4, 4}},
      {"head.weight", dtype::f32, {10, 4}, 0, 7},
      {"view_a.w", dtype::f32, {2, 4}, 0, 9, 64},
      {"view_a.v", dtype::f32, {4}, 0, 9, 64},
  };
  const auto inv = inventory::from_records(records);
  REQUIRE(inv.size() == 3);
  CHECK(inv[0].name == "embed");
  CHECK(inv[0].tensors.size() == 2);
  CHECK(inv[0].bytes == 160);  // counted once
  CHECK(inv[1].name == "body");
  CHECK(inv[2].bytes == 64);   // storage bytes, shared by two views
}

TEST_CASE("bad inventory input is a typed error") {
  std::vector<tensor_record> dup{{"a.w", dtype::f32, {1}}, {"a.w", dtype::f32, {1}}};
  CHECK_THROWS_AS(inventory::from_records(dup), distorch::format_error);
  const distorch::grouping_rule bad[] = {{"blocks\\.(\\d+"}};
  CHECK_THROWS_AS(inventory::from_records(sample_records(), bad), distorch::allocation_error);
}

TEST_CASE("from_records handles 100k records quickly enough to be used by the planner") {
  std::vector<tensor_record> records;
  for (int i = 0; i < 100000; ++i) records.push_back({"layers." + std::to_string(i) + ".weight", dtype::f16, {8, 8}});
  const auto inv = inventory::from_records(records);
  CHECK(inv.size() == 100000);
  CHECK(inv.total_bytes() == 100000ull * 128);
}

TEST_CASE("grouping rules go through the user-regex limits") {
  const auto records = sample_records();
  for (const char* bad : {"blocks\\2221", "(((((((((((((((((a)))))))))))))))))", "a{40}b{40}", ""}) {
    CAPTURE(bad);
    const distorch::grouping_rule rules[] = {{bad}};
    CHECK_THROWS_AS(inventory::from_records(records, rules), distorch::allocation_error);
  }
  // A pattern that backtracks exponentially in the default matcher still finishes.
  // (It matches nothing, which is then reported like any rule that groups nothing.)
  const distorch::grouping_rule slow[] = {{"(a*)*b"}};
  std::vector<tensor_record> long_name{{std::string(40, 'a') + ".w", dtype::f32, {1}}};
  CHECK_THROWS_AS(inventory::from_records(long_name, slow), distorch::allocation_error);
  long_name.push_back({std::string(40, 'a') + "b.w", dtype::f32, {1}});
  CHECK(inventory::from_records(long_name, slow).size() == 2);
}

TEST_CASE("a grouping rule that matches no tensor is an allocation_error naming the rule, not leaf units") {
  const auto records = sample_records();
  // The classic slip: `blocks\d+` for `blocks\.\d+`. Leaf units would hide it.
  const distorch::grouping_rule typo[] = {{R"(blocks\.\d+)"}, {R"(blocks\d+)"}};
  try {
    (void)inventory::from_records(records, typo);
    FAIL("expected an allocation_error");
  } catch (const distorch::allocation_error& e) {
    CHECK(e.info().subject == R"(blocks\d+)");
    REQUIRE(e.info().position.has_value());
    CHECK(e.info().position->kind == "rule");
    CHECK(e.info().position->value == 2);
    const std::string what = e.what();
    CHECK(what.find("grouping rule 'blocks\\d+'") != std::string::npos);
    CHECK(what.find("matches no tensor") != std::string::npos);
    CHECK(what.find("'embed'") != std::string::npos);   // the first module path, to compare with
  }
  // A rule that matches only part way into a component matches nothing either.
  const distorch::grouping_rule partial[] = {{R"(block)"}};
  CHECK_THROWS_AS(inventory::from_records(records, partial), distorch::allocation_error);
  // A rule that matches, but only where an earlier rule already took the path, is not an error.
  const distorch::grouping_rule shadowed[] = {{R"(blocks\.\d+)"}, {R"(blocks\.1)"}};
  CHECK(inventory::from_records(records, shadowed).index_of("blocks.1") >= 0);
  // Nothing to match: no names, nothing to report.
  CHECK(inventory::from_records(std::vector<tensor_record>{}, typo).empty());
}
