"""Reports of a run: JSON records, JUnit XML for CI, report.html, and the summary table."""

from .results import summary_table, write_page, write_results

__all__ = ["write_page", "write_results", "summary_table"]
