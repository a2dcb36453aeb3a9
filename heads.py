"""Head-only training modes: head tuning (reference §6.3) and linear probing (reference §5.6).

Head tuning trains only the output head (for tied embeddings: the shared embedding matrix). Instead of a patched copy
of one architecture's modeling file (the reference's `ht_opt.py`, OPT only), everything before the head runs with grad
mode off through forward hooks, so any Hugging Face causal LM with an output embedding works and no autograd graph (nor
the activations it would keep) is built for the trunk.

Linear probing replaces training by a multinomial logistic regression, without intercept and with L2 regularisation,
from the final hidden states (the LM head's input) to the option tokens they predict. The reference used scikit-learn's
`LogisticRegressionCV`; this is the same estimator in torch (L-BFGS, stratified 5-fold CV over Cs = logspace(-4, 4, 10),
refit on everything with the best C). Unlike the reference it neither writes the coefficients into `lm_head` (with tied
embeddings that also overwrote the input embeddings of the class tokens) nor leaks forward hooks: the fit returns a
`LinearProbe`, and `apply_linear_probe` makes the head's logits of the class tokens those of the probe through a hook,
leaving every weight of the model untouched.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _model_type(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _output_head(model, purpose: str) -> torch.nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{purpose} needs a model with an output embedding (LM head); model type "
                         f"{_model_type(model)!r} has none.")
    return head


# --- head tuning ----------------------------------------------------------------------------------------------------

_HT_HANDLES = "_head_tuning_handles"


def enable_head_tuning(model) -> list[str]:
    """Train only the output head; run everything before it without autograd. Returns the trainable parameter names.

    Grad mode is switched by hooks, not by a model-specific forward: a pre-hook on the whole model turns it off, a
    pre-hook on the output head turns the caller's mode back on, and a post-hook on the model restores it (also when
    the forward raises). Hooking the model and its head rather than `model.base_model` matters: some causal LMs never
    call their base model (transformers' OPTForCausalLM calls `self.model.decoder` directly), while every one calls
    its head. Whatever runs after the head (logit soft-capping, the loss when `labels` are passed) keeps the caller's
    grad mode, so its graph stays connected to the head.

    With tied embeddings the head's weight is the input embedding matrix, so that matrix trains (reported under its
    first name, e.g. `model.embed_tokens.weight`, as in the reference); its lookup inside the trunk builds no graph,
    so its gradient comes from the head's matmul alone, as with the reference's no_grad decoder.
    """
    head = _output_head(model, "Head tuning")
    if head is model:
        raise ValueError(f"Head tuning needs an output head separate from the model; model type "
                         f"{_model_type(model)!r} has none.")
    disable_head_tuning(model)  # idempotent: never stack a second set of hooks

    head_params = {id(p) for p in head.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in head_params)

    # A stack, not a single saved flag: the model may be called inside its own forward (nested calls), and each
    # post-hook must restore the mode its own pre-hook found. Grad mode is per thread, so is the stack (DataParallel
    # runs replicas, which share these hooks, in threads).
    local = threading.local()

    def stack() -> list[bool]:
        if not hasattr(local, "saved"):
            local.saved = []
        return local.saved

    def model_pre_hook(module, args):
        stack().append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def head_pre_hook(module, args):
        saved = stack()
        if saved:  # the head called on its own, outside a model forward, needs no switching
            torch.set_grad_enabled(saved[-1])

    def model_post_hook(module, args, output):
        saved = stack()
        if saved:  # always_call also runs this when an earlier pre-hook raised before ours ran
            torch.set_grad_enabled(saved.pop())

    handles = [model.register_forward_pre_hook(model_pre_hook),
               head.register_forward_pre_hook(head_pre_hook),
               # always_call: an exception inside the trunk must not leave grad mode switched off for the caller
               model.register_forward_hook(model_post_hook, always_call=True)]
    setattr(model, _HT_HANDLES, handles)
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    logger.info("Head tuning: training %s (%d parameters)", names,
                sum(p.numel() for p in model.parameters() if p.requires_grad))
    return names


def has_head_tuning(model) -> bool:
    return bool(getattr(model, _HT_HANDLES, None))


def disable_head_tuning(model) -> None:
    """Remove the grad-mode hooks of `enable_head_tuning` (requires_grad flags are left as they are)."""
    for handle in getattr(model, _HT_HANDLES, None) or []:
        handle.remove()
    if hasattr(model, _HT_HANDLES):
        delattr(model, _HT_HANDLES)


# --- linear probing: the probe and how it scores ------------------------------------------------------------------

@dataclass
class LinearProbe:
    """Logistic-regression head over the observed class tokens: logit of token `class_token_ids[k]` = h · weight[k]."""
    weight: torch.Tensor               # (classes, hidden), fp32
    class_token_ids: torch.Tensor      # (classes,), long, ascending
    C: float = 1.0                     # inverse L2 strength chosen by CV (sklearn's convention)
    cv_scores: dict[float, float] = field(default_factory=dict)  # mean CV score per C (accuracy or -log-loss)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.to(features.dtype).T

    def state_dict(self) -> dict:
        return {"weight": self.weight, "class_token_ids": self.class_token_ids, "C": self.C,
                "cv_scores": dict(self.cv_scores)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "LinearProbe":
        return cls(weight=state["weight"], class_token_ids=state["class_token_ids"], C=float(state["C"]),
                   cv_scores=dict(state.get("cv_scores", {})))

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path) -> "LinearProbe":
        return cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))


_LP_HANDLE = "_linear_probe_handle"


def apply_linear_probe(model, probe: LinearProbe) -> None:
    """Make the model score with the probe: the head's logits of the class tokens become `h · W_c` (+ the head's bias
    for those tokens, if it has one), all other vocabulary logits stay as the head computes them.

    This is exactly what the reference's write of the coefficients into the `lm_head` rows did to the logits, but no
    weight changes: with tied embeddings the input embeddings of the class tokens stay pretrained (the reference
    overwrote them), and `remove_linear_probe` restores the original model. It acts wherever the head runs, so
    `evaluator.score_options` (log_softmax over the full vocabulary) and `generate` see the probe's logits.
    """
    head = _output_head(model, "Linear probing")
    remove_linear_probe(model)
    weight = getattr(head, "weight", None)
    device = weight.device if weight is not None else probe.weight.device
    ids = probe.class_token_ids.to(device)
    rows = probe.weight.to(device)
    bias = getattr(head, "bias", None)
    class_bias = bias.detach()[ids] if isinstance(bias, torch.Tensor) else None

    def replace_class_logits(module, args, kwargs, output):
        hidden = args[0] if args else next(iter(kwargs.values()))
        # In the head's dtype, as the reference's modified head rows computed them.
        class_logits = F.linear(hidden, rows.to(hidden.dtype),
                                None if class_bias is None else class_bias.to(hidden.dtype))
        # index_copy is out of place: the original output may be needed by autograd
        return output.index_copy(-1, ids, class_logits.to(output.dtype))

    setattr(model, _LP_HANDLE, head.register_forward_hook(replace_class_logits, with_kwargs=True))


def remove_linear_probe(model) -> None:
    handle = getattr(model, _LP_HANDLE, None)
    if handle is not None:
        handle.remove()
        delattr(model, _LP_HANDLE)


# --- linear probing: features ---------------------------------------------------------------------------------------

def collect_features(model, batches: Iterable[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the positions that predict each option token, and those tokens.

    Position t predicts token t+1. Batches come from `utils.TrainCollator`: left-padded, so the options are the last
    `option_len` tokens of each row; the LM head then only needs the last `max(option_len) + 1` positions, and the
    hook on its input sees exactly those. Returns (features (N, hidden) fp32 on CPU, token ids (N,)).
    """
    from models import model_device

    head = _output_head(model, "Linear probing")
    device = model_device(model)
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        captured.append((args[0] if args else next(iter(kwargs.values()))).detach())

    features, targets = [], []
    was_training = model.training
    model.eval()  # deterministic features: no dropout (the reference ran its loaded model in eval mode)
    handle = head.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.inference_mode():
            for batch in batches:
                option_len = batch["option_len"]
                if int(option_len.max()) == 0:
                    continue
                keep = int(option_len.max()) + 1
                captured.clear()
                model(**{k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}, logits_to_keep=keep,
                      use_cache=False)  # a cache would copy every layer's keys and values for nothing
                if len(captured) != 1:
                    raise RuntimeError(f"Expected the LM head to run once per forward, it ran {len(captured)} times.")
                hidden = captured[0][:, -keep:-1]                 # positions predicting the last keep-1 tokens
                predicted = batch["input_ids"][:, -keep + 1:]      # the tokens they predict
                position = torch.arange(keep - 1)
                is_option = position[None, :] >= (keep - 1 - option_len.cpu())[:, None]
                features.append(hidden.float().cpu()[is_option])
                targets.append(predicted.cpu()[is_option])
    finally:
        handle.remove()  # the reference registered one hook per batch and never removed any
        model.train(was_training)
    if not features:
        raise ValueError("Linear probing found no option tokens in the training batches.")
    # clone outside inference mode: inference tensors cannot take part in later autograd-enabled code
    return torch.cat(features).clone(), torch.cat(targets).clone()


