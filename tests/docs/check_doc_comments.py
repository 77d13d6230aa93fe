#!/usr/bin/env python3
"""Lists public declarations in include/distorch/**.hpp that lack a `///` doc comment, and headers
that hold no `\\code` example. Prints file:line for each miss and exits 1 when there is any.

It is a heuristic reader of C++, not a compiler. It tokenizes each header (comments, strings, raw
strings, preprocessor lines), walks namespace and class scopes by braces, skips `detail`
namespaces, `detail/` folders, private and protected sections and every function body, and looks
at what is left:
  - classes, structs, unions and enums (definitions, not forward declarations);
  - functions and member functions, constructors and operators included (not destructors, not
    copy / move members, not `= default` / `= delete` ones: they add nothing to document, and not
    `override`s: the base class documents them; nor the standard members of a class named
    iterator or sentinel: value_type, operator*, operator++, ...);
  - `using name = ...` aliases, concepts, and namespace-scope variables (constants, adaptor
    objects).
A declaration is documented when a `///` (or `/** */`) comment ends on the line just above it, or
when a `///<` comment follows it on its last line. Data members are not required to have one.

Before scanning it checks itself on a temporary header with one undocumented public function, so
a reader that has stopped finding anything fails loudly instead of passing.

Usage: check_doc_comments.py [--root DIR] [AREA_OR_FILE ...]
  AREA_OR_FILE: a folder under include/distorch (core, runtime, ...) or a header path; default all.
"""

import argparse
import os
import re
import sys
import tempfile

KEYWORDS_BEFORE_PAREN = {"decltype", "noexcept", "requires", "alignas", "sizeof", "alignof", "static_assert",
                         "explicit", "if", "while", "for", "switch", "return", "throw"}


# Inside an iterator or sentinel class, the members every iterator has need no doc of their own.
ITERATOR_CLASSES = {"iterator", "const_iterator", "sentinel"}
ITERATOR_PROTOCOL = {"operator*", "operator->", "operator++", "operator--", "operator==", "operator!=", "operator<=>"}
ITERATOR_ALIASES = {"value_type", "difference_type", "iterator_concept", "iterator_category", "reference", "pointer",
                    "element_type", "size_type"}


class Token:
    __slots__ = ("kind", "text", "line", "end_line")

    def __init__(self, kind, text, line, end_line=None):
        self.kind = kind  # 'comment', 'code', 'punct', 'string', 'pp'
        self.text = text
        self.line = line
        self.end_line = end_line if end_line is not None else line


def tokenize(src):
    """Comments, string literals and preprocessor lines become single tokens; code is split into
    identifiers and single punctuation characters (with '::' kept whole)."""
    tokens = []
    i, n, line = 0, len(src), 1
    at_line_start = True
    while i < n:
        c = src[i]
        if c == "\n":
            line += 1
            i += 1
            at_line_start = True
            continue
        if c in " \t\r\f\v":
            i += 1
            continue
        if c == "#" and at_line_start:
            start_line, j = line, i
            while j < n:
                if src[j] == "\n":
                    if src[j - 1] == "\\":
                        line += 1
                        j += 1
                        continue
                    break
                j += 1
            tokens.append(Token("pp", src[i:j], start_line, line))
            i = j
            continue
        at_line_start = False
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            tokens.append(Token("comment", src[i:j], line))
            i = j
            continue
        if src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            text = src[i:j]
            tokens.append(Token("comment", text, line, line + text.count("\n")))
            line += text.count("\n")
            i = j
            continue
        m = re.match(r'(?:u8|u|U|L)?R"([^()\\ ]{0,16})\(', src[i:i + 40])
        if m:
            close = ")" + m.group(1) + '"'
            j = src.find(close, i + m.end())
            j = n if j < 0 else j + len(close)
            text = src[i:j]
            tokens.append(Token("string", text, line, line + text.count("\n")))
            line += text.count("\n")
            i = j
            continue
        if c in "\"'":
            # A digit separator (1'000) is not a character literal.
            if c == "'" and i > 0 and (src[i - 1].isalnum()) and i + 1 < n and src[i + 1].isalnum():
                i += 1
                continue
            j = i + 1
            while j < n and src[j] != c and src[j] != "\n":
                j += 2 if src[j] == "\\" else 1
            tokens.append(Token("string", src[i:j + 1], line))
            i = j + 1
            continue
        if c.isalnum() or c == "_":
            j = i
            while j < n and (src[j].isalnum() or src[j] == "_"):
                j += 1
            tokens.append(Token("code", src[i:j], line))
            i = j
            continue
        if src.startswith("::", i):
            tokens.append(Token("punct", "::", line))
            i += 2
            continue
        tokens.append(Token("punct", c, line))
        i += 1
    return tokens


