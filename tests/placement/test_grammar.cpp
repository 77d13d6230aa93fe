// Tests for placement/grammar.hpp: accepted strings and what they parse to, one test per class
// of rejected string with the expected column, and the checks against a topology.
#include "distorch/placement/any_policy.hpp"
#include "distorch/placement/grammar.hpp"
#include "distorch/placement/planner.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

namespace {

using distorch::allocation_mode;
using distorch::device_id;
constexpr std::uint64_t GiB = 1ull << 30;
constexpr std::uint64_t MiB = 1ull << 20;

/// Expects an allocation_error at `column` whose problem contains `part`.
void check_rejects(const std::string& text, std::size_t column, const std::string& part) {
  CAPTURE(text);
  try {
    (void)distorch::parse_allocation(text);
    FAIL("expected allocation_error");
  } catch (const distorch::allocation_error& e) {
    REQUIRE(e.info().position.has_value());
    CHECK(e.info().position->kind == "column");
    CHECK(e.info().position->value == column);
    CHECK_MESSAGE(e.info().problem.find(part) != std::string::npos, e.what());
    if (!text.empty()) CHECK(!e.info().subject.empty());
    CHECK(!e.info().fix.empty());
  }
}

}  // namespace

TEST_CASE("grammar: bytes mode entries, sizes and wildcards") {
  struct expected_entry { device_id device; std::uint64_t bytes; bool wildcard; bool has_size; };
  struct row { const char* text; std::vector<expected_entry> entries; };
  const row rows[] = {
      {"cuda:0,2.5gb;cpu,*", {{device_id::cuda(0), 2 * GiB + GiB / 2, false, true}, {device_id::cpu(), 0, true, false}}},
      {"cuda:0,500mb;cuda:1,3.0g;cpu,5gb*",
       {{device_id::cuda(0), 500 * MiB, false, true}, {device_id::cuda(1), 3 * GiB, false, true}, {device_id::cpu(), 5 * GiB, true, true}}},
      {" cuda:0 , 1GiB ; cpu , * ", {{device_id::cuda(0), GiB, false, true}, {device_id::cpu(), 0, true, false}}},
      {"cuda,1024k;cpu,4096b", {{device_id::cuda(0), 1024 * 1024, false, true}, {device_id::cpu(), 4096, false, true}}},
      {"cpu,*;cuda:1,512MiB", {{device_id::cpu(), 0, true, false}, {device_id::cuda(1), 512 * MiB, false, true}}},
      {"sim:3,7b", {{device_id::sim(3), 7, false, true}}},
  };
  for (const auto& r : rows) {
    CAPTURE(r.text);
    const auto spec = distorch::parse_allocation(r.text);
    CHECK(spec.mode == allocation_mode::bytes);
    CHECK(spec.text == r.text);
    REQUIRE(spec.entries.size() == r.entries.size());
    for (std::size_t i = 0; i < r.entries.size(); ++i) {
      CHECK(spec.entries[i].device == r.entries[i].device);
      CHECK(spec.entries[i].bytes == r.entries[i].bytes);
      CHECK(spec.entries[i].wildcard == r.entries[i].wildcard);
      CHECK(spec.entries[i].has_size == r.entries[i].has_size);
    }
  }
}

TEST_CASE("grammar: entries remember their text and columns") {
  const auto spec = distorch::parse_allocation("cuda:0,500mb; cpu, 5gb*");
  REQUIRE(spec.entries.size() == 2);
  CHECK(spec.entries[0].text == "cuda:0,500mb");
  CHECK(spec.entries[0].column == 1);
  CHECK(spec.entries[0].value_column == 8);
  CHECK(spec.entries[1].text == "cpu, 5gb*");
  CHECK(spec.entries[1].column == 15);
  CHECK(spec.entries[1].value_column == 20);
  CHECK(spec.find(device_id::cpu()) == &spec.entries[1]);
  CHECK(spec.find(device_id::cuda(3)) == nullptr);
}

