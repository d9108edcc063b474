"""Exception types, each also deriving from the built-in a caller would naturally catch, and `few()` for
the lists their messages quote."""


class LoRAError(Exception):
    """Base class of every error hf_lora raises on purpose."""


class TargetModulesError(LoRAError, ValueError):
    """`target_modules` / `modules_to_save` / layer selection does not fit the model."""


class AdapterNotFoundError(LoRAError, FileNotFoundError):
    """No adapter at the given path or Hub repo (or a file of it is missing)."""


class AdapterFormatError(LoRAError, ValueError):
    """Adapter files exist but cannot be used: corrupted, truncated, unsafe, or made for another model."""


class AdapterStateError(LoRAError, RuntimeError):
    """The call does not fit the model's current adapter state (unknown adapter name, already wrapped, ...)."""


class HubAccessError(LoRAError, PermissionError):
    """The Hub refused the credentials (bad or missing token, or no write access to that namespace)."""


class HubError(LoRAError, OSError):
    """The Hub answered a request with an error of its own (HTTP 5xx, or a refusal other than access)."""


def few(names: list[str], n: int = 6) -> str:
    """At most `n` names for a message, and how many more there are (never "and 1 more")."""
    if len(names) <= n:
        return ", ".join(names)
    return ", ".join(names[: n - 1]) + f" and {len(names) - n + 1} more"
