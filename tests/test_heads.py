"""Head tuning and linear probing (heads.py) on tiny OPT, LLaMA (grouped KV heads) and GPT-2 models.

Head tuning: only the head (or the tied embedding matrix) changes, the trunk builds no autograd graph, the loss can be
driven down, and scoring/generation are unaffected. Linear probing: the torch L-BFGS estimator against an independent
Newton solve, the CV choice of C, features at the shifted positions, the probe's logits in the evaluator, and that no
weight of the model and no hook is left changed behind.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import evaluator
import heads
import utils
from conftest import VOCAB, tiny_model

KINDS = ["opt", "llama", "gpt2"]
PAD = 258



def make_model(kind: str, tied: bool = True):
    model = tiny_model(kind)
    if not tied:
        from transformers import AutoModelForCausalLM
        config = copy.deepcopy(model.config)
        config.tie_word_embeddings = False
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    else:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model


def records(seed: int = 0, count: int = 6) -> list[dict]:
    """Byte-token examples of different lengths whose last 1-3 tokens are the option."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        length = 5 + int(torch.randint(0, 9, (1,), generator=g))
        ids = [256] + torch.randint(32, 127, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "option_len": 1 + i % 3})
    return out


def collate(rows):
    return utils.TrainCollator(PAD)(rows)


def count_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def graph_nodes(tensor) -> set:
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return seen


# --- head tuning ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kind", KINDS)
def test_head_tuning_updates_only_the_head(kind, tied):
    model = make_model(kind, tied)
    names = heads.enable_head_tuning(model)
    head = model.get_output_embeddings().weight
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is head
    if tied:  # reported under the embedding's name, as the reference reports embed_tokens
        assert names == [n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight]
        assert "embed" in names[0] or "wte" in names[0]
    else:
        assert names == ["lm_head.weight"]

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    batch = collate(records())
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        utils.lm_loss(model, batch).backward()
        optimizer.step()
    head_keys = {k for k, v in model.state_dict().items() if v.data_ptr() == head.data_ptr()}
    assert ("lm_head.weight" in head_keys) and (len(head_keys) == (2 if tied else 1))
    for key, value in model.state_dict().items():
        if key in head_keys:
            assert not torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters() if p is not head)


@pytest.mark.parametrize("kind", KINDS)
def test_trunk_builds_no_autograd_graph(kind):
    model = make_model(kind)
    batch = {k: v for k, v in collate(records()).items() if k in utils.MODEL_INPUTS}
    full = graph_nodes(model(**batch).logits.sum())

    head_inputs = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: head_inputs.append(args[0]))
    heads.enable_head_tuning(model)
    loss = model(**batch).logits.sum()
    assert torch.is_grad_enabled()                    # the post-hook restored the caller's grad mode
    assert not head_inputs[-1].requires_grad          # the trunk's output (the head's input) carries no graph
    nodes = graph_nodes(loss)
    assert len(nodes) <= 6 < len(full), (len(nodes), len(full))
    # With tied embeddings, the input-embedding lookup inside the trunk builds no graph either.
    assert not any("Embedding" in type(n).__name__ for n in nodes)
    assert loss.requires_grad

    heads.disable_head_tuning(model)  # the trunk records again (through the tied embedding lookup)
    nodes = graph_nodes(model(**batch).logits.sum())
    assert len(nodes) > 6 and any("Embedding" in type(n).__name__ for n in nodes)


def test_grad_mode_restored_when_the_trunk_raises():
    model = make_model("llama")
    heads.enable_head_tuning(model)
    with pytest.raises(Exception):
        model(input_ids=torch.tensor([[VOCAB + 5]]))  # out-of-range token id: the embedding lookup raises
    assert torch.is_grad_enabled()
    hooks = count_hooks(model)
    heads.enable_head_tuning(model)                   # idempotent: no second pair of hooks
    assert count_hooks(model) == hooks
    heads.disable_head_tuning(model)
    assert count_hooks(model) == hooks - 3


