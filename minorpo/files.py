"""Files written so that a crash never leaves half of one, and read so that a hostile one stays harmless.

Decisions:
- A file or folder is written under a temporary sibling name and renamed into place when complete (a rename
  is atomic): a reader sees the old or the new version, never a partial one; a crash leaves a temporary name.
- safetensors is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
  then the tensors' raw bytes. It is written here because safetensors.torch.save_file imports NumPy (not a
  minorpo dependency). Reading checks the whole header before a byte of tensor data is read or allocated.
- A file someone else gave (a model, an adapter, a checkpoint) is read only through file_inside, and its
  JSON is capped in size, so nothing it says can make minorpo read elsewhere or exhaust memory.
- YAML (a preset) is read strictly: at most 1 MB of UTF-8, no duplicate keys (the later would silently win),
  no anchors or aliases (a few nested aliases expand to gigabytes), and only true and false are booleans
  (YAML 1.1 reads `compile: on` as True). `1e-4` is a number, as it is in Python.
"""
import contextlib
import ctypes
import json
import os
import re
import shutil
import struct
import uuid

import torch
import yaml
from safetensors import SafetensorError, safe_open


class UserError(ValueError):
    """A mistake in something the user gave: a setting, a file, a folder. train.py prints the message as one
    line (no traceback) and exits nonzero, so it must name the file, line or key, and the fix."""


def file_inside(folder, name, what="file"):
    """The real path of folder/name if, after resolving symlinks, it is a regular file inside the real
    folder; anything else (a link out of the folder, a device, a directory) is refused."""
    root = os.path.realpath(folder)
    real = os.path.realpath(os.path.join(folder, name))
    if os.path.commonpath([root, real]) != root:
        raise UserError(f"{os.path.join(folder, name)}: the {what} resolves to {real}, outside {folder}; refused")
    if not os.path.isfile(real):
        kind = "a folder" if os.path.isdir(real) else "missing" if not os.path.exists(real) else "not a regular file"
        raise UserError(f"{os.path.join(folder, name)}: the {what} is {kind}; expected a regular file")
    return real


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                      torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
FLOATS = ("F32", "BF16", "F16")  # the only tensor dtypes minorpo reads
MAX_JSON = 16 << 20  # bytes; the JSON files minorpo reads are at most a few MB


class NonFiniteError(UserError):
    """A tensor about to be saved holds NaN or inf: saving it would make a checkpoint that resumes into NaN."""


def read_json(path, fix):
    """The JSON object in path (a real path from file_inside), at most MAX_JSON bytes; anything else
    (too big, not UTF-8, not JSON, too deeply nested, not an object) is a UserError ending with `fix`."""
    if os.path.getsize(path) > MAX_JSON:
        raise UserError(f"{path}: {os.path.getsize(path)} bytes, more than a JSON file here can be; {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: not valid JSON ({str(e)[:200]}); {fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object {{...}}, got {type(value).__name__}; {fix}")
    return value


class _StrictYAML(yaml.SafeLoader):
    """PyYAML's safe loader without anchors, aliases, duplicate keys, dates, or on/off/yes/no booleans."""
    yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag.rsplit(":", 1)[1] not in
                                       ("bool", "int", "timestamp")]  # bool and int come back narrower below
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise UserError(f"{self.name}:{event.start_mark.line + 1}: YAML anchors and aliases (& and *) "
                            "are not allowed in a preset; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise UserError(f"{self.name}:{key_node.start_mark.line + 1}: duplicate key `{key}`; "
                                "keep one of them")
            seen.add(key)
        return super().construct_mapping(node, deep)


for tag, pattern in (("bool", r"true|True|TRUE|false|False|FALSE"), ("int", r"[-+]?[0-9]{1,30}"),  # no 0x1F, 1:30
                     ("float", r"[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+")):  # 1e-4 too, as in Python
    _StrictYAML.add_implicit_resolver(f"tag:yaml.org,2002:{tag}", re.compile(f"^(?:{pattern})$"),
                                      list("tTfF-+0123456789"))


def parse_yaml(text, name):
    """Parse YAML text strictly; `name` (a file, or `key=value` on the command line) starts every error."""
    loader = None
    try:
        loader = _StrictYAML(text)  # reading the text already refuses control characters
        loader.name = name
        return loader.get_single_data()
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as e:  # also a key no mapping can hold
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{name}{f':{mark.line + 1}' if mark else ''}: not valid YAML "
                        f"({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    finally:
        if loader:
            loader.dispose()


