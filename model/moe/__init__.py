"""Mixture-of-Experts layer: router, dispatcher, grouped experts, balancing losses."""

from model.moe.dispatch import LocalDispatcher
from model.moe.experts import GroupedExperts
from model.moe.layer import MoE
from model.moe.router import Router, Routing

__all__ = ["GroupedExperts", "LocalDispatcher", "MoE", "Router", "Routing"]
