// profile/predictor.hpp against hand-checked closed forms (depth 0, infinite bandwidth,
// compute-bound and copy-bound pipelines, synchronous host copies) and, on random cases, against
// a second simulation written here from the recurrences rather than by issuing copies.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "distorch/profile/predictor.hpp"

using namespace distorch;

namespace {

/// A plan with the given homes and sizes, computing on `compute` (only what the predictor reads).
placement_plan make_test_plan(device_id compute, const std::vector<device_id>& homes, const std::vector<std::uint64_t>& bytes) {
  placement_plan plan;
  plan.compute = compute;
  for (std::size_t i = 0; i < homes.size(); ++i) {
    plan.units.push_back({"u" + std::to_string(i), homes[i], bytes[i], placement_reason::policy});
    plan.model_bytes += bytes[i];
  }
  return plan;
}

/// A profile whose links have the given bandwidths (bytes/s) and latencies.
profile test_profile(double h2d_bw, double h2d_lat, double d2d_bw = 1e9, double d2d_lat = 0, double memcpy_bw = 1e9) {
  profile p;
  p.machine.origin = "test";
  p.links.push_back({link_kind::host_to_device_pinned, device_id::cpu(), device_id::cuda(0), {}, h2d_bw, h2d_lat});
  p.links.push_back({link_kind::host_to_device_pageable, device_id::cpu(), device_id::cuda(0), {}, h2d_bw / 2, h2d_lat});
  p.links.push_back({link_kind::device_to_device, device_id::cuda(1), device_id::cuda(0), {}, d2d_bw, d2d_lat});
  p.links.push_back({link_kind::host_memcpy, device_id::cpu(), device_id::cpu(), {}, memcpy_bw, 0});
  return p;
}

const device_id gpu = device_id::cuda(0);
const device_id cpu = device_id::cpu();

/// The reference: the same model derived from recurrences. The copy of unit u is issued at the
/// entry of unit max(0, u - depth), copies on one stream start in unit order, and compute of
/// unit j starts at max(entry_j, copy_end_j); entry_j is the end of unit j-1.
struct reference_result {
  double step = 0;
  std::vector<double> compute_start;
};
reference_result reference(const std::vector<bool>& streamed, const std::vector<int>& stream_of, const std::vector<double>& copy,
                           const std::vector<double>& work, std::size_t depth) {
  const std::size_t n = work.size();
  std::vector<double> entry(n, 0), copy_end(n, 0), end(n, 0);
  reference_result r;
  r.compute_start.assign(n, 0);
  std::vector<double> last_end_on_stream(8, 0);
  for (std::size_t j = 0; j < n; ++j) {
    entry[j] = j == 0 ? 0 : end[j - 1];
    // Copies issued by this entry (units j .. j+depth not issued earlier) would need entry[j],
    // which is known now; a unit u is issued by entry max(0, u - depth), so compute them when
    // their issuing entry is reached.
    const std::size_t first = j == 0 ? 0 : j + depth;  // units whose issuing entry is j
    const std::size_t last = std::min(n - 1, j + depth);
    for (std::size_t u = first; u <= last && u < n; ++u) {
      if (!streamed[u]) continue;
      const double start = std::max(entry[j], last_end_on_stream[stream_of[u]]);
      copy_end[u] = start + copy[u];
      last_end_on_stream[stream_of[u]] = copy_end[u];
    }
    r.compute_start[j] = streamed[j] ? std::max(entry[j], copy_end[j]) : entry[j];
    end[j] = r.compute_start[j] + work[j];
  }
  r.step = n == 0 ? 0 : end[n - 1];
  return r;
}

}  // namespace

