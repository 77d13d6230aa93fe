// Key-group detection (lora/adapter_keys.hpp): every naming, every kind, and every rejected input.
#include "distorch/lora/adapter_keys.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

using distorch::adapter_kind;
using distorch::component;

namespace {
distorch::key_grouping group(std::vector<std::string> names) { return distorch::group_adapter_keys(names); }
}  // namespace

TEST_CASE("every LoRA up/down naming forms one lora group with the right base") {
  struct row {
    const char* up;
    const char* down;
    const char* naming;
  };
  const std::vector<row> rows{
      {".lora_up.weight", ".lora_down.weight", "kohya"},
      {".lora_B.weight", ".lora_A.weight", "peft"},
      {".lora.up.weight", ".lora.down.weight", "diffusers"},
      {".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", "transformers"},
      {".lora_B.default.weight", ".lora_A.default.weight", "peft-default"},
      {"_lora.up.weight", "_lora.down.weight", "diffusers-attn"},
      {".lora_B", ".lora_A", "mochi"},
  };
  for (const auto& r : rows) {
    CAPTURE(r.up);
    const std::string base = "blocks.0.attn.to_q";
    const auto g = group({base + r.up, base + r.down});
    REQUIRE(g.groups.size() == 1);
    CHECK(g.unrecognized.empty());
    CHECK(g.groups[0].base == base);
    CHECK(g.groups[0].kind == adapter_kind::lora);
    CHECK(g.groups[0].naming == r.naming);
    CHECK(g.groups[0].name(component::lora_up) == base + r.up);
    CHECK(g.groups[0].name(component::lora_down) == base + r.down);
  }
}

TEST_CASE("alpha, lora_mid and dora_scale join their LoRA group") {
  const auto g = group({"m.lora_up.weight", "m.lora_down.weight", "m.lora_mid.weight", "m.alpha", "m.dora_scale"});
  REQUIRE(g.groups.size() == 1);
  CHECK(g.groups[0].has(component::lora_mid));
  CHECK(g.groups[0].name(component::alpha) == "m.alpha");
  CHECK(g.groups[0].dora());
  CHECK(g.unrecognized.empty());
}

TEST_CASE("LoHa groups, with and without the t1/t2 Tucker cores") {
  auto g = group({"m.hada_w1_a", "m.hada_w1_b", "m.hada_w2_a", "m.hada_w2_b", "m.alpha"});
  REQUIRE(g.groups.size() == 1);
  CHECK(g.groups[0].kind == adapter_kind::loha);
  CHECK_FALSE(g.groups[0].has(component::hada_t1));
  g = group({"m.hada_w1_a", "m.hada_w1_b", "m.hada_w2_a", "m.hada_w2_b", "m.hada_t1", "m.hada_t2"});
  REQUIRE(g.groups.size() == 1);
  CHECK(g.groups[0].has(component::hada_t1));
  CHECK(g.groups[0].has(component::hada_t2));
  // One core without the other cannot form the Tucker product: the lone core is reported.
  g = group({"m.hada_w1_a", "m.hada_w1_b", "m.hada_w2_a", "m.hada_w2_b", "m.hada_t1"});
  REQUIRE(g.groups.size() == 1);
  CHECK_FALSE(g.groups[0].has(component::hada_t1));
  CHECK(g.unrecognized == std::vector<std::string>{"m.hada_t1"});
}

TEST_CASE("LoKr groups: full, factored and Tucker halves in every combination") {
  const std::vector<std::vector<std::string>> forms{
      {"m.lokr_w1", "m.lokr_w2"},
      {"m.lokr_w1_a", "m.lokr_w1_b", "m.lokr_w2"},
      {"m.lokr_w1", "m.lokr_w2_a", "m.lokr_w2_b"},
      {"m.lokr_w1_a", "m.lokr_w1_b", "m.lokr_w2_a", "m.lokr_w2_b"},
      {"m.lokr_w1", "m.lokr_w2_a", "m.lokr_w2_b", "m.lokr_t2"},
  };
  for (const auto& names : forms) {
    CAPTURE(names.size());
    const auto g = group(names);
    REQUIRE(g.groups.size() == 1);
    CHECK(g.groups[0].kind == adapter_kind::lokr);
    CHECK(g.unrecognized.empty());
    for (const auto& n : names) {
      bool found = false;
      for (const auto& used : g.groups[0].names) found = found || used == n;
      CHECK(found);
    }
  }
}