# --- linear probing: the estimator ----------------------------------------------------------------------------------

def default_cs() -> list[float]:
    return torch.logspace(-4, 4, 10, dtype=torch.float64).tolist()  # sklearn's Cs=10


def logistic_objective(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor,
                       C: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's (>= 1.1) scaled multinomial objective mean_i CE(W x_i, y_i) + |W|^2 / (2 C N), and its gradient.

    Analytic gradient: ∂/∂W = (softmax(X Wᵀ) − onehot(y))ᵀ X / N + W / (C N). No autograd needed.
    """
    n = X.shape[0]
    logits = X @ W.T
    log_probs = logits.log_softmax(-1)
    loss = -log_probs.gather(1, y[:, None]).mean() + W.pow(2).sum() / (2 * C * n)
    residual = log_probs.exp()
    residual[torch.arange(n), y] -= 1
    grad = residual.T @ X / n + W / (C * n)
    return loss, grad


def fit_logistic(X: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, tol: float = 1e-4,
                 max_iter: int = 5000, init: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Multinomial L2 logistic regression without intercept, by full-batch L-BFGS. Returns (W (K, d), iterations).

    `tol` has scipy's L-BFGS-B `gtol` meaning, as sklearn passes it: stop once max_i |∂f/∂w_i| <= tol for the scaled
    objective above; this is torch LBFGS's `tolerance_grad`. scipy's other criterion, a relative decrease of f below
    64·eps, becomes `tolerance_change` 64·eps (torch applies it to the absolute change of f and of the step; the
    objective is O(1)), so with a tol near machine precision the run may end on that criterion first, as in scipy.
    History 10 (scipy's maxcor) and a strong-Wolfe line search, as in scipy.
    """
    X = X.to(torch.float64)
    y = y.to(X.device)
    W = torch.zeros(num_classes, X.shape[1], dtype=torch.float64, device=X.device) if init is None \
        else init.detach().to(X.device, torch.float64).clone()
    W.requires_grad_(True)  # LBFGS only steps parameters that require grad; the gradient itself is analytic
    optimizer = torch.optim.LBFGS([W], lr=1, max_iter=max_iter, max_eval=max(int(max_iter * 1.25), 50),
                                  tolerance_grad=tol, tolerance_change=64 * torch.finfo(torch.float64).eps,
                                  history_size=10, line_search_fn="strong_wolfe")

    def closure():
        with torch.no_grad():
            loss, grad = logistic_objective(W, X, y, C)
        W.grad = grad
        return loss

    optimizer.step(closure)
    iterations = int(optimizer.state[W].get("n_iter", 0))
    if iterations >= max_iter:
        logger.warning("Linear probe (C=%g): L-BFGS stopped at max_iter=%d before reaching tol=%g.", C, max_iter, tol)
    return W.detach(), iterations


def stratified_folds(y: torch.Tensor, n_splits: int) -> torch.Tensor:
    """Test-fold index of each sample, like sklearn's StratifiedKFold(shuffle=False): per class, consecutive blocks
    of its samples (in order) go to folds 0..n_splits-1, with the class counts spread as evenly as possible."""
    _, y_enc = torch.unique(y, return_inverse=True)
    num_classes = int(y_enc.max()) + 1
    y_order = y_enc.sort().values
    allocation = torch.stack([torch.bincount(y_order[i::n_splits], minlength=num_classes) for i in range(n_splits)])
    folds = torch.empty_like(y_enc)
    for k in range(num_classes):
        folds[y_enc == k] = torch.arange(n_splits).repeat_interleave(allocation[:, k])
    return folds


def _score(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor, scoring: str) -> float:
    logits = X.to(torch.float64) @ W.T
    if scoring == "accuracy":
        return (logits.argmax(-1) == y).double().mean().item()
    return -F.cross_entropy(logits, y).item()  # neg_log_loss: higher is better


def fit_probe_from_features(X: torch.Tensor, tokens: torch.Tensor, *, early_stopping: bool = False,
                            Cs: Iterable[float] | None = None, folds: int = 5, scoring: str = "accuracy",
                            binary_as_reference: bool = False) -> LinearProbe:
    """LogisticRegressionCV(fit_intercept=False, multinomial, L2) over the observed token ids, in torch.

    * C is chosen by stratified k-fold CV: the best mean fold score (sklearn's default scorer, accuracy, or
      `scoring="log_loss"`); ties go to the first, i.e. smallest, C, as sklearn's argmax does. Each fold fits the Cs
      in ascending order, warm-starting from the previous C (sklearn's path), and the final fit on all samples starts
      from the fold mean of the chosen C's coefficients (sklearn's refit).
    * Classes: every token id observed among the targets; with one class there is nothing to fit (sklearn raises too).
    * Two classes: we keep the two-row multinomial fit. Its L2 optimum is symmetric, W = [−d/2, +d/2], with d the
      margin direction. sklearn reports one row c = +d/2, which the reference wrote into the head as [−c/2, +c/2] =
      [−d/4, +d/4]: the same decision between the two tokens with half the margin. `binary_as_reference=True`
      reproduces the reference's rows exactly.
    """
    if scoring not in ("accuracy", "log_loss"):
        raise ValueError(f"scoring must be 'accuracy' or 'log_loss', not {scoring!r}")
    tol, max_iter = (0.01, 1000) if early_stopping else (1e-4, 5000)
    Cs = sorted(default_cs() if Cs is None else [float(c) for c in Cs])
    class_ids, y = torch.unique(tokens, return_inverse=True)
    num_classes = len(class_ids)
    if num_classes < 2:
        raise ValueError(f"Linear probing needs at least two distinct option tokens; all {len(tokens)} targets are "
                         f"token {class_ids.tolist()}.")
    X = X.to(torch.float64)

    # sklearn refuses n_splits above the largest class count; fewer folds keep tiny training sets usable.
    n_splits = min(folds, int(torch.bincount(y).max()))
    cv_scores: dict[float, float] = {}
    if n_splits >= 2 and len(Cs) > 1:
        test_fold = stratified_folds(y, n_splits)
        scores = torch.zeros(n_splits, len(Cs), dtype=torch.float64)
        # Fold sums of the coefficients per C, for the refit's start; fp32 keeps many-class (generation) fits small.
        coef_sums = torch.zeros(len(Cs), num_classes, X.shape[1])
        for f in range(n_splits):
            train, test = test_fold != f, test_fold == f
            W = None
            for j, C in enumerate(Cs):
                W, _ = fit_logistic(X[train], y[train], num_classes, C, tol, max_iter, init=W)
                coef_sums[j] += W.float().cpu()
                scores[f, j] = _score(W, X[test], y[test], scoring)
        mean = scores.mean(0)
        best = int(torch.nonzero(mean == mean.max())[0])  # first (smallest) C among ties
        C, init = Cs[best], coef_sums[best] / n_splits
        cv_scores = {c: s for c, s in zip(Cs, mean.tolist())}
    else:
        C, init = (Cs[0] if len(Cs) == 1 else 1.0), None
        if len(Cs) > 1:
            logger.warning("Linear probe: too few samples per class for cross-validation; using C=%g.", C)
    W, iterations = fit_logistic(X, y, num_classes, C, tol, max_iter, init=init)
    logger.info("Linear probe: %d samples, %d classes, C=%g (CV %s), %d L-BFGS iterations", len(y), num_classes, C,
                {f"{c:.3g}": round(s, 4) for c, s in cv_scores.items()}, iterations)
    if num_classes == 2 and binary_as_reference:
        c = W[1] - W[0]  # = 2·(sklearn's row) at the symmetric optimum; c/2 is what sklearn reports
        W = torch.stack([-c / 4, c / 4])
    return LinearProbe(weight=W.float(), class_token_ids=class_ids, C=C, cv_scores=cv_scores)


def fit_linear_probe(model, batches: Iterable[dict], early_stopping: bool = False, **kwargs) -> LinearProbe:
    """Fit the probe on the model's final hidden states over the training batches (reference §5.6).

    `early_stopping` is `--lp_early_stopping` (tol 0.01, max_iter 1000; otherwise tol 1e-4, max_iter 5000). Other
    keyword arguments go to `fit_probe_from_features` (Cs, folds, scoring, binary_as_reference). The model is not
    modified; apply the result with `apply_linear_probe`.
    """
    X, tokens = collect_features(model, batches)
    return fit_probe_from_features(X, tokens, early_stopping=early_stopping, **kwargs)


__all__ = ["enable_head_tuning", "has_head_tuning", "disable_head_tuning", "LinearProbe", "apply_linear_probe", "remove_linear_probe",
           "collect_features", "fit_logistic", "fit_probe_from_features", "fit_linear_probe", "stratified_folds",
           "default_cs", "logistic_objective"]
