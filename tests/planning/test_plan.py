"""The planner's arithmetic against the numbers in the papers (DisTrO, He et al. 2024)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from potluck.planning.plan import (
    Plan,
    auto_plan,
    local_steps_for_efficiency,
    make_plan,
    parse_quantity,
    scaling_efficiency,
    transfer_seconds,
)

# He et al. scenario 1: two clusters of 8 GPUs at 150 TFLOP/s, 4M-token global batch, 0.8 Gbit/s between them.
SCENARIO_1 = {
    "clusters": 2,
    "gpus_per_cluster": 8,
    "device_flops": 150e12,
    "bandwidth_bits_per_s": 0.8e9,
    "batch_tokens": 4e6,
}


def test_distro_upload_and_download_times() -> None:
    # DisTrO with aggregation servers: 2.8 MB up at 10 Mbit/s, 86.8 MB down at 100 Mbit/s.
    assert round(transfer_seconds(2.8e6, 10e6), 2) == 2.24
    assert round(transfer_seconds(86.8e6, 100e6), 2) == 6.94
    assert transfer_seconds(86.8e6, 100e6) == pytest.approx(6.944)


def test_scenario_1_is_above_90_percent_at_32_steps() -> None:
    k = scaling_efficiency(**SCENARIO_1, local_steps=32)
    # 2(m-1)nC_d / (3BsW) = 2*1*8*150e12 / (3*4e6*32*1e8 bytes/s) = 2.4e15 / 3.84e16 = 1/16
    assert k == pytest.approx(16 / 17)
    assert k > 0.9


def test_one_cluster_is_perfectly_efficient() -> None:
    assert scaling_efficiency(**{**SCENARIO_1, "clusters": 1}, local_steps=1) == 1.0
    assert local_steps_for_efficiency(0.99, **{**SCENARIO_1, "clusters": 1}) == 1


@given(
    steps=st.integers(1, 10_000),
    bandwidth=st.floats(1e3, 1e12),
    clusters=st.integers(2, 64),
)
def test_efficiency_grows_with_steps_and_bandwidth(steps: int, bandwidth: float, clusters: int) -> None:
    link = {**SCENARIO_1, "clusters": clusters, "bandwidth_bits_per_s": bandwidth}
    k = scaling_efficiency(**link, local_steps=steps)
    assert 0 < k < 1
    assert scaling_efficiency(**link, local_steps=steps + 1) > k
    assert scaling_efficiency(**{**link, "bandwidth_bits_per_s": bandwidth * 2}, local_steps=steps) > k


@given(target=st.floats(0.01, 0.999), bandwidth=st.floats(1e5, 1e11))
def test_local_steps_for_efficiency_is_minimal(target: float, bandwidth: float) -> None:
    link = {**SCENARIO_1, "bandwidth_bits_per_s": bandwidth}
    steps = local_steps_for_efficiency(target, **link)
    reached = target * (1 - 1e-12)  # the planner's float-noise tolerance
    assert scaling_efficiency(**link, local_steps=steps) >= reached
    assert steps == 1 or scaling_efficiency(**link, local_steps=steps - 1) < reached


def test_scenario_1_needs_18_steps_for_90_percent() -> None:
    # s >= a·t/(1-t) with a = 2 (a/32 = 1/16 above): 2 * 0.9 / 0.1 = 18 exactly, where floats give
    # K(18) = 0.8999999999999999; the planner must not round that up to 19.
    assert local_steps_for_efficiency(0.9, **SCENARIO_1) == 18
    assert scaling_efficiency(**SCENARIO_1, local_steps=17) < 0.9


def test_make_plan_fills_what_inputs_determine() -> None:
    plan = make_plan(
        **SCENARIO_1,
        local_steps=32,
        target_k=0.9,
        upload_bytes=2.8e6,
        up_bits_per_s=10e6,
        download_bytes=86.8e6,
        down_bits_per_s=100e6,
    )
    data = plan.to_dict()
    assert data["K"] == pytest.approx(16 / 17)
    assert data["local_steps_needed"] == 18
    assert data["upload_seconds"] == pytest.approx(2.24)
    assert data["download_seconds"] == pytest.approx(6.944)
    assert data["round_network_seconds"] == pytest.approx(9.184)
    assert data["compute_seconds_per_round"] is None  # needs params

    only_upload = make_plan(upload_bytes=2.8e6, up_bits_per_s=10e6, target_k=0.9)
    assert only_upload.K is None and only_upload.local_steps_needed is None
    assert only_upload.download_seconds is None and only_upload.round_network_seconds is None
    # target_k alone determines nothing: the plan stays empty, so a caller can tell the user so.
    assert make_plan(target_k=0.9) == make_plan() == Plan()
    assert all(value is None for value in Plan().to_dict().values())


def test_make_plan_takes_whole_floats_as_counts_the_way_the_cli_parses_them() -> None:
    as_floats = {key: float(value) for key, value in SCENARIO_1.items()}
    assert make_plan(**as_floats, local_steps=32.0).K == pytest.approx(16 / 17)
    with pytest.raises(ValueError, match="whole number"):
        make_plan(**{**as_floats, "clusters": 2.5}, local_steps=32)
    link = {key: value for key, value in SCENARIO_1.items() if key != "gpus_per_cluster"}
    assert make_plan(**link, local_steps=1).K == scaling_efficiency(**link, gpus_per_cluster=1, local_steps=1)


@given(
    params=st.floats(1e6, 1e12),
    clusters=st.integers(1, 64),
    steps=st.integers(1, 1000),
    bandwidth=st.floats(1e5, 1e11),
)
def test_k_is_the_compute_share_of_the_round(params: float, clusters: int, steps: int, bandwidth: float) -> None:
    # The derivation in the module docstring, checked numerically: K = T_comp / (T_comp + T_comm) for any N.
    link = {**SCENARIO_1, "clusters": clusters, "bandwidth_bits_per_s": bandwidth}
    plan = make_plan(params=params, **link, local_steps=steps)
    compute, allreduce = plan.compute_seconds_per_round, plan.allreduce_seconds_per_round
    assert plan.K == pytest.approx(compute / (compute + allreduce), rel=1e-9)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("10", 10.0),
        ("0.7", 0.7),
        ("1e9", 1e9),
        ("4_000_000", 4e6),
        ("10M", 10e6),
        ("4M", 4e6),
        ("150T", 150e12),
        ("0.8G", 0.8e9),
        ("100Mbit", 100e6),
        ("10 Mbit/s", 10e6),
        ("100Mbps", 100e6),
        ("2.8MB", 2.8e6),
        ("86.8 MB", 86.8e6),
        ("5k", 5e3),
        (" 3 ", 3.0),
    ],
)
def test_parse_quantity(text: str, value: float) -> None:
    assert parse_quantity(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "abc", "10x", "10mbit", "M", "1..2", "nan", "inf", "1e400", "1__0", "10 M B"])
def test_parse_quantity_refuses_junk(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_quantity(text)
    assert "\n" not in str(info.value)


def test_parse_quantity_checks_the_unit_when_asked() -> None:
    assert parse_quantity("100Mbit", kind="bits") == 100e6
    assert parse_quantity("100M", kind="bits") == 100e6
    with pytest.raises(ValueError, match="in bytes"):
        parse_quantity("10MB", kind="bits")
    with pytest.raises(ValueError, match="in bits"):
        parse_quantity("80Mbit", kind="bytes")


@pytest.mark.parametrize(
    "bad",
    [
        {"clusters": 0},
        {"gpus_per_cluster": 0},
        {"device_flops": 0.0},
        {"bandwidth_bits_per_s": -1.0},
        {"batch_tokens": float("nan")},
    ],
)
def test_invalid_inputs_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        scaling_efficiency(**{**SCENARIO_1, **bad}, local_steps=1)


def test_invalid_targets_and_steps_are_refused() -> None:
    for target in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="target_k"):
            local_steps_for_efficiency(target, **SCENARIO_1)
    with pytest.raises(ValueError, match="local_steps"):
        scaling_efficiency(**SCENARIO_1, local_steps=0)
    with pytest.raises(ValueError):
        transfer_seconds(-1, 10e6)


MEASURED = {
    "step_s": 0.2,
    "tokens_per_step": 4096,
    "params": 124e6,
    "peers": 8,
    "local_steps": 100,
    "upload_bytes": 3_000_000,
    "download_bytes": 12_000_000,
    "up_bits_per_s": 10e6,
    "down_bits_per_s": 100e6,
}


def test_auto_plan_is_the_paper_formula_on_the_measured_flops_and_the_round_on_the_measured_link() -> None:
    plan = auto_plan(**MEASURED)

    flops = 6 * 124e6 * 4096 / 0.2
    assert plan.device_flops == pytest.approx(flops)
    link = {"clusters": 8, "gpus_per_cluster": 1, "device_flops": flops, "bandwidth_bits_per_s": 10e6}
    assert plan.K == pytest.approx(scaling_efficiency(**link, batch_tokens=8 * 4096, local_steps=100))
    assert plan.local_steps_for_k == local_steps_for_efficiency(0.9, **link, batch_tokens=8 * 4096)
    assert plan.round_network_s == pytest.approx(3e6 * 8 / 10e6 + 12e6 * 8 / 100e6)  # 2.4 s up + 0.96 s down
    assert plan.K_potluck == pytest.approx(20 / (20 + 3.36))


@given(
    step_s=st.floats(1e-3, 10),
    network_bytes=st.integers(1, 10**9),
    target=st.floats(0.5, 0.99),
)
def test_auto_plans_local_steps_are_the_fewest_that_reach_the_target(
    step_s: float, network_bytes: int, target: float
) -> None:
    inputs = MEASURED | {"step_s": step_s, "upload_bytes": network_bytes, "target_k": target}

    steps = auto_plan(**inputs).local_steps_for_k_potluck

    assert auto_plan(**inputs | {"local_steps": steps}).K_potluck >= target * (1 - 1e-9)
    if steps > 1:
        assert auto_plan(**inputs | {"local_steps": steps - 1}).K_potluck < target


@pytest.mark.parametrize("field", ["step_s", "up_bits_per_s", "down_bits_per_s"])
def test_auto_plan_refuses_a_measurement_that_is_not_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        auto_plan(**MEASURED | {field: 0.0})


def test_auto_plan_line_names_both_efficiencies() -> None:
    line = auto_plan(**MEASURED).line()

    assert line.startswith("plan: step 200 ms") and "K 0.86 (K >= 0.9 from 152 steps)" in line
    assert "He et al.'s dense all-reduce among 8 peers: K 0.05" in line
    assert "--overlap would train through the network's 14% of a round" in line


def test_auto_plan_names_the_densest_code_the_link_affords() -> None:
    options = {1 / 64: (100_000, 400_000), 1 / 16: (400_000, 1_600_000), 1 / 4: (1_600_000, 6_400_000)}

    fast = auto_plan(**MEASURED | {"upload_bytes": 100_000, "download_bytes": 400_000}, density_options=options)
    slow = auto_plan(**MEASURED | {"up_bits_per_s": 1e5}, density_options=options)

    # 20 s of compute allows 2.2 s of network: 1/16 needs 0.32 + 0.128 s at 10/100 Mbit/s, 1/4 1.28 + 0.51 s
    assert fast.density_for_k == 1 / 4
    assert slow.density_for_k is None  # at 100 kbit/s not even 1/64 keeps K >= 0.9
    assert auto_plan(**MEASURED).density_for_k is None  # nothing measured, nothing named
    assert "density up to 1/4" in fast.line() and "density" not in slow.line()
