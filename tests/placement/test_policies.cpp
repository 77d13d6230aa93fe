// Tests for placement/policy.hpp, policies.hpp, overrides.hpp and any_policy.hpp: the quotas of
// DisTorch2's documented strings, a seeded comparison with DisTorch2's own arithmetic (float64,
// four-decimal fractions, as distorch_2.py computes them), clamping, and composition.
#include "distorch/placement/any_policy.hpp"
#include "distorch/placement/overrides.hpp"
#include "distorch/placement/policies.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <map>
#include <random>
#include <regex>
#include <string>
#include <vector>

namespace {

using distorch::device_id;
constexpr std::uint64_t GiB = 1ull << 30;
constexpr std::uint64_t MiB = 1ull << 20;

distorch::inventory model_of_bytes(std::uint64_t total, std::size_t units = 10) {
  std::vector<distorch::unit> us;
  for (std::size_t i = 0; i < units; ++i) {
    const std::uint64_t b = total / units + (i + 1 == units ? total % units : 0);
    us.push_back({"blocks." + std::to_string(i), {}, b});
  }
  return distorch::inventory(std::move(us));
}

const distorch::topology& three_devices() {
  static const auto topo = distorch::parse_topology("cuda:0=24GiB,cuda:1=12GiB,cpu=64GiB");
  return topo;
}

std::map<std::string, std::uint64_t> quotas_of(const std::string& spec, std::uint64_t model_bytes,
                                               const distorch::topology& topo = three_devices(),
                                               device_id compute = device_id::cuda(0)) {
  const auto model = model_of_bytes(model_bytes);
  const auto set = distorch::policy_from_string(spec).quotas({model, topo, compute});
  std::map<std::string, std::uint64_t> out;
  for (const auto& q : set.quotas) out[q.device.str()] = q.bytes;
  return out;
}

std::vector<std::string> fill_order(const std::string& spec, std::uint64_t model_bytes) {
  const auto model = model_of_bytes(model_bytes);
  std::vector<std::string> out;
  for (const auto& q : distorch::policy_from_string(spec).quotas({model, three_devices(), device_id::cuda(0)}).quotas)
    out.push_back(q.device.str());
  return out;
}

}  // namespace

TEST_CASE("policies: DisTorch2's documented strings give DisTorch2's quotas") {
  const std::uint64_t model = 10 * GiB;
  using q = std::map<std::string, std::uint64_t>;
  // "will load the first 2.50GB of the model onto cuda:0 and the rest onto the cpu"
  CHECK(quotas_of("cuda:0,2.5gb;cpu,*", model) == q{{"cuda:0", 2 * GiB + GiB / 2}, {"cpu", 7 * GiB + GiB / 2}});
  // "0.50GB on cuda:0, 3.00GB on cuda:1, and 5.00GB (or the remainder) on cpu"
  CHECK(quotas_of("cuda:0,500mb;cuda:1,3.0g;cpu,5gb*", model) ==
        q{{"cuda:0", 500 * MiB}, {"cuda:1", 3 * GiB}, {"cpu", model - 500 * MiB - 3 * GiB}});
  CHECK(quotas_of("cuda:0,500mb;cuda:1,3.0g;cpu,5gb*", 8 * GiB + 500 * MiB)["cpu"] == 5 * GiB);
  // "a 1:3 ratio, loading 25% onto cuda:0 and 75% onto the cpu"
  CHECK(quotas_of("cuda:0,25%;cpu,75%", model) == q{{"cuda:0", model / 4}, {"cpu", model / 4 * 3}});
  // "an 8:8:4 ratio, putting 40% of the model on cuda:0, 40% on cuda:1, and 20% on cpu"
  CHECK(quotas_of("cuda:0,8%;cuda:1,8%;cpu,4%", model) == q{{"cuda:0", 4 * GiB}, {"cuda:1", 4 * GiB}, {"cpu", 2 * GiB}});
  // "will use 10% of cuda:0's VRAM and 50% of the cpu's RAM to hold the model"
  CHECK(quotas_of("cuda:0,0.1;cpu,0.5", model) == q{{"cuda:0", 24 * GiB / 10}, {"cpu", 32 * GiB}});
  // virtual VRAM: move 4 GB off cuda:0 onto cpu
  CHECK(quotas_of("cuda:0;4;cpu", model) == q{{"cuda:0", 6 * GiB}, {"cpu", 4 * GiB}});
  // donors in order, each up to its capacity; the compute device keeps max(0, model - GB)
  CHECK(quotas_of("cuda:0;20;cuda:1,cpu", model) == q{{"cuda:0", 0}, {"cuda:1", 12 * GiB}, {"cpu", 8 * GiB}});
}

