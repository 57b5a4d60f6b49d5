"""Small offline tasks shared by the demo, the examples and the tests (no hub downloads)."""
