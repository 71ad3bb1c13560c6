"""Unlearning methods on a class-conditional DDPM: SalUn mask, SalUn, GA, ESD-u, Retrain, recipes, mask subsets."""

from __future__ import annotations

import pytest
import torch

from salun_ext import SaliencyMask
from salun_ext.diffusion.ddpm import forget_retain_sets
from salun_ext.diffusion.methods import METHODS, DiffusionMethod, make_task, run_task, unlearn
from salun_ext.diffusion.recipes import RECIPES, recipe
from salun_ext.diffusion.saliency import diffusion_saliency, guided_forget_loss
from salun_ext.diffusion.tasks import ESDTask, GATask, SalUnTask, esd_parameters
from salun_ext.train import RunOptions, TrainRecipe
from salun_ext.train.engine import OptimConfig
from tests.diffusion_helpers import digits, micro_ddpm, params_snapshot


@pytest.fixture(scope="module")
def setup():
    model = micro_ddpm(seed=0)
    forget, retain = forget_retain_sets(model, digits(), ["3"])
    return model, forget, retain


def _adam(steps, lr=1e-3):
    return TrainRecipe(max_steps=steps, optimizer=OptimConfig("adam", lr=lr, weight_decay=0.0))


QUIET = RunOptions(progress=False)


def test_mask_covers_the_whole_unet(setup):
    model, forget, _ = setup
    masks = diffusion_saliency(model.unet, model.spec, forget, ratio=[0.5, 0.1], batch_size=64, progress=False)
    names = [n for n, _ in model.unet.named_parameters()]
    for mask, ratio in zip(masks, (0.5, 0.1)):
        assert list(mask.names) == names
        mask.check_compatible(model.unet, require_all=True)  # every UNet tensor, right shapes
        assert mask.count() == int(mask.numel * ratio)
    # the 10% mask is inside the 50% mask (one global ranking)
    assert all(bool((masks[1].dense(n) <= masks[0].dense(n)).all()) for n in names)
    assert all(p.grad is None for p in model.unet.parameters())


def _independent_guided_loss(spec, unet, batch, scale, reduction):
    """-||noise - eps_hat||^2 built by hand: x_t from alphas_cumprod, eps_hat = e_null + s (e_c - e_null) from two
    separate forward passes; "sum": summed over C, H, W then mean over the batch (the paper code); "mean": per
    element."""
    abar = spec.scheduler.alphas_cumprod[batch["t"]].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * batch["x0"] + (1 - abar).sqrt() * batch["noise"]
    e_c = spec.eps(unet, x_t, batch["t"], batch["ids"])
    e_null = spec.eps(unet, x_t, batch["t"], torch.full_like(batch["ids"], spec.null_id))
    err = (e_null + scale * (e_c - e_null) - batch["noise"]) ** 2
    return -(err.sum(dim=(1, 2, 3)).mean() if reduction == "sum" else err.mean())


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_mask_ranks_the_clipped_sum_of_guided_forget_loss_gradients(setup, reduction):
    """The DDPM mask == top-k of |sum over batches of the per-batch gradient clipped to norm 1| (by hand)."""
    model, forget, _ = setup
    from salun_ext.diffusion.saliency import saliency_batches

    unet = model.unet.eval()
    params = list(unet.parameters())
    batches = list(saliency_batches(model.spec, forget, batch_size=64, seed=0, device=torch.device("cpu")))
    assert len(batches) >= 2
    lib_loss = guided_forget_loss(model.spec, 3.0, reduction)
    clipped, raw, norms = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], []
    for batch in batches:
        loss = _independent_guided_loss(model.spec, unet, batch, 3.0, reduction)
        assert torch.allclose(lib_loss(unet, batch), loss, rtol=1e-5)
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(float(norm))
        clipped = [c + g * min(1.0, 1.0 / (float(norm) + 1e-6)) for c, g in zip(clipped, grads)]
        raw = [r + g for r, g in zip(raw, grads)]
    n_elem = batches[0]["x0"][0].numel()
    if reduction == "sum":
        # the paper code's scale: every batch gradient is far above norm 1, so the clip fires on each of them
        assert min(norms) > 1.0
    else:
        # the per-element mean is C*H*W = 64 times smaller than the sum
        assert torch.allclose(
            lib_loss(unet, batches[0]) * n_elem, guided_forget_loss(model.spec, 3.0, "sum")(unet, batches[0]), rtol=1e-5
        )

    def top(scores_per_param, k):
        scores = torch.cat([g.abs().flatten() for g in scores_per_param])
        want = torch.zeros(scores.numel(), dtype=torch.bool)
        want[torch.topk(scores, k).indices] = True
        return scores, want

    numel = sum(p.numel() for p in params)
    k = int(0.3 * numel)
    scores, want = top(clipped, k)
    got_mask = diffusion_saliency(unet, model.spec, forget, ratio=0.3, batch_size=64, seed=0, reduction=reduction,
                                  progress=False)  # fmt: skip
    got = torch.cat([got_mask.dense(n).flatten() for n, _ in unet.named_parameters()])
    cut = scores.sort(descending=True).values[k - 1]
    clear = (scores - cut).abs() > 1e-5 * cut  # entries not within float noise of the threshold
    assert int(got.sum()) == k and torch.equal(got[clear], want[clear]) and clear.float().mean() > 0.99
    if min(norms) > 1.0:  # the clip changes the ranking: without it the mask would differ
        _, unclipped = top(raw, k)
        assert int((unclipped != want).sum()) > 100


