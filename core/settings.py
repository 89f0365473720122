"""Typed settings: every stage's knobs are one pydantic model with defaults, bounds and help text.

One source of truth, read three ways:

- the stage itself: `TrainConfig(**kw)` validates on construction (bounds, choices, cross-field
  rules); `validate()` re-checks after attribute edits and adds the checks that look at the disk;
- `eagle run`'s YAML: its sections are these models (`core.runconfig` derives them with `section`,
  never restating a field; defaults that differ inside `eagle run` are listed in one place there);
- the CLI: `eagle_tui.cli.common.option(Model, "field")` builds each Typer option from the field
  (default, help, flag name), so `eagle train --help` and the YAML schema say the same thing.

Errors name what the user typed: `--lr: must be > 0 (got 0)` for a stage config,
`config field train.lr: must be > 0 (got 0)` for a RunConfig (`FILE: field train.lr: ...` when read
from a YAML file); all exit 2 (UsageError).
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from core.errors import UsageError

DEVICES = ("auto", "cpu", "cuda")
Device = Literal[DEVICES]


def refuse(field: str, message: str) -> PydanticCustomError:
    """A cross-field refusal raised inside a model validator. `field` is the setting it names;
    `{other}` in the message names another setting of the same model the way the user spells it."""
    return PydanticCustomError("setting", "{message}", {"field": field, "message": message})


class Settings(BaseModel):
    """Base of every settings model: unknown names refused, numbers accepted for text fields."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, arbitrary_types_allowed=True,
                              protected_namespaces=())
    # CLI flags that are not `--field-name` (e.g. RegenConfig.servers is --target-server)
    cli_names: ClassVar[dict[str, str]] = {}

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise settings_error(e, type(self), cli=True) from None

    # Nested inside another model (a YAML section) pydantic validates without calling __init__, so
    # the outer model reports the error with its full path (`train.lr`), not as a CLI option.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def flag(cls, name: str) -> str:
        return cls.cli_names.get(name, "--" + name.replace("_", "-"))

    @classmethod
    def default(cls, name: str) -> Any:
        return cls.model_fields[name].get_default(call_default_factory=True)

    @classmethod
    def knobs(cls, obj: BaseModel) -> dict[str, Any]:
        """The values of this model's fields taken from `obj` (e.g. a YAML section), by name."""
        return {k: getattr(obj, k) for k in cls.model_fields if k in type(obj).model_fields}

    def validate(self):  # type: ignore[override]  # (pydantic v1's classmethod of that name)
        """Re-check every value (attributes may have been edited since construction), then the disk."""
        type(self)(**self.model_dump())
        self.check_inputs()
        return self

    def check_inputs(self) -> None:
        """Checks that look at files (model folders, datasets); run by validate(), not on construction."""

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def section(name: str, base: type[Settings], doc: str, *, drop: tuple[str, ...] = (),
            rename: dict[str, str] | None = None, defaults: dict[str, Any] | None = None,
            **extra: Any) -> type[Settings]:
    """A YAML section derived from a stage model: its fields (bounds, help) copied, some dropped or
    renamed, some defaulting differently (`defaults`), plus section-only fields (`extra`: name=(type, Field)).
    Without drop/rename the section subclasses `base`, so its cross-field rules apply too."""
    rename, defaults = rename or {}, defaults or {}
    fields: dict[str, Any] = {}
    for k, f in base.model_fields.items():
        if k in drop or (not drop and not rename and k not in defaults):
            continue
        info = FieldInfo.merge_field_infos(f, default=defaults[k]) if k in defaults else f
        fields[rename.get(k, k)] = (f.annotation, info)
    parent = base if not drop and not rename else Settings
    model = create_model(name, __base__=parent, __doc__=doc, __module__="core.runconfig", **fields, **extra)
    model.source_model = base  # type: ignore[attr-defined]
    model.renamed = dict(rename)  # type: ignore[attr-defined]
    return model


# ---- errors --------------------------------------------------------------------------------------
_WHAT = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
         "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
         "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list",
         "tuple_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
         "model_attributes_type": "a mapping"}
_BOUND = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
          "less_than_equal": ("le", "<=")}


