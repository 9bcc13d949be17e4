#!/usr/bin/env python3
"""Specification of compare_introspection.py, on small made-up schemas.

Run: python3 -m unittest discover -s qapi-schema/tools -p 'test_*.py'
"""

import json
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_introspection as ci  # noqa: E402

SCHEMA = """
{ 'pragma': { 'doc-required': true } }

##
# @Color:
#
# A color.
#
# @red: red
#
# @blue: blue
#
# Since: 1.0
##
{ 'enum': 'Color', 'data': [ 'red', 'blue' ] }

##
# @Paint:
#
# A paint job.
#
# @color: the color
#
# @coats: how many coats
#
# Since: 1.0
##
{ 'struct': 'Paint',
  'data': { 'color': 'Color', '*coats': 'uint8' } }

##
# @paint:
#
# Paint something.
#
# @job: what to do
#
# @tags: labels
#
# Returns: the paint used
#
# Since: 1.0
##
{ 'command': 'paint', 'data': { 'job': 'Paint', '*tags': [ 'str' ] },
  'returns': 'Paint' }

##
# @PAINTED:
#
# Painting is done.
#
# @color: the color
#
# Since: 1.0
##
{ 'event': 'PAINTED', 'data': { 'color': 'Color' } }
"""


def introspection(coats_optional=True, colors=("red", "blue")):
    """A QSD-style answer describing SCHEMA (names masked)."""
    coats = {"name": "coats", "type": "int"}
    if coats_optional:
        coats["default"] = None
    return [
        {"name": "paint", "meta-type": "command", "arg-type": "0",
         "ret-type": "1"},
        {"name": "PAINTED", "meta-type": "event", "arg-type": "2"},
        {"name": "0", "meta-type": "object", "members": [
            {"name": "job", "type": "1"},
            {"name": "tags", "type": "[str]", "default": None}]},
        {"name": "1", "meta-type": "object", "members": [
            {"name": "color", "type": "3"}, coats]},
        {"name": "2", "meta-type": "object", "members": [
            {"name": "color", "type": "3"}]},
        {"name": "3", "meta-type": "enum",
         "members": [{"name": c} for c in colors], "values": list(colors)},
        {"name": "[str]", "meta-type": "array", "element-type": "str"},
        {"name": "str", "meta-type": "builtin", "json-type": "string"},
        {"name": "int", "meta-type": "builtin", "json-type": "int"},
    ]


class CompareTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.schema = os.path.join(self.dir.name, "schema.json")
        with open(self.schema, "w") as f:
            f.write(SCHEMA)

    def tearDown(self):
        self.dir.cleanup()

    def diffs(self, theirs):
        exprs, _ = ci.load_schema(self.schema)
        cmp = ci.Comparer(ci.Ours(exprs), ci.Theirs(theirs))
        for e in exprs:
            if ci.meta_of(e) in ("command", "event"):
                cmp.entity(e[ci.meta_of(e)], e)
        return cmp.diffs

    def test_matching_schema_has_no_differences(self):
        self.assertEqual(self.diffs(introspection()), [])

    def test_optionality_difference_is_reported_with_its_path(self):
        self.assertEqual(self.diffs(introspection(coats_optional=False)),
                         ["paint.job.coats: optional here but mandatory in QSD"])

    def test_enum_value_missing_here_is_reported(self):
        diffs = self.diffs(introspection(colors=("red", "blue", "green")))
        self.assertIn("paint.job.color: enum value 'green' missing here", diffs)

    def test_introspection_compared_with_itself_has_no_differences(self):
        theirs = ci.Theirs(introspection())
        cmp = ci.Comparer(ci.Theirs(introspection()), theirs)
        for e in introspection():
            if e["meta-type"] in ("command", "event"):
                cmp.introspected_entity(e["name"], e)
        self.assertEqual(cmp.diffs, [])

    def test_undocumented_member_is_a_doc_problem(self):
        with open(self.schema, "w") as f:
            f.write(SCHEMA.replace("# @coats: how many coats\n#\n", ""))
        exprs, _ = ci.load_schema(self.schema)
        problems = ci.check_docs(exprs, ci.Ours(exprs))
        self.assertEqual(len(problems), 1)
        self.assertIn("Paint: member coats undocumented", problems[0])

    def test_missing_since_is_a_doc_problem(self):
        with open(self.schema, "w") as f:
            f.write(SCHEMA.replace("# Painting is done.\n#\n# @color: the color\n#\n# Since: 1.0",
                                   "# Painting is done.\n#\n# @color: the color"))
        exprs, _ = ci.load_schema(self.schema)
        problems = ci.check_docs(exprs, ci.Ours(exprs))
        self.assertEqual(len(problems), 1)
        self.assertIn("PAINTED lacks a Since: section", problems[0])

    def test_unterminated_string_is_a_clear_error(self):
        with open(self.schema, "w") as f:
            f.write("{ 'enum': 'Color', 'data': [] }\n{ 'x\n")
        with self.assertRaises(ci.SchemaError) as ctx:
            ci.load_schema(self.schema)
        self.assertIn("schema.json:2: unterminated string", str(ctx.exception))

    def test_allow_patterns_match_whole_lines(self):
        self.assertTrue(ci.allowed("blockdev-add: branch 'nbd' missing here",
                                   ["blockdev-add: branch '*' missing here"]))
        self.assertFalse(ci.allowed("paint.job: branch 'x' missing here",
                                    ["blockdev-add: branch '*' missing here"]))


class OurSchemaTest(unittest.TestCase):
    """The real schema against the recorded QSD answer, when present."""

    QSD = "/work/shared/oracle/expected/qmp-schema.json"

    @unittest.skipUnless(os.path.exists(QSD), "QSD's recorded schema absent")
    def test_only_deliberate_differences_remain(self):
        here = os.path.dirname(os.path.abspath(__file__))
        exprs, _ = ci.load_schema(os.path.join(here, "..", "qapi-schema.json"))
        with open(self.QSD) as f:
            cmp = ci.Comparer(ci.Ours(exprs), ci.Theirs(json.load(f)))
        for e in exprs:
            if ci.meta_of(e) in ("command", "event"):
                cmp.entity(e[ci.meta_of(e)], e)
        allow = ci.read_allow(os.path.join(here, "deliberate-differences.txt"))
        self.assertEqual([d for d in cmp.diffs if not ci.allowed(d, allow)], [])
        self.assertEqual(cmp.info, [])

    def test_every_definition_is_documented(self):
        here = os.path.dirname(os.path.abspath(__file__))
        exprs, _ = ci.load_schema(os.path.join(here, "..", "qapi-schema.json"))
        self.assertEqual(ci.check_docs(exprs, ci.Ours(exprs)), [])


if __name__ == "__main__":
    unittest.main()
