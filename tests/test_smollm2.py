"""The embedded default, for real: SmolLM2-135M-Instruct learns the sample's format on CPU."""

import pytest
import torch

from medcot.config import load_config
from medcot.data import prepare
from medcot.evaluate import heldout_token_losses
from medcot.modeling import load_with_adapter, resolve_model_path, select_backend
from medcot.training import train_stage

from conftest import ROOT

pytestmark = pytest.mark.slow


def mean_loss(pairs):
    return sum(s for s, _ in pairs) / sum(n for _, n in pairs)


def test_demo_training_lowers_the_heldout_loss_and_the_adapter_loads_with_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = load_config(ROOT / "configs" / "demo.yaml", [f"output_dir={tmp_path}", "training.max_steps=8",
                                                          "training.save_steps=4"])
    runtime = select_backend(config.model)
    model, tok = load_with_adapter(config, runtime, None)
    heldout = prepare(config.data, tok, config.model.max_seq_length).heldout[:8]
    before = mean_loss(heldout_token_losses(model, tok, heldout, batch_size=4))

    assert train_stage(config, runtime) == 0
    adapter = config.run_dir / "train" / "adapter"
    model, tok = load_with_adapter(config, runtime, adapter)
    after = mean_loss(heldout_token_losses(model, tok, heldout, batch_size=4))
    print(f"SmolLM2 held-out loss: before {before:.4f}, after {after:.4f}")
    assert after < before - 0.05

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(config.model.name), dtype=torch.float32)
    assert isinstance(PeftModel.from_pretrained(base, adapter), PeftModel)
