"""Fixtures for every test."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def restore_graphq_logger():
    """cli.main configures the 'graphq' logger for a terminal; undo that after each test."""
    logger = logging.getLogger("graphq")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
