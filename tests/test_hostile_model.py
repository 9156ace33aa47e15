"""Hostile model folders and checkpoints, through the real train.py in a subprocess (memory-capped, with
a hang guard): each is refused with one line naming the file, no traceback, nothing written outside the
run folder, nothing changed in the model folder or at a link's target."""
import hashlib
import json
import os
import shutil
import struct

import pytest
import torch
from conftest import tiny_base
from safetensors.torch import load_file

from minorpo import tiny
from minorpo.files import NonFiniteError, UserError, save_safetensors

RUN = ["training.eval_every=0", "sample.max_new_tokens=4",
       "training.phases=[{step: 0, trainable: [all]}]"]  # full fine-tuning: the checkpoints hold every weight


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The tiny model and 100 tiny pairs (enough for a batch of 16), built once for every test here."""
    root = tmp_path_factory.mktemp("shared")
    return tiny_base(str(root / "tiny-base")), tiny.ensure_pairs(str(root / "pairs.jsonl"), n=100)


def contents(folder):
    """{path under folder: (link target or None, sha256 of what it reads as)} of everything in folder."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            digest = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.exists(path) else None
            found[os.path.relpath(path, folder)] = (os.readlink(path) if os.path.islink(path) else None, digest)
    return found


def train_args(shared, folder, model_name, *settings, max_steps=2):
    """train.py's arguments for a run under folder/out on model_name with the shared pairs."""
    return ["train.py", "presets/orpo.yml", f"model_name={model_name}", f"output_dir={folder / 'out'}",
            f"data.path={shared[1]}", f"training.max_steps={max_steps}", *RUN, *settings]


def run_refused(run_many, prepared):
    """prepared: {name: (folder, train.py arguments, needles)}. Runs them all at once (run_many) and returns
    {name: (process, folder, needles, what the folder held before)}."""
    before = {name: contents(folder) for name, (folder, _, _) in prepared.items()}
    results = run_many({name: args for name, (_, args, _) in prepared.items()})
    return {name: (results[name], folder, needles, before[name]) for name, (folder, _, needles) in prepared.items()}


def assert_refused(one_line_error, result, run_name="orpo"):
    """A one-line error naming every needle; nothing under the folder changed but out/, which has no final/."""
    p, folder, needles, before = result
    one_line_error(p, *needles)
    assert {k: v for k, v in contents(folder).items() if not k.startswith("out" + os.sep)} == before
    assert not os.path.exists(folder / "out" / run_name / "final")


def rewrite_header(path, edit):
    """Rewrite a safetensors file's JSON header with edit(header); the data bytes stay as they are."""
    data = open(path, "rb").read()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + data[8 + length:])


# Each case makes a copy of the tiny model hostile: prepare(folder, model) -> (model_name, needles the error names)
def linked_outside(name):
    def prepare(folder, model):
        outside = folder / "outside"
        outside.mkdir()
        if name == "tokenizer.json":  # the model's own tokenizer, moved out of the folder: only the link is wrong
            os.replace(model / name, outside / name)
        else:
            (outside / name).write_text("#version: 0.2\nnot for you\n")
        os.symlink(outside / name, model / name)
        return model, [str(model / name), "outside", "refused"]
    return prepare


def shard_outside(absolute):
    def prepare(folder, model):
        shard = str(folder / "x.safetensors") if absolute else "../x.safetensors"
        os.replace(model / "model.safetensors", folder / "x.safetensors")  # a valid shard, just not inside
        names = load_file(folder / "x.safetensors")
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
        return model, ["model.safetensors.index.json", shard, "not a plain file name"]
    return prepare


def integer_tensor(declared):
    def prepare(folder, model):
        path = str(model / "model.safetensors")
        if declared:  # the same 4-byte elements, read as integers
            rewrite_header(path, lambda header: header["model.norm.weight"].update(dtype="I32"))
        else:
            tensors = {n: t.clone() for n, t in load_file(path).items()}  # not views of the file rewritten
            tensors["model.norm.weight"] = torch.ones(128, dtype=torch.int64)
            save_safetensors(tensors, path)
        return model, [path, f"dtype {'I32' if declared else 'I64'}", "model.norm.weight", "F32, BF16 or F16"]
    return prepare


def one_tensor_in_two_shards(folder, model):
    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    first, second = names[:len(names) // 2], names[len(names) // 2:]
    save_safetensors({n: tensors[n] for n in first}, str(model / "a.safetensors"))
    save_safetensors({n: tensors[n] for n in second + first[:1]}, str(model / "b.safetensors"))  # first[0] twice
    index = {n: "a.safetensors" for n in first} | {n: "b.safetensors" for n in second}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    os.remove(model / "model.safetensors")
    return model, ["a.safetensors", "b.safetensors", first[0]]


def bad_header(huge_length):
    def prepare(folder, model):
        path = str(model / "model.safetensors")
        if huge_length:
            data = open(path, "rb").read()
            open(path, "wb").write(struct.pack("<Q", 1 << 40) + data[8:])
        else:  # offsets past the end of the file
            rewrite_header(path, lambda h: h["model.norm.weight"].update(data_offsets=[1 << 30, (1 << 30) + 512]))
        return model, [path, "not a readable safetensors file"]
    return prepare


def config_field(change, needle):
    def prepare(folder, model):
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, **change}))
        return model, [str(model / "config.json"), needle]
    return prepare


