#!/usr/bin/env python3
"""Compiles every ```cpp code block of README.md and docs/*.md against the library, so that a
reader who copies one gets code that builds: every name it uses is declared in the block or comes
from a header the block #includes.

How a block is read (docs/getting-started.md, "Code in these pages", says the same for writers):
  - its `#include` lines go to the top of the file;
  - its definitions of types, templates, concepts, namespaces and functions (and `using`
    declarations, `TORCH_MODULE(...)`-style macros) stay at namespace scope;
  - the rest, its statements, is the body of one function, in the order written. So a block may
    read like a script (`auto plan = ...; std::cout << ...;`), but what it uses it must declare:
    `pool`, `model`, `x`... come from a line of the block, not from the reader's imagination.
  - A block that cannot stand alone (an excerpt inside a list, a line quoted from a header) is
    marked by an HTML comment on the line before its fence, with the reason:
        <!-- fragment: an excerpt of examples/block_loop.cpp -->
    Fragments are rare; a reason is required.

Two checks, both reported as FILE.md:LINE:
  1. includes: every `distorch::name` a block uses is declared in a header the block includes
     (directly or through that header's own includes). The compile alone could not see this: all
     blocks share one translation unit, so one block's includes serve the next.
  2. compile: all blocks, each in its own namespace, in one translation unit, compiled with
     -fsyntax-only by the command Meson uses for the `doc_snippets` target (read from
     compile_commands.json: the same compiler, flags and LibTorch include folders as the build).
     `#line` directives make the compiler's messages point at the Markdown lines.
Before checking it proves on a made-up page that it reports a missing include and places a block's
parts where they belong, so a reader that has stopped working fails instead of passing.

Usage:
  check_doc_snippets.py [--root DIR] --write OUT.cpp          write the translation unit (Meson)
  check_doc_snippets.py [--root DIR] --compdb FILE [--keep F]  include check, then the compile
  check_doc_snippets.py [--root DIR] --lint-only               include check only (no LibTorch)
"""

import argparse
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

FENCE_OPEN = re.compile(r"^(\s*)```\s*(cpp|c\+\+)\s*$")
FENCE_CLOSE = re.compile(r"^\s*```\s*$")
FRAGMENT = re.compile(r"^\s*<!--\s*fragment\s*:\s*(\S.*?)\s*-->\s*$")
FRAGMENT_BARE = re.compile(r"^\s*<!--\s*fragment\b")
INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]\s*(//.*)?$')
CONTROL = {"for", "if", "while", "switch", "do", "else", "try", "catch", "return", "co_return", "case", "default"}
HOIST_START = re.compile(r"^(template\b|struct\b|class\b|union\b|enum\b|namespace\b|concept\b|using\b|typedef\b"
                         r"|static_assert\b|extern\b|[A-Z][A-Z0-9_]*\s*\()")
FUNCTION_HEAD = re.compile(r"^[^=;{}\[]*?[A-Za-z_~][\w:<>,\s*&]*?\s*\([^{};]*\)"
                           r"(\s*(const|noexcept|override|final|&|&&|->\s*[^{;=]+))*\s*$", re.S)
SUFFIXES = (".md",)


# ---- reading Markdown ---------------------------------------------------------------------------

class Block:
    def __init__(self, path, line, lines, fragment):
        self.path = path          # relative to the root, as reported
        self.line = line          # 1-based line of the block's first code line
        self.lines = lines        # the code, dedented by the fence's indentation
        self.fragment = fragment  # the reason, or None


def markdown_files(root):
    files = [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))
    return [f for f in files if os.path.isfile(f)]