TEST_CASE("bytes policy: in written order, min(size, rest); the wildcard or cpu takes what is left") {
  using q = std::map<std::string, std::uint64_t>;
  const std::uint64_t model = 10 * GiB;
  CHECK(quotas_of("cuda:0,20gb;cpu,*", model) == q{{"cuda:0", model}, {"cpu", 0}});
  CHECK(quotas_of("cuda:0,6gb;cuda:1,6gb;cpu,*", model) == q{{"cuda:0", 6 * GiB}, {"cuda:1", 4 * GiB}, {"cpu", 0}});
  // cpu is the implicit wildcard: appended when absent...
  CHECK(quotas_of("cuda:0,1gb;cuda:1,2gb", model) == q{{"cuda:0", GiB}, {"cuda:1", 2 * GiB}, {"cpu", 7 * GiB}});
  CHECK(fill_order("cuda:0,1gb;cuda:1,2gb", model) == std::vector<std::string>{"cuda:0", "cuda:1", "cpu"});
  // ...and topped up when named with a size, as DisTorch2 does
  CHECK(quotas_of("cuda:0,1gb;cpu,2gb", model) == q{{"cuda:0", GiB}, {"cpu", 9 * GiB}});
  // an explicit wildcard elsewhere takes the remainder instead of cpu
  CHECK(quotas_of("cuda:1,*;cuda:0,1gb;cpu,2gb", model) == q{{"cuda:0", GiB}, {"cuda:1", 7 * GiB}, {"cpu", 2 * GiB}});
  CHECK(fill_order("cuda:1,*;cuda:0,1gb;cpu,2gb", model) == std::vector<std::string>{"cuda:1", "cuda:0", "cpu"});
}

TEST_CASE("bytes policy: without a wildcard and without cpu, the rest stays on the compute device") {
  const auto topo = distorch::parse_topology("cuda:0=24GiB,cuda:1=12GiB");
  const auto model = model_of_bytes(10 * GiB);
  const auto set = distorch::policy_from_string("cuda:1,2gb").quotas({model, topo, device_id::cuda(0)});
  REQUIRE(set.quotas.size() == 1);
  CHECK(set.quotas[0].bytes == 2 * GiB);
  REQUIRE(set.warnings.size() == 1);
  CHECK(set.warnings[0].find("8.00 GiB stay on the compute device cuda:0") != std::string::npos);
}

TEST_CASE("ratio and fraction policies round down in exact integers") {
  const std::uint64_t model = 1000;
  using q = std::map<std::string, std::uint64_t>;
  CHECK(quotas_of("cuda:0,1%;cuda:1,1%;cpu,1%", model) == q{{"cuda:0", 333}, {"cuda:1", 333}, {"cpu", 333}});
  CHECK(quotas_of("cuda:0,2.5%;cpu,7.5%", model) == q{{"cuda:0", 250}, {"cpu", 750}});
  const auto topo = distorch::parse_topology("cuda:0=1000b,cpu=999b");
  CHECK(quotas_of("cuda:0,0.3333;cpu,1", model, topo) == q{{"cuda:0", 333}, {"cpu", 999}});
}

TEST_CASE("auto policy: compute keeps free - reserve - window, GPUs then cpu offer all their memory") {
  const auto topo = distorch::parse_topology("cpu=64GiB,cuda:0=8GiB,cuda:1=4GiB");
  const auto model = model_of_bytes(20 * GiB);
  const distorch::policy_context ctx{model, topo, device_id::cuda(0), 1 * GiB, 2 * GiB};
  const auto set = distorch::auto_policy{}.quotas(ctx);
  REQUIRE(set.quotas.size() == 3);
  CHECK(set.quotas[0].device == device_id::cuda(0));
  CHECK(set.quotas[0].bytes == 5 * GiB);
  CHECK(set.quotas[1].device == device_id::cuda(1));
  CHECK(set.quotas[1].bytes == 4 * GiB);
  CHECK(set.quotas[2].device == device_id::cpu());
  CHECK(set.quotas[2].bytes == 64 * GiB);
  CHECK(set.warnings.empty());
  const auto huge = model_of_bytes(100 * GiB);
  const auto short_set = distorch::auto_policy{}.quotas({huge, topo, device_id::cuda(0), 1 * GiB, 2 * GiB});
  REQUIRE(short_set.warnings.size() == 1);
  CHECK(short_set.warnings[0].find("fit on no device") != std::string::npos);
}

