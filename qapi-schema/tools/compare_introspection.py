#!/usr/bin/env python3
"""Compare our QAPI schema with qemu-storage-daemon's query-qmp-schema answer.

Usage:
    compare_introspection.py [--schema qapi-schema/qapi-schema.json]
                             [--introspection OURS.json]
                             [--qsd /work/shared/oracle/expected/qmp-schema.json]
                             [--allow qapi-schema/tools/deliberate-differences.txt]
                             [--docs] [--show NAME]

For every command and event our schema defines, the argument type (and a
command's return type) is resolved on both sides into its wire shape:
member names, optionality, JSON types, enum values, union tags and
branches, alternate members and features.  Type names play no part,
because introspection masks them.  Every difference is printed as one
line ``<entity>: <path>: <what>``.

Members, enum values and branches guarded by an ``if`` condition in our
schema are compared only when QSD has them; when QSD lacks them the
condition is assumed false in QSD's build and the difference is listed
separately as informational.

Differences matching a pattern of the --allow file (one fnmatch pattern
a line; lines starting with ``#`` are comments) are reported as
deliberate and do not fail the run.
Exit status: 0 when every difference is deliberate, 1 otherwise, 2 on a
schema that cannot be read.

--docs additionally checks our doc comments: every definition, member,
enum value, alternative and feature documented, and a Since: section.
--show NAME prints the resolved wire shape of QSD's command or event NAME.
--introspection FILE compares our running daemon's query-qmp-schema answer
(saved to FILE) with QSD's, the same way, instead of the schema files.

Standard library only.
"""

import argparse
import fnmatch
import json
import os
import re
import sys

BUILTIN_JSON = {
    "str": "string", "QType": "string",
    "number": "number",
    "int": "int", "int8": "int", "int16": "int", "int32": "int",
    "int64": "int", "uint8": "int", "uint16": "int", "uint32": "int",
    "uint64": "int", "size": "int",
    "bool": "boolean", "null": "null", "any": "value",
}


class SchemaError(Exception):
    pass


# --------------------------------------------------------------------------
# Reading QAPI schema text


class Lexer:
    """Tokens of the QAPI schema language, with comments kept apart."""

    def __init__(self, path, text):
        self.path = path
        self.text = text
        self.pos = 0
        self.line = 1
        self.comments = []  # (line, text after '#')

    def error(self, msg):
        raise SchemaError("%s:%d: %s" % (self.path, self.line, msg))

    def next(self):
        t = self.text
        while self.pos < len(t):
            c = t[self.pos]
            if c == "\n":
                self.line += 1
                self.pos += 1
            elif c in " \t\r":
                self.pos += 1
            elif c == "#":
                end = t.find("\n", self.pos)
                if end < 0:
                    end = len(t)
                self.comments.append((self.line, t[self.pos + 1:end]))
                self.pos = end
            else:
                break
        if self.pos >= len(t):
            return ("eof", None, self.line)
        c = t[self.pos]
        line = self.line
        if c in "{}[],:":
            self.pos += 1
            return (c, c, line)
        if c == "'":
            end = self.pos + 1
            out = []
            while True:
                if end >= len(t) or t[end] == "\n":
                    self.error("unterminated string")
                if t[end] == "\\":
                    out.append(t[end + 1])
                    end += 2
                    continue
                if t[end] == "'":
                    break
                out.append(t[end])
                end += 1
            self.pos = end + 1
            return ("str", "".join(out), line)
        for word, val in (("true", True), ("false", False)):
            if t.startswith(word, self.pos):
                self.pos += len(word)
                return ("bool", val, line)
        self.error("stray %r" % c)