def read_yaml(path):
    """(the mapping in a YAML preset, its text): at most 1 MB of UTF-8, parsed strictly."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: preset file not found (presets/ has the shipped ones)")
    if os.path.getsize(path) > 1 << 20:
        raise UserError(f"{path}: a preset is at most 1 MB; this one is {os.path.getsize(path):,} bytes")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{raw[:e.start].count(10) + 1}: not UTF-8 text; save the preset as UTF-8") from None
    tree = parse_yaml(text, path) or {}
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a preset is a mapping of keys to values")
    return tree, text


def safetensors_header(path, fix):
    """{name: shape} of a safetensors file; the library checks sizes and offsets, and here every dtype must be
    F32, BF16 or F16 (integer and bool tensors are refused, never cast). Errors are UserErrors ending in `fix`."""
    try:
        with safe_open(path, framework="pt") as f:
            header = {name: (f.get_slice(name).get_dtype(), f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e}); {fix}") from None
    for name, (dtype, shape) in header.items():
        if dtype not in FLOATS:
            raise UserError(f"{path}: tensor {name} has dtype {dtype}; minorpo reads F32, BF16 or F16 tensors "
                            f"only (integer and bool tensors are refused, not cast); {fix}")
    return {name: shape for name, (dtype, shape) in header.items()}


def read_tensors(path, names, dtype=None, device="cpu", fix="download or copy the file again"):
    """Yield (name, tensor) for `names` of a file checked by safetensors_header, one at a time, each a copy
    (in dtype, on device): a view of the memory-mapped file would die if the file were rewritten. A tensor
    holding NaN or inf is a UserError naming the file and tensor: it would train to NaN hours later."""
    with safe_open(path, framework="pt") as f:
        for name in names:
            tensor = f.get_tensor(name)
            tensor = tensor.to(device=device, dtype=dtype or tensor.dtype, copy=True)
            flat = tensor.reshape(-1)  # checked in pieces: the mask of a big embedding costs no big allocation
            if tensor.is_floating_point() and not all(torch.isfinite(flat[i:i + (1 << 24)]).all()
                                                      for i in range(0, flat.numel(), 1 << 24)):
                raise UserError(f"{path}: tensor {name} holds NaN or inf; a model or checkpoint holds finite "
                                f"values only: {fix}")
            yield name, tensor


@contextlib.contextmanager
def naming(path, tmp=None):
    """An OSError gets the path the user knows: `path` when it has no file name (a full disk or a file-size
    limit is raised by a write, which names no file), `path` + the rest of a name inside the temporary `tmp`."""
    try:
        yield
    except OSError as e:
        name = e.filename if isinstance(e.filename, str) else None
        if not e.errno or name and not (tmp and name.startswith(tmp)):
            raise
        raise OSError(e.errno, e.strerror, path + name[len(tmp):] if name else path) from None


@contextlib.contextmanager
def atomic_folder(path):
    """Yield a temporary sibling folder to write into; on success it replaces `path`, on error it is removed.
    The old folder is renamed aside, not deleted, until the new one is in: a crash leaves it as a .old folder."""
    path = os.path.abspath(path)
    stem = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with naming(path, stem + ".tmp"):
        os.mkdir(stem + ".tmp")
    try:
        with naming(path, stem + ".tmp"):
            yield stem + ".tmp"
    except BaseException:
        shutil.rmtree(stem + ".tmp", ignore_errors=True)
        raise
    if os.path.exists(path):
        os.rename(path, stem + ".old")
        os.rename(stem + ".tmp", path)
        shutil.rmtree(stem + ".old")
    else:
        os.rename(stem + ".tmp", path)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a text file to write, a temporary sibling of path renamed onto it when the block ends without error."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with naming(path, tmp), open(tmp, "w") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path, text):
    """Write text to path through a temporary sibling file and a rename."""
    with atomic_file(path) as f:
        f.write(text)


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} to a .safetensors file. A floating tensor with a NaN or inf is refused
    (NonFiniteError) before the file is opened."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    header, offset = {"__metadata__": metadata or {}}, 0
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(f"{os.path.basename(path)}: not saved, tensor {name} holds NaN or inf (the training "
                                 "diverged); lower training.learning_rate or resume from an earlier checkpoint")
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format pads the header to 8-byte alignment
    with naming(path), open(path, "wb") as f:  # a full disk names the file
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for t in tensors.values():
            f.write(ctypes.string_at(t.data_ptr(), t.nbytes))  # a copy of the raw bytes
