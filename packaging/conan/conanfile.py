"""Conan 2 recipe for distorch, a header-only C++20 library on LibTorch.

    conan create packaging/conan --build=missing [-o "distorch/*:torch_dir=/opt/libtorch"] [-o "distorch/*:with_cuda=True"]

ConanCenter has no LibTorch recipe, so LibTorch is not a Conan requirement: the package's consumers
link the LibTorch found on their machine. `torch_dir` names its root (or its share/cmake/Torch
folder); without it the recipe uses the Torch_DIR environment variable, else the system's LibTorch
(Debian's libtorch-dev: headers under /usr/include, libraries in the default linker path).
docs/packaging.md explains the choice.
"""
import os
import re

from conan import ConanFile
from conan.tools.build import check_min_cppstd
from conan.tools.files import copy, load
from conan.tools.layout import basic_layout

required_conan_version = ">=2.0"


class DistorchConan(ConanFile):
    name = "distorch"
    description = ("Spreads LibTorch model weights across the devices of one machine by a placement policy, "
                   "patches LoRAs before distributing, and streams donor-held weights back just in time")
    license = "Apache-2.0"
    homepage = "https://github.com/distorch/distorch"
    url = "https://github.com/distorch/distorch"
    topics = ("libtorch", "pytorch", "offloading", "lora", "header-only")
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"
    options = {"torch_dir": [None, "ANY"], "with_cuda": [True, False]}
    default_options = {"torch_dir": None, "with_cuda": False}
    no_copy_source = True

    def set_version(self):
        # One version for every build system: the one in meson.build's project().
        meson_build = load(self, os.path.join(self.recipe_folder, "..", "..", "meson.build"))
        self.version = re.search(r"project\([^)]*?version:\s*'([^']+)'", meson_build, re.S).group(1)

    def export_sources(self):
        root = os.path.join(self.recipe_folder, "..", "..")
        copy(self, "LICENSE", src=root, dst=self.export_sources_folder)
        copy(self, "include/*", src=root, dst=self.export_sources_folder)

    def layout(self):
        basic_layout(self, src_folder=".")

    def requirements(self):
        self.requires("range-v3/0.12.0")
        self.requires("nlohmann_json/3.11.2")

    def package_id(self):
        # The headers are the same for every setting and option; the options only tell consumers
        # where LibTorch is.
        self.info.clear()

    def validate(self):
        if self.settings.get_safe("compiler.cppstd"):
            check_min_cppstd(self, 20)

    def package(self):
        copy(self, "LICENSE", src=self.source_folder, dst=os.path.join(self.package_folder, "licenses"))
        copy(self, "*", src=os.path.join(self.source_folder, "include"), dst=os.path.join(self.package_folder, "include"))

    def _torch_root(self):
        torch_dir = str(self.options.torch_dir) if self.options.torch_dir else os.environ.get("Torch_DIR", "")
        if torch_dir and os.path.isfile(os.path.join(torch_dir, "TorchConfig.cmake")):
            torch_dir = os.path.normpath(os.path.join(torch_dir, "..", "..", ".."))
        return torch_dir

    @staticmethod
    def _torch_abi(root):
        """The C++ ABI LibTorch was built with, read from its libc10 (new-ABI std::string symbols
        carry `__cxx11`); 1, the ABI of every LibTorch 2.x and of Debian's, when none is found."""
        lib = os.path.join(root, "lib", "libc10.so") if root else "/usr/lib/x86_64-linux-gnu/libc10.so"
        try:
            with open(lib, "rb") as f:
                return 1 if b"__cxx11" in f.read() else 0
        except OSError:
            return 1

    def package_info(self):
        # The same names as the CMake config and the .pc file that `meson install` writes.
        self.cpp_info.set_property("cmake_file_name", "distorch")
        self.cpp_info.set_property("cmake_target_name", "distorch::distorch")
        self.cpp_info.set_property("pkg_config_name", "distorch")
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []
        self.cpp_info.requires = ["range-v3::range-v3", "nlohmann_json::nlohmann_json"]

        root = self._torch_root()
        self.cpp_info.defines = [f"_GLIBCXX_USE_CXX11_ABI={self._torch_abi(root)}"]
        if root:
            self.cpp_info.includedirs = ["include", os.path.join(root, "include"),
                                         os.path.join(root, "include", "torch", "csrc", "api", "include")]
            self.cpp_info.libdirs = [os.path.join(root, "lib")]
            self.cpp_info.exelinkflags = [f"-Wl,-rpath,{os.path.join(root, 'lib')}"]
            self.cpp_info.sharedlinkflags = list(self.cpp_info.exelinkflags)
        else:
            self.cpp_info.includedirs = ["include", "/usr/include/torch/csrc/api/include"]
        self.cpp_info.system_libs = ["torch", "torch_cpu", "c10"]
        if self.options.with_cuda:
            # libtorch_cuda registers CUDA from a static initializer and no consumer symbol needs
            # it: keep the linker from dropping it.
            self.cpp_info.exelinkflags.append("-Wl,--no-as-needed,-ltorch_cuda,--as-needed")
            self.cpp_info.sharedlinkflags.append("-Wl,--no-as-needed,-ltorch_cuda,--as-needed")
            self.cpp_info.system_libs.append("c10_cuda")
        if self.settings.os in ("Linux", "FreeBSD"):
            self.cpp_info.system_libs.append("pthread")