class Parser:
    def __init__(self, path):
        self.path = path
        with open(path) as f:
            self.lex = Lexer(path, f.read())
        self.tok = self.lex.next()

    def advance(self):
        self.tok = self.lex.next()

    def expect(self, kind):
        if self.tok[0] != kind:
            self.lex.error("expected %r, got %r" % (kind, self.tok[1]))
        val = self.tok[1]
        self.advance()
        return val

    def value(self):
        kind, val, _ = self.tok
        if kind == "{":
            self.advance()
            out = {}
            if self.tok[0] == "}":
                self.advance()
                return out
            while True:
                key = self.expect("str")
                if key in out:
                    self.lex.error("duplicate key %r" % key)
                self.expect(":")
                out[key] = self.value()
                if self.tok[0] == ",":
                    self.advance()
                    continue
                self.expect("}")
                return out
        if kind == "[":
            self.advance()
            out = []
            if self.tok[0] == "]":
                self.advance()
                return out
            while True:
                out.append(self.value())
                if self.tok[0] == ",":
                    self.advance()
                    continue
                self.expect("]")
                return out
        if kind in ("str", "bool"):
            self.advance()
            return val
        self.lex.error("unexpected %r" % (val,))

    def expressions(self):
        """Yield (expr, line, doc_lines) for each top-level expression."""
        while self.tok[0] != "eof":
            line = self.tok[2]
            # comments seen before this expression's '{'
            pending = [c for c in self.lex.comments if c[0] < line]
            self.lex.comments = [c for c in self.lex.comments if c[0] >= line]
            expr = self.value()
            if not isinstance(expr, dict):
                self.lex.error("top-level expression must be an object")
            yield expr, line, doc_block_before(pending, line)


def doc_block_before(comments, line):
    """The '##' ... '##' block ending right before LINE, as text lines."""
    if not comments:
        return None
    # find last '##' closing line
    lines = list(comments)
    if lines[-1][1].strip() != "#" or lines[-1][0] != line - 1:
        return None
    end = len(lines) - 1
    start = end - 1
    while start >= 0 and lines[start][1].strip() != "#":
        start -= 1
    if start < 0:
        return None
    return [text for _, text in lines[start + 1:end]]


def load_schema(path):
    """Expressions of PATH with includes expanded, each annotated."""
    seen = set()
    exprs = []
    pragmas = {}

    def load(p):
        p = os.path.realpath(p)
        if p in seen:
            return
        seen.add(p)
        for expr, line, doc in Parser(p).expressions():
            where = "%s:%d" % (os.path.relpath(p), line)
            if "include" in expr:
                load(os.path.join(os.path.dirname(p), expr["include"]))
            elif "pragma" in expr:
                for k, v in expr["pragma"].items():
                    if isinstance(v, list):
                        pragmas.setdefault(k, []).extend(v)
                    else:
                        pragmas[k] = v
            else:
                expr["_where"] = where
                expr["_doc"] = doc
                exprs.append(expr)

    load(path)
    return exprs, pragmas


META = ("enum", "struct", "union", "alternate", "command", "event")


def meta_of(expr):
    for m in META:
        if m in expr:
            return m
    raise SchemaError("%s: unknown expression" % expr.get("_where"))


# --------------------------------------------------------------------------
# Our schema → wire shapes


def norm_members(data):
    """Member dicts of an inline 'data' object."""
    out = []
    for key, val in data.items():
        opt = key.startswith("*")
        name = key[1:] if opt else key
        if isinstance(val, dict):
            out.append({"name": name, "type": val["type"], "optional": opt,
                        "if": val.get("if"),
                        "features": feature_names(val.get("features", []))})
        else:
            out.append({"name": name, "type": val, "optional": opt,
                        "if": None, "features": []})
    return out


def feature_names(feats):
    return [f if isinstance(f, str) else f["name"] for f in feats]


def enum_values(data):
    out = []
    for v in data:
        if isinstance(v, str):
            out.append({"name": v, "if": None, "features": []})
        else:
            out.append({"name": v["name"], "if": v.get("if"),
                        "features": feature_names(v.get("features", []))})
    return out