def a_file_for_a_folder(folder, model):
    return model / "config.json", ["config.json: a file", "model_name takes a checkpoint folder"]


def no_config_json(folder, model):
    os.remove(model / "config.json")
    return model, [f"{model}: no config.json", "tokenizer.json"]


HOSTILE_MODELS = {
    "tokenizer-json-linked-outside": linked_outside("tokenizer.json"),
    "merges-txt-linked-outside": linked_outside("merges.txt"),
    "shard-index-naming-a-parent-path": shard_outside(absolute=False),
    "shard-index-naming-an-absolute-path": shard_outside(absolute=True),
    "float-bytes-declared-I32": integer_tensor(declared=True),
    "an-int64-tensor": integer_tensor(declared=False),
    "one-tensor-in-two-shards": one_tensor_in_two_shards,
    "huge-header-length": bad_header(huge_length=True),
    "offsets-past-the-end": bad_header(huge_length=False),
    "absurd-layer-count": config_field({"num_hidden_layers": 1_000_000_000},
                                       "num_hidden_layers is 1000000000, expected 1 .. 1024"),
    "layer-count-not-in-the-weights": config_field({"num_hidden_layers": 6},
                                                   "num_hidden_layers is 6 but the weights hold 4 layers"),
    "string-for-an-int": config_field({"hidden_size": "big"}, 'hidden_size is "big", expected an integer'),
    "true-for-an-int": config_field({"num_attention_heads": True}, "num_attention_heads is true, expected an integer"),
    "negative-eps": config_field({"rms_norm_eps": -1.0}, "rms_norm_eps is -1.0, expected a finite number above 0"),
    "model-name-is-a-file": a_file_for_a_folder,
    "folder-without-config-json": no_config_json,
}


@pytest.fixture(scope="module")
def hostile_runs(tmp_path_factory, shared, run_many):
    """Every case of HOSTILE_MODELS in its own folder (a copy of the tiny model, made hostile), then
    train.py on each, all at once."""
    prepared = {}
    for name, prepare in HOSTILE_MODELS.items():
        folder = tmp_path_factory.mktemp(name)
        shutil.copytree(shared[0], folder / "model")
        model_name, needles = prepare(folder, folder / "model")
        prepared[name] = (folder, train_args(shared, folder, model_name), needles)
    return run_refused(run_many, prepared)


@pytest.mark.parametrize("name", HOSTILE_MODELS)
def test_a_hostile_model_folder_is_refused_in_one_line_and_nothing_changes(hostile_runs, one_line_error, name):
    assert_refused(one_line_error, hostile_runs[name])


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, shared):
    """A resumable checkpoint written by train.py at step 2 (run `a`)."""
    from conftest import _run
    out = tmp_path_factory.mktemp("run")
    p = _run(["train.py", "presets/orpo.yml", f"model_name={shared[0]}", f"output_dir={out}", f"data.path={shared[1]}",
              "run_name=a", "training.max_steps=3", "training.save_every=2", *RUN])
    assert p.returncode == 0, p.stderr[-2000:]
    return out / "a" / "step_000002"


def drop_position(folder):
    state = json.loads((folder / "state.json").read_text())
    del state["position"]
    (folder / "state.json").write_text(json.dumps(state))


def empty_optimizer(folder):
    (folder / "optimizer.safetensors").write_bytes(b"")


def position_past_the_epoch(folder):
    state = json.loads((folder / "state.json").read_text())
    state["position"] = 10**6
    (folder / "state.json").write_text(json.dumps(state))


def misshaped_weight(folder):
    weights = {n: t.clone() for n, t in load_file(folder / "weights.safetensors").items()}
    weights["model.norm.weight"] = torch.ones(7)
    save_safetensors(weights, str(folder / "weights.safetensors"))


DAMAGED = {  # name: (damage(checkpoint folder), needles the error names)
    "state-json-missing-a-key": (drop_position, ("state.json", "position is missing")),
    "empty-optimizer-file": (empty_optimizer, ("optimizer.safetensors", "not a readable safetensors file")),
    "misshaped-weight": (misshaped_weight, ("weights.safetensors", "model.norm.weight is (7,)")),
    "position-past-the-epoch": (position_past_the_epoch, ("state.json", "position 1000000 past the")),
}