def drop_inactive_branches(tokens):
    """Keeps the first branch of every #if/#ifdef, drops #elif/#else branches, so braces balance."""
    out, stack = [], []  # stack of "this conditional's current branch is dropped"
    for t in tokens:
        if t.kind == "pp":
            directive = t.text[1:].strip().split(None, 1)[0] if t.text[1:].strip() else ""
            if directive in ("if", "ifdef", "ifndef"):
                stack.append(False)
            elif directive in ("elif", "else") and stack:
                stack[-1] = True
            elif directive == "endif" and stack:
                stack.pop()
            out.append(t)
            continue
        if any(stack):
            continue
        out.append(t)
    return out


def is_doc_comment(text):
    return (text.startswith("///") and not text.startswith("///<") and not text.startswith("////")) or \
        (text.startswith("/**") and not text.startswith("/**<") and text != "/**/")


def is_trailing_doc(text):
    return text.startswith("///<") or text.startswith("//!<") or text.startswith("/**<")


class Declaration:
    def __init__(self):
        self.code = []  # code/punct/string tokens
        self.leading = []  # comment tokens seen before the first code token, since the last break

    def empty(self):
        return not self.code


def top_level(tokens):
    """Each token with its depth in () and [] (not <>: '<' is also less-than)."""
    depth = 0
    for t in tokens:
        if t.text in ("(", "["):
            depth += 1
        elif t.text in (")", "]"):
            depth = max(0, depth - 1)
        yield t, depth


def classify(decl, ends_with, class_name=None):
    """What a declaration is: (kind, name) or None when nothing needs a doc comment."""
    code = decl.code
    texts = [t.text for t in code]
    if not texts:
        return None
    # Skip a leading template<...> header; attributes ([[nodiscard]]) need no skipping.
    k = 0
    if texts[0] == "template":
        depth = 0
        k = 1
        while k < len(texts):
            if texts[k] == "<":
                depth += 1
            elif texts[k] == ">":
                depth -= 1
                if depth == 0:
                    k += 1
                    break
            k += 1
    body = texts[k:]
    if not body:
        return None
    first = body[0]
    if first in ("namespace", "static_assert", "extern"):
        return None
    if first == "typedef":
        return ("alias", body[-1] if body else "?")
    if first == "using":
        if len(body) >= 3 and body[1] != "namespace" and body[2] == "=":
            return ("alias", body[1])
        return None
    if first == "friend" and ends_with == ";" and "(" not in body:
        return None  # friend class X;
    if first in ("public", "private", "protected"):
        return None
    if "concept" in body[:2]:
        i = body.index("concept")
        return ("concept", body[i + 1] if i + 1 < len(body) else "?")
    # A class, struct, union or enum head: the keyword before any '(' or '='.
    for i, w in enumerate(body):
        if w in ("(", "="):
            break
        if w in ("class", "struct", "union", "enum"):
            if ends_with == ";":
                return None  # a forward declaration, or an elaborated type in a variable
            j = i + 1
            while j < len(body) and body[j] in ("class", "struct", "alignas", "[", "]"):
                j += 1
            name = body[j] if j < len(body) else "?"
            while j + 2 < len(body) and body[j + 1] == "::":
                j += 2
                name += "::" + body[j]
            if name in ("{", ":"):
                name = "(anonymous)"
            return ("enum" if w == "enum" else w, name)
    # A function: an identifier followed by '(' at top level.
    if "(" in body:
        idx = None
        for i, w in enumerate(body):
            if w == "(" and i > 0:
                prev = body[i - 1]
                if prev in KEYWORDS_BEFORE_PAREN:
                    continue
                if prev == "operator" and i + 2 < len(body) and body[i + 1] == ")" and body[i + 2] == "(":
                    continue  # operator(): the parameter list is the next paren
                if prev == "operator" or re.match(r"^[A-Za-z_~]\w*$", prev) or (i > 1 and body[i - 2] == "operator"):
                    idx = i
                    break
                if re.match(r"^[^\w\s]$", prev):
                    # operator==, operator(), operator<<: walk back to 'operator'
                    j = i - 1
                    while j > 0 and body[j] != "operator" and re.match(r"^[^\w\s]$", body[j]):
                        j -= 1
                    if body[j] == "operator":
                        idx = i
                        break
        if idx is None:
            return None
        # Where is the name: '=' before the paren means a variable initialised by a call.
        before = body[:idx]
        if "=" in before and "operator" not in before:
            return ("variable", before[before.index("=") - 1])
        name_end = idx - 1
        j = name_end
        while j > 0 and body[j] != "operator" and re.match(r"^[^\w\s]$", body[j]) and body[j] != ">":
            j -= 1
        if body[j] == "operator":
            name = "operator" + "".join(body[j + 1:idx])
        elif name_end > 0 and body[name_end - 1] == "operator":
            name = "operator " + body[name_end]  # a conversion: operator bool
        else:
            name = body[name_end]
            if j > 0 and body[j - 1] == "~":
                return None  # destructor
        if name.startswith("~") or (name_end > 0 and body[name_end - 1] == "~"):
            return None
        if j > 0 and body[j - 1] == "::":
            return None  # X::f defined out of its class: the declaration inside carries the doc
        if name in ("DISTORCH_DEFINE_ERROR",):
            return ("macro", name)
        # = default / = delete after the parameter list
        tail = body[idx:]
        depth = 0
        for i, w in enumerate(tail):
            if w == "(":
                depth += 1
            elif w == ")":
                depth -= 1
            elif depth == 0 and w == "=" and i + 1 < len(tail) and tail[i + 1] in ("default", "delete", "0"):
                return None
        if is_copy_or_move(name, tail, class_name):
            return None
        if "override" in tail or "final" in tail:
            return None  # documented where the base class declares it (Doxygen inherits the doc)
        return ("function", name)
    # A variable at namespace scope: inline constexpr auto x = ...; (members are data, skipped)
    if "=" in body or ends_with == ";":
        return ("variable", body[body.index("=") - 1] if "=" in body else body[-1])
    return None