class Ours:
    def __init__(self, exprs):
        self.defs = {}
        for e in exprs:
            name = e[meta_of(e)]
            if name in self.defs:
                raise SchemaError("%s: %s defined twice" % (e["_where"], name))
            self.defs[name] = e

    def shape(self, ty):
        """Wire shape of a type reference (str or [str] or inline dict)."""
        if isinstance(ty, list):
            return ("array", ty[0], self)
        if isinstance(ty, dict):
            return ("object", {"members": norm_members(ty), "features": []})
        if ty in BUILTIN_JSON:
            return ("builtin", BUILTIN_JSON[ty])
        e = self.defs.get(ty)
        if e is None:
            raise SchemaError("unknown type %r" % ty)
        m = meta_of(e)
        feats = feature_names(e.get("features", []))
        if m == "enum":
            return ("enum", {"values": enum_values(e["data"]),
                             "features": feats})
        if m == "alternate":
            alts = []
            for k, v in e["data"].items():
                if isinstance(v, dict):
                    alts.append({"name": k, "type": v["type"],
                                 "if": v.get("if")})
                else:
                    alts.append({"name": k, "type": v, "if": None})
            return ("alternate", {"members": alts, "features": feats})
        if m == "struct":
            return ("object", {"members": self.struct_members(ty),
                               "features": feats})
        if m == "union":
            base = e["base"]
            members = (norm_members(base) if isinstance(base, dict)
                       else self.struct_members(base))
            tag = e["discriminator"]
            tag_ty = next(mm["type"] for mm in members if mm["name"] == tag)
            values = enum_values(self.defs[tag_ty]["data"])
            variants = {}
            for v in values:
                variants[v["name"]] = {"type": None, "if": v["if"]}
            for k, v in e["data"].items():
                if isinstance(v, dict):
                    variants[k] = {"type": v["type"], "if": v.get("if")}
                else:
                    variants[k] = {"type": v, "if": variants[k]["if"]
                                   if k in variants else None}
            return ("object", {"members": members, "tag": tag,
                               "variants": variants, "features": feats})
        raise SchemaError("%s is a %s, not a type" % (ty, m))

    def struct_members(self, name):
        e = self.defs[name]
        if "struct" not in e:
            raise SchemaError("%s: base %s is not a struct" % (e["_where"], name))
        out = []
        if "base" in e:
            out.extend(self.struct_members(e["base"]))
        out.extend(norm_members(e.get("data", {})))
        return out


# --------------------------------------------------------------------------
# QSD's introspection → wire shapes


class Theirs:
    def __init__(self, entries):
        self.by = {e["name"]: e for e in entries}

    def shape(self, name):
        e = self.by[name]
        mt = e["meta-type"]
        feats = e.get("features", [])
        if mt == "builtin":
            return ("builtin", e["json-type"])
        if mt == "array":
            return ("array", e["element-type"], self)
        if mt == "enum":
            members = e.get("members") or [{"name": v} for v in e["values"]]
            return ("enum", {"values": [{"name": m["name"], "if": None,
                                         "features": m.get("features", [])}
                                        for m in members],
                             "features": feats})
        if mt == "alternate":
            return ("alternate", {"members": [{"name": None, "type": m["type"],
                                               "if": None}
                                              for m in e["members"]],
                                  "features": feats})
        if mt == "object":
            members = [{"name": m["name"], "type": m["type"],
                        "optional": "default" in m, "if": None,
                        "features": m.get("features", [])}
                       for m in e["members"]]
            out = {"members": members, "features": feats}
            if "tag" in e:
                out["tag"] = e["tag"]
                out["variants"] = {v["case"]: {"type": v["type"], "if": None}
                                   for v in e["variants"]}
            return ("object", out)
        raise SchemaError("unexpected meta-type %s" % mt)


# --------------------------------------------------------------------------
# Comparison


