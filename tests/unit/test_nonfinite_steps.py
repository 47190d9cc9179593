"""A non-finite loss in one engine: the step is skipped, the model, optimizer state and LR schedule stay right."""

from __future__ import annotations

import torch


def test_skipped_step_leaves_the_model_untouched():
    from twist_scale.config import RunConfig
    from twist_scale.engines.single_process import SingleProcessEngine
    from twist_scale.models import build_model

    torch.manual_seed(0)
    engine = SingleProcessEngine(build_model("llama", "tiny", 64), RunConfig())
    batch = torch.randint(1, 64, (2, 16))
    assert torch.isfinite(torch.tensor(engine.train_step([batch])))
    with torch.no_grad():
        engine.module.lm_head.weight[0] = float("inf")  # every position's log-softmax turns NaN
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    state = {k: v.clone() for k, v in engine.optimizer.state[engine.params["lm_head.weight"]].items()}
    assert engine.train_step([batch]) != engine.train_step([batch])  # NaN, twice
    for name, p in engine.module.named_parameters():
        assert torch.equal(p, before[name]) or name == "lm_head.weight" and p.isinf().sum() == 64, name
    assert all(torch.equal(v, state[k]) for k, v in engine.optimizer.state[engine.params["lm_head.weight"]].items())


def test_skipped_steps_keep_the_lr_schedule_in_step():
    """A group that skips a step must stay on the schedule of groups that did not (same LR at step 3)."""
    from twist_scale.config import RunConfig
    from twist_scale.engines.single_process import SingleProcessEngine
    from twist_scale.models import build_model

    cfg = RunConfig()
    cfg.optim.warmup_steps = 4  # the LR still changes every step
    torch.manual_seed(0)
    skipping, steady = (SingleProcessEngine(build_model("llama", "tiny", 64), cfg) for _ in range(2))
    batch = torch.randint(1, 64, (2, 16))
    with torch.no_grad():
        skipping.module.lm_head.weight[0] = float("inf")
    for _ in range(3):
        assert not torch.isfinite(torch.tensor(skipping.train_step([batch])))
        steady.train_step([batch])
    assert skipping.lr() == steady.lr() == cfg.optim.lr * 3 / 4
