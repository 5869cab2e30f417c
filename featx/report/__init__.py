"""Reporting: result files, plots and plain-words advice."""
