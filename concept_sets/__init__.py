"""Concept sets: the plain-text loader and the built-in vocabularies."""
