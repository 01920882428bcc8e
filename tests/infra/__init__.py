"""Test infrastructure: servers, emulators and clusters started (and stopped) by the tests."""
