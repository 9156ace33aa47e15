"""Checkpoints: both config.json spellings, single and sharded weights and both dtypes load; every bad
folder gives its named error; Hub ids resolve from the local cache; save -> load round-trips, atomically."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from minorpo.checkpoint import CheckpointError, load_model, load_model_config, resolve, write_model
from minorpo.files import UserError, atomic_folder, save_safetensors
from minorpo.model import ModelConfig, Qwen

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
QWEN2, QWEN3 = os.path.join(FIXTURES, "qwen2-tiny"), os.path.join(FIXTURES, "qwen3-tiny")


def save_model(model, folder, tokenizer_from=None, dtype=None):
    """A checkpoint folder written atomically, as train.py writes final/."""
    with atomic_folder(folder) as tmp:
        write_model(model, tmp, tokenizer_from, dtype)


def reference(folder):
    return load_file(folder + ".reference.safetensors")


def copy_fixture(tmp_path, folder=QWEN2):
    dest = tmp_path / os.path.basename(folder)
    shutil.copytree(folder, dest)
    return str(dest)


def edit_weights(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    tensors = {name: t.clone() for name, t in load_file(path).items()}  # not views of the file we rewrite
    edit(tensors)
    save_safetensors(tensors, path)


def test_both_config_spellings_are_read():
    qwen2 = load_model_config(QWEN2)  # transformers 4: rope_theta, torch_dtype
    assert json.load(open(os.path.join(QWEN2, "config.json")))["rope_theta"] == 1e6
    assert (qwen2.model_type, qwen2.rope_theta, qwen2.head_dim, qwen2.attention_bias, qwen2.tie_word_embeddings) \
        == ("qwen2", 1e6, 8, True, True)
    qwen3 = load_model_config(QWEN3)  # transformers 5: rope_parameters.rope_theta, dtype
    assert "rope_theta" not in json.load(open(os.path.join(QWEN3, "config.json")))
    assert (qwen3.model_type, qwen3.rope_theta, qwen3.head_dim, qwen3.attention_bias, qwen3.tie_word_embeddings) \
        == ("qwen3", 5e5, 16, False, False)


def test_sharded_untied_and_single_file_tied_checkpoints_load():
    assert os.path.isfile(os.path.join(QWEN3, "model.safetensors.index.json"))
    qwen3 = load_model(QWEN3)
    assert qwen3.lm_head.weight is not qwen3.model.embed_tokens.weight
    qwen2 = load_model(QWEN2)
    assert qwen2.lm_head.weight is qwen2.model.embed_tokens.weight  # still one Parameter after loading
    assert len(list(qwen2.parameters())) == len(qwen2.state_dict()) - 1


@pytest.mark.parametrize("folder, stored_dtype", [(QWEN2, torch.bfloat16), (QWEN3, torch.float32)],
                         ids=["qwen2-tiny-bf16", "qwen3-tiny-fp32"])
def test_bf16_checkpoint_loads_into_fp32_and_fp32_into_bf16(folder, stored_dtype):
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors")]
    assert {t.dtype for f in files for t in load_file(f).values()} == {stored_dtype}
    ref = reference(folder)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 0.15)):
        model = load_model(folder, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}
        with torch.no_grad():
            logits = model(ref["input_ids"]).float()
        assert (logits - ref["logits"]).abs().max().item() <= tolerance


@pytest.mark.parametrize("folder", [QWEN2, QWEN3], ids=os.path.basename)
def test_save_then_load_gives_identical_logits(tmp_path, folder):
    model, ids = load_model(folder), reference(folder)["input_ids"]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.json").write_text('{"fake": true}')
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    out = str(tmp_path / "out" / "final")
    save_model(model, out, tokenizer_from=str(tmp_path / "src"))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path / "out")) == ["final"]  # no temporary folder left behind
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids), model(ids), rtol=0, atol=0)
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["architectures"] == [saved["model_type"].capitalize() + "ForCausalLM"]
    assert saved["torch_dtype"] == saved["dtype"] == "float32"
    assert saved["rope_theta"] == saved["rope_parameters"]["rope_theta"] == model.config.rope_theta
    stored = load_file(os.path.join(out, "model.safetensors"))
    assert ("lm_head.weight" in stored) != model.config.tie_word_embeddings


def test_save_in_bf16_and_replace_an_existing_checkpoint(tmp_path):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=3)
    out = str(tmp_path / "ckpt")
    save_model(Qwen(cfg, seed=0), out)
    save_model(Qwen(cfg, seed=1), out, dtype=torch.bfloat16)
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    assert load_model_config(out) == cfg
    expected = Qwen(cfg, seed=1).model.embed_tokens.weight.bfloat16().float()
    assert torch.equal(load_model(out).model.embed_tokens.weight, expected)
    assert os.listdir(tmp_path) == ["ckpt"]


def test_save_over_the_folder_it_was_loaded_from(tmp_path):
    folder = copy_fixture(tmp_path, QWEN3)  # fp32 on disk and in memory: no cast that would copy anyway
    model = load_model(folder)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    save_model(model, folder)
    assert torch.equal(load_model(folder).model.norm.weight, model.model.norm.weight)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]


def test_atomic_folder_leaves_nothing_on_failure_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(str(target)) as tmp:
            open(os.path.join(tmp, "half.txt"), "w").write("half")
            raise RuntimeError("crash while writing")
    assert os.listdir(tmp_path) == ["ckpt"] and os.listdir(target) == ["old.txt"]


def test_saving_a_model_that_is_not_a_plain_qwen_is_refused(tmp_path):
    model = load_model(QWEN3)
    model.model.layers[0].mlp.gate_proj = torch.nn.Sequential(model.model.layers[0].mlp.gate_proj)  # a "wrapper"
    with pytest.raises(CheckpointError, match=r"missing tensor model.layers.0.mlp.gate_proj.weight.*merge LoRA"):
        save_model(model, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_folder_without_config_json(tmp_path):
    folder = copy_fixture(tmp_path)
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(CheckpointError, match=r"qwen2-tiny: no config.json"):
        load_model(folder)


def test_folder_without_weights(tmp_path):
    folder = copy_fixture(tmp_path)
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no weights, expected model.safetensors or "
                                              r"model.safetensors.index.json$"):
        load_model(folder)
    open(os.path.join(folder, "pytorch_model.bin"), "wb").close()
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin is not read .*never unpickles"):
        load_model(folder)


def test_missing_shard(tmp_path):
    folder = copy_fixture(tmp_path, QWEN3)
    os.remove(os.path.join(folder, "model-00002-of-00003.safetensors"))
    with pytest.raises(CheckpointError, match=r"index.json: shard model-00002-of-00003.safetensors is missing"):
        load_model(folder)


def test_damaged_weights_and_index_are_named(tmp_path):
    folder = copy_fixture(tmp_path)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])  # a download cut short
    with pytest.raises(UserError, match=r"model.safetensors: not a readable safetensors file"):
        load_model(folder)
    sharded = copy_fixture(tmp_path, QWEN3)
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
        f.write('{"metadata": {}}')
    with pytest.raises(UserError, match=r"index.json: not a valid index"):
        load_model(sharded)


def test_missing_tensor(tmp_path):
    folder = copy_fixture(tmp_path)
    edit_weights(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing tensor "
                                              r"model.layers.1.self_attn.k_proj.bias \(shape \[16\]\)"):
        load_model(folder)


def test_unexpected_tensor(tmp_path):
    folder = copy_fixture(tmp_path)
    edit_weights(folder, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(64, 32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model.layers.2.mlp.up_proj.weight "
                                              r"\(shape \[64, 32\]\)"):
        load_model(folder)


def test_mis_shaped_tensor_names_both_shapes(tmp_path):
    folder = copy_fixture(tmp_path)
    edit_weights(folder, lambda t: t.update({"model.norm.weight": torch.ones(31)}))
    with pytest.raises(CheckpointError, match=r"tensor model.norm.weight has shape \[31\] "
                                              r"but config.json implies \[32\]"):
        load_model(folder)


def test_unsupported_config_is_named(tmp_path):
    folder = copy_fixture(tmp_path)
    path = os.path.join(folder, "config.json")
    raw = json.load(open(path))
    for change, message in (({"model_type": "llama"}, "model_type 'llama' is not supported"),
                            ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling"),
                            ({"use_sliding_window": True}, "sliding-window")):
        json.dump({**raw, **change}, open(path, "w"))
        with pytest.raises(CheckpointError, match=message):
            load_model_config(folder)


def fake_hub_cache(hub, repo_id, revisions, main=None):
    """A Hub cache entry laid out as huggingface_hub writes it: snapshot files are links into ../../blobs."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for revision in revisions:
        (repo / "snapshots" / revision).mkdir(parents=True)
        for name in os.listdir(QWEN2):
            shutil.copy(os.path.join(QWEN2, name), repo / "blobs" / f"{revision}-{name}")
            os.symlink(f"../../blobs/{revision}-{name}", repo / "snapshots" / revision / name)
    if main:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(main + "\n")
    return repo


