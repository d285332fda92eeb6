"""Dataset registrations; importing a module registers its datasets (data is prepared on use)."""

from . import shapes  # noqa: F401
