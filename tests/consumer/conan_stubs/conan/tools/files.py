"""copy() and load() with Conan 2's semantics for what the recipe uses: `pattern` is matched with
fnmatch against each file's path relative to `src` (so `*` crosses folders), and the relative path
is kept under `dst`."""
import fnmatch
import os
import shutil


def load(conanfile, path, encoding="utf-8"):
    with open(path, encoding=encoding) as f:
        return f.read()


def copy(conanfile, pattern, src, dst, keep_path=True, excludes=None):
    copied = []
    for root, _, files in os.walk(src):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), src)
            if not fnmatch.fnmatch(rel, pattern) or any(fnmatch.fnmatch(rel, e) for e in (excludes or ())):
                continue
            target = os.path.join(dst, rel if keep_path else name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(os.path.join(root, name), target)
            copied.append(target)
    return copied