def blocks_of(path, display, problems):
    with open(path, encoding="utf-8") as f:
        text = f.read().split("\n")
    out = []
    i = 0
    while i < len(text):
        m = FENCE_OPEN.match(text[i])
        if not m:
            i += 1
            continue
        indent = len(m.group(1))
        j = i + 1
        while j < len(text) and not FENCE_CLOSE.match(text[j]):
            j += 1
        if j == len(text):
            problems.append(f"{display}:{i + 1}: ```cpp block is never closed")
            break
        prev = i - 1
        while prev >= 0 and not text[prev].strip():
            prev -= 1
        fragment = None
        if prev >= 0 and FRAGMENT_BARE.match(text[prev]):
            fm = FRAGMENT.match(text[prev])
            if fm:
                fragment = fm.group(1)
            else:
                problems.append(f"{display}:{prev + 1}: a fragment marker needs its reason: <!-- fragment: why -->")
                fragment = "(no reason)"
        code = [line[indent:] if line[:indent].strip() == "" else line.lstrip() for line in text[i + 1:j]]
        out.append(Block(display, i + 2, code, fragment))
        i = j + 1
    return out


# ---- reading C++ --------------------------------------------------------------------------------

def strip_comments_and_strings(src, keep_strings=False):
    """The code with comments (and string / char literal contents) replaced by spaces, newlines
    kept, so offsets and line numbers stay."""
    out = list(src)
    i, n = 0, len(src)

    def blank(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif c == "R" and i + 1 < n and src[i + 1] == '"' and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            k = src.find("(", i + 2)
            delim = src[i + 2:k] if k >= 0 else ""
            end = src.find(")" + delim + '"', k + 1) if k >= 0 else -1
            j = n if end < 0 else end + len(delim) + 2
            if not keep_strings:
                blank(i + 1, j)
            i = j
        elif c in "\"'":
            if c == "'" and i > 0 and src[i - 1].isalnum() and i + 1 < n and src[i + 1].isalnum() and \
                    (src[i - 1].isdigit() or re.match(r"[0-9a-fA-F]", src[i - 1])) and src[i + 1] != "\\":
                i += 1  # a digit separator: 1'000
                continue
            j = i + 1
            while j < n and src[j] != c and src[j] != "\n":
                j += 2 if src[j] == "\\" else 1
            j = min(j + 1, n)
            if not keep_strings:
                blank(i + 1, j - 1)
            i = j
        else:
            i += 1
    return "".join(out)


def split_items(code):
    """Top-level items of a block's code: (start, end) offsets. An item ends at a ';' outside all
    brackets, or at a '}' that closes to the top level (taking a ';' right after it along)."""
    clean = strip_comments_and_strings(code)
    items = []
    depth = 0
    start = None
    i, n = 0, len(clean)
    while i < n:
        c = clean[i]
        if start is None and not c.isspace():
            start = i
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
            if c == "}" and depth == 0 and start is not None:
                j = i + 1
                while j < n and clean[j].isspace():
                    j += 1
                if j < n and clean[j] == ";":
                    i = j
                elif j < n and clean[j] in ",)":
                    i += 1
                    continue
                items.append((start, i + 1))
                start = None
        elif c == ";" and depth == 0 and start is not None:
            items.append((start, i + 1))
            start = None
        i += 1
    if start is not None and clean[start:].strip():
        items.append((start, n))
    return items, clean


def hoisted(item_clean):
    """True for what must live at namespace scope: type, template, concept and function
    definitions, namespaces, using-declarations and macro invocations such as TORCH_MODULE(X)."""
    t = " ".join(item_clean.split())
    t = re.sub(r"^(\[\[[^\]]*\]\]\s*)+", "", t)
    if HOIST_START.match(t):
        return True
    first = re.match(r"[A-Za-z_]\w*", t)
    if not t.endswith("}") or (first and first.group(0) in CONTROL) or t.startswith(("{", "[")):
        return False
    brace = t.find("{")
    return bool(FUNCTION_HEAD.match(t[:brace])) if brace > 0 else False


class Piece:
    def __init__(self, line, text):
        self.line, self.text = line, text


def parse_block(block):
    """(includes, namespace-scope pieces, function-body pieces); each piece knows its line."""
    includes, body_lines = [], []
    for k, line in enumerate(block.lines):
        if INCLUDE.match(line):
            includes.append(Piece(block.line + k, line.strip()))
            body_lines.append("")
        else:
            body_lines.append(line)
    code = "\n".join(body_lines)
    items, clean = split_items(code)
    scope, body = [], []
    for a, b in items:
        piece = Piece(block.line + code.count("\n", 0, a), code[a:b])
        (scope if hoisted(clean[a:b]) else body).append(piece)
    return includes, scope, body


def translation_unit(blocks):
    """One translation unit holding every block, each in its own namespace, with #line
    directives pointing at the Markdown."""
    head = ["// Generated by tests/docs/check_doc_snippets.py from the ```cpp blocks of README.md and docs/*.md.",
            "// Each block is in its own namespace: its definitions at namespace scope, its statements",
            "// in the function snippet(). Compile errors point at the Markdown lines."]
    seen = set()
    parts = []
    for n, block in enumerate(blocks):
        if block.fragment is not None:
            continue
        includes, scope, body = parse_block(block)
        for inc in includes:
            key = INCLUDE.match(inc.text).group(2)
            if key not in seen:
                seen.add(key)
                head += [f'#line {inc.line} "{block.path}"', inc.text]
        parts.append(f"namespace distorch_doc_snippet_{n} {{  // {block.path}:{block.line}")
        for p in scope:
            if re.match(r"int\s+main\s*\(", p.text):
                # main in a namespace is an ordinary function: no implicit `return 0`.
                parts += ["#pragma GCC diagnostic push", '#pragma GCC diagnostic ignored "-Wreturn-type"',
                          f'#line {p.line} "{block.path}"', p.text, "#pragma GCC diagnostic pop"]
                continue
            parts += [f'#line {p.line} "{block.path}"', p.text]
        parts.append("[[maybe_unused]] void snippet() {")
        for p in body:
            parts += [f'#line {p.line} "{block.path}"', p.text]
        parts += ["}", "}"]
    return "\n".join(head + parts) + "\n"


# ---- the include check ----------------------------------------------------------------------------

class HeaderIndex:
    """What each public header declares at distorch's namespace scope (by name), and what it
    includes, to answer: does this set of #include lines declare distorch::name?"""

    def __init__(self, include_dir):
        self.include_dir = include_dir
        self.declared = {}   # header -> set of names
        self.includes = {}   # header -> set of headers
        self.namespaces = set()
        self.top_level = {}  # header -> names declared in column 0
        base = os.path.join(include_dir, "distorch")
        for dirpath, _, files in os.walk(base):
            for name in files:
                if name.endswith((".hpp", ".h")):
                    path = os.path.join(dirpath, name)
                    rel = os.path.relpath(path, include_dir).replace(os.sep, "/")
                    self._read(rel, path)
        self._closure = {}

    def _read(self, rel, path):
        with open(path, encoding="utf-8", errors="replace") as f:
            raw = f.read()
        src = strip_comments_and_strings(raw)
        self.includes[rel] = {m.group(2) for m in (INCLUDE.match(l) for l in raw.split("\n")) if m}
        names = set()
        for m in re.finditer(r"\b(?:struct|class|union|enum(?:\s+class)?|concept)\s+(\w+)(?!\s*;)", src):
            names.add(m.group(1))
        for m in re.finditer(r"\bnamespace\s+([\w:]+)", src):
            for part in m.group(1).split("::"):
                self.namespaces.add(part)
        names |= set(re.findall(r"\busing\s+(\w+)\s*=", src))
        names |= set(re.findall(r"^DISTORCH_\w+\(\s*(\w+)\s*\)", src, re.M))   # DISTORCH_DEFINE_ERROR(x), ...
        # Functions and variables: a declaration line (possibly after `template <...>`) that names
        # the entity before '(', '=' or '{'. (Not ';': `class adapter;` declares nothing usable.)
        for m in re.finditer(r"^[ \t]*(?:template\s*<[^;{]*?>\s*)?(?:\[\[[^\]]*\]\]\s*)*"
                             r"(?:(?:inline|constexpr|static|friend|consteval|explicit)\s+)*"
                             r"[\w:<>,\s&*]*?\b(\w+)\s*(?:\(|=|\{)", src, re.M):
            names.add(m.group(1))
        self.declared[rel] = names
        # Namespace-scope declarations start in column 0 (namespaces are not indented here): the
        # header to suggest when a block lacks one.
        self.top_level[rel] = {n for n in names if re.search(r"^(?:[^\s#/].*)?\b" + re.escape(n) + r"\b", src, re.M)}

    def closure(self, header):
        if header in self._closure:
            return self._closure[header]
        seen, todo = set(), [header]
        while todo:
            h = todo.pop()
            if h in seen or h not in self.includes:
                continue
            seen.add(h)
            todo += [i for i in self.includes[h] if i.startswith("distorch/")]
        self._closure[header] = seen
        return seen

    def declares(self, headers, name):
        return any(name in self.declared.get(h, ()) for top in headers for h in self.closure(top))

    def headers_declaring(self, name):
        top = sorted(h for h, names in self.top_level.items() if name in names and "/detail/" not in h)
        return top or sorted(h for h, names in self.declared.items() if name in names and "/detail/" not in h)


QUALIFIED = re.compile(r"(?<![\w:])distorch::((?:\w+::)*\w+)")


def check_includes(blocks, index):
    problems = []
    for block in blocks:
        if block.fragment is not None:
            continue
        includes, scope, body = parse_block(block)
        headers = []
        for inc in includes:
            target = INCLUDE.match(inc.text).group(2)
            if target.startswith("distorch/"):
                if not os.path.isfile(os.path.join(index.include_dir, target)):
                    problems.append(f"{block.path}:{inc.line}: #include <{target}>: no such header")
                else:
                    headers.append(target)
        reported = set()
        for piece in scope + body:
            clean = strip_comments_and_strings(piece.text)
            for m in QUALIFIED.finditer(clean):
                parts = m.group(1).split("::")
                name = next((p for p in parts if p not in index.namespaces), parts[-1])
                if name in reported or index.declares(headers, name):
                    continue
                reported.add(name)
                line = piece.line + clean.count("\n", 0, m.start())
                where = index.headers_declaring(name)
                fix = f"add #include <{where[0]}>" if where else "no public header declares it"
                problems.append(f"{block.path}:{line}: 'distorch::{m.group(1)}' is not declared by the block's "
                                f"#include lines ({', '.join(headers) or 'none'}): {fix}")
    return problems


# ---- the compile -------------------------------------------------------------------------------

def syntax_command(compdb, anchor, source):
    """The compile command of `anchor` (a file name in compile_commands.json), made to check
    `source` with -fsyntax-only instead; (argv, working directory)."""
    with open(compdb, encoding="utf-8") as f:
        entries = json.load(f)
    entry = next((e for e in entries if e["file"].replace("\\", "/").endswith(anchor)), None)
    if entry is None:
        raise SystemExit(f"check_doc_snippets.py: {anchor} is not in {compdb}; reconfigure the build (meson setup --reconfigure)")
    argv = entry["arguments"] if "arguments" in entry else shlex.split(entry["command"])
    while argv and os.path.basename(argv[0]) in ("ccache", "sccache"):
        argv = argv[1:]
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("-o", "-MQ", "-MF", "-MT"):
            skip = True
            continue
        if a in ("-c", "-MD", "-MMD") or a == entry["file"] or a.endswith(anchor):
            continue
        if a.startswith("-fdiagnostics-color"):
            a = "-fdiagnostics-color=never"
        out.append(a)
    out += ["-fsyntax-only", "-Wno-unused-variable", "-Wno-unused-but-set-variable", "-Wno-unused-parameter",
            "-Wno-unused-function", "-Wno-unused-local-typedefs", source]
    return out, entry["directory"]


# ---- self-test ---------------------------------------------------------------------------------

SELF_TEST_PAGE = """# A page

```cpp
#include <distorch/core/bytes.hpp>

struct widget { int n = 0; };
int twice(int x) { return 2 * x; }
auto size = distorch::parse_bytes("2gb");
for (int i = 0; i < 2; ++i) { size += twice(i); }
std::cout << distorch::format_plan_table(plan);
```

<!-- fragment: an excerpt -->
```cpp
y = f(x);
```
"""


def self_test(include_dir):
    with tempfile.TemporaryDirectory(prefix="distorch-snippets-") as d:
        page = os.path.join(d, "page.md")
        with open(page, "w", encoding="utf-8") as f:
            f.write(SELF_TEST_PAGE)
        problems = []
        blocks = blocks_of(page, "page.md", problems)
        if problems or len(blocks) != 2 or blocks[1].fragment != "an excerpt" or blocks[0].fragment is not None:
            print("check_doc_snippets.py: self-test failed: blocks or fragment marker misread", file=sys.stderr)
            return False
        includes, scope, body = parse_block(blocks[0])
        got = ([p.line for p in includes], [p.text.split()[0] for p in scope], [p.text.split()[0] for p in body])
        want = ([4], ["struct", "int"], ["auto", "for", "std::cout"])
        if got != want:
            print(f"check_doc_snippets.py: self-test failed: split {got}, expected {want}", file=sys.stderr)
            return False
        found = check_includes(blocks, HeaderIndex(include_dir))
        if len(found) != 1 or not found[0].startswith("page.md:10:") or "format_plan_table" not in found[0] \
                or "distorch/placement/plan" not in found[0]:
            print("check_doc_snippets.py: self-test failed: expected one missing include for format_plan_table at "
                  "page.md:10, got: " + ("; ".join(found) or "none"), file=sys.stderr)
            return False
    return True


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        help="repository root (default: this script's)")
    parser.add_argument("--write", metavar="OUT", help="write the translation unit and stop")
    parser.add_argument("--compdb", metavar="FILE", help="compile_commands.json of a build with LibTorch")
    parser.add_argument("--anchor", default="doc_snippets.cpp",
                        help="the file whose compile command is used (default: doc_snippets.cpp)")
    parser.add_argument("--lint-only", action="store_true", help="the include check only")
    parser.add_argument("--keep", metavar="FILE", help="also write the checked translation unit here")
    args = parser.parse_args(argv)

    problems = []
    blocks = []
    for path in markdown_files(args.root):
        blocks += blocks_of(path, os.path.relpath(path, args.root).replace(os.sep, "/"), problems)
    if args.write:
        text = translation_unit(blocks)
        if not os.path.exists(args.write) or open(args.write, encoding="utf-8").read() != text:
            with open(args.write, "w", encoding="utf-8") as f:
                f.write(text)
        return 0
    if not args.lint_only and not args.compdb:
        parser.error("give --compdb (or --lint-only, or --write)")
    include_dir = os.path.join(args.root, "include")
    if not self_test(include_dir):
        return 2
    problems += check_includes(blocks, HeaderIndex(include_dir))
    fragments = [b for b in blocks if b.fragment is not None]
    for p in problems:
        print(p)
    compiled_ok = True
    if not args.lint_only:
        with tempfile.TemporaryDirectory(prefix="distorch-snippets-") as d:
            source = os.path.join(d, "doc_snippets.cpp")
            text = translation_unit(blocks)
            with open(source, "w", encoding="utf-8") as f:
                f.write(text)
            if args.keep:
                with open(args.keep, "w", encoding="utf-8") as f:
                    f.write(text)
            command, cwd = syntax_command(args.compdb, args.anchor, source)
            done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
            output = (done.stdout + done.stderr).strip()
            if output:
                print(output)
            compiled_ok = done.returncode == 0
            if not compiled_ok:
                print(f"compile failed: {shlex.join(command[:1])} ... -fsyntax-only (exit {done.returncode})")
    print(f"{len(blocks)} blocks ({len(fragments)} marked as fragments) in {len(markdown_files(args.root))} pages, "
          f"{len(problems)} include problems, " +
          ("not compiled" if args.lint_only else "compiled" if compiled_ok else "compile errors"), file=sys.stderr)
    return 1 if problems or not compiled_ok else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
