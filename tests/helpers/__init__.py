"""Helpers that test modules share beyond the engine tier's (those are in tests/conftest.py): one module per
topic. Test modules import from here or from tests.conftest, never from one another (tests/test_layout.py)."""