TEST_CASE("depth 0: every copy is exposed, the step is compute + all copies") {
  const auto plan = make_test_plan(gpu, {gpu, cpu, cpu, gpu, cpu}, {100, 200, 300, 400, 500});
  const auto p = predict_step(plan, test_profile(100.0, 0.5), compute_time::uniform(1.0), {.depth = 0});
  // Copies: 0.5 + bytes/100 = 2.5, 3.5, 5.5 seconds.
  CHECK(p.compute_seconds == doctest::Approx(5.0));
  CHECK(p.step_seconds == doctest::Approx(5.0 + 2.5 + 3.5 + 5.5));
  CHECK(p.exposed_seconds == doctest::Approx(11.5));
  REQUIRE(p.links.size() == 1);
  CHECK(p.links[0].kind == link_kind::host_to_device_pinned);
  CHECK(p.links[0].units == 3);
  CHECK(p.links[0].bytes_per_step == 1000);
  CHECK(p.links[0].transfer_seconds == doctest::Approx(11.5));
  CHECK(p.links[0].exposed_seconds == doctest::Approx(11.5));
  REQUIRE(p.slowdown);
  CHECK(*p.slowdown == doctest::Approx(16.5 / 5.0));
}

TEST_CASE("infinite bandwidth and no latency: the step is all-resident") {
  const auto plan = make_test_plan(gpu, {cpu, cpu, gpu, cpu}, {1 << 20, 1 << 20, 1 << 20, 1 << 20});
  for (std::size_t depth : {0u, 1u, 3u}) {
    const auto p = predict_step(plan, test_profile(1e300, 0), compute_time::by_bytes(1e6), {.depth = depth});
    CHECK(p.step_seconds == doctest::Approx(p.compute_seconds));
    CHECK(p.exposed_seconds == doctest::Approx(0).epsilon(1e-9));
    CHECK(*p.slowdown == doctest::Approx(1.0));
  }
}

TEST_CASE("all resident: no links, slowdown 1") {
  const auto plan = make_test_plan(gpu, {gpu, gpu}, {10, 20});
  const auto p = predict_step(plan, test_profile(1.0, 1.0), compute_time::uniform(0.25), {.depth = 2});
  CHECK(p.links.empty());
  CHECK(p.step_seconds == doctest::Approx(0.5));
  CHECK(*p.slowdown == doctest::Approx(1.0));
  CHECK(format_prediction(p).find("every unit is resident") != std::string::npos);
}

TEST_CASE("compute-bound pipeline: only the first copy is exposed") {
  // n streamed units, copy x = 1 s < compute c = 3 s, depth 1: step = x + n c.
  const std::size_t n = 6;
  const auto plan = make_test_plan(gpu, std::vector<device_id>(n, cpu), std::vector<std::uint64_t>(n, 100));
  const auto p = predict_step(plan, test_profile(100.0, 0), compute_time::uniform(3.0), {.depth = 1});
  CHECK(p.step_seconds == doctest::Approx(1.0 + 6 * 3.0));
  CHECK(p.exposed_seconds == doctest::Approx(1.0));
}

TEST_CASE("copy-bound pipeline: copies run back to back, the step is n copies + the last compute") {
  // copy x = 4 s > compute c = 1 s, depth 1 (and deeper): step = n x + c.
  const std::size_t n = 5;
  const auto plan = make_test_plan(gpu, std::vector<device_id>(n, cpu), std::vector<std::uint64_t>(n, 400));
  for (std::size_t depth : {1u, 2u, 10u}) {
    const auto p = predict_step(plan, test_profile(100.0, 0), compute_time::uniform(1.0), {.depth = depth});
    CHECK(p.step_seconds == doctest::Approx(5 * 4.0 + 1.0));
    CHECK(p.links[0].exposed_seconds == doctest::Approx(p.step_seconds - 5.0));
  }
}

TEST_CASE("a host-backed compute device copies synchronously: nothing overlaps at any depth") {
  const auto plan = make_test_plan(device_id::sim(0), {device_id::sim(0), cpu, cpu}, {100, 200, 300});
  for (std::size_t depth : {0u, 1u, 4u}) {
    const auto p = predict_step(plan, test_profile(1.0, 0, 1.0, 0, 100.0), compute_time::uniform(1.0), {.depth = depth});
    CHECK(p.synchronous_copies);
    REQUIRE(p.links.size() == 1);
    CHECK(p.links[0].kind == link_kind::host_memcpy);
    CHECK(p.step_seconds == doctest::Approx(3.0 + 2.0 + 3.0));
    CHECK(p.links[0].exposed_seconds == doctest::Approx(5.0));
  }
}

