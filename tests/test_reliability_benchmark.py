"""Smoke test of benchmarks/reliability.py: the corpus loads (plain-data cases, unique names), a few real CLI
cases replay as expected, and the classifier itself catches what it must (tracebacks, several error lines, an
unnamed key, a protected file that changed)."""

import importlib.util
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def rel():
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location("reliability", os.path.join(BENCH, "reliability.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("reliability", mod)
    spec.loader.exec_module(mod)
    return sys.modules["reliability"]


def test_corpus_is_plain_data(rel):
    cases = rel.all_cases()
    assert len(cases) >= 40 and len({c.name for c in cases}) == len(cases)
    assert all(c.expected in rel.CLASSES for c in cases)
    import reliability_cases

    # every input case's clear error must name something (the key, file or argument)
    assert all(c.names for c in reliability_cases.CASES if c.expected == "clear-error")


def test_classifier(rel, tmp_path):
    case = rel.ReliabilityCase("x", [], "clear-error", names=("'optim.lr'",))
    out = lambda rc, err: rel.Outcome(rc, "", err, 0.0)  # noqa: E731
    assert rel.classify(case, out(2, "hstu: error: key 'optim.lr' = nan must be a finite number\n")) == "clear-error"
    assert rel.classify(case, out(2, "Traceback (most recent call last):\nValueError: 'optim.lr'\n")) == "raw-error"
    assert rel.classify(case, out(2, "hstu: error: something else\n")) == "raw-error"  # the key is not named
    assert rel.classify(case, out(2, "hstu: error: 'optim.lr'\nhstu: error: 'optim.lr'\n")) == "raw-error"
    assert rel.classify(case, out(0, "")) == "accepted"
    victim = tmp_path / "victim"

    def setup(ctx):
        victim.write_text("good")
        ctx.protect.append(victim)

    clobber = rel.ReliabilityCase("clobber", ["python", "-c", f"open({str(victim)!r}, 'w').write('bad')"],
                                  "accepted", setup=setup)
    row = rel.run_case(clobber, rel.Shared(tmp_path), tmp_path)
    assert row["observed"] == "lost-previous-work" and not row["ok"] and row["lost"] == [str(victim)]
    beside = rel.ReliabilityCase("beside", ["python", "-c", f"open({str(victim) + '.new'!r}, 'w').write('x')"],
                                 "accepted", setup=setup)
    assert rel.run_case(beside, rel.Shared(tmp_path), tmp_path)["observed"] == "accepted"  # new files are fine


def test_smoke_cases_against_the_real_cli(rel, tmp_path):
    payload = rel.main(["--smoke", "--out", str(tmp_path)])
    with open(tmp_path / "reliability.json") as f:
        saved = json.load(f)
    assert saved["totals"] == payload["totals"] and saved["totals"]["cases"] == len(rel.SMOKE)
    for key in ("date", "machine", "commit", "command"):
        assert saved[key], key
    for row in saved["cases"]:
        assert row["ok"] and row["observed"] == row["expected"], row
        assert "$TMP" in row["command"]  # temporary paths are not recorded
