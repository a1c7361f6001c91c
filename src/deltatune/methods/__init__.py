"""Every method module, imported explicitly so registration never depends on import order elsewhere."""

from . import dora, lora  # noqa: F401
