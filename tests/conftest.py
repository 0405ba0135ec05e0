"""Shared fixtures. Helpers that tests import are in helpers.py; this file holds only fixtures."""

from __future__ import annotations

import pytest
from helpers import run_study, written_report


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """One real 2^2 x 2 study (helpers.TINY_STUDY: policy x model, one epoch each) run through the CLI, shared
    by the study and report tests. Read it, never change it: copy it first (helpers.copy_study)."""
    return run_study(tmp_path_factory.mktemp("tiny-study"))


@pytest.fixture(scope="module")
def report(study):
    """The report of the module's own `study` fixture, written into that study: (HTML, Markdown)."""
    return written_report(study)