def is_copy_or_move(name, tail, class_name):
    """X(const X&), X(X&&) and their assignments: the language's, nothing to document."""
    if not class_name or name not in (class_name, "operator="):
        return False
    depth, params = 0, []
    for w in tail:
        if w == "(":
            depth += 1
            if depth == 1:
                continue
        elif w == ")":
            depth -= 1
            if depth == 0:
                break
        params.append(w)
    params = [w for w in params if w not in ("const", "other", "o", "rhs", "that")]
    return params in ([class_name, "&"], [class_name, "&", "&"])


def scan_header(path, display):
    with open(path, encoding="utf-8", errors="replace") as f:
        src = f.read()
    tokens = drop_inactive_branches(tokenize(src))
    misses = []

    # Scope stack entries: ('namespace', public?) ('class', access) ('skip',)
    scopes = [["namespace", True]]
    decl = Declaration()
    pending_initializer = None  # a declaration whose '= {' brace body is being skipped
    skip_depth = 0

    def in_public_scope():
        for s in scopes:
            if s[0] == "namespace" and not s[1]:
                return False
            if s[0] == "class" and s[1] != "public":
                return False
        return True

    def documented(d, end_line, next_index):
        # The adjacent run of comments above; plain // notes may sit between the doc and the code.
        next_line = d.code[0].line
        for c in reversed(d.leading):
            if c.end_line < next_line - 1:
                break
            if is_doc_comment(c.text):
                return True
            next_line = c.line
        # a trailing ///< on the declaration's last line
        for t in tokens[next_index:next_index + 3]:
            if t.kind == "comment" and t.line == end_line and is_trailing_doc(t.text):
                return True
        return False

    def record(d, ends_with, end_line, next_index, scope_kind):
        what = classify(d, ends_with, scopes[-1][2] if scopes[-1][0] == "class" else None)
        if not what:
            return
        kind, name = what
        if scope_kind == "class" and kind == "variable":
            return  # data members
        if scope_kind == "class" and scopes[-1][2] in ITERATOR_CLASSES and \
                (name in ITERATOR_PROTOCOL or (kind == "alias" and name in ITERATOR_ALIASES)):
            return  # the standard iterator protocol explains itself
        if name.startswith("DISTORCH_") and kind != "macro":
            return
        if not in_public_scope():
            return
        if not documented(d, end_line, next_index):
            misses.append(f"{display}:{d.code[0].line}: public {kind} '{name}' has no /// doc comment")

    i = 0
    while i < len(tokens):
        t = tokens[i]
        if skip_depth:
            if t.kind == "punct" and t.text == "{":
                skip_depth += 1
            elif t.kind == "punct" and t.text == "}":
                skip_depth -= 1
                if skip_depth == 0 and pending_initializer is not None:
                    decl = pending_initializer
                    pending_initializer = None
            i += 1
            continue
        if t.kind == "pp":
            if decl.empty():
                decl.leading = []  # a doc comment does not reach past an #include or #define
            i += 1
            continue
        if t.kind == "comment":
            if decl.empty():
                # A blank line between comments starts a new run.
                if decl.leading and t.line > decl.leading[-1].end_line + 1:
                    decl.leading = []
                decl.leading.append(t)
            i += 1
            continue
        scope = scopes[-1]
        if t.kind == "punct" and t.text == ":" and scope[0] == "class" and len(decl.code) == 1 and \
                decl.code[0].text in ("public", "private", "protected"):
            scope[1] = decl.code[0].text
            decl = Declaration()
            i += 1
            continue
        if t.kind == "punct" and t.text == ";":
            if not decl.empty():
                record(decl, ";", t.line, i + 1, scope[0])
            decl = Declaration()
            i += 1
            continue
        if t.kind == "punct" and t.text == "}":
            scopes.pop() if len(scopes) > 1 else None
            decl = Declaration()
            i += 1
            continue
        if t.kind == "punct" and t.text == "{":
            texts = [c.text for c in decl.code]
            if texts and texts[0] == "namespace" or (len(texts) >= 2 and texts[0] == "inline" and texts[1] == "namespace"):
                name = "".join(x for x in texts if x not in ("inline", "namespace"))
                public = "detail" not in name.split("::") and not name.endswith("detail")
                scopes.append(["namespace", public])
                decl = Declaration()
                i += 1
                continue
            if texts[:2] == ["extern", '"C"'] or (texts and texts[0] == "extern"):
                scopes.append(["namespace", scopes[-1][1]])
                decl = Declaration()
                i += 1
                continue
            what = classify(decl, "{", scope[2] if scope[0] == "class" else None)
            top = [x for x, d in top_level(decl.code) if d == 0]
            is_init = any(x.text == "=" for x in top) and not (what and what[0] == "function")
            if what and what[0] in ("class", "struct", "union"):
                record(decl, "{", t.line, i + 1, scope[0])
                scopes.append(["class", "private" if what[0] == "class" else "public", what[1].split("::")[-1]])
                decl = Declaration()
                i += 1
                continue
            if what and what[0] == "enum":
                record(decl, "{", t.line, i + 1, scope[0])
                decl = Declaration()
                skip_depth = 1
                i += 1
                continue
            if is_init or (decl.code and decl.code[-1].text in ("=", ",", "(", "return")):
                # A brace initializer: skip it, keep the declaration going to its ';'.
                pending_initializer = decl
                skip_depth = 1
                i += 1
                continue
            if what and what[0] == "function":
                record(decl, "{", t.line, i + 1, scope[0])
            decl = Declaration()
            skip_depth = 1
            i += 1
            continue
        decl.code.append(t)
        i += 1
    if "\\code" not in src:
        misses.append(f"{display}:1: header has no \\code example")
    return misses


