"""What the nodes check of what is connected to them (combo values, numbers, one value per input), and how a
node's validator reports a check. Every message names the node that speaks (`node`: its display name)."""
from __future__ import annotations

import math
from typing import Sequence


def validation_result(check, *args, **kwargs):
    """A node's `validate_inputs` answer: True, or the check's error message (the host shows it for the input and
    runs nothing). The host then skips its own check of those inputs, whose message would not say what to do."""
    try:
        check(*args, **kwargs)
    except (ValueError, FileNotFoundError) as error:
        return str(error)
    return True


def first(value):
    """A validator's or fingerprint's value: a list of one under is_input_list (a plain value when called directly)."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def check_choices(options: dict[str, Sequence[str]], **values) -> None:
    """Combo values as the node lists them (`options`: input name -> its choices); a workflow saved by an older
    version may hold shifted ones. None is an input the validator does not know yet (linked to another node)."""
    for name, value in values.items():
        if value is not None and value not in options[name]:
            raise ValueError(f"{name} {value!r} is not one of {list(options[name])} (a workflow saved by an older "
                             "version may hold shifted values): pick one of those on the node, then queue again.")


def check_number(node: str, name: str, value: float, low: float, high: float) -> float:
    """A FLOAT input within its range: the host's min/max check lets NaN through (every comparison with it is false),
    and a hand-edited or API-made prompt can hold anything."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high):
        raise ValueError(f"{node}: {name} is {value!r}; it must be a number from {low:g} to {high:g}. Type one on the "
                         "node.")
    return float(value)


def single_values(inputs: dict, node: str, lists: str) -> dict:
    """A node that takes its inputs as lists (photos may be a list of different sizes): every input but those named
    in `lists` must hold one value, as one identity is trained per run."""
    for name, values in inputs.items():
        if len(values) != 1:
            raise ValueError(f"'{name}' received a list of {len(values)} values, but {node} trains one identity per "
                             f"run from one set of settings. Connect a single value to '{name}'; only {lists} take "
                             "lists (several photos of one subject).")
    return {name: values[0] for name, values in inputs.items()}
