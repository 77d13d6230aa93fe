#!/usr/bin/env python3
"""Checks the vcpkg overlay port and the Conan recipe as far as a machine without vcpkg and Conan
allows: their metadata against meson.build, and the files they would install against what
`meson install` of BUILD_ROOT installs into a temporary prefix.

    check_recipes.py BUILD_ROOT

vcpkg: vcpkg.json's fields, version and `cuda` feature; the portfile's Meson calls and options
(each one a real option of meson.options); then the portfile itself, run under `cmake -P` with
stand-ins for vcpkg's functions (vcpkg_stubs.cmake.in): its package must be the vcpkg layout of
what `meson install` gives, and a CMake project and pkg-config must find it there.
Conan: conanfile.py read with Python's ast: name, version rule, package_type, settings,
requirements (versions within meson.build's minimums), the files package() copies (compared with
the installed headers), the names its package_info() gives generators (compared with the installed
.pc and CMake config), the test_package files; then its methods, run with a stand-in for Conan's
API (conan_stubs/).
"""
import ast
import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.dont_write_bytecode = True  # nothing written into the source tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
import consumer  # noqa: E402  (shares the install step)

SOURCE_ROOT = consumer.SOURCE_ROOT
PORT = SOURCE_ROOT / "packaging" / "vcpkg" / "ports" / "distorch"
CONAN = SOURCE_ROOT / "packaging" / "conan"

failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
        print("FAIL:", what)
    return ok


def version_tuple(text):
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def meson_facts(build_root):
    text = (SOURCE_ROOT / "meson.build").read_text()
    options = set(re.findall(r"option\('([^']+)'", (SOURCE_ROOT / "meson.options").read_text()))
    minimums = {name: version_tuple(v) for name, v in
                re.findall(r"dependency\('([^']+)',\s*version:\s*'>=\s*([\d.]+)'", text)}
    return {
        "version": consumer.project_version(build_root),
        "license": re.search(r"license:\s*'([^']+)'", text).group(1),
        "options": options,
        "minimums": minimums,
    }


def installed_files(where):
    """Installed files relative to the prefix, as a set of POSIX paths."""
    prefix = where["prefix"]
    return {p.relative_to(prefix).as_posix() for p in prefix.rglob("*") if p.is_file()}


# ---- vcpkg ---------------------------------------------------------------------------------------