def test_salun_moves_the_forget_loss_and_keeps_non_salient_weights(setup):
    model, forget, retain = setup
    unet = model.unet
    mask = diffusion_saliency(unet, model.spec, forget, ratio=0.5, batch_size=64, progress=False)
    task = SalUnTask(model.spec, forget, retain, alpha=1e-3, batch_size=32, seed=1)
    batch = next(iter(task.batches(0)))
    with torch.no_grad():
        before = float(task.forget_loss(unet, batch))
    start = params_snapshot(unet)
    fit = run_task(unet, task, _adam(25), QUIET, mask=mask)
    with torch.no_grad():
        after = float(task.forget_loss(unet, batch))
    assert fit.steps == 25 and set(task.last_terms) == {"forget", "retain"}
    assert after < 0.5 * before, (before, after)
    moved_salient = 0
    for n, p in unet.named_parameters():
        m = mask.dense(n)
        assert torch.equal(p[~m], start[n][~m]), f"{n}: a non-salient weight moved"
        moved_salient += int((p[m] != start[n][m]).sum())
    assert moved_salient > 0.5 * mask.count()


def test_salun_ddpm_loss_by_hand(setup):
    """MSE(eps(x_t, c_f), sg eps(x_t, c' = c_f + 1)) + alpha * (sum over C,H,W of the retain eps error, mean over
    the batch), both from the model being trained, x_t from alphas_cumprod (the paper code's saliency_unlearn)."""
    model, forget, retain = setup
    spec, unet = model.spec, model.unet
    task = SalUnTask(spec, forget, retain, alpha=0.01, batch_size=8, retain_cond_drop=0.0, seed=2)
    batch = next(iter(task.batches(0)))
    assert set(batch["ids"].tolist()) == {3} and set(batch["target_ids"].tolist()) == {4}  # c' = (c + 1) % 10
    assert set(batch["retain_ids"].tolist()).isdisjoint({3})

    def x_t(prefix):
        abar = spec.scheduler.alphas_cumprod[batch[prefix + "t"]].view(-1, 1, 1, 1)
        return abar.sqrt() * batch[prefix + "x0"] + (1 - abar).sqrt() * batch[prefix + "noise"]

    with torch.no_grad():
        xf = x_t("")
        forget_term = (
            (spec.eps(unet, xf, batch["t"], batch["ids"]) - spec.eps(unet, xf, batch["t"], batch["target_ids"])) ** 2
        ).mean()
        xr = x_t("retain_")
        err = (spec.eps(unet, xr, batch["retain_t"], batch["retain_ids"]) - batch["retain_noise"]) ** 2
        want = forget_term + 0.01 * err.sum(dim=(1, 2, 3)).mean()
        got = task.loss(unet, batch)
    assert torch.allclose(got, want, rtol=1e-5), (float(got), float(want))
    assert torch.allclose(task.last_terms["forget"], forget_term, rtol=1e-5)