class Comparer:
    def __init__(self, ours, theirs):
        self.ours = ours
        self.theirs = theirs
        self.diffs = []
        self.info = []
        self.done = set()

    def diff(self, path, what, conditional=False):
        (self.info if conditional else self.diffs).append("%s: %s" % (path, what))

    def compare(self, path, our_ty, their_ty):
        key = (json.dumps(our_ty), their_ty)
        if key in self.done:
            return
        self.done.add(key)
        a = self.ours.shape(our_ty)
        b = self.theirs.shape(their_ty)
        if a[0] != b[0]:
            self.diff(path, "is %s here but %s in QSD" % (a[0], b[0]))
            return
        kind = a[0]
        if kind == "builtin":
            if a[1] != b[1]:
                self.diff(path, "JSON type %s here but %s in QSD" % (a[1], b[1]))
            return
        if kind == "array":
            self.compare(path + "[]", a[1], b[1])
            return
        self.features(path, a[1]["features"], b[1]["features"])
        if kind == "enum":
            self.enum(path, a[1]["values"], b[1]["values"])
        elif kind == "alternate":
            self.alternate(path, a[1]["members"], b[1]["members"])
        else:
            self.object(path, a[1], b[1])

    def features(self, path, ours, theirs):
        for f in ours:
            if f not in theirs:
                self.diff(path, "feature %s not in QSD" % f)
        for f in theirs:
            if f not in ours:
                self.diff(path, "feature %s missing here" % f)

    def enum(self, path, ours, theirs):
        tv = {v["name"]: v for v in theirs}
        ov = {v["name"]: v for v in ours}
        for v in ours:
            if v["name"] not in tv:
                self.diff(path, "enum value %r not in QSD%s" % (
                    v["name"], cond_note(v["if"])), conditional=bool(v["if"]))
            else:
                self.features("%s=%s" % (path, v["name"]), v["features"],
                              tv[v["name"]]["features"])
        for v in theirs:
            if v["name"] not in ov:
                self.diff(path, "enum value %r missing here" % v["name"])

    def alternate(self, path, ours, theirs):
        # alternates are told apart by JSON type: compare them by that
        def kinds(side, members):
            out = {}
            for m in members:
                s = side.shape(m["type"])
                k = s[1] if s[0] == "builtin" else (
                    "string" if s[0] == "enum" else s[0])
                out[k] = m
            return out
        ok = kinds(self.ours, ours)
        tk = kinds(self.theirs, theirs)
        for k, m in ok.items():
            if k not in tk:
                self.diff(path, "alternative of JSON kind %s not in QSD%s" % (
                    k, cond_note(m["if"])), conditional=bool(m["if"]))
            else:
                self.compare("%s|%s" % (path, k), m["type"], tk[k]["type"])
        for k in tk:
            if k not in ok:
                self.diff(path, "alternative of JSON kind %s missing here" % k)

    def object(self, path, ours, theirs):
        tm = {m["name"]: m for m in theirs["members"]}
        om = {m["name"]: m for m in ours["members"]}
        for m in ours["members"]:
            p = "%s.%s" % (path, m["name"])
            t = tm.get(m["name"])
            if t is None:
                self.diff(path, "member %r not in QSD%s" % (
                    m["name"], cond_note(m["if"])), conditional=bool(m["if"]))
                continue
            if m["optional"] != t["optional"]:
                self.diff(p, "%s here but %s in QSD" % (
                    opt_word(m["optional"]), opt_word(t["optional"])))
            self.features(p, m["features"], t["features"])
            self.compare(p, m["type"], t["type"])
        for m in theirs["members"]:
            if m["name"] not in om:
                self.diff(path, "member %r (%s) missing here" % (
                    m["name"], opt_word(m["optional"])))
        if ours.get("tag") != theirs.get("tag"):
            self.diff(path, "union tag %r here but %r in QSD" % (
                ours.get("tag"), theirs.get("tag")))
            return
        if "tag" not in ours:
            return
        ov, tv = ours["variants"], theirs["variants"]
        for case, v in ov.items():
            p = "%s{%s=%s}" % (path, ours["tag"], case)
            if case not in tv:
                self.diff(path, "branch %r not in QSD%s" % (
                    case, cond_note(v["if"])), conditional=bool(v["if"]))
                continue
            if v["type"] is None:
                their_members = self.theirs.shape(tv[case]["type"])[1]["members"]
                if their_members:
                    self.diff(p, "branch has no members here but %d in QSD" %
                              len(their_members))
                continue
            self.compare(p, v["type"], tv[case]["type"])
        for case in tv:
            if case not in ov:
                self.diff(path, "branch %r missing here" % case)

    def entity(self, name, expr):
        meta = meta_of(expr)
        t = self.theirs.by.get(name)
        if t is None or t["meta-type"] != meta:
            self.diff(name, "%s not in QSD%s" % (meta, cond_note(expr.get("if"))),
                      conditional=bool(expr.get("if")))
            return
        self.features(name, feature_names(expr.get("features", [])),
                      t.get("features", []))
        data = expr.get("data")
        their_args = self.theirs.shape(t["arg-type"])
        if data is None:
            if their_args[1]["members"]:
                self.diff(name, "takes no arguments here but QSD has %s" %
                          [m["name"] for m in their_args[1]["members"]])
        else:
            self.compare(name, data, t["arg-type"])
        if meta == "command":
            ret = expr.get("returns")
            if ret is None:
                r = self.theirs.shape(t["ret-type"])
                if r[0] != "object" or r[1]["members"]:
                    self.diff(name + "->", "returns nothing here but something in QSD")
            else:
                self.compare(name + "->", ret, t["ret-type"])
            if bool(expr.get("allow-oob")) != bool(t.get("allow-oob")):
                self.diff(name, "allow-oob differs")


    def introspected_entity(self, name, ours_entry):
        """Like entity(), for an entry of our daemon's own introspection."""
        meta = ours_entry["meta-type"]
        t = self.theirs.by.get(name)
        if t is None or t["meta-type"] != meta:
            self.diff(name, "%s not in QSD" % meta)
            return
        self.features(name, ours_entry.get("features", []),
                      t.get("features", []))
        self.compare(name, ours_entry["arg-type"], t["arg-type"])
        if meta == "command":
            self.compare(name + "->", ours_entry["ret-type"], t["ret-type"])
            if bool(ours_entry.get("allow-oob")) != bool(t.get("allow-oob")):
                self.diff(name, "allow-oob differs")


