// PEFT adapter_config.json reading (lora/peft_config.hpp) and PEFT's scale rules.
#include "distorch/lora/peft_config.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <string>

namespace {
distorch::peft_config parse(const std::string& text) { return distorch::parse_peft_config(text, "adapter_config.json"); }

std::string problem_of(const std::string& text) {
  try {
    (void)parse(text);
  } catch (const distorch::lora_error& e) {
    CHECK_FALSE(e.info().fix.empty());
    return e.info().subject + ": " + e.info().problem;
  }
  return "";
}
}  // namespace

TEST_CASE("the fields that change the merge are read; others are ignored") {
  const auto cfg = parse(R"({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_rslora": false,
                              "target_modules": ["to_q", "to_k"], "lora_dropout": 0.1})");
  CHECK(cfg.r == 16);
  CHECK(cfg.lora_alpha == 32.0);
  CHECK_FALSE(cfg.use_rslora);
  CHECK(distorch::peft_scale(cfg, "down_blocks.0.attn.to_q", 16) == 2.0);
}

TEST_CASE("use_rslora scales by alpha over the square root of the rank") {
  const auto cfg = parse(R"({"r": 16, "lora_alpha": 8, "use_rslora": true})");
  CHECK(distorch::peft_scale(cfg, "x", 16) == doctest::Approx(8.0 / 4.0));
  CHECK(distorch::peft_scale(cfg, "x", 9) == doctest::Approx(8.0 / 3.0));
}

TEST_CASE("alpha_pattern overrides lora_alpha for modules whose path ends with its key") {
  const auto cfg = parse(R"({"lora_alpha": 16, "alpha_pattern": {"attn.to_q": 4, "to_v": 2}})");
  CHECK(distorch::peft_alpha(cfg, "blocks.0.attn.to_q") == 4.0);
  CHECK(distorch::peft_alpha(cfg, "to_v") == 2.0);
  CHECK(distorch::peft_alpha(cfg, "blocks.0.attn.xto_v") == 16.0);  // a suffix must start after a '.'
  CHECK(distorch::peft_alpha(cfg, "blocks.0.attn.to_k") == 16.0);
}

TEST_CASE("no alpha in the config leaves the scale at 1") {
  const auto cfg = parse(R"({"r": 4})");
  CHECK_FALSE(cfg.lora_alpha.has_value());
  CHECK(distorch::peft_scale(cfg, "x", 4) == 1.0);
}

TEST_CASE("malformed JSON is a lora_error with the byte offset") {
  try {
    (void)parse(R"({"r": 4,,})");
    FAIL("expected lora_error");
  } catch (const distorch::lora_error& e) {
    REQUIRE(e.info().position.has_value());
    CHECK(e.info().position->kind == "offset");
    CHECK(e.info().position->value == 9);
  }
}

TEST_CASE("a top level that is not an object is rejected") { CHECK(problem_of("[1, 2]").find("not a JSON object") != std::string::npos); }

TEST_CASE("JSON nested absurdly deep is rejected before parsing") {
  CHECK(problem_of(std::string(100000, '[')).find("nested deeper") != std::string::npos);
}

TEST_CASE("lora_alpha must be a finite number") {
  CHECK(problem_of(R"({"lora_alpha": "16"})").find("lora_alpha: must be a number") != std::string::npos);
}

TEST_CASE("r must be an integer of at least 1") {
  CHECK(problem_of(R"({"r": 2.5})").find("r: must be an integer") != std::string::npos);
  CHECK(problem_of(R"({"r": 0})").find("below 1") != std::string::npos);
}

TEST_CASE("use_rslora must be a boolean") { CHECK(problem_of(R"({"use_rslora": 1})").find("true or false") != std::string::npos); }

TEST_CASE("alpha_pattern must map module keys to numbers") {
  CHECK(problem_of(R"({"alpha_pattern": [1]})").find("must be an object") != std::string::npos);
  CHECK(problem_of(R"({"alpha_pattern": {"to_q": "x"}})").find("alpha_pattern.to_q") != std::string::npos);
  CHECK(problem_of(R"({"alpha_pattern": {"": 4}})").find("empty module key") != std::string::npos);
}

TEST_CASE("a config for another PEFT method is rejected") {
  CHECK(problem_of(R"({"peft_type": "LOHA", "alpha": 4})").find("'LOHA' is not supported") != std::string::npos);
  CHECK(problem_of(R"({"peft_type": 3})").find("must be a string") != std::string::npos);
}

TEST_CASE("a number too large for a double is a lora_error, not a JSON library exception") {
  CHECK(problem_of(R"({"lora_alpha": 1e999999})").find("unreadable JSON") != std::string::npos);
}
