// A custom forward loop with distorch::views::streamed: each transformer block is one unit; the
// loop body sees its block resident on the compute device while the next block's copy is already
// made. The output is compared bit for bit with the same model run undistributed.
#include <ATen/Parallel.h>

#include <iostream>

#include "distorch/runtime/demo.hpp"
#include "distorch/runtime/distributed_module.hpp"
#include "distorch/runtime/streamed_view.hpp"

int main() {
  using namespace distorch;
  try {
    at::set_num_threads(1);
    at::manual_seed(3);
    demo::tiny_transformer model(32, 128, 6);
    at::manual_seed(3);
    demo::tiny_transformer reference(32, 128, 6);

    // A simulated 256 KiB GPU computing, the blocks homed on the CPU and streamed.
    device_pool pool;
    pool.add(simulated_device(device_id::sim(0), 256 << 10, "simulated GPU")).add_host();
    distribute_spec spec;
    spec.compute = device_id::sim(0);
    spec.grouping = {{R"(blocks\.\d+)"}};
    spec.streaming.prefetch_depth = 1;
    DistributedModule dm(model, pool, policy_from_string("sim:0,40kb;cpu,*"), spec);
    std::cout << format_plan_table(dm.plan()) << '\n';

    const at::Tensor x = at::randn({2, 8, 32});
    at::Tensor out;
    for (int pass = 0; pass < 2; ++pass) {
      at::Tensor h = model->embed(x);
      int i = 0;
      for (auto& block : *model->blocks | views::streamed(dm)) {
        const auto units = dm.units_of(*block);
        std::cout << "pass " << pass << " block " << i++ << ": resident=" << dm.residency().resident(units.at(0))
                  << ", sim:0 holds " << format_bytes(pool.used(device_id::sim(0))) << '\n';
        h = block->as<demo::attention_block_impl>()->forward(h);
      }
      out = model->head(model->norm(h));
    }
    const at::Tensor expected = reference->forward(x);
    std::cout << dm.stats().str() << '\n';
    const bool same = out.equal(expected);
    std::cout << "bit-identical to the undistributed model: " << (same ? "yes" : "NO") << '\n';
    return same ? 0 : 1;
  } catch (const distorch::error& e) {
    std::cerr << "block_loop: " << e.what() << '\n';
    return 1;
  }
}
