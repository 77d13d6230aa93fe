// Conan test_package: builds against the packaged headers, LibTorch and the two requirements,
// plans a small model on simulated devices and makes a tensor on a planned home.
#include <iostream>
#include <vector>

#include <ATen/ops/zeros.h>
#include <distorch/device/torch_device.hpp>
#include <distorch/placement/planner.hpp>

int main() {
  const std::vector<distorch::tensor_record> records{{"blocks.0.weight", distorch::dtype::f32, {256, 256}},
                                                     {"blocks.1.weight", distorch::dtype::f32, {256, 256}}};
  const distorch::grouping_rule blocks[] = {{R"(blocks\.\d+)"}};
  const auto model = distorch::inventory::from_records(records, blocks);
  const auto plan = distorch::make_plan(model, distorch::parse_topology("sim:0=16MiB,cpu=1GiB"), distorch::device_id::sim(0),
                                        "sim:0,256kb;cpu,*");
  const auto home = plan.home_of("blocks.1");
  const at::Tensor t = at::zeros({2, 2}, at::TensorOptions().device(distorch::to_torch_device(home)));
  std::cout << "distorch " << distorch::version_string() << ": blocks.1 on " << home.str() << ", tensor on "
            << t.device() << '\n';
  return 0;
}
