"""The progress line: counts, rate, and the unit's plural as English spells it."""

from __future__ import annotations

import logging

from graphq.progress import Progress


def test_progress_lines_name_their_units_in_english(caplog):
    caplog.set_level(logging.INFO, logger="graphq")
    cases = [("batch", 4, 1, "1/4 batches"), ("batch", None, 1, "1 batch"),
             ("batch", None, 3, "3 batches"), ("step", 10, 10, "10/10 steps"),
             ("weight", 1, 1, "1/1 weight")]
    for unit, total, done, want in cases:
        caplog.clear()
        progress = Progress("work", total=total, unit=unit, every=0.0)
        progress.update(done)
        progress.close()
        assert len(caplog.messages) == 1, caplog.messages
        line = caplog.messages[0]
        assert line.startswith(f"work: {want} ("), line
        assert line.endswith("/s)"), line


def test_step_counts_one_more_each_time(caplog):
    caplog.set_level(logging.INFO, logger="graphq")
    progress = Progress("work", total=3, unit="run", every=0.0)
    for _ in range(3):
        progress.step()
    assert progress.done == 3 and caplog.messages[-1].startswith("work: 3/3 runs (")
