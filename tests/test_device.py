"""The ``device`` setting: its forms, how it resolves, the clear refusal of a GPU that is not there
(library and command line, before any work), a CPU run recording the device it used, and the
benchmark that compares devices (its CPU column).  Nothing here needs a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ecif.cli import main
from ecif.config import AUTO_DEVICE, DEVICE_FORMS, DemoDataConfig, FinetuneConfig, RunConfig, parse_device
from ecif.devices import DeviceUnavailable, device_choices, resolve_device

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """Torch on one thread: the small runs here took 10× longer on two threads of a busy two-core host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without a GPU, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_forms_are_canonical_and_anything_else_lists_them():
    assert [parse_device(text) for text in ("auto", " CPU ", "cuda", "cuda:01")] == ["auto", "cpu", "cuda", "cuda:1"]
    for wrong in ("gpu", "cuda:", "cuda:x", "mps", ""):
        with pytest.raises(ValueError, match="device must be one of " + ", ".join(DEVICE_FORMS)):
            parse_device(wrong)
    with pytest.raises(ValueError, match="device must be"):
        RunConfig(run_dir=Path("."), device="gpu")


def test_auto_is_the_first_gpu_else_the_cpu():
    expected = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device(AUTO_DEVICE) == expected
    assert RunConfig(run_dir=Path(".")).device == AUTO_DEVICE
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_is_the_cpu_without_a_gpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert device_choices() == ["auto", "cpu"]


@pytest.mark.parametrize("setting", ["cuda", "cuda:0", "cuda:3"])
def test_a_gpu_that_is_not_there_is_a_clear_error(no_gpu, setting):
    with pytest.raises(DeviceUnavailable) as raised:
        resolve_device(setting)
    message = str(raised.value)
    assert repr(parse_device(setting)) in message  # the device asked for
    assert "torch sees no CUDA device" in message  # what torch sees
    assert "pass --device cpu or auto" in message  # what to pass instead


@pytest.mark.parametrize("command", [["score"], ["extract-features", "--manifest", "unused.csv"]])
def test_the_command_line_refuses_a_missing_gpu_before_any_work(no_gpu, tmp_path, capsys, command):
    out = tmp_path / "out"
    assert main([*command, "--out", str(out), "--device", "cuda:1"]) == 1
    assert "device 'cuda:1' is not available" in capsys.readouterr().err
    assert not out.exists()  # refused before the output folder was made
    with pytest.raises(SystemExit) as parsed:  # a form that is not one: a usage error
        main([*command, "--out", str(out), "--device", "gpu"])
    assert parsed.value.code == 2
    assert "device must be one of auto, cpu, cuda, cuda:N" in capsys.readouterr().err


def _small_config(run_dir: Path, device: str) -> RunConfig:
    """A 100-pair shapes demo on the shipped demo CLIP (nothing trained), δ fixed: seconds on a CPU."""
    from ecif.models.demo import SHIPPED_MODEL
    from ecif.paths import asset_path

    return RunConfig(run_dir=run_dir, model="ecif-demo", checkpoint=asset_path(SHIPPED_MODEL), demo=DemoDataConfig(n=100),
                     finetune=FinetuneConfig(delta=1.0), device=device)


def test_a_cpu_run_records_its_device_and_resumes_on_another_setting(tmp_path):
    from ecif.run import Run
    from ecif.tasks.engine import load_engine
    from ecif.tasks.pipeline import DEVICE_STAGES, run_pipeline

    run = run_pipeline(_small_config(tmp_path / "run", "cpu"), stop_after="scores")
    info = Run(run.directory).info
    assert info["device"] == {"setting": "cpu", "used": "cpu", "name": "cpu"}
    assert "device" not in info["settings"]  # not part of the results' identity
    for name, stage in info["stages"].items():
        assert stage.get("device") == ("cpu" if name in DEVICE_STAGES else None), name
    engine = load_engine(run.directory)
    assert engine.device == torch.device("cpu") and engine.theta.device == engine.problem.data.image.device == torch.device("cpu")
    assert len(run.scores()) == int((run.manifest()["split"] == "train").sum())

    # The same folder under another device setting is the same run: resumed, not refused.
    resumed = run_pipeline(_small_config(tmp_path / "run", "auto"), stop_after="scores")
    assert Run(resumed.directory).info["device"]["setting"] == "auto"


def test_device_check_times_the_cpu_and_says_there_is_no_gpu(no_gpu, tmp_path, capsys):
    if str(REPO) not in sys.path:  # the bench package is at the repository root
        sys.path.insert(0, str(REPO))
    from bench import device_check

    payload = device_check.main(["--n", "100", "--delta", "1", "--threads", "1", "--work", str(tmp_path), "--results", str(tmp_path)])
    assert payload["devices"] == ["cpu"] and payload["agreement"] is None
    seconds = payload["runs"][0]["seconds"]
    assert set(seconds) == {*device_check.TIMED_STAGES, device_check.TRACE} and all(value >= 0 for value in seconds.values())
    printed = capsys.readouterr().out
    assert "no GPU here" in printed and "| trace-back |" in printed
    assert (tmp_path / "device_check.md").exists()


def test_device_check_compares_two_runs_side_by_side(tmp_path):
    """The two-device table and the agreement, on two CPU runs (identical: differences 0, Spearman 1)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench import device_check
    from ecif.tasks.pipeline import run_pipeline

    runs = [run_pipeline(_small_config(tmp_path / f"run{index}", "cpu"), stop_after="scores").directory for index in range(2)]
    agreed = device_check.agreement(runs[0], runs[1])
    assert agreed["spearman_influence"] == pytest.approx(1.0)
    assert max(value for key, value in agreed.items() if key.startswith("max_abs")) == 0.0
    timings = {stage: 1.0 for stage in (*device_check.TIMED_STAGES, device_check.TRACE)}
    fake = [{"device": device, "seconds": timings, "delta": 1.0, "used": {"used": device, "name": device}} for device in ("cpu", "cuda:0")]
    args = device_check.parse_args(["--n", "100"])
    table = device_check.report({"cpu": "x", "cores": 2, "ram_gib": 1, "python": "3", "torch": "2", "torch_threads": 1,
                                 "load_average_at_start": [0], "date_utc": "now"}, args, fake, None, agreed)
    assert "| stage | cpu s | cuda:0 s | cpu / cuda:0 |" in table and "spearman_influence" in table
