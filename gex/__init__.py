"""gex-bench's core: GEX (influence as the covariance of loss deviations over a geometric ensemble), the
``InfluenceTask`` every method consumes, and the registry of methods.

    from gex import GEX, InfluenceTask
    task = InfluenceTask.from_model(model, (x, y), loss="ce")
    scores = GEX().fit(task).self_influence(task.train)      # (n,), higher = more influential

The baselines register themselves when ``baselines`` is imported (``build_method(name)`` then knows them all).
"""
from gex.attribution import METHODS, Attributor, InfluenceTask, MethodError, build_method, register
from gex.data import Augment, LabeledData
from gex.method import GEX, GEXLin, GEXMeanLoss

__all__ = ["GEX", "GEXLin", "GEXMeanLoss", "InfluenceTask", "Attributor", "LabeledData", "Augment", "METHODS",
           "MethodError", "build_method", "register"]