def test_ga_raises_the_forget_eps_loss():
    model = micro_ddpm(seed=1)
    forget, _ = forget_retain_sets(model, digits(), [5])
    task = GATask(model.spec, forget, batch_size=32, seed=0)
    batch = next(iter(task.batches(0)))
    with torch.no_grad():
        before = -float(task.loss(model.unet, batch))
    run_task(model.unet, task, _adam(10, lr=1e-3), QUIET)
    with torch.no_grad():
        after = -float(task.loss(model.unet, batch))
    assert after > 1.5 * before, (before, after)


def test_esd_u_regresses_onto_the_negatively_guided_target():
    model = micro_ddpm(seed=2)
    task = ESDTask(model.spec, model.unet, [7], (1, 8, 8), eta=1.0, sample_steps=5, batch_size=8, seed=0)
    # the frozen copy is independent of the trained model
    assert all(not p.requires_grad for p in task.frozen.parameters())
    batches = list(task.batches(0))[:4]
    with torch.no_grad():
        before = sum(float(task.loss(model.unet, b)) for b in batches)
    params = esd_parameters(model.unet, "esd-u")
    assert all("norm" not in n for n, _ in params)
    run_task(model.unet, task, _adam(30, lr=1e-3), QUIET, params=params)
    with torch.no_grad():
        after = sum(float(task.loss(model.unet, b)) for b in batches)
    assert after < 0.5 * before, (before, after)
    # xt_source="data" and the target formula: test_esd_target_is_the_frozen_negatively_guided_eps
    with pytest.raises(ValueError, match="no cross-attention: use esd-u"):
        esd_parameters(model.unet, "esd-x")


@pytest.mark.parametrize("eta", [1.0, 2.5])  # 1.0: the recipe's
def test_esd_target_is_the_frozen_negatively_guided_eps(eta):
    """ESD's loss == MSE(eps_theta(x_t, c), e0(x_t) - eta (e0(x_t, c) - e0(x_t))) with e0 the frozen original, by
    hand (separate forward passes); for eta 1 that is 2 e0(x_t) - e0(x_t, c), the diffusers script's
    e0(c) - 2 (e0(c) - e0(""))."""
    model = micro_ddpm(seed=2)
    forget, _ = forget_retain_sets(model, digits(), [7])
    task = ESDTask(model.spec, model.unet, [7], (1, 8, 8), eta=eta, xt_source="data", data=forget, batch_size=6)
    frozen = micro_ddpm(seed=2).unet.eval()  # an untouched copy of the original weights
    trained = model.unet
    with torch.no_grad():
        for p in trained.parameters():  # the trained model has moved away from the original
            p.add_(0.05 * torch.randn_like(p))
    batch = next(iter(task.batches(0)))
    assert set(batch["ids"].tolist()) == {7}
    spec = model.spec
    abar = spec.scheduler.alphas_cumprod[batch["t"]].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * batch["x0"] + (1 - abar).sqrt() * batch["noise"]
    with torch.no_grad():
        e_c = spec.eps(frozen, x_t, batch["t"], batch["ids"])
        e_null = spec.eps(frozen, x_t, batch["t"], torch.full_like(batch["ids"], spec.null_id))
        target = e_null - eta * (e_c - e_null)
        if eta == 1.0:
            assert torch.allclose(target, e_c - 2 * (e_c - e_null), atol=1e-6)
        want = ((spec.eps(trained, x_t, batch["t"], batch["ids"]) - target) ** 2).mean()
        got = task.loss(trained, batch)
    assert torch.allclose(got, want, rtol=1e-5), (float(got), float(want))
    # the frozen copy did not follow the perturbation of the trained model
    assert all(torch.equal(a, b) for a, b in zip(task.frozen.parameters(), frozen.parameters()))