TEST_CASE("virtual VRAM policy: compute device must match; short donors warn or fail in strict mode") {
  const auto model = model_of_bytes(40 * GiB);
  const auto policy = distorch::policy_from_string("cuda:0;30;cuda:1");
  const auto set = policy.quotas({model, three_devices(), device_id::cuda(0)});
  REQUIRE(set.warnings.size() == 1);
  CHECK(set.warnings[0].find("hold only 12.00 GiB of the 30.00 GiB") != std::string::npos);
  CHECK_THROWS_AS(policy.quotas({model, three_devices(), device_id::cuda(0), 0, 0, true}), distorch::allocation_error);
  try {
    (void)policy.quotas({model, three_devices(), device_id::cuda(1)});
    FAIL("expected allocation_error");
  } catch (const distorch::allocation_error& e) {
    CHECK(e.info().position->value == 1);
    CHECK(e.info().problem.find("computes on cuda:0 but the plan's compute device is cuda:1") != std::string::npos);
  }
}

TEST_CASE("policies: asking more than a device has is clamped with a warning, an error in strict mode") {
  const auto model = model_of_bytes(40 * GiB);
  const auto policy = distorch::policy_from_string("cuda:1,20gb;cpu,*");
  const auto set = policy.quotas({model, three_devices(), device_id::cuda(0)});
  REQUIRE(set.quotas.size() == 2);
  CHECK(set.quotas[0].requested == 20 * GiB);
  CHECK(set.quotas[0].bytes == 12 * GiB);
  REQUIRE(set.warnings.size() == 1);
  CHECK(set.warnings[0].find("'cuda:1,20gb' asks 20.00 GiB but cuda:1 has 12.00 GiB free; clamped to 12.00 GiB") != std::string::npos);
  try {
    (void)policy.quotas({model, three_devices(), device_id::cuda(0), 0, 0, true});
    FAIL("expected allocation_error");
  } catch (const distorch::allocation_error& e) {
    CHECK(e.info().subject == "cuda:1,20gb");
    CHECK(e.info().position->value == 1);
  }
}

TEST_CASE("policies: a device not in the topology is an allocation_error naming its entry") {
  const auto model = model_of_bytes(GiB);
  for (const char* spec : {"cuda:0,1gb;cuda:2,1gb;cpu,*", "cuda:0,25%;cuda:2,75%", "cuda:0,0.1;cuda:2,0.5", "cuda:0;4;cuda:2"}) {
    CAPTURE(spec);
    try {
      (void)distorch::policy_from_string(spec).quotas({model, three_devices(), device_id::cuda(0)});
      FAIL("expected allocation_error");
    } catch (const distorch::allocation_error& e) {
      CHECK(e.info().problem.find("cuda:2 is not present") != std::string::npos);
      CHECK(e.info().position.has_value());
    }
  }
}

