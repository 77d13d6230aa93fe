// Two models in a registry, one kept loaded. free() unloads the other and clears caches; the
// retention check then proves the kept model did not lose or move a tensor. Memory snapshots at
// each checkpoint print as one aligned series.
#include <ATen/Parallel.h>

#include <iostream>

#include "distorch/runtime/demo.hpp"
#include "distorch/runtime/distributed_module.hpp"
#include "distorch/runtime/registry.hpp"

int main() {
  using namespace distorch;
  using model_type = DistributedModule<demo::tiny_transformer>;
  try {
    at::set_num_threads(1);
    device_pool pool;
    pool.add(simulated_device(device_id::sim(0), 1 << 20, "simulated GPU")).add_host();
    distribute_spec spec;
    spec.compute = device_id::sim(0);

    model_registry registry(pool);
    registry.snapshot("empty");
    at::manual_seed(1);
    auto encoder = std::make_shared<model_type>(demo::tiny_transformer(32, 64, 2), pool, policy_from_string("sim:0,60kb;cpu,*"), spec);
    at::manual_seed(2);
    auto denoiser = std::make_shared<model_type>(demo::tiny_transformer(32, 128, 3), pool, policy_from_string("sim:0,100kb;cpu,*"), spec);
    registry.add("encoder", encoder);
    registry.add("denoiser", denoiser, /*keep_loaded=*/true);
    registry.snapshot("both loaded");

    const at::Tensor x = at::randn({1, 4, 32});
    const at::Tensor before = denoiser->forward(x);
    const auto report = registry.free();  // throws retention_error if the denoiser was touched
    registry.snapshot("after free");
    std::cout << "unloaded:";
    for (const auto& name : report.unloaded) std::cout << ' ' << name;
    std::cout << "\nkept model still loaded: " << (denoiser->loaded() ? "yes" : "no") << '\n';

    const auto nothing = registry.unload_all();  // nothing left to unload: a strict no-op
    registry.snapshot("no-op unload");
    std::cout << registry.memory().table();
    const bool same = denoiser->forward(x).equal(before);
    std::cout << "kept model computes the same after free: " << (same ? "yes" : "NO") << '\n';
    return same && nothing.empty() && report.unloaded == std::vector<std::string>{"encoder"} ? 0 : 1;
  } catch (const distorch::error& e) {
    std::cerr << "registry: " << e.what() << '\n';
    return 1;
  }
}