TEST_CASE("full diffs, bias diffs and set_weight") {
  auto g = group({"m.diff", "m.diff_b"});
  REQUIRE(g.groups.size() == 1);
  CHECK(g.groups[0].kind == adapter_kind::diff);
  CHECK(g.groups[0].patches_bias());
  g = group({"m.diff_b"});
  REQUIRE(g.groups.size() == 1);
  CHECK_FALSE(g.groups[0].kind.has_value());
  CHECK(g.groups[0].patches_bias());
  g = group({"m.set_weight"});
  REQUIRE(g.groups.size() == 1);
  CHECK(g.groups[0].kind == adapter_kind::set);
}

TEST_CASE("kinds are detected per module, so one file can mix them") {
  const auto g = group({"a.lora_up.weight", "a.lora_down.weight", "b.hada_w1_a", "b.hada_w1_b", "b.hada_w2_a",
                        "b.hada_w2_b", "c.lokr_w1", "c.lokr_w2", "d.diff"});
  REQUIRE(g.groups.size() == 4);
  CHECK(g.groups[0].kind == adapter_kind::lora);
  CHECK(g.groups[1].kind == adapter_kind::loha);
  CHECK(g.groups[2].kind == adapter_kind::lokr);
  CHECK(g.groups[3].kind == adapter_kind::diff);
}

TEST_CASE("unknown suffixes are unrecognized") {
  const auto g = group({"m.lora_up.weight", "m.lora_down.weight", "m.something_else", "lora_up.weight"});
  REQUIRE(g.groups.size() == 1);
  // "lora_up.weight" alone has no base (the suffix needs a module in front of it).
  CHECK(g.unrecognized == std::vector<std::string>{"lora_up.weight", "m.something_else"});
}

TEST_CASE("incomplete groups are unrecognized, not silently dropped") {
  auto g = group({"m.lora_up.weight", "m.alpha"});
  CHECK(g.groups.empty());
  CHECK(g.unrecognized == std::vector<std::string>{"m.alpha", "m.lora_up.weight"});
  g = group({"m.hada_w1_a", "m.hada_w1_b", "m.hada_w2_a"});
  CHECK(g.groups.empty());
  CHECK(g.unrecognized.size() == 3);
  g = group({"m.lokr_w1_a", "m.lokr_w2"});  // w1 factored but w1_b missing
  CHECK(g.groups.empty());
  CHECK(g.unrecognized.size() == 2);
  g = group({"m.dora_scale"});
  CHECK(g.groups.empty());
  CHECK(g.unrecognized == std::vector<std::string>{"m.dora_scale"});
}

TEST_CASE("a module with two patch kinds is a lora_error naming the module") {
  try {
    (void)group({"m.lora_up.weight", "m.lora_down.weight", "m.diff"});
    FAIL("expected lora_error");
  } catch (const distorch::lora_error& e) {
    CHECK(e.info().subject == "m");
    CHECK(e.info().problem.find("lora, diff") != std::string::npos);
    CHECK_FALSE(e.info().fix.empty());
  }
}

TEST_CASE("one role under two namings is a lora_error naming both keys") {
  try {
    (void)group({"m.lora_up.weight", "m.lora_B.weight", "m.lora_down.weight"});
    FAIL("expected lora_error");
  } catch (const distorch::lora_error& e) {
    CHECK(e.info().problem.find("m.lora_up.weight") != std::string::npos);
    CHECK(e.info().problem.find("m.lora_B.weight") != std::string::npos);
  }
}
