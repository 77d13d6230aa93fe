// The README's demo: generate a small transformer and a LoRA for it as safetensors, load them
// through DistributedModule with a bytes policy across the devices found (without a GPU: a
// simulated compute device too small for the model, plus the CPU), run forward a few times, and
// compare with the same model run undistributed with the LoRA merged. Exits 1 unless the
// difference is exactly 0.
#include <iostream>

#include "distorch/runtime/demo.hpp"

int main() {
  try {
    const auto result = distorch::demo::run();
    std::cout << result.report;
    return result.bit_identical && result.max_abs_diff == 0.0 ? 0 : 1;
  } catch (const distorch::error& e) {
    std::cerr << "quickstart: " << e.what() << '\n';
    return 1;
  }
}