TEST_CASE("grammar: ratio and fraction values are exact nine-decimal fixed point") {
  struct row { const char* text; allocation_mode mode; std::vector<std::uint64_t> values_e9; };
  const row rows[] = {
      {"cuda:0,25%;cpu,75%", allocation_mode::ratio, {25'000'000'000ull, 75'000'000'000ull}},
      {"cuda:0,8%;cuda:1,8%;cpu,4%", allocation_mode::ratio, {8'000'000'000ull, 8'000'000'000ull, 4'000'000'000ull}},
      {"cuda:0,0.5 %;cpu,1.25%", allocation_mode::ratio, {500'000'000ull, 1'250'000'000ull}},
      {"cuda:0,0%;cpu,3%", allocation_mode::ratio, {0, 3'000'000'000ull}},
      {"cuda:0,0.1;cpu,0.5", allocation_mode::fraction, {100'000'000ull, 500'000'000ull}},
      {"cuda:0,0.0207;cuda:1,0.1273;cpu,0.0808", allocation_mode::fraction, {20'700'000ull, 127'300'000ull, 80'800'000ull}},
      {"cpu,1;cuda:0,0", allocation_mode::fraction, {1'000'000'000ull, 0}},
      {"cpu,.25", allocation_mode::fraction, {250'000'000ull}},
      {"cpu,0.1234567891234", allocation_mode::fraction, {123'456'789ull}},  // beyond nine decimals is dropped
  };
  for (const auto& r : rows) {
    CAPTURE(r.text);
    const auto spec = distorch::parse_allocation(r.text);
    CHECK(spec.mode == r.mode);
    REQUIRE(spec.entries.size() == r.values_e9.size());
    for (std::size_t i = 0; i < r.values_e9.size(); ++i) CHECK(spec.entries[i].value_e9 == r.values_e9[i]);
  }
}

TEST_CASE("grammar: virtual VRAM form") {
  auto spec = distorch::parse_allocation("cuda:0;4;cpu");
  CHECK(spec.mode == allocation_mode::virtual_vram);
  CHECK(spec.vvram_compute == device_id::cuda(0));
  CHECK(spec.vvram_bytes == 4 * GiB);
  REQUIRE(spec.entries.size() == 1);
  CHECK(spec.entries[0].device == device_id::cpu());

  spec = distorch::parse_allocation("cuda:1; 2.5 ; cuda:0, cpu");
  CHECK(spec.vvram_compute == device_id::cuda(1));
  CHECK(spec.vvram_bytes == 2 * GiB + GiB / 2);
  REQUIRE(spec.entries.size() == 2);
  CHECK(spec.entries[0].device == device_id::cuda(0));
  CHECK(spec.entries[1].device == device_id::cpu());
  CHECK(spec.entries[1].column == 23);

  spec = distorch::parse_allocation("cuda:0;512mb;cpu");  // an explicit unit is accepted too
  CHECK(spec.vvram_bytes == 512 * MiB);
}

TEST_CASE("grammar: auto and overrides") {
  CHECK(distorch::parse_allocation("auto").mode == allocation_mode::automatic);
  CHECK(distorch::parse_allocation(" AUTO ").mode == allocation_mode::automatic);
  const auto spec = distorch::parse_allocation(R"(blocks\.(0|1)\..*=cuda:1;cuda:0,2.5gb;head=cpu;cpu,*)");
  CHECK(spec.mode == allocation_mode::bytes);
  REQUIRE(spec.overrides.size() == 2);
  CHECK(spec.overrides[0].pattern == R"(blocks\.(0|1)\..*)");
  CHECK(spec.overrides[0].device == device_id::cuda(1));
  CHECK(spec.overrides[0].column == 1);
  CHECK(spec.overrides[1].pattern == "head");
  CHECK(spec.overrides[1].device == device_id::cpu());
  REQUIRE(spec.entries.size() == 2);
  const auto with_auto = distorch::parse_allocation("norm=cuda:0;auto");
  CHECK(with_auto.mode == allocation_mode::automatic);
  CHECK(with_auto.overrides.size() == 1);
  const auto lookahead = distorch::parse_allocation("a(?=b)=cpu;cpu,*");  // the last '=' separates the device
  CHECK(lookahead.overrides[0].pattern == "a(?=b)");
}

TEST_CASE("grammar rejects: empty string and empty entries") {
  check_rejects("", 1, "empty allocation string");
  check_rejects("   ", 1, "empty allocation string");
  check_rejects("cuda:0,1gb;;cpu,*", 12, "empty entry");
  check_rejects("cuda:0,1gb;cpu,*;", 18, "empty entry");
}

TEST_CASE("grammar rejects: mixing modes") {
  check_rejects("cuda:0,25%;cpu,0.5", 16, "mixes fraction with ratio");
  check_rejects("cuda:0,1gb;cpu,50%", 16, "mixes ratio with bytes");
  check_rejects("cuda:0,50%;cpu,*", 16, "mixes bytes with ratio");
  check_rejects("cuda:0,0.5;cpu,*", 16, "mixes bytes with fraction");
  check_rejects("auto;cpu,1gb", 1, "'auto' mixed");
}

TEST_CASE("grammar rejects: unknown device types") {
  check_rejects("gpu:0,1gb", 1, "unknown device type");
  check_rejects("cuda:0,1gb;tpu,*", 12, "unknown device type");
  check_rejects("cuda:x,1gb", 6, "not a number");
  check_rejects(",1gb", 1, "missing device name");
}

TEST_CASE("grammar rejects: a device named twice") {
  check_rejects("cuda:0,1gb;cuda:0,2gb", 12, "named twice");
  check_rejects("cuda,1gb;cpu,*;cuda:0,1gb", 16, "named twice");
}

TEST_CASE("grammar rejects: negative values") {
  check_rejects("cuda:0,-1gb", 8, "negative");
  check_rejects("cuda:0,-25%;cpu,75%", 8, "negative");
  check_rejects("cuda:0,-0.5", 8, "negative");
}

TEST_CASE("grammar rejects: NaN and infinity") {
  check_rejects("cuda:0,nan", 8, "not a finite");
  check_rejects("cuda:0,inf%", 8, "not a finite");
  check_rejects("cuda:0,NaN*", 8, "not a finite");
}

TEST_CASE("grammar rejects: unparsable values") {
  check_rejects("cuda:0,abc", 8, "must start with a number");
  check_rejects("cuda:0,0.5x", 11, "not a byte unit");
  check_rejects("cuda:0,1.2.3", 11, "unexpected");
  check_rejects("cuda:0,1e5", 9, "exponent");
  check_rejects("cuda:0,5*gb", 9, "'*' must end");
  check_rejects("cuda:0,%;cpu,1%", 8, "empty value");
  check_rejects("cuda:0,99999999999%", 8, "too large");
  check_rejects("cuda:0,", 8, "missing value");
  check_rejects("cuda:0,1gb,2gb", 11, "more than one ','");
}

TEST_CASE("grammar rejects: missing ',value'") {
  check_rejects("cuda:0", 1, "missing ',value'");
  check_rejects("cuda:0,1gb;cpu", 12, "missing ',value'");
}

TEST_CASE("grammar rejects: a fraction above 1") {
  check_rejects("cuda:0,1.5;cpu,0.5", 8, "greater than 1");
  check_rejects("cuda:0,0.5;cpu,7", 16, "greater than 1");
}

TEST_CASE("grammar rejects: ratios summing to zero") {
  check_rejects("cuda:0,0%;cpu,0%", 8, "sum to zero");
  check_rejects("cpu,0.0%", 5, "sum to zero");
}

TEST_CASE("grammar rejects: two wildcards") {
  check_rejects("cuda:0,*;cpu,*", 14, "second wildcard");
  check_rejects("cuda:0,1gb*;cuda:1,2gb;cpu,3gb*", 28, "second wildcard");
}

TEST_CASE("grammar rejects: malformed virtual VRAM") {
  check_rejects("cuda:0;x;cpu", 8, "must start with a number");
  check_rejects("cuda:0;-4;cpu", 8, "negative");
  check_rejects("cuda:0;4;cuda:0", 10, "cannot donate to itself");
  check_rejects("cuda:0;4;cpu,cpu", 14, "named twice");
  check_rejects("cuda:0;4;cpu,", 14, "empty donor");
  check_rejects("cuda:0;4", 1, "missing ',value'");
  check_rejects("gpu;4;cpu", 1, "unknown device type");
}

TEST_CASE("grammar rejects: malformed overrides") {
  check_rejects("=cuda:1;cpu,*", 1, "empty regex");
  check_rejects("blocks(=cuda:1;cpu,*", 1, "not a valid regular expression");
  check_rejects("blocks=;cpu,*", 8, "missing device");
  check_rejects("blocks=gpu;cpu,*", 8, "unknown device type");
  check_rejects("a=cpu", 1, "only overrides");
  check_rejects(std::string(300, 'a') + "=cpu;cpu,*", 1, "characters long");
  check_rejects(std::string(20, '(') + "a" + std::string(20, ')') + "=cpu;cpu,*", 17, "nests groups");
  check_rejects("a{40}b{40}=cpu;cpu,*", 7, "repeats more than");
  check_rejects("a{99999999999999999999}=cpu;cpu,*", 2, "repeats more than");
  check_rejects("(a)\\2221112211111111111112=cpu;cpu,*", 4, "backreference");  // found by fuzz_allocation
}

TEST_CASE("check_against: devices must be present") {
  const auto topo = distorch::parse_topology("cuda:0=24GiB,cpu=64GiB");
  auto expect_missing = [&](const char* text, std::size_t column) {
    CAPTURE(text);
    try {
      (void)distorch::check_against(distorch::parse_allocation(text), topo);
      FAIL("expected allocation_error");
    } catch (const distorch::allocation_error& e) {
      CHECK(e.info().position->value == column);
      CHECK(e.info().problem.find("not present") != std::string::npos);
    }
  };
  expect_missing("cuda:0,1gb;cuda:1,2gb;cpu,*", 12);
  expect_missing("cuda:1;4;cpu", 1);
  expect_missing("cuda:0;4;cpu,cuda:2", 14);
  expect_missing("blocks=cuda:3;cuda:0,25%;cpu,75%", 1);
  CHECK(distorch::check_against(distorch::parse_allocation("cuda:0,25%;cpu,75%"), topo).empty());
}

TEST_CASE("check_against: asking more than a device has warns, or fails in strict mode") {
  const auto topo = distorch::parse_topology("cuda:0=24GiB,cpu=64GiB");
  std::vector<std::string> logged;
  distorch::set_log_sink([&](distorch::log_level, std::string_view m) { logged.emplace_back(m); });
  const auto spec = distorch::parse_allocation("cuda:0,30gb;cpu,*");
  const auto warnings = distorch::check_against(spec, topo);
  distorch::set_log_sink({});
  REQUIRE(warnings.size() == 1);
  CHECK(warnings[0].find("asks 30.00 GiB") != std::string::npos);
  CHECK(warnings[0].find("clamped to 24.00 GiB") != std::string::npos);
  CHECK(logged == warnings);
  try {
    (void)distorch::check_against(spec, topo, true);
    FAIL("expected allocation_error");
  } catch (const distorch::allocation_error& e) {
    CHECK(e.info().position->value == 8);
    CHECK(e.info().subject == "cuda:0,30gb");
  }
}

#if defined(__GLIBCXX__)
TEST_CASE("grammar rejects: backreferences in overrides") {
  // With libstdc++, override patterns match in polynomial time, which excludes backreferences.
  check_rejects("(a)\\1=cpu;cpu,*", 1, "not a valid regular expression");
}
#endif

namespace {

/// A rejected storage suffix: allocation_error at `column`, its problem containing `part`, and the
/// fix naming the accepted names when `names_accepted`.
void check_rejects_storage(const std::string& text, std::size_t column, const std::string& part, bool names_accepted) {
  CAPTURE(text);
  check_rejects(text, column, part);
  if (!names_accepted) return;
  try {
    (void)distorch::parse_allocation(text);
  } catch (const distorch::allocation_error& e) {
    for (const char* name : {"fp8", "e5m2", "bf16", "fp16"}) CHECK_MESSAGE(e.info().fix.find(name) != std::string::npos, e.what());
  }
}

}  // namespace

TEST_CASE("grammar: storage suffixes in every entry form") {
  using distorch::dtype;
  auto spec = distorch::parse_allocation("cuda:0,2gb;cuda:1,4gb:bf16;cpu,*:fp8");
  CHECK(spec.mode == allocation_mode::bytes);
  REQUIRE(spec.entries.size() == 3);
  CHECK_FALSE(spec.entries[0].storage.has_value());
  CHECK(spec.entries[0].storage_column == 0);
  CHECK(spec.entries[1].bytes == 4 * GiB);
  CHECK(spec.entries[1].storage == dtype::bf16);
  CHECK(spec.entries[1].storage_column == 23);
  CHECK(spec.entries[2].wildcard);
  CHECK(spec.entries[2].storage == dtype::f8_e4m3);
  CHECK(spec.entries[2].text == "cpu,*:fp8");
  CHECK(spec.entries[2].value_column == 32);
  CHECK(spec.entries[2].storage_column == 34);
  CHECK((distorch::storage_of(spec) ==
         std::vector<distorch::device_storage>{{device_id::cuda(1), dtype::bf16}, {device_id::cpu(), dtype::f8_e4m3}}));

  spec = distorch::parse_allocation("cpu,50%:e5m2;cuda:0,50%");
  CHECK(spec.mode == allocation_mode::ratio);
  CHECK(spec.entries[0].value_e9 == 50 * distorch::decimal_one);
  CHECK(spec.entries[0].storage == dtype::f8_e5m2);

  spec = distorch::parse_allocation("cuda:0,0.5:fp16;cpu, 0.25 : BF16 ");
  CHECK(spec.mode == allocation_mode::fraction);
  CHECK(spec.entries[0].storage == dtype::f16);
  CHECK(spec.entries[1].value_e9 == distorch::decimal_one / 4);
  CHECK(spec.entries[1].storage == dtype::bf16);

  spec = distorch::parse_allocation("cpu,5gb*:float8_e4m3fn");
  CHECK(spec.entries[0].bytes == 5 * GiB);
  CHECK(spec.entries[0].storage == dtype::f8_e4m3);

  // Virtual VRAM: a donor takes the suffix after its name (a device index is digits).
  spec = distorch::parse_allocation("cuda:0;4;cuda:1:bf16,cpu:fp8, sim:2");
  CHECK(spec.mode == allocation_mode::virtual_vram);
  REQUIRE(spec.entries.size() == 3);
  CHECK(spec.entries[0].device == device_id::cuda(1));
  CHECK(spec.entries[0].storage == dtype::bf16);
  CHECK(spec.entries[0].storage_column == 17);
  CHECK(spec.entries[1].device == device_id::cpu());
  CHECK(spec.entries[1].storage == dtype::f8_e4m3);
  CHECK(spec.entries[2].device == device_id::sim(2));
  CHECK_FALSE(spec.entries[2].storage.has_value());

  spec = distorch::parse_allocation(R"(blocks\.0\..*=cuda:1;cuda:0,1gb;cuda:1,1gb:half;cpu,*:float8_e5m2)");
  CHECK(spec.overrides.size() == 1);
  CHECK((distorch::storage_of(spec) ==
         std::vector<distorch::device_storage>{{device_id::cuda(1), dtype::f16}, {device_id::cpu(), dtype::f8_e5m2}}));
  for (const auto& [name, type] : distorch::storage_dtype_names) {
    CAPTURE(name);
    CHECK(distorch::parse_allocation("cpu,*:" + std::string(name)).entries[0].storage == type);
  }
  CHECK(distorch::policy_from_string("cuda:0,1gb;cpu,*:fp8").storage().size() == 1);
  CHECK(distorch::policy_from_string("cuda:0,1gb;cpu,*").storage().empty());
}

TEST_CASE("grammar: a storage suffix changes nothing else; strings without one parse and plan as before") {
  const auto topo = distorch::parse_topology("cuda:0=8GiB,cuda:1=4GiB,cpu=32GiB");
  std::vector<distorch::unit> units;
  for (int i = 0; i < 12; ++i) units.push_back({"blocks." + std::to_string(i), {}, (300ull + 11 * i) << 20});
  const distorch::inventory model(std::move(units));
  const std::pair<const char*, const char*> pairs[] = {
      {"cuda:0,1gb;cuda:1,1.5gb;cpu,*", "cuda:0,1gb;cuda:1,1.5gb:bf16;cpu,*:fp8"},
      {"cuda:0,10%;cuda:1,30%;cpu,60%", "cuda:0,10%;cuda:1,30%:e5m2;cpu,60%:fp16"},
      {"cuda:0,0.2;cuda:1,0.5;cpu,0.5", "cuda:0,0.2;cuda:1,0.5:fp8;cpu,0.5"},
      {"cuda:0;2;cuda:1,cpu", "cuda:0;2;cuda:1:bf16,cpu:fp8"},
      {R"(blocks\.3=cuda:1;cuda:0,1gb;cuda:1,0b;cpu,*)", R"(blocks\.3=cuda:1;cuda:0,1gb;cuda:1,0b:bf16;cpu,*:fp8)"},
  };
  for (const auto& [plain, suffixed] : pairs) {
    CAPTURE(plain);
    CAPTURE(suffixed);
    const auto a = distorch::parse_allocation(plain);
    for (const auto& e : a.entries) CHECK_FALSE(e.storage.has_value());
    CHECK(distorch::storage_of(a).empty());
    const auto b = distorch::parse_allocation(suffixed);
    CHECK(b.mode == a.mode);
    CHECK_FALSE(distorch::storage_of(b).empty());
    const auto compute = a.mode == allocation_mode::virtual_vram ? a.vvram_compute : device_id::cuda(0);
    const auto pa = distorch::make_plan(model, topo, compute, distorch::policy_from_spec(a), {});
    const auto pb = distorch::make_plan(model, topo, compute, distorch::policy_from_spec(b), {});
    REQUIRE(pa.units.size() == pb.units.size());
    for (std::size_t i = 0; i < pa.units.size(); ++i) {
      CHECK(pa.units[i].device == pb.units[i].device);
      CHECK(pa.units[i].bytes == pb.units[i].bytes);
    }
  }
}

TEST_CASE("grammar rejects: an empty storage suffix") {
  check_rejects_storage("cpu,*:", 7, "missing storage dtype after ':'", true);
  check_rejects_storage("cuda:0,1gb;cpu,*:  ", 18, "missing storage dtype", true);
}

TEST_CASE("grammar rejects: an unknown storage dtype, naming the accepted ones") {
  check_rejects_storage("cuda:0,1gb;cpu,*:int8", 18, "unknown storage dtype 'int8'", true);
  check_rejects_storage("cpu,*:fp32", 7, "unknown storage dtype 'fp32'", true);
  check_rejects_storage("cpu,50%:fp4", 9, "unknown storage dtype 'fp4'", true);
  check_rejects_storage("cuda:0;4;cpu:nf4", 14, "unknown storage dtype 'nf4'", true);
  check_rejects("cpu,fp8:bf16", 5, "must start with a number");  // the value is checked first
}

TEST_CASE("grammar rejects: two storage suffixes") {
  check_rejects_storage("cpu,*:fp8:bf16", 10, "more than one storage suffix", false);
  check_rejects_storage("cuda:0;4;cpu:fp8:bf16", 14, "more than one storage suffix", false);
}

TEST_CASE("grammar rejects: a storage suffix in the wrong place") {
  check_rejects_storage("cpu:fp8,*", 5, "must follow the value", false);
  check_rejects_storage("cpu,:fp8", 5, "missing value", false);
  check_rejects_storage("blocks=cpu:fp8;cpu,*", 12, "override takes no storage suffix", false);
  check_rejects_storage("cuda:0:fp8;4;cpu", 8, "compute device takes no storage suffix", false);
}
