"""`import unsloth` rewrites only TRL's SFT trainer, the one medcot trains with.

When Unsloth is imported, its `PatchFastRL` builds a patched copy of every trainer that TRL ships: SFT, DPO, GRPO,
KTO, reward, RLOO, distillation and the experimental ones. For each, it rewrites the source, compiles it and imports
it. medcot uses SFTTrainer alone, so before the import, `sft_only()` arranges for the module that does the rewriting
(`unsloth.models.rl`) to get a `patch_trl_rl_trainers` that rewrites `sft_trainer` only, through Unsloth's own
function for one trainer. Everything else Unsloth patches stays as it is. On an H200, `select_backend` took 8.4-11.5 s
this way and 13.0-17.7 s with every trainer rewritten: 2.6-6.6 s less in each of three pairs (bench/import_cost.py).

If Unsloth no longer has these two functions, nothing is changed and the log says so. MEDCOT_UNSLOTH_SFT_ONLY=0 keeps
Unsloth's own walk over all trainers.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType

log = logging.getLogger(__name__)

MODULE = "unsloth.models.rl"  # where Unsloth rewrites TRL's trainers
TRAINER = "sft_trainer"


class AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then(module)` once, right after the module `name` has executed and before anything else can import
    names from it. It finds the module as Python would (the path finder) and adds its step to that module's loader."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; the lookup below does not come back here
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute, then = spec.loader.exec_module, self.then

        def exec_module(module: ModuleType) -> None:
            execute(module)
            then(module)

        spec.loader.exec_module = exec_module  # this spec's own loader object: no other module is touched
        return spec


def _sft_only(rl: ModuleType) -> None:
    one = getattr(rl, "_patch_trl_rl_trainers", None)
    if not callable(getattr(rl, "patch_trl_rl_trainers", None)) or not callable(one):
        log.info("unsloth: %s has no patch_trl_rl_trainers / _patch_trl_rl_trainers; every TRL trainer is "
                 "rewritten as Unsloth does it", rl.__name__)
        return

    def patch_trl_rl_trainers() -> None:
        one(TRAINER)

    rl.patch_trl_rl_trainers = patch_trl_rl_trainers
    log.info("unsloth: rewriting TRL's %s only, not every trainer TRL ships (MEDCOT_UNSLOTH_SFT_ONLY=0: all)", TRAINER)


def sft_only() -> bool:
    """Call before `import unsloth`. Whether the restriction is in place: not when MEDCOT_UNSLOTH_SFT_ONLY=0 or when
    Unsloth's module is already imported (its trainers are rewritten by then)."""
    if os.environ.get("MEDCOT_UNSLOTH_SFT_ONLY", "1") == "0" or MODULE in sys.modules:
        return False
    if not any(isinstance(f, AfterImport) and f.name == MODULE for f in sys.meta_path):
        sys.meta_path.insert(0, AfterImport(MODULE, _sft_only))
    return True