def test_retrain_reinitialises_and_trains_on_retain_only(setup):
    _model, forget, retain = setup
    fresh = micro_ddpm(seed=0)
    before = params_snapshot(fresh.unet)
    task, params = make_task("retrain", fresh.spec, fresh.unet, forget, retain, {"batch_size": 32}, seed=4)
    assert params is None and 3 not in set(task.data.ids.tolist())
    assert any(not torch.equal(p, before[n]) for n, p in fresh.unet.named_parameters())  # re-initialised
    with pytest.raises(ValueError, match="takes no mask"):
        unlearn(
            "retrain",
            "ddpm",
            fresh.unet,
            fresh.spec,
            forget,
            retain,
            mask=SaliencyMask.from_dense(
                {n: torch.ones_like(p, dtype=torch.bool) for n, p in fresh.unet.named_parameters()}
            ),
        )


def test_unlearn_driver_uses_recipes_and_overrides(setup, monkeypatch):
    from salun_ext.train.engine import Engine

    _model, forget, retain = setup
    m = micro_ddpm(seed=3)
    before = params_snapshot(m.unet)
    steps, real = [], Engine.train_step

    def recording(self, task, batch):
        steps.append((task, batch))
        return real(self, task, batch)

    monkeypatch.setattr(Engine, "train_step", recording)
    fit = unlearn(
        "salun",
        "ddpm",
        m.unet,
        m.spec,
        forget,
        retain,
        max_steps=2,
        lr=1e-5,
        task_overrides={"batch_size": 16, "alpha": None},
        options=QUIET,
    )
    assert fit.steps == 2
    task, batch = steps[0]
    # the recipe's alpha (None keeps it) and retain terms, the overridden batch size, the forget class only
    assert isinstance(task, SalUnTask) and task.alpha == 1e-3 and task.retain_reduction == "sum"
    assert batch["x0"].shape[0] == 16 and batch["retain_x0"].shape[0] == 16 and set(batch["ids"].tolist()) == {3}
    assert len(steps) == 2
    # Adam moves each weight by at most ~lr per step: the overridden lr 1e-5 (the recipe's 1e-4 would move more)
    delta = max(float((p.detach() - before[n]).abs().max()) for n, p in m.unet.named_parameters())
    assert 0 < delta <= 2 * 1e-5 * 1.01


def test_unlearn_passes_overrides_and_options_to_fit(setup, monkeypatch):
    """lr / steps / task overrides replace the recipe's values; RunOptions reach salun_ext.train.fit unchanged."""
    import salun_ext.diffusion.methods as methods

    _model, forget, retain = setup
    m = micro_ddpm(seed=3)
    seen = {}

    def fake_fit(model, task, train, options, **kw):
        seen.update(task=task, train=train, options=options, desc=kw["desc"])
        return "fitted"

    monkeypatch.setattr(methods, "fit", fake_fit)
    options = RunOptions(device="cpu", seed=7, amp="bf16", progress=False)
    got = unlearn("salun", "ddpm", m.unet, m.spec, forget, retain, options=options, lr=3e-4, epochs=2,
                  task_overrides={"alpha": 0.5, "batch_size": None})  # fmt: skip
    assert got == "fitted" and seen["options"] is options and seen["desc"] == "salun"
    train = seen["train"]
    assert (train.optimizer.lr, train.epochs, train.max_steps, train.grad_clip) == (3e-4, 2, None, 1.0)
    task = seen["task"]
    assert isinstance(task, SalUnTask) and task.alpha == 0.5 and task.batch_size == 128 and task.seed == 7
    unlearn("esd-u", "ddpm", m.unet, m.spec, forget, retain, options=options)  # the registry's hyphenated name
    assert isinstance(seen["task"], ESDTask) and seen["train"].max_steps == 1000