def check_vcpkg(facts, where, installed):
    manifest = json.loads((PORT / "vcpkg.json").read_text())
    check(manifest.get("name") == "distorch", "vcpkg.json: name is not distorch")
    check(manifest.get("version") == facts["version"],
          f"vcpkg.json: version {manifest.get('version')} differs from meson.build's {facts['version']}")
    for field in ("description", "homepage", "license"):
        check(bool(manifest.get(field)), f"vcpkg.json: no {field}")
    check(manifest.get("license") == facts["license"],
          f"vcpkg.json: license {manifest.get('license')} differs from meson.build's {facts['license']}")
    check(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", manifest.get("name", "")) is not None, "vcpkg.json: name is not a valid port name")

    def dep_names(deps, host):
        return {(d if isinstance(d, str) else d["name"]) for d in deps
                if (isinstance(d, dict) and d.get("host", False)) == host}

    deps = manifest.get("dependencies", [])
    for name in ("libtorch", "nlohmann-json", "range-v3"):
        check(name in dep_names(deps, False), f"vcpkg.json: no dependency on {name}")
    for name in ("vcpkg-tool-meson", "vcpkg-cmake-config"):
        check(name in dep_names(deps, True), f"vcpkg.json: no host dependency on {name}")
    cuda = manifest.get("features", {}).get("cuda")
    if check(isinstance(cuda, dict), "vcpkg.json: no cuda feature"):
        check(bool(cuda.get("description")), "vcpkg.json: the cuda feature has no description")
        torch_cuda = [d for d in cuda.get("dependencies", [])
                      if isinstance(d, dict) and d.get("name") == "libtorch" and "cuda" in d.get("features", [])]
        check(bool(torch_cuda), "vcpkg.json: the cuda feature does not ask for libtorch[cuda]")

    portfile = (PORT / "portfile.cmake").read_text()
    for call in ("vcpkg_configure_meson(", "vcpkg_install_meson(", "vcpkg_cmake_config_fixup(", "vcpkg_fixup_pkgconfig(",
                 "vcpkg_install_copyright("):
        check(call in portfile, f"portfile.cmake: no {call[:-1]} call")
    check('"cuda" IN_LIST FEATURES' in portfile, "portfile.cmake: the cuda feature changes nothing")
    passed = dict(re.findall(r"-D(\w+)=(\S+?)\"?\s", portfile))
    for name in passed:
        check(name in facts["options"], f"portfile.cmake: -D{name} is not an option of meson.options")
    for name in ("tests", "benchmarks", "examples", "fuzzers", "tools"):
        check(passed.get(name) == "false", f"portfile.cmake: does not pass -D{name}=false")
    check((PORT / "usage").is_file() and "distorch::distorch" in (PORT / "usage").read_text(),
          "usage: missing, or does not name distorch::distorch")

    print(f"vcpkg port: version {manifest.get('version')}, features {sorted(manifest.get('features', {}))}")


def run_portfile(facts, where, installed, tmp):
    """Runs portfile.cmake under `cmake -P` with stand-ins for vcpkg's functions
    (vcpkg_stubs.cmake.in); the build step is replaced by this build's `meson install`, laid out
    as vcpkg's Meson would (libdir = lib). Then checks the package: its files, a CMake project that
    finds it, and pkg-config's view of its .pc file."""
    packages = tmp / "vcpkg" / "packages" / "distorch_x64-linux"
    installed_dir = tmp / "vcpkg" / "installed" / "x64-linux"
    staged = tmp / "vcpkg" / "staged"
    record = tmp / "vcpkg" / "configure.txt"
    rel = {k: Path(v).relative_to(where["prefix"]).as_posix() for k, v in where.items() if k != "prefix"}
    for f in installed:
        if f.startswith(rel["includedir"] + "/"):
            target = "include/" + f[len(rel["includedir"]) + 1:]
        elif f.startswith(rel["libdir"] + "/"):
            target = "lib/" + f[len(rel["libdir"]) + 1:]
        elif f.startswith(rel["bindir"] + "/"):
            target = "bin/" + f[len(rel["bindir"]) + 1:]
        else:
            target = f
        (staged / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(where["prefix"] / f, staged / target)
    # As configured by the portfile's -Dtorch_dir=${CURRENT_INSTALLED_DIR}.
    config = staged / "lib" / "cmake" / "distorch" / "distorchConfig.cmake"
    built_root = None
    if config.is_file():
        text = config.read_text()
        built_root = re.search(r'set\(_distorch_torch_root "([^"]*)"\)', text)
        built_root = built_root.group(1) if built_root else None
        config.write_text(re.sub(r'set\(_distorch_torch_root "[^"]*"\)', f'set(_distorch_torch_root "{installed_dir}")', text))
    stubs = (Path(__file__).resolve().parent / "vcpkg_stubs.cmake.in").read_text()
    for key, value in {"PACKAGES": packages, "INSTALLED": installed_dir, "STAGED": staged, "RECORD": record,
                       "PORTFILE": PORT / "portfile.cmake"}.items():
        stubs = stubs.replace(f"@{key}@", str(value))
    script = tmp / "vcpkg" / "run-portfile.cmake"
    script.write_text(stubs)
    try:
        consumer.run(["cmake", "-P", script])
    except consumer.Failure as e:
        check(False, f"portfile.cmake does not run: {e}")
        return
    options = dict(line.split("=", 1) for line in record.read_text().splitlines())
    configured = [line[len("OPTION="):] for line in record.read_text().splitlines() if line.startswith("OPTION=")]
    check(Path(options.get("SOURCE_PATH", "")).resolve() == SOURCE_ROOT,
          f"portfile.cmake builds {options.get('SOURCE_PATH')}, not the checkout it sits in")
    if "-Dtools=false" in configured:
        shutil.rmtree(packages / "bin", ignore_errors=True)  # what -Dtools=false leaves out
    got = {p.relative_to(packages).as_posix() for p in packages.rglob("*") if p.is_file()}
    want = set()
    for f in installed:
        if f.startswith(rel["includedir"] + "/"):
            want.add("include/" + f[len(rel["includedir"]) + 1:])
        elif f.endswith(".pc"):
            want.add("share/pkgconfig/" + Path(f).name)
        elif "/cmake/distorch/" in f:
            want.add("share/distorch/" + Path(f).name)
    want |= {"share/distorch/usage", "share/distorch/copyright"}
    check(got == want, f"the port's package differs from the vcpkg layout of meson install: only port {sorted(got - want)}, "
                       f"only meson {sorted(want - got)}")
    for f in got:
        if f.endswith((".cmake", ".pc")):
            check(str(installed_dir) not in (packages / f).read_text(),
                  f"the port's {f} keeps the absolute path of vcpkg's installed tree")
    print(f"portfile run: {len(got)} files in the package")

    # A CMake project finds the package where vcpkg puts it, with the headers from the package.
    # This simulated vcpkg tree has no libtorch port installed: the consumer names the LibTorch
    # this build used through Torch_DIR, as a user with LibTorch outside vcpkg would.
    out = consumer.run(["cmake", "-S", Path(__file__).resolve().parent / "vcpkg_consumer", "-B", tmp / "vcpkg" / "consumer",
                        f"-DCMAKE_PREFIX_PATH={packages}"] + ([f"-DTorch_DIR={built_root}"] if built_root else []))
    includes = re.search(r"distorch-includes=(.*)", out)
    version = re.search(r"distorch-version=(.*)", out)
    check(includes is not None and Path(includes.group(1).split(";")[0]).resolve() == (packages / "include").resolve(),
          f"the vcpkg package's distorch::distorch points at {includes.group(1) if includes else None}, not {packages / 'include'}")
    check(version is not None and version.group(1).strip() == facts["version"],
          f"the vcpkg package's CMake version is {version.group(1) if version else None}")
    pc = subprocess.run(["pkg-config", "--cflags", "distorch"], stdout=subprocess.PIPE, text=True,
                        env=dict(os.environ, PKG_CONFIG_PATH=str(packages / "share" / "pkgconfig")))
    pc_includes = [os.path.normpath(a[2:]) for a in pc.stdout.split() if a.startswith("-I")]
    check(pc.returncode == 0 and str(packages / "include") in pc_includes,
          f"pkg-config reads the vcpkg package's .pc as {pc.stdout.strip()!r}")


# ---- Conan ---------------------------------------------------------------------------------------

def literal(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def join_parts(node):
    """`os.path.join(self.X_folder, "a", "b")` or `self.X_folder` → ("X_folder", "a/b")."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr, ""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join"
            and node.args and isinstance(node.args[0], ast.Attribute)):
        rest = [literal(a) for a in node.args[1:]]
        if all(isinstance(r, str) for r in rest):
            return node.args[0].attr, "/".join(rest)
    return None, None


def copies(method):
    """The copy(self, pattern, src=..., dst=...) calls of a method: (pattern, (src folder, sub), (dst folder, sub))."""
    out = []
    for node in ast.walk(method):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "copy":
            kw = {k.arg: k.value for k in node.keywords}
            out.append((literal(node.args[1]), join_parts(kw["src"]), join_parts(kw["dst"])))
    return out


def calls(method, attr):
    return [node for node in ast.walk(method)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr]


def check_conan(facts, where, installed):
    tree = ast.parse((CONAN / "conanfile.py").read_text())
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    if not check(len(classes) == 1 and any(getattr(b, "id", "") == "ConanFile" for b in classes[0].bases),
                 "conanfile.py: not one ConanFile class"):
        return
    cls = classes[0]
    attrs = {t.id: literal(n.value) for n in cls.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
    check(attrs.get("name") == "distorch", "conanfile.py: name is not distorch")
    check(attrs.get("package_type") == "header-library", "conanfile.py: package_type is not header-library")
    check(attrs.get("license") == facts["license"], f"conanfile.py: license {attrs.get('license')} differs from meson.build's")
    check(set(attrs.get("settings") or ()) >= {"os", "arch", "compiler", "build_type"}, "conanfile.py: settings lack os/arch/compiler/build_type")
    imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("conan") for a in n.names}
    check(not any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("conans") for n in ast.walk(tree)),
          "conanfile.py: imports Conan 1's `conans` package")
    check("ConanFile" in imports, "conanfile.py: does not import ConanFile from conan")

    # The version: either a literal equal to meson's, or set_version() reading meson.build with a
    # regex that this check applies too.
    if "version" in attrs:
        check(attrs["version"] == facts["version"], f"conanfile.py: version {attrs['version']} differs from meson.build's")
    elif check("set_version" in methods, "conanfile.py: neither version nor set_version()"):
        strings = [literal(n) for n in ast.walk(methods["set_version"]) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        check("meson.build" in strings, "conanfile.py: set_version() does not read meson.build")
        patterns = [s for s in strings if s and "(" in s and "version" in s]
        if check(len(patterns) == 1, "conanfile.py: set_version() has no single version regex"):
            m = re.search(patterns[0], (SOURCE_ROOT / "meson.build").read_text(), re.S)
            check(m is not None and m.group(1) == facts["version"],
                  f"conanfile.py: set_version() finds {m.group(1) if m else None}, meson's version is {facts['version']}")

    # Requirements: range-v3 and nlohmann_json, at versions meson.build accepts. LibTorch is not one.
    required = {}
    if check("requirements" in methods, "conanfile.py: no requirements()"):
        for c in calls(methods["requirements"], "requires"):
            ref = literal(c.args[0])
            if isinstance(ref, str) and "/" in ref:
                name, version = ref.split("/", 1)
                required[name] = version
    for name in ("range-v3", "nlohmann_json"):
        check(name in required, f"conanfile.py: does not require {name}")
    for name, minimum in facts["minimums"].items():
        if name in required:
            check(version_tuple(required[name]) >= minimum,
                  f"conanfile.py: requires {name}/{required[name]}, meson.build needs >= {'.'.join(map(str, minimum))}")
    check("libtorch" not in required, "conanfile.py: requires libtorch, which ConanCenter does not have")

    # package(): the headers it copies from the exported sources must be what meson installs.
    exported = [p for p, _, _ in copies(methods.get("export_sources", cls))]
    packaged = set()
    if check("package" in methods, "conanfile.py: no package()"):
        for pattern, (src_folder, src_sub), (dst_folder, dst_sub) in copies(methods["package"]):
            if None in (pattern, src_folder, dst_folder):
                check(False, "conanfile.py: package() has a copy() this check cannot read")
                continue
            check(src_folder == "source_folder" and dst_folder == "package_folder",
                  f"conanfile.py: package() copies from self.{src_folder} to self.{dst_folder}")
            src = SOURCE_ROOT / src_sub
            for f in (p for p in src.rglob("*") if p.is_file()):
                r = f.relative_to(src).as_posix()
                if fnmatch.fnmatch(r, pattern):
                    full = (src_sub + "/" + r) if src_sub else r
                    check(any(fnmatch.fnmatch(full, e) for e in exported),
                          f"conanfile.py: package() copies {full}, which export_sources() does not export")
                    packaged.add((dst_sub + "/" + r) if dst_sub else r)
    rel_include = Path(where["includedir"]).relative_to(where["prefix"]).as_posix()
    meson_headers = {"include/" + f[len(rel_include) + 1:] for f in installed if f.startswith(rel_include + "/")}
    conan_headers = {f for f in packaged if f.startswith("include/")}
    check(conan_headers == meson_headers,
          f"conan package headers differ from meson install: only conan {sorted(conan_headers - meson_headers)[:5]}, "
          f"only meson {sorted(meson_headers - conan_headers)[:5]}")
    check("licenses/LICENSE" in packaged, "conanfile.py: package() does not copy LICENSE to licenses/")

    # package_info(): the generators' names must be those of meson's .pc and CMake config.
    props = {}
    if check("package_info" in methods, "conanfile.py: no package_info()"):
        for c in calls(methods["package_info"], "set_property"):
            props[literal(c.args[0])] = literal(c.args[1])
    pc_names = {Path(f).stem for f in installed if f.endswith(".pc")}
    cmake_names = {Path(f).name[:-len("Config.cmake")] for f in installed if f.endswith("Config.cmake")}
    config_text = "".join((where["prefix"] / f).read_text() for f in installed if f.endswith("Config.cmake"))
    check(props.get("pkg_config_name") in pc_names, f"conanfile.py: pkg_config_name {props.get('pkg_config_name')}, meson installs {pc_names}")
    check(props.get("cmake_file_name") in cmake_names, f"conanfile.py: cmake_file_name {props.get('cmake_file_name')}, meson installs {cmake_names}")
    target = props.get("cmake_target_name")
    check(target is not None and f"add_library({target} INTERFACE IMPORTED)" in config_text,
          f"conanfile.py: cmake_target_name {target} is not the target meson's CMake config defines")

    # test_package
    tp = CONAN / "test_package"
    for name in ("conanfile.py", "CMakeLists.txt", "test_package.cpp"):
        check((tp / name).is_file(), f"test_package/{name} is missing")
    if (tp / "conanfile.py").is_file():
        tp_tree = ast.parse((tp / "conanfile.py").read_text())
        text = (tp / "conanfile.py").read_text()
        check("tested_reference_str" in text, "test_package/conanfile.py: does not require tested_reference_str")
        check(any(isinstance(n, ast.FunctionDef) and n.name == "test" for n in ast.walk(tp_tree)), "test_package/conanfile.py: no test()")
    if (tp / "CMakeLists.txt").is_file():
        cm = (tp / "CMakeLists.txt").read_text()
        check(f"find_package({props.get('cmake_file_name')} CONFIG REQUIRED)" in cm and str(target) in cm,
              "test_package/CMakeLists.txt: does not find_package the package and link its target")
    if (tp / "test_package.cpp").is_file():
        for inc in re.findall(r'#include <(distorch/[^>]+)>', (tp / "test_package.cpp").read_text()):
            check(f"include/{inc}" in meson_headers, f"test_package.cpp includes {inc}, which is not installed")
    print(f"conan recipe: {len(conan_headers)} headers, requires {required}, generator names {props}")


def run_recipe(facts, where, installed, tmp):
    """Runs the Conan recipe's methods with a stand-in for Conan's API (conan_stubs/): version,
    export, package and package_info, and compares the package with what meson install gives."""
    stubs = str(Path(__file__).resolve().parent / "conan_stubs")
    sys.path.insert(0, stubs)
    try:
        spec = importlib.util.spec_from_file_location("distorch_conanfile", CONAN / "conanfile.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # the recipe itself is what is being checked
        check(False, f"conanfile.py does not load: {e!r}")
        return
    finally:
        sys.path.remove(stubs)
    recipes = [v for v in vars(module).values() if isinstance(v, type) and v.__name__ != "ConanFile" and hasattr(v, "package_type")]
    if not check(len(recipes) == 1, "conanfile.py: not one recipe class"):
        return

    def make(**options):
        r = recipes[0](settings={"os": "Linux", "arch": "x86_64", "compiler": "gcc", "build_type": "Release",
                                 "compiler.cppstd": "20"}, options=options)
        r.recipe_folder = str(CONAN)
        r.export_sources_folder = str(tmp / "conan" / "export")
        r.source_folder = r.export_sources_folder
        r.package_folder = str(tmp / "conan" / "package")
        return r

    r = make()
    try:
        r.set_version()
        r.export_sources()
        r.layout()
        r.requirements()
        r.validate()
        r.package()
        r.package_id()
        r.package_info()
    except Exception as e:
        check(False, f"conanfile.py fails when run: {e!r}")
        return
    check(r.version == facts["version"], f"conanfile.py's set_version() gives {r.version}, meson.build says {facts['version']}")
    check(not vars(r.info), "conanfile.py: package_id() keeps settings or options in a header-only package id")
    package = tmp / "conan" / "package"
    got = {p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()}
    rel_include = Path(where["includedir"]).relative_to(where["prefix"]).as_posix()
    want = {"include/" + f[len(rel_include) + 1:] for f in installed if f.startswith(rel_include + "/")} | {"licenses/LICENSE"}
    check(got == want, f"the Conan package differs from meson install's headers: only conan {sorted(got - want)[:5]}, "
                       f"only meson {sorted(want - got)[:5]}")
    ci = r.cpp_info
    check("include" in ci.includedirs, f"package_info(): includedirs {ci.includedirs} lack the package's include/")
    check({"torch", "torch_cpu", "c10"} <= set(ci.system_libs), f"package_info(): system_libs {ci.system_libs} lack LibTorch")
    check({"range-v3::range-v3", "nlohmann_json::nlohmann_json"} <= set(ci.requires), f"package_info(): requires {ci.requires}")
    check(not ci.bindirs, "package_info(): a header-only package has bin dirs")

    root = tmp / "conan" / "libtorch"
    cuda = make(torch_dir=str(root), with_cuda=True)
    cuda.package_info()
    check(str(root / "include" / "torch" / "csrc" / "api" / "include") in cuda.cpp_info.includedirs
          and str(root / "lib") in cuda.cpp_info.libdirs,
          f"package_info(): torch_dir={root} gives includedirs {cuda.cpp_info.includedirs}, libdirs {cuda.cpp_info.libdirs}")
    check(any("--no-as-needed" in f and "torch_cuda" in f for f in cuda.cpp_info.exelinkflags),
          f"package_info(): with_cuda does not link torch_cuda with --no-as-needed: {cuda.cpp_info.exelinkflags}")
    print(f"conan recipe run: version {r.version}, {len(got)} files in the package")


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    build_root = Path(argv[1]).resolve()
    consumer.exit_on_sigterm()
    tmp = Path(tempfile.mkdtemp(prefix="distorch-recipes-"))
    try:
        where = consumer.install(build_root, tmp)
        installed = installed_files(where)
        print(f"meson install: {len(installed)} files")
        facts = meson_facts(build_root)
        check_vcpkg(facts, where, installed)
        run_portfile(facts, where, installed, tmp)
        check_conan(facts, where, installed)
        run_recipe(facts, where, installed, tmp)
    except consumer.Failure as e:
        check(False, str(e))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} problem(s) with the recipes", file=sys.stderr)
        return 1
    print("recipes ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