def cond_note(cond):
    return " (conditional: if %s)" % json.dumps(cond) if cond else ""


def opt_word(optional):
    return "optional" if optional else "mandatory"


# --------------------------------------------------------------------------
# Doc comment checks


SECTION_RE = re.compile(r"^(Since|Returns|Errors|TODO)(:|$)")


def parse_doc(lines):
    """(name, {'members': set, 'features': set, 'sections': set})."""
    if not lines:
        return None
    first = lines[0].strip()
    m = re.match(r"^@([^:\s]+):$", first)
    if not m:
        return None
    members, features, sections = set(), set(), set()
    order = []
    # 0: overview, 1: member descriptions, 2: feature descriptions,
    # 3: tagged sections; QEMU expects them in this order.
    phase = 0
    in_section = False  # inside a member, feature or tagged section
    for raw in lines[1:]:
        if raw and not raw.startswith(" "):
            order.append("line lacks a space after '#': %r" % raw)
        text = raw[1:] if raw.startswith(" ") else raw
        if not text.strip():
            in_section = False
            continue
        starts = (text.startswith("Features:") or re.match(r"^@[^:\s]+:", text)
                  or SECTION_RE.match(text))
        if in_section and not starts and not text.startswith("    "):
            order.append("continuation line not indented: %r" % text)
        in_section = bool(starts) or (in_section and text.startswith("    "))
        if text.startswith("Features:"):
            if phase > 2:
                order.append("'Features:' after a tagged section")
            phase = 2
            sections.add("Features")
            continue
        mm = re.match(r"^@([^:\s]+):", text)
        if mm:
            if phase == 3:
                order.append("@%s: after a tagged section" % mm.group(1))
            if phase == 2:
                features.add(mm.group(1))
            else:
                phase = 1
                members.add(mm.group(1))
            continue
        sm = SECTION_RE.match(text)
        if sm:
            if sm.group(1) in sections:
                order.append("duplicate %s: section" % sm.group(1))
            sections.add(sm.group(1))
            phase = 3
    return m.group(1), {"members": members, "features": features,
                        "sections": sections, "order": order}


