"""Dev-only: check that minorpo's ORPO loss, metrics and gradients equal TRL's ORPOTrainer's, on TRL's own batch.

Needs trl, transformers, peft and datasets, which are not minorpo dependencies; nothing imports this file:
    python -m venv .trl-venv && .trl-venv/bin/pip install torch transformers peft trl datasets \
        tokenizers safetensors pyyaml
    .trl-venv/bin/python scripts/check_trl.py

Written for trl 1.16 (ORPOTrainer lives in trl.experimental.orpo since trl 0.2x; older versions had it in trl,
and the import below tries both), transformers 5. What it does, for a small random Qwen3 and Qwen2 model:
  1. builds TRL's ORPOTrainer on a handful of the embedded synthetic pairs (minorpo.tiny: text, with minorpo's
     tiny tokenizer) and lets TRL tokenize them and collate them (tokenize_row, DPODataCollatorWithPadding);
  2. feeds that batch to TRL's get_batch_loss_metrics, and the same token rows to minorpo's step.train_step
     with loss.sft_tokens: prompt_and_response (batches.collate(..., prompt_loss=True): train.py's
     train_collate), in both layouts (padded and packed), plus the per-pair odds-ratio loss of each;
  3. prints the largest |difference| of each quantity and of the gradients, and exits 1 if one exceeds 1e-5.

TRL's metric names, and minorpo's for the same quantity (TRL's names are historical, mind the two log odds):
    loss                 total_loss      L_SFT + lambda * L_OR (TRL: nll_loss - mean(beta * log sigma(log OR)))
    nll_loss             sft_loss        mean NLL over the chosen rows' tokens, prompt included
    log_odds_chosen      log_odds_ratio  the mean log odds ratio
    log_odds_ratio       -orpo_loss      the mean of log sigma(log OR), i.e. -L_OR
    rewards/accuracies   pref_accuracy   share of pairs with log P(chosen) > log P(rejected), i.e. log OR > 0
    logps/chosen         chosen_logps    mean per-token log-prob of the chosen responses (same for rejected)
    -losses / beta       (per pair) L_OR = -log sigma(log OR)
"""
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")  # transformers' and trl's notes about defaults; the numbers are what counts
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minorpo import batches, checkpoint, loss, packing, step, tiny  # noqa: E402
from minorpo.model import ModelConfig  # noqa: E402

LAMBDA, PAIRS, TOLERANCE = 0.25, 6, 1e-5
SMALL = dict(vocab_size=tiny.TINY_MODEL["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
             tie_word_embeddings=False)
CONFIGS = {"qwen3": ModelConfig(model_type="qwen3", head_dim=32, **SMALL),
           "qwen2": ModelConfig(model_type="qwen2", **SMALL)}  # qwen2: q/k/v biases


def import_trl():
    try:
        import datasets
        import transformers
        import trl
        try:
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        except ImportError:  # trl before the move to trl.experimental
            from trl import ORPOConfig, ORPOTrainer
    except ImportError as missing:
        sys.exit(f"scripts/check_trl.py needs trl, transformers, peft and datasets (see its docstring): {missing}")
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets, transformers, trl, ORPOConfig, ORPOTrainer


class KeepGradients(torch.optim.Optimizer):
    """An 'optimizer' whose step keeps a copy of every gradient and changes nothing: train_step's gradients."""

    def __init__(self, named):
        self.names = {p: name for name, p in named}
        super().__init__(list(self.names), {})
        self.grads = {}

    def step(self, closure=None):
        self.grads = {self.names[p]: p.grad.detach().clone() for p in self.names if p.grad is not None}


def random_model(cfg, folder):
    """minorpo's Qwen with every parameter random (norm gains and biases too), written as a checkpoint folder."""
    from minorpo.model import Qwen
    model = Qwen(cfg, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():  # norm gains about 1, everything else about 0
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + ("norm" in name))
    checkpoint.write_model(model, folder, dtype=torch.float32)
    tiny.build_tokenizer().save(os.path.join(folder, "tokenizer.json"))


def trl_side(folder, libs):
    """TRL's batch (its own tokenization and collation), its metrics, per-pair L_OR and gradients."""
    datasets, transformers, _, ORPOConfig, ORPOTrainer = libs
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"),
                                                     eos_token="<|im_end|>", pad_token="<|endoftext|>")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager")
    rows = datasets.Dataset.from_list(tiny.make_pairs(PAIRS, seed=3))
    with tempfile.TemporaryDirectory() as out:
        args = ORPOConfig(output_dir=out, beta=LAMBDA, max_length=256, report_to=[], per_device_train_batch_size=PAIRS,
                          use_cpu=True, disable_dropout=True)
        trainer = ORPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    features = [trainer.train_dataset[i] for i in range(PAIRS)]
    batch = trainer.data_collator(features)
    model.train()
    model.zero_grad()
    total, metrics = trainer.get_batch_loss_metrics(model, batch, train_eval="train")
    total.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        chosen_logps, rejected_logps = trainer.concatenated_forward(model, batch)[:2]
        per_pair = -trainer.odds_ratio_loss(chosen_logps, rejected_logps)[0] / LAMBDA
    metrics = {**metrics, "loss": total.item()}
    examples = [{key: f[key] for key in batches.PAIR_KEYS} for f in features]  # the very token rows TRL trains on
    return examples, metrics, per_pair, grads


