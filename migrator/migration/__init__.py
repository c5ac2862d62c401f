"""One live migration: parameters, the state machine, progress and the result record."""

from .engine import EDGES, Migration, MigrationResult, Phase, ProgressRecord
from .params import MigrationParams

__all__ = ["Migration", "MigrationParams", "MigrationResult", "Phase", "ProgressRecord", "EDGES"]