def test_methods_registry_builds_each_methods_task(setup):
    assert list(METHODS) == ["salun", "ga", "esd-x", "esd-u", "fmn", "retrain", "uce"]
    assert METHODS.key("ESD-U") == "esd-u" and METHODS.key("esd_u") == "esd-u"
    assert all(issubclass(cls, DiffusionMethod) for cls in METHODS.values())
    trained = {name for name, cls in METHODS.items() if not cls.closed_form}  # UCE is an edit: no recipe
    assert {m for _, m in RECIPES} == trained == set(METHODS) - {"uce"}  # a recipe per trained method, and back
    with pytest.raises(ValueError, match="unknown diffusion method 'scrub'"):
        METHODS.key("scrub")
    model, forget, retain = setup
    task, params = make_task("ga", model.spec, model.unet, forget, retain, {"batch_size": 8}, seed=2)
    assert isinstance(task, GATask) and params is None and task.seed == 2


def test_recipes_hold_the_paper_defaults():
    r = recipe("ddpm", "salun")
    assert (r.task["alpha"], r.train.optimizer.name, r.train.optimizer.lr, r.train.max_steps) == (
        1e-3,
        "adam",
        1e-4,
        1000,
    )
    assert r.task["batch_size"] == 128 and r.train.grad_clip == 1.0 and r.train.optimizer.weight_decay == 0.0
    r = recipe("sd", "salun")
    assert (r.task["alpha"], r.train.optimizer.lr, r.train.epochs, r.task["batch_size"]) == (0.5, 1e-5, 5, 8)
    r = recipe("sd-nsfw", "salun")
    assert (r.task["alpha"], r.train.epochs) == (0.1, 1)
    r = recipe("sd", "esd-x")
    assert (r.task["eta"], r.task["guidance_scale"], r.train.max_steps, r.train.optimizer.lr) == (
        1.0,
        3.0,
        1000,
        1e-5,
    )
    r = recipe("sd", "fmn")
    assert (r.train.optimizer.name, r.train.optimizer.lr, r.train.max_steps) == ("adamw", 2e-6, 35)
    # FMN stage 2: wd 0.01, clip 1.0, batch 1, fp32 (Forget-Me-Not's configs)
    assert (r.train.optimizer.weight_decay, r.train.grad_clip, r.task["batch_size"]) == (0.01, 1.0, 1)
    assert r.train.amp in (None, "none") and recipe("sd-nsfw", "fmn") == r
    # GA (ours, NOT the paper code's: it uses lr 1e-4 on DDPM and -forget + 0.1 retain for 10 epochs on SD;
    # see the faithfulness audit of issue #13): pinned so that a change is deliberate
    r = recipe("ddpm", "ga")
    assert (r.train.optimizer.lr, r.train.max_steps, r.train.grad_clip, r.task) == (
        1e-5,
        1000,
        1.0,
        {"batch_size": 128},
    )
    r = recipe("sd", "ga")
    assert (r.train.optimizer.lr, r.train.epochs, r.task) == (1e-5, 5, {"batch_size": 8})
    recipe("ddpm", "salun").task["alpha"] = 5  # recipes are copies
    assert recipe("ddpm", "salun").task["alpha"] == 1e-3
    with pytest.raises(ValueError, match="unknown method"):
        recipe("ddpm", "scrub")
    with pytest.raises(ValueError, match="does not apply to 'ddpm'"):
        recipe("ddpm", "fmn")
    with pytest.raises(ValueError, match="unknown setting"):
        recipe("imagen", "salun")


