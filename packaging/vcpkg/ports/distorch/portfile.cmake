# Overlay port for distorch (vcpkg install distorch --overlay-ports=<checkout>/packaging/vcpkg/ports).
# It builds the distorch checkout it sits in: this folder is <checkout>/packaging/vcpkg/ports/distorch.
# A registry port would fetch the release instead, with
#   vcpkg_from_github(OUT_SOURCE_PATH SOURCE_PATH REPO distorch/distorch REF "v${VERSION}" SHA512 <hash>)
get_filename_component(SOURCE_PATH "${CMAKE_CURRENT_LIST_DIR}/../../../.." ABSOLUTE)
if(NOT EXISTS "${SOURCE_PATH}/meson.build" OR NOT EXISTS "${SOURCE_PATH}/include/distorch/distorch.hpp")
  message(FATAL_ERROR "distorch overlay port: expected the distorch checkout at ${SOURCE_PATH}")
endif()

# Header-only: one configuration holds everything; nothing is compiled.
set(VCPKG_BUILD_TYPE release)

if("cuda" IN_LIST FEATURES)
  # distorch's meson.build looks for cuda_runtime_api.h under CUDA_HOME.
  include("${CURRENT_INSTALLED_DIR}/share/cuda/vcpkg_find_cuda.cmake")
  vcpkg_find_cuda(OUT_CUDA_TOOLKIT_ROOT DISTORCH_CUDA_ROOT)
  set(ENV{CUDA_HOME} "${DISTORCH_CUDA_ROOT}")
endif()

# LibTorch comes from vcpkg's libtorch port, found at the installed tree's root (distorch's
# meson.build takes a LibTorch root: <root>/include, <root>/include/torch/csrc/api/include, <root>/lib).
vcpkg_configure_meson(
  SOURCE_PATH "${SOURCE_PATH}"
  OPTIONS
    -Dtests=false
    -Dbenchmarks=false
    -Dexamples=false
    -Dfuzzers=false
    -Dtools=false
    -Dtorch=enabled
    "-Dtorch_dir=${CURRENT_INSTALLED_DIR}"
)
vcpkg_install_meson()

# Meson puts the CMake package and the .pc file under lib/; vcpkg wants them under share/ for a
# header-only port (and an empty lib/ is an error). The config remembers the LibTorch root it was
# built against; in vcpkg that is the installed tree, the prefix distorch itself lands in.
vcpkg_replace_string("${CURRENT_PACKAGES_DIR}/lib/cmake/distorch/distorchConfig.cmake"
  "${CURRENT_INSTALLED_DIR}" "\${PACKAGE_PREFIX_DIR}")
vcpkg_cmake_config_fixup(PACKAGE_NAME distorch CONFIG_PATH lib/cmake/distorch NO_PREFIX_CORRECTION)
# Meson's PACKAGE_INIT climbs from lib/cmake/distorch; the config now sits in share/distorch.
set(DISTORCH_CONFIG "${CURRENT_PACKAGES_DIR}/share/distorch/distorchConfig.cmake")
file(READ "${DISTORCH_CONFIG}" DISTORCH_CONFIG_TEXT)
string(REGEX REPLACE "get_filename_component\\(PACKAGE_PREFIX_DIR \"[^\"]*\" ABSOLUTE\\)"
  "get_filename_component(PACKAGE_PREFIX_DIR \"\${CMAKE_CURRENT_LIST_DIR}/../..\" ABSOLUTE)"
  DISTORCH_FIXED_TEXT "${DISTORCH_CONFIG_TEXT}")
if(DISTORCH_FIXED_TEXT STREQUAL DISTORCH_CONFIG_TEXT)
  message(FATAL_ERROR "distorch: no PACKAGE_PREFIX_DIR line to correct in ${DISTORCH_CONFIG}")
endif()
file(WRITE "${DISTORCH_CONFIG}" "${DISTORCH_FIXED_TEXT}")
file(MAKE_DIRECTORY "${CURRENT_PACKAGES_DIR}/share/pkgconfig")
file(RENAME "${CURRENT_PACKAGES_DIR}/lib/pkgconfig/distorch.pc" "${CURRENT_PACKAGES_DIR}/share/pkgconfig/distorch.pc")
file(REMOVE_RECURSE "${CURRENT_PACKAGES_DIR}/lib")
vcpkg_fixup_pkgconfig()

if("cuda" IN_LIST FEATURES)
  file(READ "${CURRENT_PACKAGES_DIR}/share/pkgconfig/distorch.pc" DISTORCH_PC)
  if(NOT DISTORCH_PC MATCHES "torch_cuda")
    message(FATAL_ERROR "distorch[cuda]: distorch's build did not find libtorch_cuda under ${CURRENT_INSTALLED_DIR}/lib")
  endif()
endif()

file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
vcpkg_install_copyright(FILE_LIST "${SOURCE_PATH}/LICENSE")
