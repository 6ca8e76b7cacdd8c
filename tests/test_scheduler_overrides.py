"""--scheduler-config KEY=VALUE: the reference's scheduler takes the port's deliberate sampler settings, the
run metadata records them, impl honours them (staying at parity), and bad settings are bad input."""
import numpy as np
import pytest

from sd_parity.cases.case import Case, run_case
from sd_parity.cli import main
from sd_parity.errors import BadInput
from sd_parity.runs.config import RunConfig, format_scheduler_setting, parse_scheduler_setting
from sd_parity.runs.open import open_run

BASE = dict(model="tiny-sd1", steps=3, prompt="a red cube", negative_prompt="blurry", capture="pipeline")
TRAILING = {"timestep_spacing": "trailing", "set_alpha_to_one": True}


def _timesteps(path) -> list[int]:
    with open_run(path) as run:
        return [int(run.read(f"pipeline/{inv}/timestep")[0]) for inv in run.invocations("pipeline")
                if inv.startswith("step_")]


def test_an_override_changes_the_reference_and_is_recorded(reference_run):
    plain = reference_run(**BASE)
    trailing = reference_run(**BASE, scheduler_overrides=TRAILING)
    # leading spacing + steps_offset 1 over 3 steps: 667, 334, 1; trailing: round(arange(1000, 0, -1000/3)) - 1
    assert _timesteps(plain) == [667, 334, 1]
    assert _timesteps(trailing) == [999, 666, 332]
    with open_run(trailing) as run:
        metadata = run.metadata
        final = run.read("pipeline/step_002/latents")
    assert metadata["scheduler_overrides"] == TRAILING
    assert metadata["scheduler_config"]["timestep_spacing"] == "trailing"
    assert metadata["scheduler_config"]["set_alpha_to_one"] is True
    with open_run(plain) as run:
        assert not np.allclose(run.read("pipeline/step_002/latents"), final)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_impl_with_the_same_override_stays_at_parity(tmp_path, backend):
    config = RunConfig(**{**BASE, "capture": None}, scheduler_overrides=TRAILING)
    summary = run_case(Case(config, backend), tmp_path / "case").summary
    assert summary["verdict"]["status"] == "parity", summary["verdict"]["text"]
    assert summary["runs"]["candidate"]["metadata"]["scheduler_overrides"] == TRAILING
    assert "--scheduler-config timestep_spacing=" in summary["case"]["repro"]


def test_an_impl_without_the_override_diverges_at_the_timestep(tmp_path, reference_run, impl_run):
    """What the override is for: without it, the port's deliberate choice fails every step."""
    from sd_parity.judging.compare import compare_runs

    _, plain_impl = impl_run("torch", **BASE)
    comparison = compare_runs(reference_run(**BASE, scheduler_overrides=TRAILING), plain_impl)
    assert comparison.first_divergence().key == "pipeline/step_000/timestep"
    assert any("scheduler_overrides" in warning for warning in comparison.warnings)


@pytest.mark.parametrize("setting, message", [
    ("foo=1", "has no setting 'foo'"),
    ("steps_offset=true", "steps_offset must be an int"),
    ("timestep_spacing=middle", 'must be one of "leading", "trailing", "linspace"'),
    ("set_alpha_to_one=1", "must be a bool"),
    ("steps_offset", "is not KEY=VALUE"),
])
def test_bad_settings_are_bad_input(tmp_path, capsys, setting, message):
    code = main(["capture", "--model", "tiny-sd1", "--scheduler-config", setting, "--output", str(tmp_path / "r.h5")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.h5").exists()


def test_settings_are_checked_against_the_samplers_own_scheduler():
    RunConfig(model="tiny-sd1", scheduler="pndm", scheduler_overrides={"skip_prk_steps": False})
    with pytest.raises(BadInput, match="EulerDiscreteScheduler .* has no setting 'skip_prk_steps'"):
        RunConfig(model="tiny-sd1", scheduler="euler", scheduler_overrides={"skip_prk_steps": False})
    assert parse_scheduler_setting("steps_offset=0") == ("steps_offset", 0)
    assert parse_scheduler_setting("timestep_spacing=trailing") == ("timestep_spacing", "trailing")
    assert parse_scheduler_setting("beta_end=0.012") == ("beta_end", 0.012)
    for item in (("timestep_spacing", "trailing"), ("steps_offset", 0), ("prediction_type", "true")):
        assert parse_scheduler_setting(format_scheduler_setting(*item)) == item
