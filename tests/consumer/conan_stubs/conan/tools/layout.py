def basic_layout(conanfile, src_folder="."):
    conanfile.folders.source = src_folder
    conanfile.folders.build = "build"
    conanfile.folders.generators = "build/generators"