def test_hub_id_resolves_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = fake_hub_cache(tmp_path / "hf" / "hub", "Qwen/Tiny-0.1B", ["aaa", "bbb"], main="aaa")
    assert resolve("Qwen/Tiny-0.1B") == str(repo / "snapshots" / "aaa")  # refs/main wins over the newer bbb
    assert load_model("Qwen/Tiny-0.1B").config.model_type == "qwen2"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    repo = fake_hub_cache(tmp_path / "elsewhere", "Qwen/Tiny-0.1B", ["ccc"])
    assert resolve("Qwen/Tiny-0.1B") == str(repo / "snapshots" / "ccc")  # no refs/main: the snapshot there


def test_hub_id_not_in_the_cache_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"Qwen/Qwen3-0.6B: not a folder.*"
                                              r"huggingface-cli download Qwen/Qwen3-0.6B"):
        load_model("Qwen/Qwen3-0.6B")
    with pytest.raises(CheckpointError, match=r"no/such/folder: no such folder; model_name takes a checkpoint"):
        resolve("no/such/folder")


def test_tokenizer_files_are_copied_as_contents_and_only_from_inside_the_folder(tmp_path):
    model = load_model(QWEN2)
    source = tmp_path / "src"
    source.mkdir()
    (tmp_path / "real.json").write_text('{"real": true}')
    os.symlink(tmp_path / "real.json", source / "tokenizer.json")  # a link out of the source folder
    with pytest.raises(UserError, match=r"src/tokenizer.json: the tokenizer file resolves to .*real.json, outside"):
        save_model(model, str(tmp_path / "out"), tokenizer_from=str(source))
    assert not os.path.exists(tmp_path / "out")
    os.replace(tmp_path / "real.json", source / "real.json")
    os.remove(source / "tokenizer.json")
    os.symlink("real.json", source / "tokenizer.json")  # a link inside the folder: its content is copied
    save_model(model, str(tmp_path / "out"), tokenizer_from=str(source))
    assert not os.path.islink(tmp_path / "out" / "tokenizer.json")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"real": true}'