@pytest.mark.parametrize("kind,tied", [("llama", True), ("opt", True), ("gpt2", False)])
def test_head_tuning_overfits_a_few_examples(kind, tied):
    model = make_model(kind, tied)
    heads.enable_head_tuning(model)
    batch = collate(records(count=4))
    # Moderate SGD: with tied embeddings each step also moves the input embeddings, which the head-only gradient
    # ignores (as in the reference), so large steps overshoot.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = utils.training_loss(model, batch, utils.Objective())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("kind", KINDS)
def test_scoring_and_generation_unchanged_by_head_tuning(kind):
    model = make_model(kind)
    groups = [([[256, 70, 71, 72, 73], [256, 70, 71, 72, 80, 81]], [1, 2]),
              ([[256, 90, 91, 92], [256, 90, 91, 93]], [1, 1])]
    prompt = torch.tensor([[256, 70, 71, 72]])
    expected = evaluator.score_options(model, groups, PAD)
    generated = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    heads.enable_head_tuning(model)
    got = evaluator.score_options(model, groups, PAD)
    for a, b in zip(expected, got):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=PAD),
                       generated)
    assert torch.is_grad_enabled()


def test_head_tuning_needs_an_output_head():
    from transformers import AutoModel
    base = AutoModel.from_config(tiny_model("llama").config)   # LlamaModel: no LM head
    with pytest.raises(ValueError, match="llama"):
        heads.enable_head_tuning(base)


# --- linear probing: the estimator ----------------------------------------------------------------------------------

def newton_solve(X, y, K, C, iterations=60):
    """Independent solver: damped Newton on sklearn's classic objective C·Σ CE + ½|W|² (same minimiser as the
    scaled one heads.py uses), gradient and Hessian by autograd."""
    X = X.double()
    d = X.shape[1]

    def objective(w):
        W = w.view(K, d)
        return C * F.cross_entropy(X @ W.T, y, reduction="sum") + 0.5 * W.pow(2).sum()

    w = torch.zeros(K * d, dtype=torch.float64)
    for _ in range(iterations):
        grad = torch.autograd.functional.jacobian(objective, w)
        hess = torch.autograd.functional.hessian(objective, w)
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        while objective(w - t * step) > objective(w) - 0.25 * t * grad @ step and t > 1e-8:
            t /= 2
        w = w - t * step
        if grad.abs().max() < 1e-13:
            break
    return w.view(K, d), objective


@pytest.mark.parametrize("case", ["three_classes", "separable_binary"])
def test_lbfgs_matches_an_independent_newton_solve(case):
    g = torch.Generator().manual_seed(3)
    if case == "three_classes":
        N, d, K, C = 50, 4, 3, 0.7
        X = torch.randn(N, d, generator=g, dtype=torch.float64)
        y = (X @ torch.randn(d, K, generator=g, dtype=torch.float64)
             + torch.randn(N, K, generator=g, dtype=torch.float64)).argmax(-1)
    else:  # linearly separable: only the L2 term keeps the optimum finite
        N, d, K, C = 40, 3, 2, 5.0
        X = torch.randn(N, d, generator=g, dtype=torch.float64)
        y = (X[:, 0] > 0).long()
        X[:, 0] += (2 * y - 1) * 0.5
    W, iterations = heads.fit_logistic(X, y, K, C, tol=1e-10, max_iter=5000)
    reference, objective = newton_solve(X, y, K, C)
    assert 0 < iterations < 5000
    assert torch.allclose(W, reference, atol=1e-7, rtol=1e-7), (W - reference).abs().max()
    gradient = torch.autograd.functional.jacobian(objective, W.reshape(-1))
    assert gradient.abs().max() < 1e-6
    if K == 2:  # the symmetric two-row optimum the probe's documentation relies on
        assert torch.allclose(W[0], -W[1], atol=1e-8)


def test_tol_is_a_bound_on_the_scaled_gradient():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(60, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=g)
    loose, n_loose = heads.fit_logistic(X, y, 3, C=10.0, tol=1e-2)
    tight, n_tight = heads.fit_logistic(X, y, 3, C=10.0, tol=1e-6)
    assert heads.logistic_objective(loose, X, y, 10.0)[1].abs().max() <= 1e-2
    assert heads.logistic_objective(tight, X, y, 10.0)[1].abs().max() <= 1e-6
    assert n_loose < n_tight


