"""Form rows bound to a dotted `RunConfig` path (e.g. "train.lr"): label, control, hint line.

A row parses its control's text into the config value and writes it into the config as soon as it is
valid (validation as you type); an invalid row keeps the last good value and says why in red.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.validation import Function, Integer, Number, ValidationResult, Validator
from textual.widgets import Input, Label, Select, Static, Switch

URL_RE = re.compile(r"^https?://[^\s/]+")


def _setting(path: str) -> tuple[Any, Any]:
    """(the model that holds a RunConfig setting, the setting's field info), or (None, None)."""
    from core.runconfig import RunConfig

    model: Any = RunConfig
    owner, info = None, None
    for part in path.split("."):
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            return None, None
        owner, model = model, info.annotation
    return owner, info


def field_bounds(path: str, integer: bool) -> tuple[float | None, float | None]:
    """(minimum, maximum) of a RunConfig setting, read from its model in core (the one place bounds
    live); an exclusive float bound is shown as the limit and refused by the config check."""
    _, info = _setting(path)
    if info is None:
        return None, None
    lo = hi = None
    for m in info.metadata:
        if getattr(m, "ge", None) is not None:
            lo = m.ge
        if getattr(m, "gt", None) is not None:
            lo = m.gt + 1 if integer else m.gt
        if getattr(m, "le", None) is not None:
            hi = m.le
        if getattr(m, "lt", None) is not None:
            hi = m.lt - 1 if integer else m.lt
    return lo, hi


def parse_setting(path: str, text: str) -> Any:
    """`text` validated and converted by the setting's own model in core (its validators are the one
    place the rules live); raises ValueError with the model's message."""
    from pydantic import ValidationError

    owner, _ = _setting(path)
    field = path.rsplit(".", 1)[-1]
    try:  # validate_assignment runs exactly this field's validators on a value-less instance
        done = owner.__pydantic_validator__.validate_assignment(owner.model_construct(), field, text)
    except ValidationError as e:
        raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None
    return getattr(done, field)


def setting_problem(path: str, text: str) -> str | None:
    try:
        parse_setting(path, text)
    except ValueError as e:
        return str(e)
    return None


def get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(obj: Any, path: str, value: Any) -> None:
    *head, last = path.split(".")
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)


class FormInput(Input):
    """An Input whose cursor blink follows the App (off in tests and snapshots)."""

    def on_mount(self) -> None:
        self.cursor_blink = getattr(self.app, "cursor_blink", True)


class FieldChanged(Message):
    """A bound row wrote a new value into the config (or became invalid)."""

    def __init__(self, row: "FieldRow") -> None:
        super().__init__()
        self.row = row


