"""syncserver: barrier and data-exchange server (a later issue)."""
