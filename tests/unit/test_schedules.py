"""Beta schedules: each kind, the entropy controller's direction and bounds, resume state, the factory."""

import random

import pytest

from megatron_gppo.algorithm.schedules import (BETA_SCHEDULES, ConstantBetas, EntropyTargetController, LinearRamp,
                                               StepSwitch, make_beta_schedule, sensitivities_from)


def test_constant():
    schedule = ConstantBetas()
    assert schedule.betas(0) == schedule.betas(10_000, entropy=3.0) == (0.5, 1.0)
    assert ConstantBetas(beta1=0.75, beta2=1.0).betas(3) == (0.75, 1.0)


def test_step_switch_at_the_papers_step():
    schedule = StepSwitch(585, before=(0.0, 1.0), after=(0.5, 1.0))
    assert schedule.betas(0) == schedule.betas(584) == (0.0, 1.0)
    assert schedule.betas(585) == schedule.betas(1000) == (0.5, 1.0)


def test_linear_ramp():
    schedule = LinearRamp(100, 200, start=(0.0, 1.0), end=(1.0, 0.5))
    assert schedule.betas(0) == schedule.betas(100) == (0.0, 1.0)
    assert schedule.betas(150) == pytest.approx((0.5, 0.75))
    assert schedule.betas(175) == pytest.approx((0.75, 0.625))
    assert schedule.betas(200) == schedule.betas(10_000) == (1.0, 0.5)


def test_entropy_controller_follows_the_paper_signs_until_a_sensitivity_is_measured():
    controller = EntropyTargetController(0.3, 0.6, initial=(0.5, 1.0), proportional_gain=0.0, integral_gain=1.0)
    # 0.3 nats too much entropy, no measurement yet: raise beta1 (the paper: lowers entropy), lower beta2.
    assert controller.betas(0, entropy=0.9) == pytest.approx((0.8, 0.7))
    # Inside the band: unchanged (dead band).
    assert controller.betas(1, entropy=0.45) == pytest.approx((0.8, 0.7))
    # 0.2 nats too little: the other way.
    assert controller.betas(2, entropy=0.1) == pytest.approx((0.6, 0.9))
    # No measurement: unchanged.
    assert controller.betas(3) == pytest.approx((0.6, 0.9))


def test_entropy_controller_steers_by_the_measured_sign():
    """Where beta1 raises entropy (as on the demo), too much entropy must LOWER beta1; the paper's sign raises it."""
    measured = EntropyTargetController(0.3, 0.6, initial=(0.5, 1.0), proportional_gain=0.0, integral_gain=1.0)
    paper = EntropyTargetController(0.3, 0.6, initial=(0.5, 1.0), proportional_gain=0.0, integral_gain=1.0,
                                    sign="paper")
    rng = random.Random(0)
    for step in range(30):  # steady measurements: dH/dbeta1 > 0, dH/dbeta2 > 0, with noise
        sensitivities = (0.02 + rng.gauss(0, 0.01), 0.05 + rng.gauss(0, 0.01))
        measured.betas(step, entropy=0.45, sensitivities=sensitivities)
        paper.betas(step, entropy=0.45, sensitivities=sensitivities)
    assert measured.directions() == (1.0, 1.0) and paper.directions() == (-1.0, 1.0)
    assert measured.betas(30, entropy=0.7) == pytest.approx((0.4, 0.9))
    assert paper.betas(30, entropy=0.7) == pytest.approx((0.6, 0.9))


def test_entropy_controller_ignores_a_sensitivity_within_its_noise():
    controller = EntropyTargetController(0.3, 0.6)
    rng = random.Random(1)
    for step in range(50):  # beta1's effect is zero on average, beta2's is clearly negative
        controller.betas(step, entropy=0.45, sensitivities=(rng.gauss(0, 0.05), -0.05 + rng.gauss(0, 0.01)))
    assert controller.directions() == (-1.0, -1.0)


def test_entropy_controller_pi_law():
    controller = EntropyTargetController(0.3, 0.6, initial=(1.0, 1.0), proportional_gain=2.0, integral_gain=0.5,
                                         sign="paper")
    # e = 0.1: du = 2 * (0.1 - 0) + 0.5 * 0.1 = 0.25; then e = 0.1 again: du = 0 + 0.05.
    assert controller.betas(0, entropy=0.7) == pytest.approx((1.25, 0.75))
    assert controller.betas(1, entropy=0.7) == pytest.approx((1.30, 0.70))
    # Back in the band: the proportional part unwinds, the integral part stays.
    assert controller.betas(2, entropy=0.5) == pytest.approx((1.10, 0.90))


def test_entropy_controller_updates_once_per_step():
    controller = EntropyTargetController(0.3, 0.6, proportional_gain=0.0, integral_gain=1.0)
    first = controller.betas(7, entropy=0.7)
    assert controller.betas(7, entropy=0.7) == first
    assert controller.betas(6, entropy=0.7) == first
    assert controller.betas(8, entropy=0.7) != first


def test_entropy_controller_stays_within_bounds():
    controller = EntropyTargetController(
        0.3, 0.6, initial=(0.5, 1.0), integral_gain=0.5, beta1_bounds=(0.0, 1.0), beta2_bounds=(0.8, 1.2)
    )
    for step in range(20):
        beta1, beta2 = controller.betas(step, entropy=5.0)
        assert 0.0 <= beta1 <= 1.0 and 0.8 <= beta2 <= 1.2
    assert (beta1, beta2) == pytest.approx((1.0, 0.8))
    for step in range(20, 40):
        beta1, beta2 = controller.betas(step, entropy=0.0)
        assert 0.0 <= beta1 <= 1.0 and 0.8 <= beta2 <= 1.2
    assert (beta1, beta2) == pytest.approx((0.0, 1.2))