def test_stratified_folds_follow_sklearn_allocation():
    y = torch.tensor([0, 1, 0, 0, 1, 0, 0, 1, 0, 0])
    # sklearn StratifiedKFold(3).split: class 0 -> folds [0,0,0,1,1,2,2], class 1 -> [0,1,2], in sample order
    assert heads.stratified_folds(y, 3).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    y = torch.randint(0, 4, (103,), generator=torch.Generator().manual_seed(0))
    folds = heads.stratified_folds(y, 5)
    for k in range(4):
        counts = torch.bincount(folds[y == k], minlength=5)
        assert counts.max() - counts.min() <= 1


def test_cv_picks_a_sensible_regularisation():
    g = torch.Generator().manual_seed(0)
    # Well separated blobs: the log-loss keeps improving as the penalty fades, so a weak penalty (large C) wins.
    y = torch.randint(0, 3, (60,), generator=g)
    X = torch.randn(3, 6, generator=g)[y] * 4 + torch.randn(60, 6, generator=g)
    probe = heads.fit_probe_from_features(X, torch.tensor([40, 50, 60])[y], scoring="log_loss")
    assert probe.C >= 100
    assert probe.class_token_ids.tolist() == [40, 50, 60]
    # One weakly informative feature among 30 noise features: an intermediate C beats both extremes.
    y = torch.randint(0, 2, (60,), generator=g)
    X = torch.randn(60, 30, generator=g)
    X[:, 0] += (2 * y - 1) * 0.7
    probe = heads.fit_probe_from_features(X, y + 7, scoring="log_loss")
    assert 1e-3 < probe.C < 10, probe.cv_scores
    scores = probe.cv_scores
    assert scores[probe.C] == max(scores.values()) > scores[min(scores)] and scores[probe.C] > scores[max(scores)]
    # Accuracy (sklearn's default scorer): ties go to the smallest C, as sklearn's argmax does.
    probe = heads.fit_probe_from_features(X, y + 7)
    best = max(probe.cv_scores.values())
    assert probe.C == min(c for c, s in probe.cv_scores.items() if s == best)


def test_binary_probe_rows_and_reference_scaling():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (40,), generator=g)
    X = torch.randn(40, 4, generator=g) + (2 * y[:, None] - 1)
    ours = heads.fit_probe_from_features(X, y + 3, Cs=[1.0])
    reference = heads.fit_probe_from_features(X, y + 3, Cs=[1.0], binary_as_reference=True)
    assert ours.C == 1.0 and ours.weight.shape == (2, 4)
    assert torch.allclose(ours.weight[0], -ours.weight[1], atol=1e-5)
    assert torch.allclose(reference.weight, ours.weight / 2, atol=1e-5)   # [−c/2, +c/2] with sklearn's c = W[1]
    with pytest.raises(ValueError, match="two distinct"):
        heads.fit_probe_from_features(X, torch.full((40,), 9))


# --- linear probing on models ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_features_are_the_hidden_states_before_each_option_token(kind):
    model = make_model(kind)
    rows = records(seed=2, count=5)
    batches = [collate(rows[:3]), collate(rows[3:])]
    hooks = count_hooks(model)
    X, tokens = heads.collect_features(model, batches)
    assert count_hooks(model) == hooks
    expected_X, expected_tokens = [], []
    with torch.no_grad():
        for row in rows:   # unpadded, one at a time: position t predicts token t+1
            ids = torch.tensor([row["input_ids"]])
            hidden = model.base_model(input_ids=ids).last_hidden_state[0]
            n, length = row["option_len"], len(row["input_ids"])
            expected_X.append(hidden[length - n - 1:length - 1])
            expected_tokens.append(ids[0, length - n:])
    assert torch.equal(tokens, torch.cat(expected_tokens))
    assert torch.allclose(X, torch.cat(expected_X), atol=1e-5)
    assert not torch.is_inference(X)


