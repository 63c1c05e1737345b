"""medcot.unsloth_trainers on CPU: the import hook that leaves Unsloth rewriting TRL's SFT trainer alone.

Unsloth cannot be imported without a GPU; its part is tests/test_gpu.py's
test_unsloth_rewrites_trls_sft_trainer_alone_unless_told_otherwise. Here a package laid out as Unsloth's is
(a module that rewrites trainers, called by the package while it is being imported) is imported for real.
"""

from __future__ import annotations

import logging
import sys
import textwrap

import pytest

from medcot import unsloth_trainers
from medcot.unsloth_trainers import AfterImport, sft_only

REWRITER = """
CALLS = []

def _patch_trl_rl_trainers(trainer_file="grpo_trainer"):
    CALLS.append(trainer_file)

def patch_trl_rl_trainers():
    for name in ("dpo_trainer", "grpo_trainer", "sft_trainer"):
        _patch_trl_rl_trainers(name)

def PatchFastRL():
    patch_trl_rl_trainers()
"""


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package `fakeunsloth` whose import runs `fakeunsloth.models.rl.PatchFastRL()`, as `import unsloth` does."""
    root = tmp_path / "fakeunsloth"
    (root / "models").mkdir(parents=True)
    (root / "__init__.py").write_text("from .models.rl import PatchFastRL\nPatchFastRL()\n")
    (root / "models" / "__init__.py").write_text("")
    (root / "models" / "rl.py").write_text(textwrap.dedent(REWRITER))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(unsloth_trainers, "MODULE", "fakeunsloth.models.rl")
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    yield root
    for name in [n for n in sys.modules if n.split(".")[0] == "fakeunsloth"]:
        del sys.modules[name]


def test_only_the_sft_trainer_is_rewritten_when_the_package_is_imported(package, monkeypatch, caplog):
    monkeypatch.delenv("MEDCOT_UNSLOTH_SFT_ONLY", raising=False)
    caplog.set_level(logging.INFO, logger="medcot.unsloth_trainers")
    assert sft_only() is True
    assert sft_only() is True and sum(isinstance(f, AfterImport) for f in sys.meta_path) == 1  # one hook, not two
    import fakeunsloth.models.rl as rl

    assert rl.CALLS == ["sft_trainer"]
    assert "rewriting TRL's sft_trainer only" in caplog.text
    assert not any(isinstance(f, AfterImport) for f in sys.meta_path)  # it removes itself once used


def test_medcot_unsloth_sft_only_0_keeps_every_trainer_rewritten(package, monkeypatch):
    monkeypatch.setenv("MEDCOT_UNSLOTH_SFT_ONLY", "0")
    assert sft_only() is False
    import fakeunsloth.models.rl as rl

    assert rl.CALLS == ["dpo_trainer", "grpo_trainer", "sft_trainer"]


def test_an_already_imported_rewriter_is_left_as_it_is(package, monkeypatch):
    monkeypatch.delenv("MEDCOT_UNSLOTH_SFT_ONLY", raising=False)
    import fakeunsloth.models.rl as rl

    assert sft_only() is False and not any(isinstance(f, AfterImport) for f in sys.meta_path)
    assert rl.CALLS == ["dpo_trainer", "grpo_trainer", "sft_trainer"]


def test_a_rewriter_without_the_two_functions_is_left_as_it_is_and_the_log_says_so(package, monkeypatch, caplog):
    monkeypatch.delenv("MEDCOT_UNSLOTH_SFT_ONLY", raising=False)
    (package / "models" / "rl.py").write_text("CALLS = []\n\ndef PatchFastRL():\n    CALLS.append('all')\n")
    caplog.set_level(logging.INFO, logger="medcot.unsloth_trainers")
    assert sft_only() is True
    import fakeunsloth.models.rl as rl

    assert rl.CALLS == ["all"]
    assert "every TRL trainer is rewritten as Unsloth does it" in caplog.text
