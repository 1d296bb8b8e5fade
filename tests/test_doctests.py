"""The package's docstring examples (``>>>``) run as tests: every module of tokenmill, on the CPU."""

import doctest
import importlib
import pkgutil

import pytest
import tokenmill

# __main__ runs the CLI when imported; every other module must import on a machine without a GPU.
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(tokenmill.__path__, "tokenmill.") if m.name != "tokenmill.__main__"
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", ["tokenmill", *MODULES])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    failed, _ = doctest.testmod(module, optionflags=FLAGS, report=True)
    assert failed == 0, f"{name}: {failed} docstring example(s) failed (printed above)"


def test_the_examples_are_found():
    # Guards the test above against finding nothing (a renamed package, a broken walk).
    finder = doctest.DocTestFinder()
    counts = {
        name: sum(len(t.examples) for t in finder.find(importlib.import_module(name)))
        for name in ("tokenmill.plan", "tokenmill.tokenizer", "tokenmill._fsutil")
    }
    assert all(n > 0 for n in counts.values()), counts
