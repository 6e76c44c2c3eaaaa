"""Test doubles that ship with the package (the fake Drive), for tests and benchmarks."""
