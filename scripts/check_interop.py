"""Dev-only: check that minorpo's adapters and models load in transformers/PEFT; needs transformers and peft.

It compares logits: what minorpo writes must give the same outputs there as in minorpo.

transformers and peft are not minorpo dependencies, and no test imports this file:
    pip install transformers peft && python scripts/check_interop.py

For a tiny random Qwen3 and Qwen2 model it wraps LoRA (random B, so the adapter does something), then
  1. saves the adapter (PEFT layout) and loads it with peft.PeftModel onto transformers' model of the
     same base checkpoint;
  2. merges it and saves a checkpoint folder, loaded with transformers' AutoModelForCausalLM;
and prints the max |logit difference| of each against minorpo's own forward pass (fp32).
"""
import argparse
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's note; minorpo needs no NumPy
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minorpo import checkpoint, lora  # noqa: E402
from minorpo.model import ModelConfig, Qwen  # noqa: E402

CONFIGS = {
    "qwen3": ModelConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, model_type="qwen3",
                         max_position_embeddings=64, tie_word_embeddings=True),
    "qwen2": ModelConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, model_type="qwen2",
                         max_position_embeddings=64, tie_word_embeddings=False),
}


def main():
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError as missing:
        sys.exit(f"scripts/check_interop.py needs transformers and peft (pip install transformers peft): {missing}")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for name, cfg in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            base_dir, adapter_dir, merged_dir = (os.path.join(tmp, d) for d in ("base", "adapter", "merged"))
            model = Qwen(cfg, seed=1)
            os.makedirs(base_dir)
            checkpoint.write_model(model, base_dir, dtype=torch.float32)
            lora.inject_lora(model, 4, 8.0, targets=["gate_proj", "up_proj", "down_proj"],
                             attn_targets=["q_proj", "k_proj", "v_proj", "o_proj"], start_layer=1)
            g = torch.Generator().manual_seed(2)
            with torch.no_grad():
                for m in lora.lora_layers(model).values():
                    m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
                ours = model(ids)
            lora.save_adapter(model, adapter_dir, base_model_name=base_dir)
            lora.merge_lora(model)
            os.makedirs(merged_dir)
            checkpoint.write_model(model, merged_dir, dtype=torch.float32)

            hf_base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
            peft_model = PeftModel.from_pretrained(hf_base, adapter_dir).eval()
            merged = AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32).eval()
            with torch.no_grad():
                d_peft = (peft_model(ids).logits - ours).abs().max().item()
                d_merged = (merged(ids).logits - ours).abs().max().item()
                with peft_model.disable_adapter():  # so the check cannot pass with an adapter that does nothing
                    effect = (peft_model(ids).logits - ours).abs().max().item()
            print(f"{name}: PEFT adapter on transformers {d_peft:.2e}, merged checkpoint in transformers "
                  f"{d_merged:.2e} (the adapter itself moves the logits by {effect:.2e})")
            worst = max(worst, d_peft, d_merged, float("inf") if effect < 1e-3 else 0.0)
    print("OK" if worst < 1e-5 else "MISMATCH")
    sys.exit(0 if worst < 1e-5 else 1)


if __name__ == "__main__":
    main()
