#pragma once
/// \file
/// `discover()`: every device this process's LibTorch can use, with total and free memory.
/// - The CPU is always first, with host RAM from `/proc/meminfo` (MemTotal, MemAvailable).
/// - Then CUDA devices, counted through LibTorch's registered CUDA guard (present only when
///   LibTorch was built with CUDA and libtorch_cuda is loaded), with memory and name from the CUDA
///   runtime that LibTorch loaded (device/memory_info.hpp). The same binary source therefore
///   compiles without CUDA and finds the GPUs of a PyTorch + CUDA install.
/// - Then XPU, MPS and PrivateUse1 (npu) devices when LibTorch has a guard registered for them.
///   Neither LibTorch 1.13 nor 2.x offers a memory query for these that both versions share, so
///   their total and free bytes are 0 ("memory unknown"); give their capacity with a topology
///   string (`parse_topology`) instead.
/// Only `<c10/core/impl/DeviceGuardImplInterface.h>` is included from LibTorch.
///
/// Example:
/// \code
///   distorch::topology topo = distorch::discover();
///   for (const auto& d : topo.devices)
///     std::cout << d.id.str() << ' ' << d.name << ' ' << distorch::format_bytes(d.free_bytes) << '\n';
/// \endcode

#include <string>

#include <c10/core/DeviceType.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "distorch/device/device_id.hpp"
#include "distorch/device/memory_info.hpp"
#include "distorch/device/topology.hpp"

namespace distorch::inline v0 {

/// How many devices of a LibTorch device type this process can use (0 when LibTorch has no backend
/// registered for it).
/// \code int gpus = distorch::torch_device_count(c10::DeviceType::CUDA); \endcode
inline int torch_device_count(c10::DeviceType type) noexcept {
  if (!c10::impl::hasDeviceGuardImpl(type)) return 0;
  return static_cast<int>(c10::impl::getDeviceGuardImpl(type)->deviceCount());
}

/// The host, then every accelerator LibTorch reports, with total and free bytes now.
/// \code
///   auto topo = distorch::discover();
///   topo.devices.front().id.str();   // "cpu"
/// \endcode
inline topology discover() {
  topology topo;
  const auto ram = host_memory();
  topo.devices.push_back({device_id::cpu(), ram ? ram->total : 0, ram ? ram->free : 0, false,
                          ram ? "host RAM" : "host RAM (memory unknown)"});

  const int cuda_count = torch_device_count(c10::DeviceType::CUDA);
  for (int i = 0; i < cuda_count; ++i) {
    const auto memory = cuda_memory(i);
    std::string name = cuda_device_name(i).value_or("CUDA device");
    if (!memory) name += " (memory unknown)";
    topo.devices.push_back({device_id::cuda(i), memory ? memory->total : 0, memory ? memory->free : 0, false, std::move(name)});
  }

  const int xpu_count = torch_device_count(c10::DeviceType::XPU);
  for (int i = 0; i < xpu_count; ++i)
    topo.devices.push_back({device_id{device_kind::xpu, i}, 0, 0, false, "XPU device (memory unknown)"});

  if (torch_device_count(c10::DeviceType::MPS) > 0)
    topo.devices.push_back({device_id{device_kind::mps, -1}, 0, 0, false, "MPS device (memory unknown)"});

  const int private_count = torch_device_count(c10::DeviceType::PrivateUse1);
  for (int i = 0; i < private_count; ++i)
    topo.devices.push_back({device_id{device_kind::npu, i}, 0, 0, false, "PrivateUse1 device (memory unknown)"});
  return topo;
}

}  // namespace distorch::inline v0
