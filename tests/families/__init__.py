"""Tiny random models of real vision-language architectures, built offline for tests."""
