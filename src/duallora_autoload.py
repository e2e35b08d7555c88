"""Register duallora's methods with peft whenever peft is imported, so an adapter loads without ``import duallora``.

The wheel installs ``duallora-autoload.pth`` beside it; Python's ``site`` runs that file's one line,
``import duallora_autoload``, at every interpreter start. This module must therefore cost nothing measurable: it
imports only ``os`` and ``sys`` (loaded at start-up already) and adds one finder to ``sys.meta_path``. The finder
answers no import but peft's: it lets the other finders find peft, and has peft's loader import duallora right after
peft's ``__init__`` has run (duallora needs a complete peft). It removes itself when peft's module is executed, not
when peft is looked up: ``importlib.util.find_spec("peft")`` (transformers' ``is_peft_available()`` in every
``from_pretrained``, and ``import trl``) looks peft up without importing it, and the import that follows must still
find the hook.

Set ``DUALLORA_NO_AUTOLOAD=1`` (or ``true``, ``yes``, ``on``) to switch it off; ``import duallora`` still registers
the methods.
"""

import os
import sys

SWITCH_OFF_VARIABLE = "DUALLORA_NO_AUTOLOAD"


class PeftImportHook:
    """A ``sys.meta_path`` finder that finds nothing itself and wraps the loader of the top-level ``peft``."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname == "bitsandbytes":  # transformers can import it before peft does
            quiet_missing_kernels_message()
            return None
        if fullname != "peft":
            return None
        quiet_missing_kernels_message()  # peft imports bitsandbytes, which logs it then
        for finder in sys.meta_path:
            if finder is cls:  # the lookup is the other finders': this one would answer itself forever
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            _register_after(spec.loader)
        return spec


def _register_after(loader) -> None:
    """Make this loader instance (peft's alone: finders make one per module) import duallora after peft ran. The hook
    leaves ``sys.meta_path`` here, when peft is imported for real (once per process), not at a mere look-up."""
    exec_peft = loader.exec_module

    def exec_module(module):
        uninstall()
        exec_peft(module)
        import_duallora()

    loader.exec_module = exec_module  # on the instance, so peft's __loader__ and __spec__ stay peft's own


def import_duallora() -> None:
    """Import duallora; a failure warns (naming the cause) instead of breaking ``import peft`` for other methods."""
    try:
        import duallora  # noqa: F401
    except Exception as error:  # noqa: BLE001  (any failure: peft must still import for LoRA and the rest)
        import warnings

        warnings.warn(
            f"duallora is installed but could not register Dual LoRA and D2-LoRA with peft ({type(error).__name__}: "
            f"{error}). Adapters of these methods will not load until this is fixed; `import duallora` shows the "
            f"whole error. Set {SWITCH_OFF_VARIABLE}=1 to stop this automatic registration.",
            RuntimeWarning,
            stacklevel=2,
        )


KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def keep_record(record) -> bool:
    """A logging filter: False only for bitsandbytes' message whose cause is that ``kernels`` is not installed."""
    cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
    missing_kernels = isinstance(cause, ModuleNotFoundError) and cause.name == "kernels"
    return not (missing_kernels and isinstance(record.msg, str) and record.msg.startswith(KERNELS_MESSAGE))


def quiet_missing_kernels_message() -> None:
    """Drop bitsandbytes' one warning that its optional ``kernels`` package is not installed (idempotent).

    On CPUs with AVX512-BF16, importing bitsandbytes (which peft does, for every method and every run) logs "Failed
    to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'". It is harmless: bitsandbytes
    then uses its own CPU kernel, and ``kernels`` would fetch code from the Hugging Face Hub. Only that cause is
    dropped; the same message for any other cause (``kernels`` installed but failing) still shows.
    """
    import logging  # here, not at the top: logging is not loaded at start-up, and this runs only with peft

    logger = logging.getLogger(KERNELS_LOGGER)
    if keep_record not in logger.filters:
        logger.addFilter(keep_record)


def switched_off() -> bool:
    """``DUALLORA_NO_AUTOLOAD`` set to a word that means yes (1, true, yes, on); 0, false, no, off or empty keep the
    hook (any other value switches it off too, and says so: a typo must not pass unnoticed)."""
    value = os.environ.get(SWITCH_OFF_VARIABLE, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value not in ("1", "true", "yes", "on"):
        sys.stderr.write(f"duallora: {SWITCH_OFF_VARIABLE}={os.environ[SWITCH_OFF_VARIABLE]!r} is not 1/true/yes/on "
                         "or 0/false/no/off; taken as switched off.\n")
    return True


def install() -> None:
    """Put the finder first on ``sys.meta_path`` unless switched off or peft is imported already."""
    if switched_off():
        return
    if "peft" in sys.modules:
        import_duallora()
    elif PeftImportHook not in sys.meta_path:
        sys.meta_path.insert(0, PeftImportHook)


def uninstall() -> None:
    """Take the finder off ``sys.meta_path`` (harmless when it is not there)."""
    if PeftImportHook in sys.meta_path:
        sys.meta_path.remove(PeftImportHook)


install()
