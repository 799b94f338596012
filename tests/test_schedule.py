"""Learning-rate schedules against hand-computed values."""
import pytest
import torch

from largefr.train.schedule import build_lr_schedule, set_learning_rate, steps_per_epoch


def test_steps_per_epoch_drops_the_partial_batch():
    assert steps_per_epoch(5_179_510, 512) == 10116  # MS1MV3 at insightface's global batch
    assert steps_per_epoch(1000, 100) == 10
    assert steps_per_epoch(1099, 100) == 10


def test_steps_per_epoch_refuses_a_data_set_smaller_than_a_batch():
    with pytest.raises(ValueError, match="50 images is smaller than one global batch of 64"):
        steps_per_epoch(50, 64)


def test_paper_step_schedule_in_epochs():
    # Adam 1e-3, x0.1 at epochs 20/40/60, stop at 80; 10 steps per epoch
    sched = build_lr_schedule(type="step", unit="epoch", base_lr=1e-3, epochs=80, steps_per_epoch=10,
                              milestones=(20, 40, 60), gamma=0.1)
    assert sched.total_steps == 800
    expected = {0: 1e-3, 199: 1e-3, 200: 1e-4, 399: 1e-4, 400: 1e-5, 599: 1e-5, 600: 1e-6, 799: 1e-6}
    for step, lr in expected.items():
        assert sched.lr_at(step) == pytest.approx(lr, rel=1e-12), step


def test_step_schedule_in_steps_with_warmup():
    sched = build_lr_schedule(type="step", unit="step", base_lr=0.4, epochs=3, steps_per_epoch=10,
                              warmup=4, milestones=(12, 20), gamma=0.5)
    assert [sched.lr_at(s) for s in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert sched.lr_at(11) == pytest.approx(0.4)
    assert sched.lr_at(12) == pytest.approx(0.2)
    assert sched.lr_at(20) == pytest.approx(0.1)
    assert sched.lr_at(29) == pytest.approx(0.1)


def test_insightface_poly_schedule_with_warmup_in_epochs():
    # 20 epochs of 5 steps, 2 warmup epochs = 10 steps, power 2
    sched = build_lr_schedule(type="poly", unit="epoch", base_lr=0.1, epochs=20, steps_per_epoch=5,
                              warmup=2, power=2.0)
    assert sched.total_steps == 100 and sched.warmup_steps == 10
    assert sched.lr_at(0) == pytest.approx(0.01)
    assert sched.lr_at(4) == pytest.approx(0.05)
    assert sched.lr_at(9) == pytest.approx(0.1)
    assert sched.lr_at(10) == pytest.approx(0.1)
    assert sched.lr_at(55) == pytest.approx(0.1 * (1 - 45 / 90) ** 2)  # 0.025
    assert sched.lr_at(99) == pytest.approx(0.1 * (1 / 90) ** 2)
    assert sched.lr_at(100) == 0.0 and sched.lr_at(150) == 0.0  # past the end: stays at 0


def test_poly_power_one_is_linear_decay_without_warmup():
    sched = build_lr_schedule(type="poly", unit="step", base_lr=2.0, epochs=1, steps_per_epoch=8, power=1.0)
    assert [sched.lr_at(s) for s in range(8)] == pytest.approx([2.0 * (1 - s / 8) for s in range(8)])


def test_fractional_epochs_round_to_steps():
    sched = build_lr_schedule(type="step", unit="epoch", base_lr=1.0, epochs=2.5, steps_per_epoch=4,
                              warmup=0.5, milestones=(1.5,))
    assert sched.total_steps == 10 and sched.warmup_steps == 2 and sched.milestone_steps == (6,)


def test_lr_is_a_pure_function_of_the_step():
    kwargs = dict(type="poly", unit="step", base_lr=0.1, epochs=4, steps_per_epoch=25, warmup=7)
    first, second = build_lr_schedule(**kwargs), build_lr_schedule(**kwargs)
    forward = [first.lr_at(s) for s in range(100)]
    backward = [second.lr_at(s) for s in reversed(range(100))][::-1]
    assert forward == backward


@pytest.mark.parametrize("kwargs, message", [
    (dict(milestones=(40, 20)), "strictly increasing"),
    (dict(milestones=(90,)), "would never apply"),
    (dict(warmup=80), "warmup .* shorter than the schedule"),
    (dict(gamma=1.5), "gamma must be in"),
    (dict(unit="step", milestones=(10.5,)), "whole number"),
    (dict(type="cosine"), "'step' or 'poly'"),
    (dict(unit="hours"), "'epoch' or 'step'"),
    (dict(base_lr=0.0), "base_lr must be a positive"),
])
def test_bad_schedules_are_refused(kwargs, message):
    args = {**dict(type="step", unit="epoch", base_lr=1e-3, epochs=80, steps_per_epoch=1), **kwargs}
    with pytest.raises(ValueError, match=message):
        build_lr_schedule(**args)


def test_set_learning_rate_sets_every_group():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    opt = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 5.0}], lr=1.0)
    set_learning_rate(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
