"""Our methods against installed peer libraries: the micro-benchmark on one tiny model (``peer_table``) and the
campaign at a chosen scale (``peer_campaign``, run by ``python -m experiments.peers``): time ratio, Spearman, AUROC / AP.

    python -m experiments.bench bench.peers=true [bench.peer_n=200]      (or: python -m bench.peers [--n 200])

Pairs: ``tracin`` vs captum ``TracInCP`` on its default exact path, and ``tracin@fast`` vs its documented fast
path (``sample_wise_grads_per_batch=True``, Linear/Conv layers only, so BN is frozen on both sides); ``if_cg`` /
``lissa`` / ``arnoldi`` / ``trak`` vs dattri's ``IFAttributorCG`` / ``IFAttributorLiSSA`` / ``IFAttributorArnoldi``
/ ``TRAKAttributor``; ``ekfac`` vs kronfluence's EK-FAC with the same damping (its heuristic 0.1 x mean
eigenvalue, our default); ``cl`` vs cleanlab's own cross-validated label quality (its default 5 folds, our recipe
as the classifier; ours with 5 folds too). Each row records both sides' settings (``ours_settings``, ``peer_settings``). The tiny
model is the smoke preset's (digits, BN MLP 64-32-10, P ~ 2.5k, 20 epochs with its 5 trajectory checkpoints): a
micro-benchmark where fixed costs dominate, small enough for every peer's default path. Each side is timed from construction to the scores
(our ``fit`` + ``self_influence``, the peer's ``cache`` + ``self_attribute``) over ``repeats`` rounds that alternate
ours and the peer's after an untimed warm-up of both (``bench.timing.alternate``): ``ours_s`` and ``peer_s`` are
medians, ``peer_time_ratio`` = peer median / ours (above 1: the peer is slower), ``peer_time_ratio_min`` / ``_max``
the range of the per-round ratios (drift of the machine's load shows there). Options are matched where the libraries
expose them (damping, iterations, projection size, checkpoint weights); stochastic ones (LiSSA batches, random
projections, sampled Fisher labels) use each side's own random streams, so Spearman < 1 there is expected. A
missing peer or method, or a peer that fails, gives a row with a ``status`` instead of numbers. In a campaign the
curvature pairs (``SUBSET_PAIRS``) may score a fixed subset of each size (``scored``; column ``scored``), the
curvature still over the whole size: one inverse-HVP per scored sample is their cost on both sides.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import statistics
import tempfile
import time
import warnings
from dataclasses import replace
from typing import Any, Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from baselines.trak import margin as trak_margin
from bench.grad_paths import freeze_norm_layers
from bench.methods import method_options
from bench.tables import markdown_table
from bench.timing import alternate, median_ratios
from gex.attribution import METHODS, InfluenceTask, build_method
from gex.data import DataConfig, LabeledData, NoiseConfig, load_data
from gex.models import ModelConfig
from gex.pipeline import pretrained_task
from gex.ranking import auroc_ap
from gex.train import TrainConfig

__all__ = ["PAIRS", "PEER_OPTIONS", "DEFAULT_SCALE_OPTIONS", "SUBSET_PAIRS", "scored_rows", "tiny_task", "peer_table",
           "peer_campaign", "peer_scores", "cost_split"]

TINY_MODEL = {"hidden": 32, "depth": 1}
TINY_EPOCHS = 20
# Both sides get these on top of configs/method/<name>.yaml: the tiny model's Hessian has negative eigenvalues
# below -0.1, where conjugate gradients (ours and dattri's) need a positive-definite damped curvature.
# dattri's CG returns NaN for many samples once it runs past convergence (seen at 40 and 200 iterations), so both
# sides stop at dattri's default of 10 iterations (ours then warns that it stopped before its tolerance).
# TRAK projects to fewer dimensions than the tiny task's 200 samples: with d >= n its self-influence reduces to the
# mean of (1 - p) over checkpoints and the kernel (the part worth comparing) never enters the scores.
PEER_BATCH = 256  # samples per batch where a peer's batch size does not change its scores (TracInCP, TRAK, Arnoldi)
WARMUP_N = 200  # samples of the untimed warm-up subset of a campaign (libraries and kernels, not the sizes)
PEER_SCORED_CHUNK = 1  # scored rows per dattri self_attribute call on a subset (its memory grows with the rows)
PEER_OPTIONS: dict[str, dict[str, Any]] = {"if_cg": {"damping": 1.0, "max_iter": 10}, "trak": {"proj_dim": 128},
                                           "cl": {"folds": 5}}  # cleanlab's default number of folds
# At the default scale (Fashion-MNIST, cnn_small) every method keeps its shipped options, except: cl's folds,
# cleanlab's default on both sides; if_cg's iterations, dattri's default of 10 on both sides (ours would run to
# 1e-6 or 200 products per solve, and dattri's CG returns NaN past convergence); LiSSA's scale, dattri's default of
# 50 on both sides, because 128-sample Hessians of theta* reach eigenvalues of ~67 (power iteration on three
# batches of a 1k subset; 38 on the whole 1k) and our shipped 10 diverges there.
DEFAULT_SCALE_OPTIONS: dict[str, dict[str, Any]] = {"cl": {"folds": 5}, "if_cg": {"max_iter": 10},
                                                    "lissa": {"scale": 50.0}}
# Pairs whose every scored sample costs an inverse-HVP solve on full-data curvature products; a campaign may score a
# fixed random subset of each size on them (``scored``), the curvature still over the whole size. Arnoldi is not one:
# once fitted it projects each sample's gradient on its top-k eigenvectors, so it scores every sample on both sides.
SUBSET_PAIRS = ("if_cg", "lissa")


def tiny_task(n: int, seed: int = 0, device: str = "cpu") -> InfluenceTask:
    """Digits (``n`` train, ``n // 2`` test, 10% noise), BN MLP 64-32-10, 20 epochs; nothing cached."""
    bundle = load_data(DataConfig(name="digits", n_train=n, n_test=max(1, n // 2)), NoiseConfig(rate=0.1), seed)
    return pretrained_task(bundle, ModelConfig("mlp", options=dict(TINY_MODEL)),
                           TrainConfig(epochs=TINY_EPOCHS, batch_size=64, bn_batches=4), seed=seed, device=device)


def _loader(task: InfluenceTask, batch_size: int | None = None, rows: Tensor | None = None) -> DataLoader:
    """The training set (or its ``rows``) in order, in one batch unless ``batch_size`` is given. The curvature peers
    need one batch twice over: dattri sums its inverse-HVPs over the cached loader's batches (only one batch gives
    the full-data inverse), and its ``self_attribute`` adds each batch's scores onto the whole output vector."""
    x, y = (task.train.x, task.train.y) if rows is None else (task.train.x[rows], task.train.y[rows])
    return DataLoader(TensorDataset(x, y), batch_size=batch_size or len(x), shuffle=False)


def scored_rows(task: InfluenceTask, size: int) -> Tensor:
    """A fixed random subset of ``size`` training rows (sorted), drawn with ``task.seed`` and stratified by the
    noise flag so both classes of the detection metrics are present: ``round(size x noise rate)`` noisy rows, at
    least one of each kind where both exist."""
    noisy = task.train.is_noisy.cpu()
    n = len(noisy)
    if size >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(int(task.seed))
    k_noisy = round(size * float(noisy.double().mean()))
    if 0 < int(noisy.sum()) < n:
        k_noisy = min(max(k_noisy, 1), size - 1, int(noisy.sum()))
    k_noisy = max(k_noisy, size - int((~noisy).sum()))
    pick = [idx[torch.randperm(len(idx), generator=gen)[:k]]
            for idx, k in ((noisy.nonzero().flatten(), k_noisy), ((~noisy).nonzero().flatten(), size - k_noisy))]
    return torch.cat(pick).sort().values


def _loss_fn(model: nn.Module, input_dims: int) -> Callable[[dict, tuple], Tensor]:
    """dattri's ``f(params, (x, y))``: the mean loss; accepts one unbatched sample (TRAK's vmap) or a batch."""
    def f(params: dict, data: tuple) -> Tensor:
        x, y = data
        if x.dim() == input_dims:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        return F.cross_entropy(functional_call(model, params, (x,)), y.long())
    return f


def _dattri_task(task: InfluenceTask, checkpoints: list[dict] | None = None,
                 output: Callable[[nn.Module, int], Callable] | None = None):
    """dattri's task on a copy of theta*. ``output``: TRAK's model output function, which dattri's TRAK documents
    as both the loss and the target function (its training features are gradients of ``loss_func``); None = the
    cross-entropy loss, for the influence functions."""
    from dattri.task import AttributionTask
    model = copy.deepcopy(task.model).eval()
    states = checkpoints or [{k: v.clone() for k, v in task.model.state_dict().items()}]
    fn = (output or _loss_fn)(model, task.train.x.dim() - 1)
    return AttributionTask(loss_func=fn, model=model, checkpoints=states, target_func=fn if output else None)


def _dattri_if(kind: str, options: dict[str, Any]) -> Callable[..., Tensor]:
    def run(task: InfluenceTask, rows: Tensor | None = None) -> Tensor:
        from dattri.algorithm import influence_function as dif
        if kind == "cg":
            attributor = dif.IFAttributorCG(_dattri_task(task), device=str(task.device), max_iter=options["max_iter"],
                                            regularization=options["damping"])
        elif kind == "lissa":
            attributor = dif.IFAttributorLiSSA(_dattri_task(task), device=str(task.device),
                                               batch_size=options["batch_size"] or len(task.train),
                                               num_repeat=options["repeats"], recursion_depth=options["depth"],
                                               damping=options["damping"], scaling=options["scale"])
        else:
            attributor = dif.IFAttributorArnoldi(_dattri_task(task), device=str(task.device),
                                                 proj_dim=options["top_k"], max_iter=options["n_iter"],
                                                 regularization=options["damping"])
        # Under no_grad: the same scores, but dattri's outputs otherwise stay attached to the autograd graph of the
        # model's parameters through every iteration (on cnn_small, a 250-sample curvature batch: 4.4 GB after 6 CG
        # iterations instead of 1.4 GB, and ~1.7x the time; at 1k one scored sample passed 11 GB).
        with torch.no_grad():
            attributor.cache(_loader(task))   # the curvature: every training sample of the task
            if rows is None and kind != "arnoldi":
                return attributor.self_attribute(_loader(task))
            # Subsets, as its documentation allows, one batch per call (it adds each batch's scores onto the whole
            # output): CG and LiSSA one row per call, as each call inverts its batch as a vmap over the rows, whose
            # memory grows with them; Arnoldi every sample, PEER_BATCH per call (its per-sample gradients).
            rows = torch.arange(len(task.train)) if rows is None else rows
            per_call = PEER_BATCH if kind == "arnoldi" else PEER_SCORED_CHUNK
            return torch.cat([attributor.self_attribute(_loader(task, rows=chunk)).cpu()
                              for chunk in rows.split(per_call)])
    names = {"cg": ("IFAttributorCG", {"max_iter": "max_iter", "regularization": "damping"}),
             "lissa": ("IFAttributorLiSSA", {"batch_size": "batch_size", "num_repeat": "repeats",
                                             "recursion_depth": "depth", "damping": "damping", "scaling": "scale"}),
             "arnoldi": ("IFAttributorArnoldi", {"proj_dim": "top_k", "max_iter": "n_iter",
                                                 "regularization": "damping"})}[kind]
    run.settings = {"class": f"dattri.algorithm.influence_function.{names[0]}",
                    "loader": "cache: the training set in one batch; self_attribute: " + (
                        f"every sample, {PEER_BATCH} per call (one batch per call)" if kind == "arnoldi" else
                        f"the scored samples, one batch per call ({PEER_SCORED_CHUNK} per call on a subset)"),
                    "autograd": "called under torch.no_grad(): the same scores, without the graph its outputs "
                                "otherwise keep through every iteration",
                    **{theirs: options.get(ours) for theirs, ours in names[1].items()}}
    return run


def _margin(model: nn.Module, input_dims: int) -> tuple[Callable, Callable]:
    """TRAK's margin ``log(p / (1 - p))`` of the labelled class and that class's probability."""
    def margin(params: dict, data: tuple) -> Tensor:
        # the stable form z_y - logsumexp(z_others) of dattri's documented logp - log(1 - exp(logp)): the same
        # function, without the infinities where p rounds to 1 (dattri zeroes non-finite gradients)
        x, y = data
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return trak_margin(logits, y.long().reshape(1), "ce")[0]

    def prob(params: dict, data: tuple) -> Tensor:
        x, y = data
        return F.softmax(functional_call(model, params, (x.unsqueeze(0),)), -1)[0, y.long()]
    return margin, prob


def _dattri_trak(options: dict[str, Any]) -> Callable[[InfluenceTask], Tensor]:
    def run(task: InfluenceTask) -> Tensor:
        from dattri.algorithm.trak import TRAKAttributor
        states = [c.state for c in task.trajectory[-options["num_checkpoints"]:]]
        dtask = _dattri_task(task, states, output=lambda net, dims: _margin(net, dims)[0])
        # Q = 1 - p on dattri's own model, into which it loads each checkpoint's state (BN statistics included)
        _, prob = _margin(dtask.get_model(), task.train.x.dim() - 1)
        attributor = TRAKAttributor(dtask, prob, projector_kwargs={"proj_dim": options["proj_dim"],
                                                                   "device": str(task.device)},
                                    device=str(task.device), regularization=options["damping"])
        # dattri refuses a loader after cache(); none fails
        return attributor.self_attribute(_loader(task, min(len(task.train), PEER_BATCH)))
    run.settings = {"class": "dattri.algorithm.trak.TRAKAttributor", "proj_dim": options["proj_dim"],
                    "regularization": options["damping"], "checkpoints": f"the last {options['num_checkpoints']}",
                    "loss_func = target_func": "margin log(p / (1 - p))", "batch_size": f"min(n, {PEER_BATCH})"}
    return run


def _captum_tracin(options: dict[str, Any], fast: bool = False) -> Callable[[InfluenceTask], Tensor]:
    """captum's ``TracInCP``: its default exact per-example gradients, or (``fast``) its documented
    ``sample_wise_grads_per_batch=True`` path, which covers Linear/Conv layers only (the pair freezes BN on both
    sides, so both cover the same parameters)."""
    def run(task: InfluenceTask) -> Tensor:
        from captum.influence import TracInCP
        model = copy.deepcopy(task.model).eval()
        states = {str(i): c for i, c in enumerate(task.trajectory)}
        use_lr = options["weighting"] == "lr"

        def load(net: nn.Module, key: str) -> float:
            net.load_state_dict(states[key].state)
            net.eval()
            return states[key].lr if use_lr else 1.0 / len(states)
        loss = nn.CrossEntropyLoss(reduction="sum" if fast else "none")  # captum's fast path wants a summed loss
        tracin = TracInCP(model, TensorDataset(task.train.x, task.train.y), list(states), load, loss_fn=loss,
                          batch_size=min(len(task.train), PEER_BATCH), sample_wise_grads_per_batch=fast)
        return tracin.self_influence(show_progress=False)
    run.settings = {"class": "captum.influence.TracInCP", "sample_wise_grads_per_batch": fast,
                    "checkpoint_weight": options["weighting"], "batch_size": f"min(n, {PEER_BATCH})",
                    "parameters": "Linear/Conv (BN frozen)" if fast else "all trainable"}
    return run


class _KronTask:
    """kronfluence's Task: summed train loss (with Fisher labels sampled from the model when ``sample``)."""

    def __new__(cls):
        from kronfluence.task import Task

        class KronTask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                x, y = batch
                logits = model(x)
                if sample:
                    with torch.no_grad():
                        y = torch.multinomial(logits.softmax(-1), 1).flatten()
                return F.cross_entropy(logits, y, reduction="sum")

            def compute_measurement(self, batch, model):
                x, y = batch
                return F.cross_entropy(model(x), y, reduction="sum")
        return KronTask()


def _kronfluence(options: dict[str, Any]) -> Callable[[InfluenceTask], Tensor]:
    """kronfluence's EK-FAC with ``damping_factor=None``: its heuristic 0.1 x the mean eigenvalue of each module,
    which is our ``ekfac`` default (``damping=0.1``, ``damping_mode=relative``); other settings of ours have no
    kronfluence equivalent and are refused."""
    if options.get("damping_mode", "relative") != "relative" or float(options.get("damping", 0.1)) != 0.1:
        raise ValueError(f"ekfac damping={options.get('damping')} ({options.get('damping_mode')}) has no kronfluence "
                         f"equivalent; the pair needs damping=0.1 damping_mode=relative (its heuristic)")

    def run(task: InfluenceTask) -> Tensor:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        ktask = _KronTask()
        model = prepare_model(copy.deepcopy(task.model).eval(), ktask)
        data = TensorDataset(task.train.x, task.train.y)
        with tempfile.TemporaryDirectory() as tmp:
            analyzer = Analyzer("bench", model, ktask, cpu=task.device.type == "cpu", disable_tqdm=True,
                                output_dir=tmp, disable_model_save=True)
            analyzer.fit_all_factors("ekfac", data, per_device_batch_size=options["batch_size"],
                                     factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
            analyzer.compute_self_scores("self", "ekfac", data, per_device_train_batch_size=options["batch_size"],
                                         score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
            return analyzer.load_self_scores("self")["all_modules"]
    run.settings = {"class": "kronfluence.Analyzer", "strategy": "ekfac",
                    "damping_factor": "None = 0.1 x mean eigenvalue per module (same as ours)",
                    "batch_size": options["batch_size"]}
    return run


class _Classifier:
    """Our training recipe as the scikit-learn classifier cleanlab cross-validates: ``fit`` trains a fresh model
    from theta*'s architecture on the rows it is given, ``predict_proba`` returns softmax probabilities."""

    def __init__(self, task: InfluenceTask, epochs: int | None = None, seed: int = 0):
        self.task, self.epochs, self.seed = task, epochs, seed

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"task": self.task, "epochs": self.epochs, "seed": self.seed}

    def set_params(self, **params: Any) -> "_Classifier":
        for key, value in params.items():
            setattr(self, key, value)
        return self

    def fit(self, x, y) -> "_Classifier":
        from gex.data import LabeledData
        from gex.train import train
        task = self.task
        data = LabeledData(torch.as_tensor(x).to(task.device), torch.as_tensor(y).long().to(task.device),
                           torch.as_tensor(y).long().to(task.device), task.train.num_classes)
        recipe = replace(task.recipe, epochs=self.epochs or task.recipe.epochs, steps=None, ckpt_fracs=[1.0])
        self.model_ = task.fresh_model(self.seed)
        train(self.model_, data, recipe, seed=self.seed, device=task.device, desc="cleanlab fold")
        return self

    def predict_proba(self, x):
        from gex.data import LabeledData
        from gex.train import eval_logits
        x = torch.as_tensor(x).to(self.task.device)
        zeros = torch.zeros(len(x), dtype=torch.long, device=x.device)
        logits = eval_logits(self.model_, LabeledData(x, zeros, zeros, self.task.train.num_classes))
        return logits.softmax(-1).double().numpy()


def _cleanlab_cv(options: dict[str, Any]) -> Callable[[InfluenceTask], Tensor]:
    """cleanlab's own cross-validated label quality: ``estimate_cv_predicted_probabilities`` with its default
    folds (5, stratified) around our training recipe, then ``get_label_quality_scores`` with our quality method;
    ``1 - quality`` so that higher = more likely mislabeled, as our ``cl``. The pair runs our ``cl`` with the same
    number of folds."""
    def run(task: InfluenceTask) -> Tensor:
        from cleanlab.count import estimate_cv_predicted_probabilities
        from cleanlab.rank import get_label_quality_scores
        labels = task.train.y.cpu().numpy()
        probs = estimate_cv_predicted_probabilities(task.train.x.cpu().numpy(), labels,
                                                    clf=_Classifier(task, options["epochs"], task.seed),
                                                    seed=task.seed)
        return 1.0 - torch.as_tensor(get_label_quality_scores(labels, probs, method=options["quality_method"]))
    run.settings = {"function": "cleanlab.count.estimate_cv_predicted_probabilities", "cv_n_folds": "5 (default)",
                    "classifier": "our recipe per fold", "quality_method": options["quality_method"]}
    return run


# pair -> (peer label, the module the peer needs, adapter built from our method's options). A pair named
# "<method>@<variant>" runs our <method>; the variant "fast" freezes BN on both sides (captum's fast path skips it).
PAIRS: dict[str, tuple[str, str, Callable[[dict[str, Any]], Callable[[InfluenceTask], Tensor]]]] = {
    "tracin": ("captum.TracInCP (exact)", "captum", _captum_tracin),
    "tracin@fast": ("captum.TracInCP (sample_wise_grads_per_batch)", "captum", lambda o: _captum_tracin(o, True)),
    "if_cg": ("dattri.IFAttributorCG", "dattri", lambda o: _dattri_if("cg", o)),
    "lissa": ("dattri.IFAttributorLiSSA", "dattri", lambda o: _dattri_if("lissa", o)),
    "arnoldi": ("dattri.IFAttributorArnoldi", "dattri", lambda o: _dattri_if("arnoldi", o)),
    "trak": ("dattri.TRAKAttributor", "dattri", _dattri_trak),
    "ekfac": ("kronfluence.EKFAC", "kronfluence", _kronfluence),
    "cl": ("cleanlab CV label quality", "cleanlab", _cleanlab_cv),
}


def _ours(task: InfluenceTask, name: str, options: dict[str, Any], scored: LabeledData | None = None) -> Tensor:
    return build_method(name, **options).fit(task).self_influence(task.train if scored is None else scored)


def _timed(fn: Callable[[], Tensor]) -> tuple[float, Tensor]:
    """Seconds and scores of ``fn()``, with the peers' warnings, logs and progress bars silenced."""
    start = time.perf_counter()
    quiet = contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO())
    with warnings.catch_warnings(), quiet[0], quiet[1]:
        warnings.simplefilter("ignore")
        out = fn()
    return time.perf_counter() - start, torch.as_tensor(out).detach().reshape(-1).double().cpu()


def _pair(task: InfluenceTask, name: str, options: dict[str, Any], repeats: int = 3,
          warmup: bool = True, scored: int | None = None) -> dict[str, Any]:
    """Our ``name`` against its peer on ``task``: alternating medians, their ratio and range, Spearman of scores,
    and both sides' detection AUROC / AP on ``task``'s noise. ``warmup=False`` skips the untimed first call of each
    side (a campaign warms up once per pair, on a small subset). ``scored``: for ``SUBSET_PAIRS``, both sides score
    only ``scored_rows(task, scored)`` (the curvature still over all of ``task``'s training set); metrics are on
    those."""
    from scipy.stats import spearmanr

    label, module, adapter = PAIRS[name]
    method, _, variant = name.partition("@")
    rows = scored_rows(task, scored) if scored and method in SUBSET_PAIRS and scored < len(task.train) else None
    row: dict[str, Any] = {"method": name, "peer": label, "n": len(task.train), "repeats": repeats,
                           "scored": len(task.train) if rows is None else len(rows),
                           "ours_settings": json.dumps(options, sort_keys=True, default=str)}
    if method not in METHODS:
        return row | {"status": f"skipped: our {method} is not registered"}
    try:
        __import__(module)
    except ImportError:
        return row | {"status": f"skipped: {module} is not installed (pip install '.[peers]')"}
    try:
        peer = adapter(options)
    except ValueError as err:
        return row | {"status": f"skipped: {err}"}
    row["peer_settings"] = json.dumps(getattr(peer, "settings", {}), sort_keys=True, default=str)
    if variant == "fast":  # both sides on the same parameters: BN frozen
        task = replace(task, model=freeze_norm_layers(task.model))
    if rows is None:
        fns = {"ours": lambda: _ours(task, method, options), "peer": lambda: peer(task)}
    else:
        fns = {"ours": lambda: _ours(task, method, options, task.train.subset(rows)), "peer": lambda: peer(task, rows)}
    try:  # an untimed warm-up of both (imports, kernels), then ours and the peer's in turn
        runs = alternate(fns, repeats, _timed, warmups=None if warmup else {})
    except Exception as err:  # noqa: BLE001 - a failing peer is reported, the others go on
        return row | {"status": f"error: {type(err).__name__}: {err}".splitlines()[0][:300]}
    ours, theirs = runs["ours"][-1][1], runs["peer"][-1][1]
    if theirs.shape != ours.shape:
        return row | {"status": f"error: peer returned {tuple(theirs.shape)} scores for {len(ours)} samples"}
    bad = int((~torch.isfinite(theirs)).sum() + (~torch.isfinite(ours)).sum())
    if bad:
        return row | {"status": f"error: {bad} non-finite scores (ours and peer's together)"}
    ratio = median_ratios({k: [r[0] for r in v] for k, v in runs.items()}, "peer")["ours"]
    noisy = task.train.is_noisy.cpu() if rows is None else task.train.is_noisy.cpu()[rows]
    (ours_auroc, ours_ap), (peer_auroc, peer_ap) = auroc_ap(ours, noisy), auroc_ap(theirs, noisy)
    return row | {"status": "ok", "ours_s": statistics.median(r[0] for r in runs["ours"]),
                  "peer_s": statistics.median(r[0] for r in runs["peer"]), "peer_time_ratio": ratio["ratio"],
                  "peer_spearman": float(spearmanr(ours.numpy(), theirs.numpy())[0]),
                  "peer_time_ratio_min": ratio["ratio_min"], "peer_time_ratio_max": ratio["ratio_max"],
                  "ours_auroc": ours_auroc, "ours_ap": ours_ap, "peer_auroc": peer_auroc, "peer_ap": peer_ap,
                  "ours_rounds_s": json.dumps([round(r[0], 3) for r in runs["ours"]]),
                  "peer_rounds_s": json.dumps([round(r[0], 3) for r in runs["peer"]])}


def peer_scores(task: InfluenceTask, name: str, overrides: dict[str, dict[str, Any]] | None = None
                ) -> tuple[Tensor, dict[str, Any]]:
    """The peer of pair ``name`` on ``task`` as the default-scale campaign configures it: its self-influence
    scores (higher = more influential) and its settings. ``@fast`` pairs run on the model with BN frozen.

    Raises:
        ValueError: an unknown pair, or settings the peer has no equivalent of.
        ImportError: the peer library is not installed.
    """
    if name not in PAIRS:
        raise ValueError(f"unknown peer pair {name!r}; valid: {list(PAIRS)}")
    label, module, adapter = PAIRS[name]
    __import__(module)
    peer = adapter(_options(name, overrides or {}, False))
    if name.partition("@")[2] == "fast":
        task = replace(task, model=freeze_norm_layers(task.model))
    return _timed(lambda: peer(task))[1], {"peer": label, **getattr(peer, "settings", {})}


def _options(name: str, overrides: dict[str, dict[str, Any]], tiny: bool) -> dict[str, Any]:
    method = name.partition("@")[0]
    base = PEER_OPTIONS.get(method, {}) if tiny else DEFAULT_SCALE_OPTIONS.get(method, {})
    return method_options(method, base | overrides.get(method, {}))


def peer_table(n: int, seed: int = 0, device: str = "cpu", overrides: dict[str, dict[str, Any]] | None = None,
               repeats: int = 3) -> pd.DataFrame:
    """One row per pair in ``PAIRS`` on ``tiny_task(n)`` (the micro-benchmark): median times,
    ``peer_time_ratio`` (and its per-round range), ``peer_spearman``, both sides' AUROC / AP, status.

    Args:
        n: training samples of the tiny task.
        seed: its seed.
        device: where both sides run.
        overrides: per-method options on top of ``configs/method/<name>.yaml`` (and ``PEER_OPTIONS``).
        repeats: timed rounds per pair, ours and the peer alternating.

    Raises:
        ValueError: ``repeats < 1``.
    """
    if repeats < 1:
        raise ValueError(f"peer_table: repeats={repeats} must be a positive integer (bench.peer_repeats, --repeats)")
    import baselines  # noqa: F401  (registers every method)
    task = tiny_task(n, seed, device)
    return pd.DataFrame([_pair(task, name, _options(name, overrides or {}, True), repeats) for name in PAIRS])


def peer_campaign(task: InfluenceTask, sizes: list[int], pairs: list[str], repeats: int = 3,
                  overrides: dict[str, dict[str, Any]] | None = None,
                  progress: Callable[[str], None] | None = None, scored: int | None = None) -> pd.DataFrame:
    """Every pair of ``pairs`` on class-balanced subsets of ``task``'s training set of each size in ``sizes``
    (theta* and its checkpoints unchanged; each side fits and scores on the subset): one ``_pair`` row per
    (size, pair). Both sides are warmed up once per pair by an untimed call on a ``WARMUP_N``-sample subset;
    sizes run smallest first. ``scored``: the
    ``SUBSET_PAIRS`` score a fixed random subset of this many samples of each size (``scored_rows``).

    Raises:
        ValueError: an unknown pair, a size outside 1..n, ``repeats < 1`` or ``scored < 1``.
    """
    from bench.methods import subtask
    unknown = sorted(set(pairs) - set(PAIRS))
    if unknown or not pairs:
        raise ValueError(f"unknown peer pairs {unknown or pairs}; valid: {list(PAIRS)}")
    if repeats < 1 or not sizes or any(not 1 <= n <= len(task.train) for n in sizes):
        raise ValueError(f"peer sizes {list(sizes)} must lie in 1..{len(task.train)} and repeats={repeats} >= 1")
    if scored is not None and scored < 1:
        raise ValueError(f"scored={scored} must be a positive number of samples (or None: all)")
    import baselines  # noqa: F401  (registers every method)
    # One untimed call of each side on a small subset loads the libraries and kernels; at the sizes themselves a
    # warm-up call would cost as much as a timed round (a curvature call at 10k: tens of minutes on a CPU).
    warm = subtask(task, min(WARMUP_N, *sizes), None)
    for name in pairs:
        if progress is not None:
            progress(f"{name}: warm-up at n = {len(warm.train)}")
        _pair(warm, name, _options(name, overrides or {}, False), 1, warmup=False, scored=scored)
    rows = []
    for n in sorted(sizes):
        sub = subtask(task, n, None)
        for name in pairs:
            if progress is not None:
                progress(f"{name} at n = {n}")
            rows.append(_pair(sub, name, _options(name, overrides or {}, False), repeats, warmup=False,
                              scored=scored))
    return pd.DataFrame(rows)


def cost_split(table: pd.DataFrame) -> pd.DataFrame:
    """Per pair, number of scored samples and side, a least-squares line through the median times against n:
    ``fixed_s`` (the intercept: set-up, factor fits that do not grow with n) and ``per_1k_s`` (seconds per 1,000
    training samples), from groups with at least two sizes. ``scored`` is the scored subset's size, or ``all``:
    rows that scored different numbers of samples cost different amounts and never share a line."""
    import numpy as np
    ok = table[table.get("status", pd.Series(dtype=str)) == "ok"]
    counts = ok["scored"] if "scored" in ok else ok["n"]
    ok = ok.assign(scored=[str(int(c)) if c < n else "all" for c, n in zip(counts, ok["n"])])
    rows = []
    for (name, scored), group in ok.groupby(["method", "scored"], sort=False):
        if group["n"].nunique() < 2:
            continue
        for side in ("ours", "peer"):
            slope, intercept = np.polyfit(group["n"].to_numpy(float), group[f"{side}_s"].to_numpy(float), 1)
            rows.append({"method": name, "side": side, "peer": group["peer"].iloc[0], "scored": scored,
                         "fixed_s": float(intercept), "per_1k_s": float(slope) * 1000,
                         "sizes": json.dumps(sorted(group["n"].tolist()))})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    import argparse
    from pathlib import Path

    from gex.runs import atomic_write_text
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per pair (ours and peer alternating)")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_peers.csv / .md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = peer_table(args.n, repeats=args.repeats)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(table.to_csv(index=False), args.out / "bench_peers.csv")
        atomic_write_text(f"n = {args.n}, {args.threads} thread(s), {args.repeats} alternating rounds, torch "
                          f"{torch.__version__}\n\n{markdown_table(table)}\n", args.out / "bench_peers.md")
    print(markdown_table(table))