TEST_CASE("policies: quotas agree with DisTorch2's float arithmetic on random strings") {
  // DisTorch2 turns bytes and ratio strings into fractions of each device's total memory printed
  // with four decimals, then multiplies back. Our exact quotas must lie within that rounding.
  const auto& topo = three_devices();
  const std::vector<std::string> names{"cuda:0", "cuda:1", "cpu"};
  std::mt19937_64 rng(20261122);
  auto total_of = [&](const std::string& d) { return static_cast<double>(topo.find(device_id::parse(d))->total_bytes); };
  auto round4 = [](double x) { return std::round(x * 10000.0) / 10000.0; };
  for (int iteration = 0; iteration < 3000; ++iteration) {
    const std::uint64_t model_bytes = MiB + rng() % (40 * GiB);
    std::vector<std::string> order = names;
    std::shuffle(order.begin(), order.end(), rng);
    order.resize(1 + rng() % 3);
    const int mode = static_cast<int>(rng() % 3);
    std::string spec;
    std::map<std::string, double> expected;
    if (mode == 0) {  // bytes, the reference is calculate_fraction_from_byte_expert_string
      const bool with_wildcard = rng() % 2;
      std::string wildcard = "cpu";
      std::vector<std::pair<std::string, double>> parsed;
      for (std::size_t i = 0; i < order.size(); ++i) {
        if (!spec.empty()) spec += ';';
        if (with_wildcard && i + 1 == order.size()) {
          spec += order[i] + ",*";
          wildcard = order[i];
          continue;
        }
        const unsigned mib = 1 + static_cast<unsigned>(rng() % (12 * 1024));
        spec += order[i] + ',' + std::to_string(mib) + "mb";
        parsed.emplace_back(order[i], mib * 1048576.0);
      }
      double remaining = static_cast<double>(model_bytes);
      std::map<std::string, double> final_bytes;
      for (const auto& [dev, want] : parsed) {
        const double give = std::min(want, remaining);
        if (give > 0) final_bytes[dev] = give, remaining -= give;
        if (remaining <= 0) break;
      }
      if (remaining > 0) final_bytes[wildcard] += remaining;
      for (const auto& [dev, b] : final_bytes) expected[dev] = total_of(dev) * round4(b / total_of(dev));
    } else if (mode == 1) {  // ratio, the reference is calculate_fraction_from_ratio_expert_string
      std::map<std::string, double> parts;
      double sum = 0;
      for (const auto& d : order) {
        const unsigned part = 1 + static_cast<unsigned>(rng() % 100);
        spec += (spec.empty() ? "" : ";") + d + ',' + std::to_string(part) + '%';
        parts[d] = part, sum += part;
      }
      for (const auto& [dev, part] : parts)
        expected[dev] = total_of(dev) * round4(part / sum * static_cast<double>(model_bytes) / total_of(dev));
    } else {  // fraction, as written
      for (const auto& d : order) {
        const unsigned ten_thousandths = static_cast<unsigned>(rng() % 10001);
        char value[16];
        std::snprintf(value, sizeof value, "%u.%04u", ten_thousandths / 10000, ten_thousandths % 10000);
        spec += (spec.empty() ? "" : ";") + d + ',' + value;
        expected[d] = total_of(d) * (ten_thousandths / 10000.0);
      }
    }
    CAPTURE(spec);
    CAPTURE(model_bytes);
    const auto model = model_of_bytes(model_bytes);
    const auto set = distorch::policy_from_string(spec).quotas({model, topo, device_id::cuda(0)});
    for (const auto& q : set.quotas) {
      const double want = expected.count(q.device.str()) ? expected[q.device.str()] : 0.0;
      const double tolerance = total_of(q.device.str()) * 0.00005 + 2.0;
      CHECK(std::abs(static_cast<double>(q.requested) - want) <= tolerance);
    }
    for (const auto& [dev, want] : expected)
      if (want > total_of(dev) * 0.00005 + 2.0) CHECK(set.find(device_id::parse(dev)) != nullptr);
  }
}

namespace {
struct everything_on_cpu {
  distorch::quota_set quotas(const distorch::policy_context& ctx) const {
    return {{{device_id::cpu(), ctx.model_bytes(), ctx.model_bytes(), "", 0}}, {}};
  }
  std::string describe() const { return "everything on cpu"; }
};
struct not_a_policy {
  int quotas() const { return 0; }
};
}  // namespace

TEST_CASE("placement_policy concept, overrides composition and any_policy") {
  static_assert(distorch::placement_policy<everything_on_cpu>);
  static_assert(!distorch::placement_policy<not_a_policy>);
  static_assert(!distorch::placement_policy<int>);
  CHECK(distorch::policy_overrides(everything_on_cpu{}).empty());

  auto composed = distorch::with_overrides(everything_on_cpu{}, {{"blocks\\.0", device_id::cuda(1), "", 0}});
  static_assert(distorch::placement_policy<decltype(composed)>);
  REQUIRE(distorch::policy_overrides(composed).size() == 1);
  CHECK(composed.describe() == "blocks\\.0=cuda:1;everything on cpu");

  distorch::any_policy erased = composed;
  CHECK(erased.describe() == composed.describe());
  CHECK(erased.overrides().size() == 1);
  distorch::any_policy copy = erased;
  erased = distorch::auto_policy{};
  CHECK(copy.overrides().size() == 1);
  CHECK(erased.overrides().empty());
  CHECK(erased.describe() == "auto");

  const auto from_text = distorch::policy_from_string("head=cpu;cuda:0,25%;cpu,75%");
  CHECK(from_text.describe() == "head=cpu;cuda:0,25%;cpu,75%");
  REQUIRE(from_text.overrides().size() == 1);
  CHECK(from_text.overrides()[0].pattern == "head");
  const auto model = model_of_bytes(GiB);
  const auto with = from_text.quotas({model, three_devices(), device_id::cuda(0)});
  const auto without = distorch::policy_from_string("cuda:0,25%;cpu,75%").quotas({model, three_devices(), device_id::cuda(0)});
  REQUIRE(with.quotas.size() == without.quotas.size());
  for (std::size_t i = 0; i < with.quotas.size(); ++i) {
    CHECK(with.quotas[i].device == without.quotas[i].device);
    CHECK(with.quotas[i].bytes == without.quotas[i].bytes);
    CHECK(with.quotas[i].column == without.quotas[i].column + 9);  // after "head=cpu;"
  }
}

