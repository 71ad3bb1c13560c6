"""What each method optimises, checked against independent computations (not the methods' own loss functions):
BS's labels, SCRUB's KL and max/min schedule, NegGrad+'s loss, the l1 penalty, RL's two orders, SalUn-soft end to
end, BE's head after the shadow neuron is removed, SSD's dampening."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from salun_ext.classification import RunOptions, UnlearnData, get_method
from salun_ext.classification.methods import boundary, random_label, scrub, ssd
from salun_ext.data import ImageDataset
from salun_ext.train.engine import Engine
from salun_ext.train.tasks import CrossEntropyTask

OPTIONS = RunOptions(device="cpu", seed=0, progress=False)


def _tagged(n_forget=20, n_retain=60, classes=3, seed=0):
    """2x2 images whose first pixel is the sample's index (forget 0.., retain n_forget..), random labels."""
    g = torch.Generator().manual_seed(seed)
    n = n_forget + n_retain
    images = torch.randint(0, 256, (n, 1, 2, 2), generator=g, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=g)
    ds = ImageDataset(images, labels, [str(c) for c in range(classes)], "tagged")
    return ds.subset(torch.arange(n_forget)), ds.subset(torch.arange(n_forget, n))


def _index(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0, 0, 0] * 255).round().long()


def _linear(classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, classes))


@pytest.fixture
def record_steps(monkeypatch):
    """Every (task, batch) the Engine trains on, in order."""
    steps = []
    real = Engine.train_step

    def recording(self, task, batch):
        steps.append((task, batch))
        return real(self, task, batch)

    monkeypatch.setattr(Engine, "train_step", recording)
    return steps


