"""A command's flags declared once, as the fields of a pydantic model that typer reads and argv is rendered from.

Each field carries a `Flag` (its declarations, e.g. `--join -j` or `--overlap/--no-overlap`, and its help) and
its pydantic bounds (`ge`, `le`), which typer shows and checks too. `Flags.parameters()` makes the fields a
typer command's parameters (so `--help` lists them), `Flags.parsed()` builds the model from what typer parsed (a
broken rule is one UsageError line), and `Flags.argv()` renders a model back into the arguments that parse into it
again: how `potluck swarm` starts its children with the options it was given.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, get_origin

import annotated_types
import typer
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo
from rich.markup import escape

from potluck.cli.common import UsageError

Command = TypeVar("Command", bound=Callable[..., None])
Model = TypeVar("Model", bound="Flags")


@dataclass(frozen=True, slots=True)
class Flag:
    """How a model field is spelled on the command line: its declarations and its help."""

    decls: tuple[str, ...]  # the first one is what argv() writes; "--x/--no-x" for a switch that can be turned off
    help: str


def flag(*decls: str, help: str) -> Flag:  # noqa: A002 - typer's name for it
    """A field's command-line spelling, e.g. `flag("--join", "-j", help="...")`."""
    return Flag(decls=decls, help=help)


def as_written(text: str) -> str:
    """Help text that `--help` shows as written: typer reads help as rich markup, where a hint such as
    `[default: the run's]` is a style tag and vanishes, so its brackets are escaped."""
    return escape(text)


def _flag(field: FieldInfo) -> Flag:
    found = [m for m in field.metadata if isinstance(m, Flag)]
    assert len(found) == 1, f"a Flags field needs one Flag, has {found}"
    return found[0]


def _bound(field: FieldInfo, kind: type) -> Any:
    bounds = [m for m in field.metadata if isinstance(m, kind)]
    return getattr(bounds[0], kind.__name__.lower()) if bounds else None


def _repeatable(field: FieldInfo) -> bool:
    return get_origin(field.annotation) is tuple


class Flags(BaseModel):
    """A command's options, validated; subclasses declare one field per flag."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)  # built on first use, not for --help

    @classmethod
    def option(cls, name: str, *, help: str | None = None) -> Any:  # noqa: A002 - typer's name for it
        """Field `name` as a typer option: its declarations and bounds, and its help unless another command's."""
        field = cls.model_fields[name]
        spelled = _flag(field)
        return typer.Option(
            *spelled.decls,
            help=as_written(spelled.help if help is None else help),
            min=_bound(field, annotated_types.Ge),
            max=_bound(field, annotated_types.Le),
        )

    @classmethod
    def parameters(cls) -> dict[str, inspect.Parameter]:
        """The fields as typer parameters, in declaration order: a repeatable flag (a tuple) defaults to None."""
        parameters = {}
        for name, field in cls.model_fields.items():
            annotation: Any = list[str] | None if _repeatable(field) else field.annotation
            parameters[name] = inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[annotation, cls.option(name)],
                default=None if _repeatable(field) else field.default,
            )
        return parameters

    @classmethod
    def parsed(cls: type[Model], values: Mapping[str, Any]) -> Model:
        """The model from what typer parsed (an absent repeatable flag is None there); UsageError when invalid."""
        fields = cls.model_fields
        given = {k: () if v is None and k in fields and _repeatable(fields[k]) else v for k, v in values.items()}
        try:
            return cls.model_validate(given)
        except ValidationError as e:
            raise UsageError(_one_line(cls, e)) from None

    def replace(self: Model, **changes: Any) -> Model:
        """A copy with `changes`, validated like any other."""
        return self.parsed({**{name: getattr(self, name) for name in type(self).model_fields}, **changes})

    def argv(self) -> list[str]:
        """The flags that parse back into this model: each field that differs from its default."""
        argv: list[str] = []
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if value == field.default:
                continue
            first = _flag(field).decls[0]
            if isinstance(value, bool):
                on, _, off = first.partition("/")
                assert value or off, f"{name}=False cannot be written as a flag"
                argv.append(on if value else off)
            elif isinstance(value, tuple):
                for item in value:
                    argv += [first, str(item)]
            elif value is None:
                raise ValueError(f"{name}=None cannot be written as a flag (its default is {field.default!r})")
            else:
                argv += [first, repr(value) if isinstance(value, float) else str(value)]
        return argv


def _one_line(model: type[Flags], error: ValidationError) -> str:
    """The first problem pydantic found, as one line: a rule's own message, else the flag and what is wrong."""
    first = error.errors()[0]
    cause = first.get("ctx", {}).get("error")
    if first["type"] == "value_error" and isinstance(cause, Exception):
        return str(cause)
    name = str(first["loc"][0]) if first["loc"] else ""
    spelled = _flag(model.model_fields[name]).decls[0].partition("/")[0] if name in model.model_fields else name
    return f"{spelled}: {first['msg']}"


def takes(parameters: Mapping[str, inspect.Parameter] | list[inspect.Parameter]) -> Callable[[Command], Command]:
    """Give a `def command(**values)` these typer parameters: typer reads a function's signature for its flags."""
    listed = list(parameters.values()) if isinstance(parameters, Mapping) else list(parameters)

    def apply(command: Command) -> Command:
        # a function object takes any attribute, but mypy knows only the ones every function has
        command.__signature__ = inspect.Signature(listed, return_annotation=None)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in listed} | {"return": None}
        return command

    return apply
