from conan.errors import ConanInvalidConfiguration


def check_min_cppstd(conanfile, cppstd):
    have = conanfile.settings.get_safe("compiler.cppstd")
    if have is not None and int(str(have).replace("gnu", "")) < int(cppstd):
        raise ConanInvalidConfiguration(f"needs C++{cppstd}, compiler.cppstd is {have}")


def can_run(conanfile):
    return True