TEST_CASE("override_matcher: search in unit and tensor names, first rule wins") {
  const std::vector<distorch::override_rule> rules{{"blocks\\.1\\.", device_id::cuda(1), "", 0}, {"blocks", device_id::cpu(), "", 0}};
  const distorch::override_matcher m(rules);
  const distorch::unit by_tensor{"blocks.1", {{"blocks.1.attn.weight", distorch::dtype::f32, {4}}}, 16};
  const distorch::unit by_name{"blocks.10", {}, 16};
  const distorch::unit other{"head", {}, 16};
  REQUIRE(m.match(by_tensor) != nullptr);
  CHECK(m.match(by_tensor)->device == device_id::cuda(1));
  REQUIRE(m.match(by_name) != nullptr);
  CHECK(m.match(by_name)->device == device_id::cpu());
  CHECK(m.match(other) == nullptr);
  CHECK_THROWS_AS(distorch::override_matcher(std::vector<distorch::override_rule>{{"(", device_id::cpu(), "", 0}}),
                  distorch::allocation_error);
}

TEST_CASE("override_matcher: same rule as plain std::regex_search on random units") {
  // Patterns in the shapes users write: literal (decided by the prefilter alone), literal with
  // open parts (prefilter rules names out, the regex decides), and ones the prefilter leaves.
  const std::vector<std::string> patterns{
      R"(blocks\.(0|1)\.)", "layer7$",         R"(^blocks\.1)",     R"(blocks\.\d+\.attn)", R"(attn\.(q|k)_proj)",
      "mlp|norm",           R"(\.bias$)",      "(?=blocks)blocks.2", R"(layer[0-3]\b)",     R"(^(head|embed))",
      "b.o",                R"(blocks\.1\d)", "[._]w", "proj"};
  std::mt19937_64 rng(99);
  const std::vector<std::string> parts{"blocks", "layer7", "layer3", "attn", "mlp", "q_proj", "k_proj", "norm",
                                       "bias", "weight", "head", "embed", "0", "1", "2", "12"};
  auto name = [&] {
    std::string s;
    const std::size_t n = 1 + rng() % 4;
    for (std::size_t i = 0; i < n; ++i) s += (i ? (rng() % 5 == 0 ? "_" : ".") : "") + parts[rng() % parts.size()];
    return s;
  };
  std::size_t matched = 0, unmatched = 0;
  for (int round = 0; round < 40; ++round) {
    std::vector<distorch::override_rule> rules;
    const std::size_t rule_count = 1 + rng() % 3;
    for (std::size_t r = 0; r < rule_count; ++r)
      rules.push_back({patterns[rng() % patterns.size()], r % 2 ? device_id::cpu() : device_id::cuda(r), "", 0});
    const distorch::override_matcher m(rules);
    std::vector<std::regex> plain;
    for (const auto& r : rules) plain.emplace_back(r.pattern, distorch::user_regex_flags);
    for (int k = 0; k < 200; ++k) {
      distorch::unit u{name(), {}, 16};
      const std::size_t tensors = rng() % 3;
      for (std::size_t t = 0; t < tensors; ++t) u.tensors.push_back({u.name + "." + name(), distorch::dtype::f32, {4}});
      const distorch::override_rule* expected = nullptr;
      for (std::size_t r = 0; r < rules.size() && !expected; ++r) {
        bool hit = std::regex_search(u.name, plain[r]);
        for (const auto& t : u.tensors) hit = hit || std::regex_search(t.name, plain[r]);
        if (hit) expected = &rules[r];
      }
      const auto* got = m.match(u);
      INFO("unit ", u.name);
      REQUIRE((got == nullptr) == (expected == nullptr));
      if (got) {
        CHECK(got->pattern == expected->pattern);
        CHECK(got->device == expected->device);
        ++matched;
      } else {
        ++unmatched;
      }
    }
  }
  CHECK(matched > 0);
  CHECK(unmatched > 0);
}
