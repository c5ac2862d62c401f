"""Reports of a run: JSON records, JUnit XML for CI, and the summary table."""

from .results import summary_table, write_results

__all__ = ["write_results", "summary_table"]
