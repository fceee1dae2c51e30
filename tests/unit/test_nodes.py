"""potluck.Aggregator and potluck.Peer take their command's options: what a user can get wrong is one line,
raised when the object is made (or, for the run's config, by start()), before any node runs."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import potluck
from potluck.errors import PotluckError
from potluck.nodes import Aggregator, NodeError, Peer
from potluck.tasks import Task

JOIN = "/ip4/127.0.0.1/tcp/4001/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


class Tiny(Task):
    """A task that is never run here: only its name matters."""

    def build_model(self, *, seed: int) -> nn.Module:
        return nn.Linear(2, 1)

    def train_batches(self, *, seed: int, batch_size: int) -> Iterator[torch.Tensor]:
        while True:
            yield torch.zeros(batch_size, 2)

    def held_out_batches(self, *, batch_size: int, count: int) -> list[torch.Tensor]:
        return [torch.zeros(batch_size, 2)] * count

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch).pow(2).mean()


def _one_line(error: pytest.ExceptionInfo[PotluckError]) -> str:
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, PotluckError)
    return message


def test_the_node_objects_are_potlucks_lazily_imported_names() -> None:
    assert potluck.Aggregator is Aggregator and potluck.Peer is Peer


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"port": 70000}, "Aggregator(port=...)"),
        ({"max_rounds": 0}, "Aggregator(max_rounds=...)"),
        ({"wait_for_peers": -1}, "Aggregator(wait_for_peers=...)"),
        ({"colour": "red"}, "takes no option 'colour'"),
        ({"as_json": True}, "takes no option 'as_json'"),
        ({"set_": ("rounds=3",)}, "takes no option 'set_'"),
        ({"state_upload_rate": "fast"}, "--state-upload-rate"),
        ({"settings": {"data.source": Path("x")}}, "settings['data.source']"),
        ({"config": 3}, "config must be a RunConfig"),
    ],
)
def test_an_aggregator_refuses_an_unusable_option_in_one_line(options: dict[str, Any], says: str) -> None:
    with pytest.raises(NodeError) as error:
        Aggregator(**options)
    assert says in _one_line(error)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"join": []}, "join is empty"),
        ({"join": 4001}, "join must be"),
        ({"join": JOIN, "batch_size": 0}, "Peer(batch_size=...)"),
        ({"join": JOIN, "overlap_limit": 0.5}, "--overlap-limit only applies with --overlap"),
        ({"join": JOIN, "device": "tpu"}, "device:"),
        ({"join": JOIN, "receipt_dir": "x"}, "takes no option 'receipt_dir'"),
    ],
)
def test_a_peer_refuses_an_unusable_option_in_one_line(options: dict[str, Any], says: str) -> None:
    with pytest.raises(NodeError) as error:
        Peer(**options)
    assert says in _one_line(error)


@pytest.mark.parametrize(
    ("task", "task_name", "says"),
    [
        (Tiny, None, "is a class; give an instance"),
        (nn.Linear(2, 1), None, "must be a potluck.Task"),
        (None, "pkg.mod:Tiny", "give the object too"),
        ("pkg.mod:Tiny", "pkg.mod:Other", "already a name"),
    ],
)
def test_a_task_given_wrongly_is_refused_in_one_line(task: Any, task_name: str | None, says: str) -> None:
    with pytest.raises(NodeError) as error:
        Peer(JOIN, task=task, task_name=task_name)
    assert says in _one_line(error)


def test_a_task_object_goes_by_its_class_unless_named() -> None:
    # Execute
    by_class = Peer(JOIN, task=Tiny())
    named = Aggregator(task=Tiny(), task_name="my_tasks.tiny:Tiny")
    by_path = Peer(JOIN, task="my_tasks.tiny:Tiny")
    # Assert: the names the run knows them by (`--task`)
    assert by_class.flags.task == f"{__name__}:Tiny"
    assert named.flags.task == by_path.flags.task == "my_tasks.tiny:Tiny"


def test_a_class_inside_a_function_must_be_named() -> None:
    class Local(Tiny):
        pass

    with pytest.raises(NodeError) as error:
        Aggregator(task=Local())
    assert "task_name=" in _one_line(error)


def test_the_options_reach_the_commands_flags() -> None:
    # Execute
    aggregator = Aggregator("run.toml", state_dir="runs/a", port=4001, settings={"rounds": 3, "inner.lr": 1e-3})
    peer = Peer([JOIN], batch_size=4, eval_batches=2, device="cpu", threads=1)
    # Assert: as `--config run.toml --state-dir runs/a --port 4001 --set ...`, and no status page unless asked
    assert aggregator.flags.config == Path("run.toml") and aggregator.flags.state_dir == Path("runs/a")
    assert aggregator.flags.port == 4001 and aggregator.flags.host == "127.0.0.1"
    assert aggregator.flags.set_ == ("rounds=3", "inner.lr=0.001")
    assert aggregator.flags.http_port == 0 and peer.flags.http_port == 0
    assert peer.flags.join == (JOIN,) and peer.flags.batch_size == 4 and peer.flags.eval_batches == 2


def test_a_node_that_was_never_started_cannot_be_waited_for_and_stops_as_a_no_op() -> None:
    peer = Peer(JOIN)
    peer.stop()
    with pytest.raises(NodeError) as error:
        peer.wait()
    assert "start()" in _one_line(error)
    assert not peer.running


def test_an_aggregator_not_up_has_no_addresses_to_join() -> None:
    with pytest.raises(NodeError) as error:
        Peer(Aggregator())
    assert "not up yet" in _one_line(error)


def test_start_raises_the_runs_own_error_and_runs_nothing(tmp_path: Path) -> None:
    # Prepare
    aggregator = Aggregator(tmp_path / "missing.toml", state_dir=tmp_path / "state")
    # Execute
    with pytest.raises(PotluckError) as error:
        aggregator.start()
    # Assert: the config's own one line; no thread was started, so the object may start again once fixed
    assert "missing.toml: no such file" in _one_line(error)
    assert not aggregator.running
