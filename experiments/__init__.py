"""Hydra entry points: ``python -m experiments.<name>`` for pretrain, detect, relabel, prune, separate, toy,
groundtruth, bench and report."""