def check_docs(exprs, ours):
    problems = []
    for e in exprs:
        meta = meta_of(e)
        name = e[meta]
        where = e["_where"]
        doc = parse_doc(e["_doc"])
        if doc is None:
            problems.append("%s: %s %s has no doc block" % (where, meta, name))
            continue
        dname, d = doc
        if dname != name:
            problems.append("%s: doc block names %s, definition is %s" % (where, dname, name))
        for o in d["order"]:
            problems.append("%s: %s: %s" % (where, name, o))
        if "Since" not in d["sections"]:
            problems.append("%s: %s lacks a Since: section" % (where, name))
        need = []
        data = e.get("data")
        if meta == "enum":
            need = [v["name"] for v in enum_values(data)]
        elif meta == "alternate":
            need = list(data.keys())
        elif meta in ("struct", "command", "event") and isinstance(data, dict):
            need = [m["name"] for m in norm_members(data)]
        elif meta == "union" and isinstance(e.get("base"), dict):
            need = [m["name"] for m in norm_members(e["base"])]
        for n in need:
            if n not in d["members"]:
                problems.append("%s: %s: member %s undocumented" % (where, name, n))
        for n in d["members"]:
            if n not in need:
                problems.append("%s: %s: documents @%s which it does not have" % (where, name, n))
        feats = set(feature_names(e.get("features", [])))
        if isinstance(data, dict) and meta != "alternate":
            for v in data.values():
                if isinstance(v, dict):
                    feats |= set(feature_names(v.get("features", [])))
        if meta == "enum":
            for v in enum_values(data):
                feats |= set(v["features"])
        if isinstance(e.get("base"), dict):
            for v in e["base"].values():
                if isinstance(v, dict):
                    feats |= set(feature_names(v.get("features", [])))
        for f in feats:
            if f not in d["features"]:
                problems.append("%s: %s: feature %s undocumented" % (where, name, f))
        for f in d["features"]:
            if f not in feats:
                problems.append("%s: %s: documents feature @%s which it does not have" % (where, name, f))
        if meta == "command" and "returns" in e and "Returns" not in d["sections"]:
            problems.append("%s: %s returns a value but has no Returns: section" % (where, name))
    return problems


# --------------------------------------------------------------------------


def show(theirs, name, depth=0, seen=None):
    """Print QSD's wire shape of a command or event."""
    if seen is None:
        seen = set()
    e = theirs.by[name]
    if e["meta-type"] in ("command", "event"):
        print("%s %s features=%s" % (e["meta-type"], name, e.get("features", [])))
        show(theirs, e["arg-type"], 1, seen)
        if "ret-type" in e:
            print("  returns:")
            show(theirs, e["ret-type"], 2, seen)
        return
    pad = "  " * depth
    if name in seen:
        print(pad + "(type %s, see above)" % name)
        return
    seen.add(name)
    s = theirs.shape(name)
    if s[0] == "builtin":
        print(pad + s[1])
    elif s[0] == "array":
        print(pad + "array of:")
        show(theirs, s[1], depth + 1, seen)
    elif s[0] == "enum":
        print(pad + "enum %s %s" % (name, [v["name"] + ("(%s)" % ",".join(v["features"]) if v["features"] else "") for v in s[1]["values"]]))
    elif s[0] == "alternate":
        print(pad + "alternate %s:" % name)
        for m in s[1]["members"]:
            show(theirs, m["type"], depth + 1, seen)
    else:
        print(pad + "object %s features=%s" % (name, s[1]["features"]))
        for m in s[1]["members"]:
            print(pad + "  %s%s %s" % (m["name"], "?" if m["optional"] else "",
                                      m["features"] or ""))
            show(theirs, m["type"], depth + 2, seen)
        for case, v in s[1].get("variants", {}).items():
            print(pad + "  [%s=%s]" % (s[1]["tag"], case))
            show(theirs, v["type"], depth + 2, seen)