@pytest.fixture(scope="module")
def damaged_runs(tmp_path_factory, shared, saved_checkpoint, run_many):
    prepared = {}
    for name, (damage, needles) in DAMAGED.items():
        folder = tmp_path_factory.mktemp(name)
        shutil.copytree(saved_checkpoint, folder / "copy")
        damage(folder / "copy")
        args = train_args(shared, folder, shared[0], f"training.resume_from={folder / 'copy'}", "run_name=b",
                          max_steps=4)
        prepared[name] = (folder, args, (str(folder / "copy"), *needles, "resume from another checkpoint"))
    return run_refused(run_many, prepared)


@pytest.mark.parametrize("name", DAMAGED)
def test_resuming_a_damaged_checkpoint_names_the_file(damaged_runs, one_line_error, name):
    assert_refused(one_line_error, damaged_runs[name], run_name="b")


def test_save_safetensors_refuses_nan_and_leaves_no_file(tmp_path):
    path = tmp_path / "w.safetensors"
    with pytest.raises(NonFiniteError, match=r"w.safetensors: not saved, tensor b holds NaN or inf"):
        save_safetensors({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}, str(path))
    assert not path.exists()
    save_safetensors({"ids": torch.tensor([1, 2])}, str(path))  # integers cannot be NaN: written
    assert path.exists()


def test_a_tokenizer_whose_ids_pass_the_embeddings_is_refused_even_with_few_tokens(shared):
    from tokenizers import Tokenizer

    from minorpo import checkpoint, data
    model = checkpoint.load_model(shared[0], torch.float32, "cpu")
    tokenizer = data.load_tokenizer(shared[0])
    checkpoint.check_fits(model, tokenizer, shared[0], 64, 8)  # its own tokenizer fits
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab[max(vocab, key=vocab.get)] = model.config.vocab_size + 5  # a gap: no more tokens, a larger id
    gapped = Tokenizer.from_str(json.dumps(spec))
    assert gapped.get_vocab_size() <= model.config.vocab_size
    with pytest.raises(checkpoint.CheckpointError, match=f"token id {model.config.vocab_size + 5} .* embeddings"):
        checkpoint.check_fits(model, gapped, shared[0], 64, 8)


def test_a_huge_tokenizer_file_is_refused_before_it_is_read(tmp_path):
    from minorpo import data
    with open(tmp_path / "tokenizer.json", "wb") as f:
        f.truncate(101 << 20)  # sparse: takes no disk
    with pytest.raises(data.DataError, match="tokenizer.json: 105,906,176 bytes is not a tokenizer"):
        data.load_tokenizer(str(tmp_path))


def saved_state(tmp_path, updates=1):
    """(folder, model, optimizer): a two-parameter model after `updates` AdamW steps, saved by state.save."""
    from minorpo import state
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    for _ in range(updates):
        model(torch.ones(3)).sum().backward()
        optimizer.step()
    state.save(str(tmp_path / "ck"), model, optimizer, ["weight", "bias"],
               {"step": updates, "epoch": 0, "position": updates, "skipped": 0})
    return tmp_path / "ck", model, optimizer


def nan_weight(folder):  # save_safetensors refuses NaN: write ones, then turn their bytes into NaN
    save_safetensors({"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, str(folder / "weights.safetensors"))
    raw = (folder / "weights.safetensors").read_bytes()
    (folder / "weights.safetensors").write_bytes(raw.replace(struct.pack("<f", 1.0), struct.pack("<f", float("nan"))))


def no_moments(folder):
    save_safetensors({}, str(folder / "optimizer.safetensors"))


def negative_step(folder):
    moments = {k: v.clone() for k, v in load_file(folder / "optimizer.safetensors").items()}  # not the mapped file
    save_safetensors({**moments, "0.step": torch.tensor(-5.0)}, str(folder / "optimizer.safetensors"))


def more_skipped_than_steps(folder):
    meta = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**meta, "skipped": 2}))


@pytest.mark.parametrize("damage, needle", [
    (nan_weight, "tensor weight holds NaN or inf"),
    (no_moments, "no optimizer moments after 1 updates"), (negative_step, "0.step does not fit"),
    (more_skipped_than_steps, "skipped (2) or epoch (0) is past step (1)"),
], ids=["nan-weight", "no-moments", "negative-step", "skipped-past-step"])
def test_state_load_refuses_values_no_run_writes(tmp_path, damage, needle):
    from minorpo import state
    folder, model, optimizer = saved_state(tmp_path)
    damage(folder)
    with pytest.raises(UserError) as error:
        state.load(str(folder), model, optimizer, ["weight", "bias"], {})
    assert needle in str(error.value) and "resume from another checkpoint" in str(error.value)


def test_state_load_accepts_a_checkpoint_whose_every_step_was_skipped(tmp_path):
    from minorpo import state
    folder, model, optimizer = saved_state(tmp_path, updates=0)
    meta = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**meta, "step": 3, "skipped": 3, "epoch": 0}))
    assert state.load(str(folder), model, optimizer, ["weight", "bias"], {})["step"] == 3