TEST_CASE("pageable homes use the pageable link; a link missing from the profile is a device_error") {
  const auto plan = make_test_plan(gpu, {cpu, cpu}, {100, 100});
  const auto pinned = predict_step(plan, test_profile(100.0, 0), compute_time::uniform(0), {.depth = 0});
  const auto pageable = predict_step(plan, test_profile(100.0, 0), compute_time::uniform(0), {.depth = 0, .pinned_host = false});
  CHECK(pinned.links[0].kind == link_kind::host_to_device_pinned);
  CHECK(pageable.links[0].kind == link_kind::host_to_device_pageable);
  CHECK(pageable.step_seconds == doctest::Approx(2 * pinned.step_seconds));
  // Compute time 0 with copies: the slowdown has no bound.
  CHECK(!pinned.slowdown);

  const auto from_gpu2 = make_test_plan(gpu, {device_id::cuda(2)}, {100});
  try {
    (void)predict_step(from_gpu2, test_profile(100.0, 0), compute_time::uniform(1));
    FAIL("predicted over a link the profile does not have");
  } catch (const device_error& e) {
    CHECK(e.info().subject == "cuda:2 -> cuda:0");
    CHECK(!e.info().fix.empty());
  }
}

TEST_CASE("compute times must match the plan and be valid") {
  const auto plan = make_test_plan(gpu, {cpu, gpu}, {100, 100});
  CHECK_THROWS_AS(predict_step(plan, test_profile(100.0, 0), compute_time::per_unit({1.0})), placement_error);
  CHECK_THROWS_AS(compute_time::uniform(-1), placement_error);
  CHECK_THROWS_AS(compute_time::by_bytes(0), placement_error);
  CHECK_THROWS_AS(compute_time::per_unit({1.0, std::nan("")}), placement_error);
  const auto p = predict_step(plan, test_profile(100.0, 0), compute_time::per_unit({2.0, 3.0}), {.depth = 1});
  CHECK(p.compute_seconds == doctest::Approx(5.0));
  CHECK(p.step_seconds == doctest::Approx(1.0 + 5.0));
}

TEST_CASE("per-link streams let copies from two homes run at once") {
  // Units 0 (cpu) and 1 (cuda:1) both copy 2 s; depth 1 issues both at time 0.
  const auto plan = make_test_plan(gpu, {cpu, device_id::cuda(1)}, {200, 200});
  const auto prof = test_profile(100.0, 0, 100.0, 0);
  const auto shared = predict_step(plan, prof, compute_time::uniform(0.5), {.depth = 1});
  const auto per_link = predict_step(plan, prof, compute_time::uniform(0.5), {.depth = 1, .streams = copy_streams::per_link});
  // Shared: copy1 waits for copy0: ends at 4; unit 1 starts at 4. Per link: it ends at 2.
  CHECK(shared.step_seconds == doctest::Approx(4.5));
  CHECK(per_link.step_seconds == doctest::Approx(2.5 + 0.5));
  CHECK(shared.links.size() == 2);
  CHECK(shared.links[1].kind == link_kind::device_to_device);
  CHECK(shared.links[1].exposed_seconds == doctest::Approx(1.5));
}