class FieldRow(Horizontal):
    """One labelled control bound to a config path.

    kind: str | optstr | int | optint | float | urls | choice | bool | list. Number bounds come from the
    setting's model unless given; a `list` (comma-separated, empty allowed) is checked and converted
    by the setting's model.
    """

    DEFAULT_CSS = """
    FieldRow { height: auto; }
    """

    def __init__(self, path: str, label: str, kind: str = "str", *, hint: str = "",
                 choices: Sequence[tuple[str, Any]] | None = None, minimum: float | None = None,
                 maximum: float | None = None, check: Callable[[str], str | None] | None = None,
                 placeholder: str = "", to_cfg: Callable[[Any], Any] | None = None,
                 from_cfg: Callable[[Any], Any] | None = None, id: str | None = None) -> None:
        super().__init__(id=id or "f-" + path.replace(".", "-"), classes="field")
        self.path, self.label, self.kind, self.hint = path, label, kind, hint
        if minimum is None and maximum is None and kind in ("int", "optint", "float"):
            minimum, maximum = field_bounds(path, integer=kind != "float")
        self.choices, self.minimum, self.maximum, self.check = choices, minimum, maximum, check
        self.placeholder = placeholder
        # optional value transforms, e.g. a "skip" switch shown for `regen.enabled` (inverted)
        self.to_cfg, self.from_cfg = to_cfg or (lambda v: v), from_cfg or (lambda v: v)
        self.error: str | None = None
        self._loading = False

    # ---- building ----------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Label(self.label, classes="field-label")
        if self.kind == "choice":
            yield Select([(str(lbl), val) for lbl, val in self.choices or []], allow_blank=False,
                         id=self.id + "-control", classes="field-control", compact=True)
        elif self.kind == "bool":
            yield Switch(id=self.id + "-control", classes="field-control")
        else:
            yield FormInput(placeholder=self.placeholder, validators=self._validators(),
                            valid_empty=self.kind in ("optint", "optstr", "urls", "list"),
                            id=self.id + "-control", classes="field-control", compact=True)
        yield Static(self.hint, classes="field-hint", id=self.id + "-hint")

    def _validators(self) -> list[Validator]:
        v: list[Validator] = []
        if self.kind in ("int", "optint"):
            v.append(Integer(minimum=self.minimum, maximum=self.maximum,
                             failure_description=self._range_text("a whole number")))
        elif self.kind == "float":
            v.append(Number(minimum=self.minimum, maximum=self.maximum,
                            failure_description=self._range_text("a number")))
        elif self.kind == "urls":
            v.append(Function(lambda s: all(URL_RE.match(u) for u in split_urls(s)),
                              "each server must be an http:// or https:// URL"))
        elif self.kind == "str":
            v.append(Function(lambda s: bool(s.strip()), "must not be empty"))
        elif self.kind == "list":
            v.append(_CheckValidator(lambda s: setting_problem(self.path, s)))
        if self.check is not None:
            v.append(_CheckValidator(self.check))
        return v

    def _range_text(self, what: str) -> str:
        if self.minimum is not None and self.maximum is not None:
            return f"must be {what} from {self.minimum:g} to {self.maximum:g}"
        if self.minimum is not None:
            return f"must be {what} ≥ {self.minimum:g}"
        return f"must be {what}"

    @property
    def control(self):
        return self.query_one(f"#{self.id}-control")

    # ---- config <-> control ------------------------------------------------------------------
    def load(self, cfg: Any) -> None:
        """Show the config's value (after open / reset) without marking anything invalid."""
        value = self.from_cfg(get_path(cfg, self.path))
        self._loading = True
        try:
            c = self.control
            if self.kind == "choice":
                c.value = value
            elif self.kind == "bool":
                c.value = bool(value)
            elif self.kind == "urls":
                c.value = ", ".join(value or [])
            elif self.kind == "list":
                c.value = ",".join(map(str, value or []))
            elif value is None:
                c.value = ""
            elif self.kind == "float":
                c.value = f"{value:g}"
            else:
                c.value = str(value)
        finally:
            self._loading = False
        self.error = None
        self.show_hint()

    def parse(self, text: str) -> Any:
        s = text.strip()
        if self.kind in ("int", "optint"):
            return int(s) if s else None
        if self.kind == "float":
            return float(s)
        if self.kind == "urls":
            return split_urls(s)
        if self.kind == "list":
            return parse_setting(self.path, s)
        if self.kind == "optstr":
            return s or None
        return s

    def _commit(self, cfg: Any, value: Any) -> None:
        set_path(cfg, self.path, self.to_cfg(value))

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        if self._loading:
            return
        result: ValidationResult | None = event.validation_result
        if result is not None and not result.is_valid:
            self.error = "; ".join(result.failure_descriptions) or "invalid"
        else:
            self.error = None
            self._commit(self.app.config, self.parse(event.value))
        self.show_hint()
        self.post_message(FieldChanged(self))

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        if self._loading or event.value is Select.NULL:
            return
        self._commit(self.app.config, event.value)
        self.post_message(FieldChanged(self))

    def on_switch_changed(self, event: Switch.Changed) -> None:
        event.stop()
        if self._loading:
            return
        self._commit(self.app.config, event.value)
        self.post_message(FieldChanged(self))

    def show_hint(self) -> None:
        hint = self.query_one(f"#{self.id}-hint", Static)
        hint.update(self.error or self.hint)
        hint.set_class(self.error is not None, "-error")


class _CheckValidator(Validator):
    """Wraps `check(text) -> problem or None` so the problem text is the failure description."""

    def __init__(self, check: Callable[[str], str | None]) -> None:
        super().__init__()
        self.check = check

    def validate(self, value: str) -> ValidationResult:
        problem = self.check(value)
        return self.success() if problem is None else self.failure(problem)


def split_urls(text: str) -> list[str]:
    return [u for u in re.split(r"[,\s]+", text.strip()) if u]