def read_allow(path):
    """Patterns (fnmatch syntax) of deliberate differences, one a line."""
    out = []
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append(line)
    return out


def allowed(diff, patterns):
    return any(fnmatch.fnmatchcase(diff, p) for p in patterns)


def compare_live(args, theirs):
    """Compare our daemon's query-qmp-schema answer with QSD's."""
    try:
        with open(args.introspection) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        print("error: cannot read %s: %s" % (args.introspection, err),
              file=sys.stderr)
        return 2
    if isinstance(data, dict):
        data = data.get("return", data)
    ours = Theirs(data)
    cmp = Comparer(ours, theirs)
    entries = [e for e in data if e["meta-type"] in ("command", "event")]
    try:
        for e in entries:
            cmp.introspected_entity(e["name"], e)
    except (KeyError, SchemaError) as err:
        print("error: malformed introspection: %s" % err, file=sys.stderr)
        return 2
    allow = read_allow(args.allow)
    unexpected = [d for d in cmp.diffs if not allowed(d, allow)]
    for d in unexpected:
        print("DIFF " + d)
    for d in cmp.diffs:
        if allowed(d, allow):
            print("deliberate " + d)
    print("%d commands and events compared: %d unexpected difference(s), "
          "%d deliberate" % (len(entries), len(unexpected),
                             len(cmp.diffs) - len(unexpected)))
    return 0 if not unexpected else 1


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schema", default=os.path.join(here, "..", "qapi-schema.json"))
    ap.add_argument("--qsd", default="/work/shared/oracle/expected/qmp-schema.json")
    ap.add_argument("--allow", default=os.path.join(here, "deliberate-differences.txt"))
    ap.add_argument("--docs", action="store_true")
    ap.add_argument("--show")
    ap.add_argument("--introspection",
                    help="compare this query-qmp-schema answer of our daemon "
                    "(a JSON list, or a reply with 'return') instead of the "
                    "schema files")
    args = ap.parse_args()

    try:
        with open(args.qsd) as f:
            theirs = Theirs(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as err:
        print("error: cannot read QSD's schema %s: %s" % (args.qsd, err),
              file=sys.stderr)
        return 2
    if args.show:
        show(theirs, args.show)
        return 0
    if args.introspection:
        return compare_live(args, theirs)
    try:
        exprs, _pragmas = load_schema(args.schema)
        ours = Ours(exprs)
        cmp = Comparer(ours, theirs)
        for e in exprs:
            if meta_of(e) in ("command", "event"):
                cmp.entity(e[meta_of(e)], e)
    except SchemaError as err:
        print("error: %s" % err, file=sys.stderr)
        return 2
    except (KeyError, TypeError, AttributeError, StopIteration) as err:
        print("error: malformed definition (%s: %s)" % (type(err).__name__, err),
              file=sys.stderr)
        return 2
    allow = read_allow(args.allow)
    unexpected = [d for d in cmp.diffs if not allowed(d, allow)]
    deliberate = [d for d in cmp.diffs if allowed(d, allow)]
    for d in unexpected:
        print("DIFF " + d)
    for d in deliberate:
        print("deliberate " + d)
    for d in cmp.info:
        print("info " + d)
    n_cmd = sum(1 for e in exprs if "command" in e)
    n_ev = sum(1 for e in exprs if "event" in e)
    status = 0 if not unexpected else 1
    if args.docs:
        problems = check_docs(exprs, ours)
        for p in problems:
            print("DOC " + p)
        if problems:
            status = 1
    print("%d commands, %d events compared: %d unexpected difference(s), "
          "%d deliberate, %d conditional" % (n_cmd, n_ev, len(unexpected),
                                             len(deliberate), len(cmp.info)))
    return status


if __name__ == "__main__":
    sys.exit(main())