TEST_CASE("random plans agree with the reference simulation") {
  std::mt19937_64 rng(20261122);
  const device_id homes[] = {gpu, cpu, device_id::cuda(1)};
  for (int trial = 0; trial < 500; ++trial) {
    const std::size_t n = 1 + rng() % 12;
    std::vector<device_id> home(n);
    std::vector<std::uint64_t> bytes(n);
    std::vector<double> work(n);
    for (std::size_t i = 0; i < n; ++i) {
      home[i] = homes[rng() % 3];
      bytes[i] = 1 + rng() % 1000;
      work[i] = static_cast<double>(rng() % 1000) / 100.0;
    }
    const double h2d_bw = 10.0 + static_cast<double>(rng() % 500), h2d_lat = static_cast<double>(rng() % 100) / 100.0;
    const double d2d_bw = 10.0 + static_cast<double>(rng() % 500), d2d_lat = static_cast<double>(rng() % 100) / 100.0;
    const auto prof = test_profile(h2d_bw, h2d_lat, d2d_bw, d2d_lat);
    const std::size_t depth = rng() % (n + 2);
    const bool per_link = rng() % 2 == 1;
    const auto plan = make_test_plan(gpu, home, bytes);
    const auto p = predict_step(plan, prof, compute_time::per_unit(work),
                                {.depth = depth, .streams = per_link ? copy_streams::per_link : copy_streams::shared});

    std::vector<bool> streamed(n);
    std::vector<int> stream_of(n, 0);
    std::vector<double> copy(n, 0);
    for (std::size_t i = 0; i < n; ++i) {
      streamed[i] = home[i] != gpu;
      if (home[i] == cpu) copy[i] = h2d_lat + static_cast<double>(bytes[i]) / h2d_bw, stream_of[i] = per_link ? 1 : 0;
      if (home[i] == device_id::cuda(1)) copy[i] = d2d_lat + static_cast<double>(bytes[i]) / d2d_bw, stream_of[i] = per_link ? 2 : 0;
    }
    const auto ref = reference(streamed, stream_of, copy, work, depth);
    INFO("trial " << trial << " n " << n << " depth " << depth << " per_link " << per_link);
    CHECK(p.step_seconds == doctest::Approx(ref.step).epsilon(1e-9));
    for (std::size_t j = 0; j < n; ++j) CHECK(p.units[j].compute_start == doctest::Approx(ref.compute_start[j]).epsilon(1e-9));
    double exposed = 0, compute = 0;
    for (const auto& l : p.links) exposed += l.exposed_seconds;
    for (double w : work) compute += w;
    CHECK(p.compute_seconds == doctest::Approx(compute));
    CHECK(exposed == doctest::Approx(p.step_seconds - compute).epsilon(1e-9));
    // Deeper prefetch never makes the step slower in this model.
    const auto deeper = predict_step(plan, prof, compute_time::per_unit(work),
                                     {.depth = depth + 1, .streams = per_link ? copy_streams::per_link : copy_streams::shared});
    CHECK(deeper.step_seconds <= p.step_seconds + 1e-9);
  }
}

TEST_CASE("compute_time_from_run takes waits (and host copies) out of the measured step") {
  const auto plan = make_test_plan(gpu, {gpu, cpu}, {300, 100});
  streaming_stats stats;
  stats.wait_seconds = 2.0;  // over 4 steps
  stats.copy_seconds = 4.0;
  const auto t = compute_time_from_run(plan, 1.5, stats, 4, false);
  // 1.5 - 0.5 = 1 s of compute, by bytes: 0.75 and 0.25.
  CHECK(t.seconds(0, 300) == doctest::Approx(0.75));
  CHECK(t.seconds(1, 100) == doctest::Approx(0.25));
  const auto host = compute_time_from_run(plan, 2.0, stats, 4, true);  // 2 - 0.5 - 1 = 0.5 s
  CHECK(host.seconds(0, 300) == doctest::Approx(0.375));
  CHECK_THROWS_AS(compute_time_from_run(plan, 1.0, stats, 0, false), placement_error);
}

TEST_CASE("prediction JSON and text carry the figures") {
  const auto plan = make_test_plan(gpu, {gpu, cpu}, {100, 200});
  const auto p = predict_step(plan, test_profile(100.0, 0), compute_time::uniform(1.0), {.depth = 0});
  const auto j = prediction_to_json(p);
  CHECK(j["step_seconds"].get<double>() == doctest::Approx(4.0));
  CHECK(j["links"][0]["bytes_per_step"] == 200);
  CHECK(j["links"][0]["kind"] == "host_to_device_pinned");
  CHECK(j["slowdown"].get<double>() == doctest::Approx(2.0));
  const auto text = format_prediction(p);
  CHECK(text.find("cpu -> cuda:0 (host_to_device_pinned)") != std::string::npos);
  CHECK(text.find("slowdown 2.000x") != std::string::npos);
}
