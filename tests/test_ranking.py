"""The AUROC / AP every layer shares (gex.ranking)."""
import math

import torch

from gex.ranking import auroc_ap


def test_the_shared_ranking_quality_is_sklearns_and_nan_for_one_class():
    scores, positive = torch.tensor([0.1, 0.9, 0.4, 0.8]), torch.tensor([False, True, False, False])
    assert auroc_ap(scores, positive) == (1.0, 1.0)
    assert auroc_ap(scores, torch.tensor([False, False, True, True])) == (0.5, 0.5833333333333333)
    assert all(math.isnan(v) for v in auroc_ap(scores, torch.zeros(4, dtype=torch.bool)))
