// A custom loader: plan from the weight file's headers alone (no tensor data read), print the plan,
// then load every unit directly into place: file -> compute device -> its home, one unit at a time.
#include <ATen/Parallel.h>
#include <unistd.h>

#include <filesystem>
#include <iostream>

#include "distorch/io/file_inventory.hpp"
#include "distorch/io/open.hpp"
#include "distorch/io/torch_tensor.hpp"
#include "distorch/runtime/demo.hpp"
#include "distorch/runtime/distributed_module.hpp"

int main() {
  using namespace distorch;
  const auto dir = std::filesystem::temp_directory_path() / ("distorch-custom-loader-" + std::to_string(::getpid()));
  int status = 1;
  try {
    at::set_num_threads(1);
    std::filesystem::create_directories(dir);
    const std::string path = (dir / "model.safetensors").string();
    at::manual_seed(1);
    demo::tiny_transformer saved(32, 128, 4);
    save_safetensors(path, demo::named_tensors(*saved));

    // 1. Plan from the file's headers: the same unit names the live module will have.
    const std::vector<grouping_rule> grouping{{R"(blocks\.\d+)"}};
    const inventory from_file = inventory_of_file(path, grouping);
    device_pool pool;
    pool.add(simulated_device(device_id::sim(0), 200 << 10, "simulated GPU")).add_host();
    planner_options planning;
    planning.prefetch_depth = 1;  // one fetched ahead of the running unit, as the runtime streams below
    const placement_plan plan = make_plan(from_file, pool.topo(), device_id::sim(0), "sim:0,64kb;cpu,*", planning);
    std::cout << "planned from " << from_file.size() << " units in the file header:\n" << format_plan_table(plan) << '\n';

    // 2. Load directly into place by that plan.
    distribute_spec spec;
    spec.compute = device_id::sim(0);
    spec.grouping = grouping;
    spec.weights = {open_weights(path)};
    spec.streaming.prefetch_depth = 1;
    at::manual_seed(2);
    demo::tiny_transformer model(32, 128, 4);
    DistributedModule<demo::tiny_transformer> dm(model, pool, plan, spec);
    std::cout << "peak on sim:0 while loading and running: " << format_bytes(pool.peak(device_id::sim(0))) << " of "
              << format_bytes(from_file.total_bytes()) << '\n';

    const at::Tensor x = at::randn({1, 8, 32});
    const bool same = dm.forward(x).equal(saved->forward(x));
    std::cout << dm.stats().str() << "\nmatches the model that wrote the file: " << (same ? "yes" : "NO") << '\n';
    status = same ? 0 : 1;
  } catch (const distorch::error& e) {
    std::cerr << "custom_loader: " << e.what() << '\n';
  }
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
  return status;
}
