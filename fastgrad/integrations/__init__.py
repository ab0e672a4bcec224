"""Trainer integrations: a Lightning callback and a HuggingFace ``transformers`` callback.

Each lives in its own module and imports its framework there, so
``import fastgrad`` never needs them::

    from fastgrad.integrations.lightning import FastgradCallback
    from fastgrad.integrations.transformers import FastgradTrainerCallback
"""

__all__ = ["FastgradCallback", "FastgradTrainerCallback"]


def __getattr__(name: str):
    if name == "FastgradCallback":
        from .lightning import FastgradCallback
        return FastgradCallback
    if name == "FastgradTrainerCallback":
        from .transformers import FastgradTrainerCallback
        return FastgradTrainerCallback
    raise AttributeError(name)