def test_hub_snapshot_links_are_confined_to_the_repo_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = fake_hub_cache(tmp_path / "hub", "Qwen/Tiny-0.1B", ["aaa"], main="aaa")
    assert load_model("Qwen/Tiny-0.1B").config.model_type == "qwen2"  # links into ../../blobs are fine
    (tmp_path / "elsewhere.json").write_text("{}")
    os.remove(repo / "snapshots" / "aaa" / "config.json")
    os.symlink(tmp_path / "elsewhere.json", repo / "snapshots" / "aaa" / "config.json")
    with pytest.raises(UserError, match=r"config.json: the config.json resolves to .*elsewhere.json, outside"):
        load_model("Qwen/Tiny-0.1B")


@pytest.mark.parametrize("change, message", [
    ({"num_hidden_layers": 10**9}, r"num_hidden_layers is 1000000000, expected 1 .. 1024"),
    ({"hidden_size": "big"}, r'hidden_size is "big", expected an integer'),
    ({"tie_word_embeddings": 1}, r"tie_word_embeddings is 1, expected true or false"),
    ({"rope_theta": -5.0, "rope_parameters": None}, r"rope_theta is -5.0, expected a finite number above 0"),
    ({"max_position_embeddings": 1 << 22, "head_dim": 128}, r"max_position_embeddings · head_dim is over 2\^28"),
])
def test_config_json_fields_are_checked_for_type_and_range(tmp_path, change, message):
    folder = copy_fixture(tmp_path)
    path = os.path.join(folder, "config.json")
    json.dump({**json.load(open(path)), **change}, open(path, "w"))
    with pytest.raises(CheckpointError, match=r"config.json: " + message):
        load_model_config(folder)


def test_a_shard_index_with_a_path_is_refused(tmp_path):
    folder = copy_fixture(tmp_path, QWEN3)
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    index["weight_map"] = {name: "sub/" + shard for name, shard in index["weight_map"].items()}
    json.dump(index, open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    with pytest.raises(CheckpointError, match=r"shard 'sub/model-0000.-of-00003.safetensors' is not a plain file"):
        load_model(folder)