def _model_at(cls: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    for part in loc:
        f = cls.model_fields.get(part)
        ann = getattr(f, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def describe(err: dict[str, Any], root: type[BaseModel], name: Callable[[list[str]], str],
             field: str = "") -> tuple[str, str | None]:
    """(message, hint) for one pydantic error; `name(path)` spells a setting's path for the user,
    `field` comes before it ("field " in YAML messages: `field train.lr: must be > 0`)."""
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    if kind == "setting":
        here = loc

        class _Names(dict):
            def __missing__(self, key: str) -> str:  # a sibling setting: `--max-length`, or `max_length`
                return name(here + [key]) if not field else key

        return f"{field}{name(loc + [ctx['field']])}: {ctx['message'].format_map(_Names())}", None
    if kind == "extra_forbidden":
        owner = _model_at(root, loc[:-1])
        known = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = (f"did you mean {name(loc[:-1] + [close[0]])}?" if close
                else f"known: {', '.join(known)}" if known else None)
        return f"unknown {field or 'setting '}{name(loc)}", hint
    subject = f"{field}{name(loc)}"
    if kind in _BOUND:
        key, op = _BOUND[kind]
        bound = f"{ctx[key]:g}" if isinstance(ctx[key], (int, float)) else ctx[key]
        return f"{subject}: must be {op} {bound} (got {got!r})", None
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", ""))) or [str(ctx.get("expected"))]
        return f"{subject}: {got!r} is not one of {', '.join(options)}", None
    if kind in _WHAT:
        return f"{subject}: expected {_WHAT[kind]}, got {got!r}", None
    if kind == "missing":
        return f"{subject}: is required", None
    if kind == "string_too_short":
        return f"{subject}: must not be empty", None
    return f"{subject}: {err.get('msg', 'invalid').removeprefix('Value error, ')}", None


def settings_error(e: ValidationError, root: type[BaseModel], cli: bool, where: str | None = None) -> UsageError:
    """One UsageError (exit 2) for all of a model's problems, each naming the CLI option (`--lr: ...`)
    or the YAML path (`config field train.lr: ...`; read from a file: `FILE: field train.lr: ...`)."""
    if cli:
        flag = getattr(root, "flag", lambda n: "--" + n.replace("_", "-"))
        name = lambda path: flag(path[0]) if len(path) == 1 else ".".join(path)  # noqa: E731
        field = ""
    else:
        name, field = ".".join, "field " if where is not None else "config field "
    described = [describe(err, root, name, field) for err in e.errors()]
    message = "; ".join(m for m, _ in described)
    hint = next((h for _, h in described if h), None)
    if where is not None:
        from core.errors import InputDataError

        return InputDataError(message, path=where, hint=hint)
    return UsageError(message, hint=hint)


# ---- shared fields -------------------------------------------------------------------------------
class DataSelection(Settings):
    """Which conversations of a dataset a stage reads (core.data.DataSpec)."""

    split: Optional[str] = Field(None, description="Dataset split and slice, e.g. train[:1000].")
    messages_column: Optional[str] = Field(None, description="Column with the turns (default: found "
                                           "by name: messages, conversations, ...).")
    shuffle_seed: Optional[int] = Field(None, description="Shuffle the rows with this seed first.")
    limit: Optional[int] = Field(None, ge=1, description="Use at most this many conversations.")
    strict: bool = Field(False, description="Fail at the first bad input row (default: skip and count it).")
    exclude: Optional[str] = Field(None, description="A JSONL of held-out conversations (e.g. eagle run's "
                                   "WORKDIR/heldout.jsonl): their prompts, and duplicates of them, are "
                                   "left out.")


def default_aux_layers(num_target_layers: int) -> list[int]:
    """The engines' default capture as 0-based layer outputs [1, N//2-1, N-4] (= the residual
    entering layers [2, N//2, N-3]): what a draft reads when no aux layers are named."""
    n = int(num_target_layers)
    return [1, n // 2 - 1, n - 4]


def aux_layers_field() -> Any:
    return Field(None, description="Three distinct 0-based target layer "
                 "outputs the draft reads, e.g. 1,15,28 (default: the engines' [1, N//2-1, N-4]).")


def check_aux_layers(ids: Optional[list[int]], field: str) -> None:
    if ids is not None and (len(ids) != 3 or len(set(ids)) != 3 or min(ids) < 0):
        raise refuse(field, f"need three distinct non-negative layer ids (got {list(ids)})")


SMALL_TARGET_VOCAB = 64000  # targets with at most this many ids get the small draft vocab
DRAFT_VOCAB_LARGE, DRAFT_VOCAB_SMALL = 32000, 8192


def default_draft_vocab(target_vocab_size: int) -> int:
    """The draft vocabulary size when none is given, the one rule every stage and estimate uses:
    32000 (the anchors' default) for targets with more than 64000 ids, 8192 for smaller ones (the
    size the demo and the peer trainer use for SmolLM2's 49152 ids: a 4x smaller head and logits),
    never more than the target's vocabulary."""
    large = target_vocab_size > SMALL_TARGET_VOCAB
    return min(target_vocab_size, DRAFT_VOCAB_LARGE if large else DRAFT_VOCAB_SMALL)


def draft_vocab(requested: Optional[int], target_vocab_size: int) -> int:
    """The draft vocab size a stage uses: the requested one (at most the target's vocab), else the rule."""
    return min(requested, target_vocab_size) if requested else default_draft_vocab(target_vocab_size)


def draft_vocab_size_field(default: Optional[int] = None) -> Any:
    return Field(default, ge=1, description="Draft vocabulary size Vd: the most frequent target ids under "
                 f"the loss mask (default: {DRAFT_VOCAB_LARGE} for targets with more than {SMALL_TARGET_VOCAB} "
                 f"ids, else {DRAFT_VOCAB_SMALL}; at most the target's vocab).")


def field_like(model: type[BaseModel], name: str, **changes: Any) -> Any:
    """Another model's field (default, bounds, help) for a setting that means the same thing here;
    `changes` (e.g. description=...) override parts of it."""
    return FieldInfo.merge_field_infos(model.model_fields[name], **changes)


def host_field() -> Any:
    return Field("127.0.0.1", min_length=1, description="Bind address (local only by default).")


def checkpoint_field() -> Any:
    return Field("best", description="Of a training run: best (highest held-out τ measured during "
                 "training; the latest when none was), latest, or a step (step-N or N).")