def copy_with_rows_written(model, probe):
    """The reference's semantics on a copy: the class tokens' head rows replaced by the coefficients (untied first,
    so the copy's input embeddings stay intact)."""
    copied = copy.deepcopy(model)
    head = copied.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    with torch.no_grad():
        head.weight[probe.class_token_ids] = probe.weight
    return copied


@pytest.mark.parametrize("kind", KINDS)
def test_applied_probe_equals_written_head_rows_and_touches_no_weight(kind):
    model = make_model(kind)
    g = torch.Generator().manual_seed(5)
    hidden_size = model.get_output_embeddings().weight.shape[1]
    probe = heads.LinearProbe(weight=torch.randn(3, hidden_size, generator=g),
                              class_token_ids=torch.tensor([65, 66, 90]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {k: v for k, v in collate(records()).items() if k in utils.MODEL_INPUTS}
    with torch.no_grad():
        original = model(**batch).logits
        expected = copy_with_rows_written(model, probe)(**batch).logits   # copied before any hook exists
        heads.apply_linear_probe(model, probe)
        probed = model(**batch).logits
    for key, value in model.state_dict().items():   # input embeddings and every head row bit-identical
        assert torch.equal(value, before[key]), key
    others = torch.ones(VOCAB, dtype=torch.bool)
    others[probe.class_token_ids] = False
    assert torch.equal(probed[..., others], original[..., others])
    assert torch.allclose(probed, expected, atol=1e-5)
    hooks = count_hooks(model)
    heads.apply_linear_probe(model, probe)            # re-applying replaces, never stacks
    assert count_hooks(model) == hooks
    heads.remove_linear_probe(model)
    assert count_hooks(model) == hooks - 1
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, original)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fitted_probe_drives_the_evaluator(kind, tmp_path):
    model = make_model(kind)
    # The option token ("A"=65 / "B"=66) is a function of the prompt's last byte: a probe can learn it.
    g = torch.Generator().manual_seed(6)
    rows, groups, gold = [], [], []
    for i in range(24):
        cue = [100, 110][i % 2]
        prompt = [256] + torch.randint(32, 90, (4 + i % 4,), generator=g).tolist() + [cue]
        answer = 65 if cue == 100 else 66
        rows.append({"input_ids": prompt + [answer], "option_len": 1})
        groups.append(([prompt + [65], prompt + [66]], [1, 1]))
        gold.append(0 if answer == 65 else 1)
    hooks = count_hooks(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = heads.fit_linear_probe(model, [collate(rows[:10]), collate(rows[10:])], early_stopping=True)
    assert count_hooks(model) == hooks            # the capture hook is gone
    assert probe.class_token_ids.tolist() == [65, 66]

    heads.apply_linear_probe(model, probe)
    scores = evaluator.score_options(model, groups, PAD)
    predicted = [max(range(2), key=lambda j: float(s[j].mean())) for s in scores]
    assert predicted == gold
    # The evaluator's log-probs are log_softmax over the full vocabulary of the probe-modified logits.
    prompt, _ = groups[0][0]
    with torch.no_grad():
        hidden = model.base_model(input_ids=torch.tensor([prompt[:-1]])).last_hidden_state[0, -1]
        logits = model.get_output_embeddings()(hidden)   # the hook replaces the class tokens' logits
        manual = hidden @ probe.weight.T
    assert torch.allclose(logits[probe.class_token_ids], manual, atol=1e-5)
    log_probs = logits.log_softmax(-1)
    assert torch.allclose(scores[0][0], log_probs[65:66], atol=1e-5)
    assert torch.allclose(scores[0][1], log_probs[66:67], atol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key

    probe.save(tmp_path / "probe.pt")
    loaded = heads.LinearProbe.load(tmp_path / "probe.pt")
    assert torch.equal(loaded.weight, probe.weight) and torch.equal(loaded.class_token_ids, probe.class_token_ids)
    assert loaded.C == probe.C and loaded.cv_scores == probe.cv_scores