def headers_under(root, selection):
    base = os.path.join(root, "include", "distorch")
    targets = []
    if not selection:
        selection = [base]
    for s in selection:
        p = s if os.path.isabs(s) or os.path.exists(s) else os.path.join(base, s)
        if os.path.isfile(p):
            targets.append(p)
            continue
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = sorted(d for d in dirnames if d != "detail")
            for name in sorted(filenames):
                if name.endswith(".hpp"):
                    targets.append(os.path.join(dirpath, name))
    return sorted(set(targets))


SELF_TEST_HEADER = """#pragma once
/// \\file
/// \\code int x = demo::documented(); \\endcode
namespace demo {
/// Documented.
inline int documented() { return 1; }
inline int undocumented_function(int a) { return a; }
namespace detail {
inline int hidden() { return 0; }
}
/// A class.
class widget {
 public:
  /// Documented member.
  int size() const;
  int undocumented_member(int) const { return 0; }
  widget(const widget&) = delete;
 private:
  int secret() const;
};
}
"""


def self_test():
    """The reader must report exactly the two undocumented public functions above."""
    with tempfile.TemporaryDirectory(prefix="distorch-doccheck-") as d:
        p = os.path.join(d, "self_test.hpp")
        with open(p, "w") as f:
            f.write(SELF_TEST_HEADER)
        misses = scan_header(p, "self_test.hpp")
        want = {"undocumented_function", "undocumented_member"}
        found = {m.split("'")[1] for m in misses if "'" in m}
        if found != want:
            print("check_doc_comments.py: self-test failed: expected misses for " + ", ".join(sorted(want)) +
                  ", got: " + ("; ".join(misses) or "none"), file=sys.stderr)
            return False
        with open(p, "w") as f:
            f.write("#pragma once\n/// Documented.\ninline int f() { return 1; }\n")
        if scan_header(p, "self_test.hpp") != ["self_test.hpp:1: header has no \\code example"]:
            print("check_doc_comments.py: self-test failed: a header without \\code went unreported", file=sys.stderr)
            return False
    return True


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        help="repository root (default: this script's)")
    parser.add_argument("paths", nargs="*", help="areas under include/distorch (core, runtime, ...) or header files")
    args = parser.parse_args(argv)
    if not self_test():
        return 2
    headers = headers_under(args.root, args.paths)
    if not headers:
        print("check_doc_comments.py: no headers found under " + args.root, file=sys.stderr)
        return 2
    misses = []
    for h in headers:
        misses += scan_header(h, os.path.relpath(h, args.root))
    for m in misses:
        print(m)
    print(f"{len(headers)} headers, {len(misses)} misses", file=sys.stderr)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
