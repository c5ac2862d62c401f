"""Test plans: test sets over hosts x queues, scheduled automatically, run as parallel
pipelines, with one merged report (``migrate-run --plan PLAN.yaml --set NAME``)."""

from .model import Plan, load_plan
from .schedule import History, Placement, schedule

__all__ = ["History", "Placement", "Plan", "load_plan", "schedule"]