def minorpo_side(folder, examples, layout):
    """minorpo's metrics (step.train_step, as train.py runs it), per-pair L_OR and gradients on the same rows."""
    model = checkpoint.load_model(folder, dtype=torch.float32)
    model.train()
    scorer = step.ResponseLogps(model, chunk_size=7)
    collate = packing.collate_for(layout, pad_id=0, max_length=256, prompt_loss=True)  # train.py's train_collate
    optimizer = KeepGradients(model.named_parameters())
    metrics = step.train_step(scorer, optimizer, [collate(examples)], "orpo", LAMBDA, "mean", max_grad_norm=0.0)
    with torch.no_grad():
        batch = batches.collate(examples, 0)
        token_logps, mask = scorer(**batch)
        seq = loss.sequence_logps(token_logps, mask)
        per_pair = loss.odds_ratio_loss(seq[:len(examples)], seq[len(examples):])[0]
    return metrics, per_pair, optimizer.grads


def main():
    libs = import_trl()
    print(f"trl {libs[2].__version__}, transformers {libs[1].__version__}, torch {torch.__version__}; "
          f"lambda (TRL's beta) {LAMBDA}, {PAIRS} pairs")
    worst = 0.0
    for name, cfg in CONFIGS.items():
        with tempfile.TemporaryDirectory() as folder:
            random_model(cfg, folder)
            examples, trl_metrics, trl_per_pair, trl_grads = trl_side(folder, libs)
            assert all(ex["chosen_labels"][0] == batches.IGNORE_INDEX for ex in examples)  # a prompt, then answers
            for layout in ("padded", "packed"):
                ours, per_pair, grads = minorpo_side(folder, examples, layout)
                pairs = [("loss / total_loss", trl_metrics["loss"], ours["total_loss"]),
                         ("nll_loss / sft_loss", trl_metrics["nll_loss"], ours["sft_loss"]),
                         ("log_odds_chosen / log_odds_ratio", trl_metrics["log_odds_chosen"], ours["log_odds_ratio"]),
                         ("log_odds_ratio / -orpo_loss", trl_metrics["log_odds_ratio"], -ours["orpo_loss"]),
                         ("rewards/accuracies / pref_accuracy", trl_metrics["rewards/accuracies"],
                          ours["pref_accuracy"]),
                         ("logps/chosen / chosen_logps", trl_metrics["logps/chosen"], ours["chosen_logps"]),
                         ("logps/rejected / rejected_logps", trl_metrics["logps/rejected"], ours["rejected_logps"]),
                         ("per-pair L_OR (-losses / beta)", 0.0, (trl_per_pair - per_pair).abs().max().item())]
                common = sorted(set(trl_grads) & set(grads))
                assert len(common) == len(grads) == len(trl_grads), "parameter names differ"
                grad_diff = max((trl_grads[k] - grads[k]).abs().max().item() for k in common)
                scale = max(g.abs().max().item() for g in grads.values())
                print(f"{name}, {layout} layout: TRL's nll_loss {trl_metrics['nll_loss']:.6f}, "
                      f"loss {trl_metrics['loss']:.6f}")
                for label, theirs, mine in pairs:
                    diff = abs(theirs - mine)
                    worst = max(worst, diff)
                    print(f"  {label:<38} max |diff| {diff:.2e}")
                print(f"  {'gradients (' + str(len(common)) + ' tensors)':<38} max |diff| {grad_diff:.2e} "
                      f"(largest gradient {scale:.2e})")
                worst = max(worst, grad_diff)
    print("OK" if worst <= TOLERANCE else f"MISMATCH: {worst:.2e} > {TOLERANCE}")
    sys.exit(0 if worst <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
