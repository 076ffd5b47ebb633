"""Every registered op has a case in its family's test file, so no rule, rewrite or MAC count goes untested."""

import importlib

from fxprune.passes.ops import OPS

FAMILIES = ("elementwise", "conv", "linear", "norms", "reductions", "layout", "indexing")


def _cases():
    return {family: importlib.import_module(f"tests.ops.test_{family}").CASES for family in FAMILIES}


def test_every_family_has_a_test_file():
    assert {op.family for op in OPS.values()} == set(FAMILIES)


def test_every_registered_op_has_a_case_in_its_family():
    cases = _cases()
    missing = [f"{OPS[t].family}: {t}" for t in OPS if not any(c.target == t for c in cases[OPS[t].family])]
    assert not missing, "registered ops without a case in tests/ops/test_<family>.py:\n" + "\n".join(missing)


def test_every_rewrite_and_mac_count_is_exercised():
    cases = [c for family in _cases().values() for c in family]
    no_rewrite = [t for t, op in OPS.items() if op.rewrite and not any(c.target == t and c.rewrites for c in cases)]
    no_macs = [t for t, op in OPS.items() if op.macs and not any(c.target == t and c.macs is not None for c in cases)]
    assert not no_rewrite, f"rewrites no case exercises: {no_rewrite}"
    assert not no_macs, f"MAC counts no case checks: {no_macs}"
