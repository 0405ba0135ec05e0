"""Factorial studies: the study file, the runner and its database, the analysis and the report."""
