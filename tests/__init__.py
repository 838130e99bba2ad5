"""Test suite of mammo-dissect."""
