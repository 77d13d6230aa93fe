// An external program that consumes distorch the way a user's program does: only through
// <distorch/distorch.hpp> and whatever the build system's package (pkg-config, CMake config, Meson
// subproject) carries. It parses an allocation string, plans a small inventory on simulated
// devices, makes a tensor on a planned home, checks what it can check itself, and prints one line
// that the consumer tests compare with the project's version.
#include <cstdint>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/ops/ones.h>
#include <distorch/distorch.hpp>

int main() {
  try {
    const auto spec = distorch::parse_allocation("sim:0,2mb;cpu,*");
    if (spec.mode != distorch::allocation_mode::bytes || spec.entries.size() != 2) {
      std::cerr << "consumer: the allocation string parsed into the wrong form\n";
      return 1;
    }

    // Four 1 MiB blocks and a small head: the planner keeps the head end on the compute device
    // and offloads the tail.
    std::vector<distorch::tensor_record> records;
    for (int b = 0; b < 4; ++b)
      records.push_back({"blocks." + std::to_string(b) + ".weight", distorch::dtype::f32, {512, 512}});
    records.push_back({"head.weight", distorch::dtype::f32, {16, 512}});
    const distorch::grouping_rule blocks[] = {{R"(blocks\.\d+)"}};
    const auto model = distorch::inventory::from_records(records, blocks);

    const auto topo = distorch::parse_topology("sim:0=64MiB,cpu=1GiB");
    const auto plan = distorch::make_plan(model, topo, distorch::device_id::sim(0), spec.text);

    std::uint64_t placed = 0;
    for (const auto& d : plan.devices) placed += d.placed_bytes;
    if (plan.units.size() != model.units().size() || placed != plan.model_bytes) {
      std::cerr << "consumer: the plan does not account for every unit\n";
      return 1;
    }

    const auto home = plan.home_of("blocks.3");
    const at::Tensor t = at::ones({4, 8}, at::TensorOptions().device(distorch::to_torch_device(home)));
    if (t.sum().item<double>() != 32.0) {
      std::cerr << "consumer: the tensor on " << home.str() << " holds the wrong values\n";
      return 1;
    }

    std::cout << "distorch consumer ok: distorch " << distorch::version_string() << ", " << plan.units.size()
              << " units, " << distorch::format_bytes(plan.model_bytes) << ", blocks.3 on " << home.str() << '\n';
    return 0;
  } catch (const distorch::error& e) {
    std::cerr << "consumer: " << e.what() << '\n';
    return 1;
  }
}
