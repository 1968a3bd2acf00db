"""The public Python API (docs/python-api.md is its contract; semver from 0.1.0 on).

Everything here wraps the code `alignkd-train` itself runs, so a foreign training loop computes the
same numbers: tests/test_api.py and the examples/ check it against `alignkd-train from-cache`.
HF Trainer glue lives in `alignkd_cache.api.hf` (it needs the `hf` extra).
"""

from alignkd_cache.api.cache import Cache, open_cache
from alignkd_cache.api.dataset import CacheBatch, CacheDataset, PlanSampler, backward_scale, step_counts
from alignkd_cache.api.loss import AlignKDLoss, DistillationModel, capture_layer0, loss_config
from alignkd_cache.backends import VLMOutput, load_backend
from alignkd_cache.backends.capture import CAPTURE_ATTENTION
from alignkd_cache.losses import LossConfig, Normalisers
from alignkd_cache.signals import LogitTargets, TeacherSignal

load_student = load_backend

__all__ = [
    "CAPTURE_ATTENTION",
    "AlignKDLoss",
    "Cache",
    "CacheBatch",
    "CacheDataset",
    "DistillationModel",
    "LogitTargets",
    "LossConfig",
    "Normalisers",
    "PlanSampler",
    "TeacherSignal",
    "VLMOutput",
    "backward_scale",
    "capture_layer0",
    "load_student",
    "loss_config",
    "open_cache",
    "step_counts",
]