def test_entropy_controller_state_round_trip():
    controller = EntropyTargetController(0.3, 0.6)
    for step in range(3):
        controller.betas(step, entropy=0.9, sensitivities=(0.1 * step, -0.2))
    state = controller.state_dict()
    resumed = EntropyTargetController(0.3, 0.6)
    assert resumed.betas(2) != controller.betas(2)
    resumed.load_state_dict(state)
    assert resumed.betas(2, entropy=0.9) == controller.betas(2, entropy=0.9)  # step 2 already applied
    assert resumed.betas(3, entropy=0.1, sensitivities=(0.3, -0.2)) == controller.betas(
        3, entropy=0.1, sensitivities=(0.3, -0.2))
    assert resumed.state_dict() == controller.state_dict()


@pytest.mark.parametrize(
    "schedule",
    [ConstantBetas(beta1=0.75), StepSwitch(10), LinearRamp(0, 10)],
    ids=["constant", "step", "linear"],
)
def test_stateless_schedules_round_trip(schedule):
    state = schedule.state_dict()
    schedule.load_state_dict(state)
    assert state["kind"] == schedule.kind
    assert schedule.betas(5) == type(schedule)(**_fields(schedule)).betas(5)


def _fields(schedule):
    return {name: value for name, value in vars(schedule).items() if not name.startswith("_")}


def test_loading_state_of_another_kind_raises():
    with pytest.raises(ValueError, match="'entropy_target'.*'constant'"):
        ConstantBetas().load_state_dict(EntropyTargetController(0.1, 0.2).state_dict())


def test_factory_builds_every_kind():
    assert set(BETA_SCHEDULES) == {"constant", "step", "linear", "entropy_target"}
    assert make_beta_schedule("constant", beta1=0.25).betas(0) == (0.25, 1.0)
    assert make_beta_schedule("step", switch_step=585, before=[0, 1], after=[0.5, 1]).betas(600) == (0.5, 1.0)
    assert make_beta_schedule("linear", start_step=0, end_step=4, end=(1.0, 1.0)).betas(2) == pytest.approx((0.5, 1.0))
    # 0.2 below the band: du = (20 + 5) * -0.2 = -5 moves the betas to their bounds the paper's way.
    assert make_beta_schedule("entropy_target", low=0.2, high=0.4).betas(0, entropy=0.0) == pytest.approx((0.0, 2.0))


@pytest.mark.parametrize(
    "kind, kwargs, match",
    [
        ("cosine", {}, "unknown beta schedule 'cosine'"),
        ("constant", {"beta3": 1.0}, "bad arguments"),
        ("step", {}, "bad arguments"),
        ("constant", {"beta1": -0.1}, "beta1"),
        ("step", {"switch_step": -1}, "switch_step"),
        ("step", {"switch_step": 5, "after": (0.5,)}, "after"),
        ("linear", {"start_step": 10, "end_step": 10}, "end_step"),
        ("entropy_target", {"low": 0.5, "high": 0.2}, "low < high"),
        ("entropy_target", {"low": 0.1, "high": 0.2, "integral_gain": -0.1}, "integral_gain must be a number >= 0"),
        ("entropy_target", {"low": 0.1, "high": 0.2, "sign": "both"}, "sign must be"),
        ("entropy_target", {"low": 0.1, "high": 0.2, "initial": (3.0, 1.0)}, "outside its bounds"),
        ("entropy_target", {"low": 0.1, "high": 0.2, "beta2_bounds": (1.5, 0.5)}, "lower <= upper"),
    ],
)
def test_bad_schedule_arguments_raise(kind, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_beta_schedule(kind, **kwargs)


def test_entropy_controller_does_not_trust_its_first_measurements():
    controller = EntropyTargetController(0.3, 0.6)
    controller.betas(0, entropy=0.45, sensitivities=(0.5, -0.5))  # one sample: its noise is unknown
    assert controller.directions() == (-1.0, 1.0)


def test_entropy_controller_counts_the_steps_it_cannot_act():
    controller = EntropyTargetController(0.3, 0.6, initial=(0.5, 1.0), integral_gain=1.0, proportional_gain=0.0)
    # 0.3 nats too little entropy: beta1 0.5 -> 0.2 -> 0, beta2 1.0 -> 1.3 -> 1.6 -> 1.9 -> 2.0 (step 3), then
    # nothing more to give.
    for step in range(8):
        controller.betas(step, entropy=0.0)
    assert controller.betas(8) == (0.0, 2.0) and controller.saturated_steps == 5
    controller.betas(8, entropy=0.45)  # back in the band
    assert controller.saturated_steps == 0


def test_controller_feedback_prefers_what_the_betas_did_through_the_optimizer():
    first_order = {"entropy_sensitivity_beta1": -0.002, "entropy_sensitivity_beta2": 0.001}
    assert sensitivities_from(first_order) == [-0.002, 0.001]
    realized = {**first_order, "realized_entropy_sensitivity_beta1": 0.004, "realized_entropy_sensitivity_beta2": -0.003}
    assert sensitivities_from(realized) == [0.004, -0.003]
    assert sensitivities_from({}) == [None, None]  # a loss without betas
