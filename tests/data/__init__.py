"""Data files for the tests, and the scripts that made them."""