def test_salun_bad_input(setup):
    model, forget, retain = setup
    same = forget.subset(torch.ones(len(forget), dtype=torch.bool))
    same.target_ids = same.ids.clone()
    with pytest.raises(ValueError, match="c' equals c"):
        SalUnTask(model.spec, same, retain)
    with pytest.raises(ValueError, match="target_ids"):
        SalUnTask(model.spec, retain, retain)
    with pytest.raises(ValueError, match="needs a retain set"):
        SalUnTask(model.spec, forget, None, alpha=0.1)
    with pytest.raises(ValueError, match="alpha"):
        SalUnTask(model.spec, forget, retain, alpha=-1.0)
    with pytest.raises(ValueError, match="cond_drop"):
        SalUnTask(model.spec, forget, retain, retain_cond_drop=1.0)


def test_mask_subset_keeps_the_bits():
    gen = torch.Generator().manual_seed(0)
    dense = {f"t{i}": torch.rand((i * 37 + 5,), generator=gen) > 0.5 for i in range(5)}
    mask = SaliencyMask.from_dense(dense)
    sub = mask.subset(["t3", "t1"])
    assert sub.names == ("t3", "t1")
    assert torch.equal(sub.dense("t3"), dense["t3"]) and torch.equal(sub.dense("t1"), dense["t1"])
    assert sub.k == int(dense["t3"].sum() + dense["t1"].sum())
    assert mask.subset(list(mask.names)) is mask
    with pytest.raises(KeyError, match="no tensor named 'zz'"):
        mask.subset(["zz"])


def test_tasks_and_mask_batches_draw_from_the_diffusion_stream(setup):
    """Every diffusion Task's batches, and the mask's, come from utils.epoch_generator(seed, epoch, "diffusion")."""
    from salun_ext.diffusion.saliency import saliency_batches
    from salun_ext.diffusion.tasks import EpsTask
    from salun_ext.utils import epoch_generator

    model, forget, retain = setup
    task = EpsTask(model.spec, retain, batch_size=len(retain), seed=5)
    order = torch.randperm(len(retain), generator=epoch_generator(5, 3, "diffusion"))
    batch = next(iter(task.batches(3)))
    assert torch.equal(batch["x0"], retain.x0[order].float())
    other = next(iter(EpsTask(model.spec, retain, batch_size=len(retain), seed=5).batches(4)))
    assert not torch.equal(batch["x0"], other["x0"])  # another epoch, other batches
    first = next(saliency_batches(model.spec, forget, batch_size=len(forget), seed=2, device=torch.device("cpu")))
    order = torch.randperm(len(forget), generator=epoch_generator(2, 0, "diffusion"))
    assert torch.equal(first["x0"], forget.x0[order].float())


def test_model_kind_defaults_treat_none_as_not_given():
    from salun_ext.diffusion.recipes import default_setting, mask_settings, sample_guidance

    assert mask_settings("ddpm") == mask_settings("ddpm", guidance_scale=None, batch_size=None)
    assert (mask_settings("ddpm").guidance_scale, mask_settings("ddpm").batch_size) == (3.0, 128)
    assert (mask_settings("sd").guidance_scale, mask_settings("sd").clip_grad_norm) == (8.5, None)
    assert mask_settings("ddpm", guidance_scale=0.0).guidance_scale == 0.0  # 0 is a value, not "not given"
    assert (sample_guidance("sd"), sample_guidance("ddpm", 0.0)) == (7.5, 0.0)
    settings = (default_setting("ddpm"), default_setting("sd", "nudity"), default_setting("sd"))
    assert settings == ("ddpm", "sd-nsfw", "sd")
    with pytest.raises(ValueError, match="kind: expected one of ddpm, sd"):
        mask_settings("imagen")