# ----------------------------------------------------------------------------------------------------- BS
class _Recorder(nn.Module):
    """A fixed linear model that remembers the inputs of its forward calls."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return x.flatten(1) @ self.weight.t() + self.bias


def test_bs_labels_are_the_frozen_models_prediction_on_a_quantised_fgsm_step():
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(3, 4, generator=g) * 3, torch.randn(3, generator=g)
    x = torch.rand(16, 1, 2, 2, generator=g)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.98, 0.03  # the clamp to [0, 1] must act on these
    y = torch.randint(0, 3, (16,), generator=g)
    model = _Recorder(weight, bias)
    labels = boundary.fgsm_nearest_labels(model, x, y, bound=0.1)
    # independent: d CE / d x of a linear model is W^T (softmax(Wx + b) - onehot(y)) / N (mean reduction)
    p = torch.softmax(x.flatten(1) @ weight.t() + bias, dim=1)
    grad = (p - nn.functional.one_hot(y, 3).float()) @ weight
    want_x = torch.round(torch.clamp(x.flatten(1) + 0.1 * grad.sign(), 0, 1) * 255).reshape(x.shape) / 255
    assert torch.equal(model.inputs[-1], want_x)
    assert want_x.max() == 1.0 and want_x.min() == 0.0
    want = (want_x.flatten(1) @ weight.t() + bias).argmax(dim=1)
    assert torch.equal(labels, want)
    assert (labels != y).any()  # the step crosses the boundary for some samples (else the test says little)


def test_bs_trains_toward_the_frozen_labels(record_steps):
    forget, retain = _tagged()
    data = UnlearnData(forget, retain, batch_size=8)
    model = _linear()
    frozen = copy.deepcopy(model)
    get_method("bs", epochs=1, lr=0.1).run(model, data, OPTIONS)
    assert len(record_steps) == 3  # forget set only: ceil(20 / 8)
    task, (x, y) = record_steps[1]
    assert set(_index(x).tolist()) <= set(range(20))
    target = boundary.fgsm_nearest_labels(frozen, x, y, 0.1)  # the untouched copy, not the model being trained
    trained = copy.deepcopy(model)
    assert torch.allclose(task.loss(trained, (x, y)), nn.functional.cross_entropy(trained(x), target))


# -------------------------------------------------------------------------------------------------- SCRUB
def test_scrub_kl_is_the_tempered_teacher_to_student_kl():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    temperature = 4.0
    want = 0.0
    for i in range(5):
        pt = [math.exp(v / temperature) for v in t[i].tolist()]
        ps = [math.exp(v / temperature) for v in s[i].tolist()]
        pt = [v / sum(pt) for v in pt]
        ps = [v / sum(ps) for v in ps]
        want += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    want = want / 5 * temperature**2
    assert float(scrub.distill_kl(s, t, temperature)) == pytest.approx(want, rel=1e-5)
    # direction: KL(teacher || student), not KL(student || teacher)
    assert float(scrub.distill_kl(t, s, temperature)) != pytest.approx(want, rel=1e-3)


def test_scrub_runs_max_passes_then_min_passes_with_their_losses(record_steps):
    forget, retain = _tagged(n_forget=16, n_retain=24)
    data = UnlearnData(forget, retain, batch_size=8)
    model = _linear()
    teacher = copy.deepcopy(model).eval()
    cfg = dict(epochs=3, max_steps=2, lr=0.05, temperature=2.0, gamma=0.7, alpha=0.3)
    get_method("scrub", **cfg).run(model, data, OPTIONS)
    phases = [batch[0] for _, batch in record_steps]
    # epochs 0 and 1: 2 forget (max) batches then 3 retain (min) batches; epoch 2: retain only
    assert phases == ["max"] * 2 + ["min"] * 3 + ["max"] * 2 + ["min"] * 3 + ["min"] * 3
    for (_, (_phase, x, _y)), want_forget in zip(record_steps, [True] * 2 + [False] * 3):
        assert (_index(x) < 16).all() == want_forget
    task = record_steps[0][0]
    assert all(p.requires_grad is False for p in task.teacher.parameters())
    for p, q in zip(task.teacher.parameters(), teacher.parameters()):
        assert torch.equal(p, q)  # the teacher is the model before unlearning, never updated
    student = _linear(seed=5)
    _, x, y = record_steps[0][1]
    zs, zt = student(x), teacher(x)
    kl = nn.functional.kl_div(
        torch.log_softmax(zs / 2.0, 1), torch.log_softmax(zt / 2.0, 1), log_target=True, reduction="batchmean"
    ) * (2.0**2)
    assert torch.allclose(task.loss(student, ("max", x, y)), -kl, atol=1e-6)
    ce = nn.functional.cross_entropy(zs, y)
    assert torch.allclose(task.loss(student, ("min", x, y)), 0.7 * ce + 0.3 * kl, atol=1e-6)


# ------------------------------------------------------------------------------------------------ NegGrad+
def test_neggrad_plus_loss_pairs_every_retain_batch_with_a_cycled_forget_batch(record_steps):
    forget, retain = _tagged(n_forget=10, n_retain=40)
    data = UnlearnData(forget, retain, batch_size=8)
    model = _linear()
    get_method("neggrad_plus", epochs=1, lr=0.01, alpha=0.8).run(model, data, OPTIONS)
    assert len(record_steps) == 5  # one step per retain batch
    seen_forget = []
    for _, (xr, _, xf, _) in record_steps:
        assert (_index(xr) >= 10).all() and (_index(xf) < 10).all()
        seen_forget += _index(xf).tolist()
    assert set(seen_forget) == set(range(10)) and len(seen_forget) == 8 + 2 + 8 + 2 + 8  # cycled
    task, (xr, yr, xf, yf) = record_steps[-1]
    other = _linear(seed=3)
    want = 0.8 * nn.functional.cross_entropy(other(xr), yr) - 0.2 * nn.functional.cross_entropy(other(xf), yf)
    assert torch.allclose(task.loss(other, (xr, yr, xf, yf)), want)


def test_ga_ascends_the_forget_cross_entropy_only(record_steps):
    forget, retain = _tagged()
    data = UnlearnData(forget, retain, batch_size=8)
    get_method("ga", epochs=1, lr=0.01).run(_linear(), data, OPTIONS)
    assert len(record_steps) == 3
    task, (x, y) = record_steps[0]
    assert (_index(x) < 20).all()
    other = _linear(seed=4)
    assert torch.allclose(task.loss(other, (x, y)), -nn.functional.cross_entropy(other(x), y))
    assert isinstance(task, CrossEntropyTask) and task.sign == -1.0


# ---------------------------------------------------------------------------------------------- l1-sparse
def test_l1_penalty_reaches_the_loss(record_steps):
    forget, retain = _tagged()
    data = UnlearnData(forget, retain, batch_size=16)
    model = _linear()
    get_method("l1_sparse", epochs=2, lr=0.01, alpha=0.05).run(model, data, OPTIONS)
    assert len(record_steps) == 2 * 4  # retain set only: ceil(60 / 16) per epoch
    for step, (task, (x, y)) in enumerate(record_steps):
        assert (_index(x) >= 20).all()
        # alpha_e = alpha (1 - e / E): 0.05 in epoch 0, 0.025 in epoch 1; the penalty is over the model's weights
        task.epoch = step // 4
        alpha = 0.05 * (1 - task.epoch / 2)
        with torch.no_grad():
            ce = float(nn.functional.cross_entropy(model(x), y))
            l1 = sum(float(p.abs().sum()) for p in model.parameters())
            assert float(task.loss(model, (x, y))) == pytest.approx(ce + alpha * l1, rel=1e-6)


def test_l1_sparse_shrinks_the_weights_more_than_ft():
    forget, retain = _tagged()
    data = UnlearnData(forget, retain, batch_size=16)
    ft, l1 = _linear(), _linear()
    get_method("ft", epochs=3, lr=0.05, weight_decay=0.0).run(ft, data, OPTIONS)
    get_method("l1_sparse", epochs=3, lr=0.05, weight_decay=0.0, alpha=0.05).run(l1, data, OPTIONS)
    norm = lambda m: sum(float(p.detach().abs().sum()) for p in m.parameters())  # noqa: E731
    assert norm(l1) < 0.9 * norm(ft)


# ---------------------------------------------------------------------------------------------------- RL
def test_rl_sequential_is_the_relabelled_forget_set_then_the_retain_set(record_steps):
    forget, retain = _tagged()
    data = UnlearnData(forget, retain, batch_size=8)
    get_method("rl", epochs=2, lr=0.01).run(_linear(), data, OPTIONS)
    per_epoch = 3 + 8  # ceil(20/8) forget batches, then ceil(60/8) retain batches
    assert len(record_steps) == 2 * per_epoch
    true = torch.cat([forget.labels, retain.labels])
    forget_batches = [[], []]
    for step, (_, (x, y)) in enumerate(record_steps):
        idx = _index(x)
        if step % per_epoch < 3:
            assert (idx < 20).all() and (y != true[idx]).all()  # relabelled, never the true label
            forget_batches[step // per_epoch].append((x, y))
        else:
            assert (idx >= 20).all() and torch.equal(y, true[idx])
    by_epoch = [(torch.cat([x for x, _ in b]), torch.cat([y for _, y in b])) for b in forget_batches]
    # drawn anew every epoch: not a fixed relabelling of each sample
    first, second = ({int(i): int(v) for i, v in zip(_index(x), y)} for x, y in (by_epoch[0], by_epoch[1]))
    assert first.keys() == second.keys() == set(range(20)) and first != second


def test_rl_mixed_shuffles_relabelled_forget_samples_among_retain_samples(record_steps):
    forget, retain = _tagged()
    data = UnlearnData(forget, retain, batch_size=8)
    get_method("rl", epochs=1, lr=0.01, order="mixed").run(_linear(), data, OPTIONS)
    assert len(record_steps) == 10  # ceil(80 / 8)
    true = torch.cat([forget.labels, retain.labels])
    seen, both = [], 0
    for _, (x, y) in record_steps:
        idx = _index(x)
        seen += idx.tolist()
        is_forget = idx < 20
        assert (y[is_forget] != true[idx][is_forget]).all() and torch.equal(y[~is_forget], true[idx][~is_forget])
        both += bool(is_forget.any() and (~is_forget).any())
    assert sorted(seen) == list(range(80)) and both >= 3


# --------------------------------------------------------------------------------------------- SalUn-soft
def test_salun_soft_soft_thresholds_the_update_after_every_step(monkeypatch):
    forget, retain = _tagged()
    data = UnlearnData(forget, retain, batch_size=16)
    model = _linear()
    theta0 = [p.detach().clone() for p in model.parameters()]
    numel = sum(p.numel() for p in theta0)
    checks = []
    real = random_label._SoftTask.on_step_end

    def checking(self, engine, step):
        before = [p.detach().clone() for p in self.prox.params]
        real(self, engine, step)
        k = int(0.5 * (self.prox.total_steps - step) / self.prox.total_steps * numel)
        d = torch.cat([(b - t).flatten() for b, t in zip(before, theta0)])
        after = torch.cat([(p.detach() - t).flatten() for p, t in zip(self.prox.params, theta0)])
        lam = d.abs().sort().values[k - 1] if k > 0 else torch.tensor(0.0)
        want = torch.where(d.abs() > lam, d - torch.sign(d) * lam, torch.zeros_like(d))
        checks.append((k, int((after == 0).sum())))
        assert torch.allclose(after, want, atol=1e-7), step

    monkeypatch.setattr(random_label._SoftTask, "on_step_end", checking)
    get_method("salun_soft", epochs=2, lr=0.1, soft_ratio=0.5).run(model, data, OPTIONS)
    steps = 2 * 5  # mixed order: ceil(80 / 16) batches per epoch
    assert len(checks) == steps
    ks = [k for k, _ in checks]
    assert ks == sorted(ks, reverse=True) and ks[0] == int(0.5 * (steps - 1) / steps * numel) and ks[-1] == 0
    assert all(zeros >= k for k, zeros in checks)  # at least k_t weights sit exactly at theta_0
    assert any(not torch.equal(p, t) for p, t in zip(model.parameters(), theta0))


# ----------------------------------------------------------------------------------------------------- BE
def test_be_trains_toward_the_shadow_class_and_drops_its_neuron(monkeypatch):
    forget, retain = _tagged()
    data = UnlearnData(forget, retain, batch_size=8)
    model = _linear()
    old = copy.deepcopy(model)
    at_end = {}
    real_fit = boundary.BoundaryExpanding.fit

    def fit(self, m, task, options, **kw):
        assert m[1].out_features == 4  # C + 1 during training
        x = torch.rand(2, 1, 2, 2)
        assert torch.equal(task.loss(m, (x, torch.zeros(2, dtype=torch.long))),
                           nn.functional.cross_entropy(m(x), torch.full((2,), 3)))  # fmt: skip
        result = real_fit(self, m, task, options, **kw)
        at_end.update({k: v.clone() for k, v in m.state_dict().items()})
        return result

    monkeypatch.setattr(boundary.BoundaryExpanding, "fit", fit)
    get_method("be", epochs=2, lr=0.5).run(model, data, OPTIONS)
    head = model[1]
    assert isinstance(head, nn.Linear) and head.out_features == 3 and head.in_features == 4
    assert torch.equal(head.weight, at_end["1.weight"][:3]) and torch.equal(head.bias, at_end["1.bias"][:3])
    assert not torch.equal(head.weight, old[1].weight)  # the real rows were trained too, and are kept
    x = torch.rand(5, 1, 2, 2)
    expanded = x.flatten(1) @ at_end["1.weight"].t() + at_end["1.bias"]
    assert torch.allclose(model(x), expanded[:, :3])


# ---------------------------------------------------------------------------------------------------- SSD
@pytest.mark.parametrize("lam", [0.5, 3.0])  # 3.0 > alpha: some factors lambda I_D / I_f exceed 1 and are clamped
def test_ssd_dampens_selected_weights_by_the_importance_ratio(lam):
    forget, retain = _tagged(n_forget=12, n_retain=36)
    data = UnlearnData(forget, retain, batch_size=12)
    model = _linear()
    with torch.no_grad():
        model[1].weight.mul_(3)
    before = [p.detach().clone() for p in model.parameters()]

    def importance(which):
        loader = data.loader(which, seed=0, stream="ssd", shuffle=False, augment=False)
        total, count = [torch.zeros_like(p) for p in before], 0
        for x, y in loader:
            grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
            total = [t + g * g for t, g in zip(total, grads)]
            count += 1
        return [t / count for t in total]

    i_f, i_d = importance("forget"), importance("all")
    assert [len(data.loader(w, seed=0, stream="s")) for w in ("forget", "all")] == [1, 4]
    alpha = 1.5
    result = get_method("ssd", dampening=lam, selection=alpha).run(model, data, OPTIONS)
    dampened, clamped = 0, 0
    for p, b, f, d in zip(model.parameters(), before, i_f, i_d):
        selected = f > alpha * d
        clamped += int((selected & (lam * d > f)).sum())
        want = torch.where(selected, b * torch.clamp(lam * d / f, max=1.0), b)
        assert torch.allclose(p.detach(), want, rtol=1e-5, atol=1e-7)
        dampened += int(selected.sum())
    assert 0 < dampened < 15 and result.info["dampened"] == dampened
    assert (clamped > 0) == (lam > alpha)
    assert any(not torch.allclose(p, b) for p, b in zip(model.parameters(), before)) == (clamped < dampened)


def test_ssd_fisher_importance_is_the_mean_of_squared_batch_gradients():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    batches = [
        (torch.tensor([[1.0, 0.0]]), torch.tensor([0])),
        (torch.tensor([[0.5, -1.0], [2.0, 1.0]]), torch.tensor([1, 0])),
    ]
    want = torch.zeros(2, 2)
    for x, y in batches:
        logits = x @ model.weight.detach().t()
        grad = (torch.softmax(logits, 1) - nn.functional.one_hot(y, 2).float()).t() @ x / len(x)  # d mean CE / dW
        want += grad.square() / 2
    assert torch.allclose(ssd.fisher_importance(model, batches, [model.weight])[0], want, atol=1e-7)


# ----------------------------------------------------------------------------------------------------- IU
def test_iu_steps_along_the_scaled_forget_minus_retain_gradient():
    # num_samples=1: the WoodFisher recursion is the identity (k = v), so the update is alpha * v exactly
    forget, retain = _tagged(n_forget=12, n_retain=36)
    data = UnlearnData(forget, retain, batch_size=10)
    model = _linear()
    before = [p.detach().clone() for p in model.parameters()]

    def summed(ds):
        x = ds.images.float() / 255
        loss = nn.functional.cross_entropy(model(x), ds.labels, reduction="sum")
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])

    n_f, n_r = 12, 36
    v = summed(forget) / (n_f + n_r) - summed(retain) * n_f / ((n_f + n_r) * n_r)
    get_method("iu", alpha=2.0, num_samples=1).run(model, data, OPTIONS)
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert torch.allclose(delta, 2.0 * v, rtol=1e-4, atol=1e-7)
