"""Names on storage: checkpoint folder names and the directory's reserved files."""

from __future__ import annotations

import numbers
import operator
import re
import string
from dataclasses import dataclass, field

from ckptman.errors import InvalidStepError, PolicyConfigError
from ckptman.lease import LEASE_NAME
from ckptman.manifest import MANIFEST_NAME
from ckptman.state import SIDECAR_NAME

LATEST_NAME = "latest"
RESERVED = frozenset({LATEST_NAME, SIDECAR_NAME, MANIFEST_NAME, LEASE_NAME})
MAX_STEP = 2**63 - 1  # steps must fit int64 for every JSON reader and for torch.distributed


def check_step(step: object) -> int:
    """A step as a plain int in [0, 2**63); bools and floats are rejected, numpy ints accepted."""
    if type(step) is int:
        value = step
    elif isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise InvalidStepError(f"step must be a non-negative int, got {step!r} ({type(step).__name__})")
    else:
        value = operator.index(step)
    if not 0 <= value <= MAX_STEP:
        raise InvalidStepError(f"step must be an int in [0, 2**63), got {value}")
    return value


def check_epoch(epoch: object) -> int:
    """Completed epochs as a plain int >= 0; bools and floats are rejected, numpy ints accepted."""
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
        raise InvalidStepError(f"epoch must be a non-negative int (completed epochs), got {epoch!r} ({type(epoch).__name__})")
    value = operator.index(epoch)
    if value < 0:
        raise InvalidStepError(f"epoch must be a non-negative int (completed epochs), got {value}")
    return value


@dataclass(frozen=True)
class NameFormat:
    """``name_format`` validated once, plus the pattern that recognises its folders.

    The pattern is what lets a writable manager clean up its own half-written
    folders without touching anything else a user keeps in the directory
    (TensorBoard logs, configs).
    """

    template: str
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.template, str):
            raise PolicyConfigError(f"name_format must be a string such as 'step_{{step:08d}}', got {self.template!r}")
        regex = []
        fields = 0
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as exc:
            raise PolicyConfigError(f"name_format {self.template!r} is not a valid format string: {exc}") from exc
        for literal, name, _spec, _conversion in parsed:
            regex.append(re.escape(literal))
            if name is None:
                continue
            if name != "step":
                raise PolicyConfigError(f"name_format {self.template!r} may only use the field {{step}}, not {{{name}}}")
            regex.append(rf"(?P<step{fields}>[0-9 ,_+]*[0-9][0-9 ,_+]*)")
            fields += 1
        if fields == 0:
            raise PolicyConfigError(f"name_format {self.template!r} must contain {{step}} so each checkpoint gets its own folder")
        object.__setattr__(self, "pattern", re.compile("".join(regex)))
        samples = [0, 1, 2, 10, 11, 12, 10**9, MAX_STEP]
        names = [self._format(step) for step in samples]
        if len(set(names)) != len(names):
            raise PolicyConfigError(f"name_format {self.template!r} gives the same name to different steps: {names}")
        for name in names:
            if "/" in name or "\\" in name or name.startswith(".") or name in RESERVED:
                raise PolicyConfigError(
                    f"name_format {self.template!r} gives the folder name {name!r}; it must be one path component, "
                    f"not start with '.', not be one of {sorted(RESERVED)}"
                )
            if not self.matches(name):
                raise PolicyConfigError(
                    f"name_format {self.template!r} gives the folder name {name!r}; format the step as decimal "
                    "digits, e.g. 'step_{step:08d}'"
                )

    def _format(self, step: int) -> str:
        try:
            return self.template.format(step=step)
        except (ValueError, TypeError) as exc:
            raise PolicyConfigError(f"name_format {self.template!r} cannot format step {step}: {exc}") from exc

    def __call__(self, step: int) -> str:
        return self._format(step)

    def matches(self, folder: str) -> bool:
        """Whether some step formats to exactly this name (so "step_1" is not ours under "step_{step:08d}")."""
        found = self.pattern.fullmatch(folder)
        if found is None:
            return False
        step = int("".join(c for c in found.group("step0") if c.isdigit()))
        return step <= MAX_STEP and self._format(step) == folder
