"""Step counters that the host knows without reading the device.

A module that counts its training forwards in a buffer (a checkpointed int64 scalar, on the GPU with the module) and
needs the count on the host (to seed a generator, to decide which steps look for dead codes) would read it every
step: a device-to-host sync. Instead the host keeps a mirror per buffer object, written by `advance`, and the buffer
is read only for a buffer never seen (a new module, or `.to()`, which makes new buffer objects) or after the owning
module dropped the mirror with `forget` (its load_state_dict hook: a loaded checkpoint rewrites the buffer in place).
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

_MIRRORS = WeakIdKeyDictionary()  # buffer -> its value, as the host last wrote it


def read(counter: torch.Tensor) -> int:
    """The counter's value; a device read only when there is no mirror."""
    value = _MIRRORS.get(counter)
    return int(counter) if value is None else value


def advance(counter: torch.Tensor) -> int:
    """counter += 1 on its device -> the new value, from the mirror."""
    value = read(counter) + 1
    counter.add_(1)
    _MIRRORS[counter] = value
    return value


def forget(counter: torch.Tensor) -> None:
    """The buffer was written by something else (a loaded state dict): read it again next time."""
    _MIRRORS.pop(counter, None)
