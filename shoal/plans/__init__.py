"""Plans (seed 004): a builder DSL compiled to JSON DAGs, run by an async scheduler with deadlines."""

from shoal.plans.dsl import define_plan
from shoal.plans.expr import EP, Key, P, coalesce, regex
from shoal.plans.registry import PlanError

__all__ = ["EP", "Key", "P", "PlanError", "coalesce", "define_plan", "regex"]
