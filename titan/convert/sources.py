"""Reading Llama weights tensor by tensor, in Meta's layout or Hugging Face's.

Both sources have `args` (the architecture their config implies), `shapes` and `dtypes`
of our (Meta) parameter names, `load(name)` giving one full tensor in Meta's layout, and
`close()`. `detect_layout` tells which one a folder holds.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from titan.convert.common import (
    ST_DTYPES,
    ConvertError,
    RemappedMap,
    config_error,
    describe,
    first_line,
    read_json,
)
from titan.files import folder_problem, listing
from titan.models import keymap
from titan.models.llama import param_shapes


class MetaSource:
    """Meta's layout: `params.json` + `consolidated.NN.pth` model-parallel shards, read
    through memory maps; shards are merged tensor by tensor (the split dimension is found
    from the shapes: wq/wk/wv/w1/w3/output/embedding on dim 0, wo/w2 on dim 1, norms
    replicated; Llama-2-style embeddings split on dim 1 also work)."""

    layout = "meta"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        params = read_json(folder / "params.json")
        self.files = sorted(folder.glob("consolidated.*.pth"))
        if not self.files:
            raise ConvertError(f"{folder}: no consolidated.*.pth files next to params.json")
        self._maps = RemappedMap(lambda: [_load_pth(f) for f in self.files])
        shards = self._maps.get()
        keys = [k for k in shards[0] if k != "rope.freqs"]  # Llama 2 also saved its RoPE table
        for f, sd in zip(self.files[1:], shards[1:], strict=True):
            if set(k for k in sd if k != "rope.freqs") != set(keys):
                raise ConvertError(f"{f} does not hold the same tensors as {self.files[0]}")
        vocab = params.get("vocab_size", -1)
        if (vocab is None or vocab <= 0) and "tok_embeddings.weight" in shards[0]:
            # Llama 2's params.json says -1: count the embedding rows (split on dim 0 or 1)
            emb = [tuple(sd["tok_embeddings.weight"].shape) for sd in shards]
            vocab = sum(s[0] for s in emb) if emb[0][1] == params.get("dim") else emb[0][0]
        try:
            self.args = keymap.args_from_meta_params(params, vocab_size=vocab)
        except (KeyError, TypeError, ValueError) as e:
            raise config_error(folder / "params.json", e) from None
        expected = param_shapes(self.args)
        check_names(keys, expected, folder)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._cat_dim: dict[str, int | None] = {}
        for name in keys:
            self.shapes[name] = expected[name]
            self._cat_dim[name] = self._split_dim(name, shards, expected[name])
            self.dtypes[name] = shards[0][name].dtype
        self.close()

    def close(self) -> None:
        self._maps.close()

    def _split_dim(
        self, name: str, shards: list[dict[str, torch.Tensor]], full: tuple[int, ...]
    ) -> int | None:
        shapes = [tuple(sd[name].shape) for sd in shards]
        if all(s == full for s in shapes):
            return None
        for dim in range(len(full)):
            others_equal = all(
                s[:dim] + s[dim + 1 :] == full[:dim] + full[dim + 1 :] for s in shapes
            )
            if others_equal and sum(s[dim] for s in shapes) == full[dim]:
                return dim
        raise ConvertError(
            f"{self.folder}: {name} has shard shapes {shapes}, which do not make the shape "
            f"{full} that params.json implies ({describe(self.args)})"
        )

    def load(self, name: str) -> torch.Tensor:
        """The full tensor, in a fresh buffer: each shard's part is copied in row chunks
        through memory maps that are remapped as they go, so resident pages stay bounded."""
        out = torch.empty(self.shapes[name], dtype=self.dtypes[name])
        dim, offset = self._cat_dim[name], 0
        for k in range(len(self.files) if dim is not None else 1):
            size = self._maps.get()[k][name].shape[dim] if dim is not None else 0
            dest = out if dim is None else out.narrow(dim, offset, size)
            offset += size
            for shards, rows in self._maps.chunks(dest):
                dest[rows].copy_(shards[k][name][rows])
        return out


class HFSource:
    """Hugging Face layout: `config.json` + `*.safetensors` (with or without an index),
    read tensor by tensor with `safe_open`; q/k rows are permuted back to Meta's order."""

    layout = "hf"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        config = read_json(folder / "config.json")
        # the sequence length a titan run trained on (dcp_to_llama.py records it)
        trained = config.get(keymap.TRAINED_SEQ_LEN_KEY)
        valid = isinstance(trained, int) and not isinstance(trained, bool) and trained > 0
        self.trained_seq_len: int | None = trained if valid else None
        try:
            self.args = keymap.args_from_hf_config(config)
        except (KeyError, TypeError, ValueError) as e:
            raise config_error(folder / "config.json", e) from None
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map", {})
            if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) for f in weight_map.values()
            ):
                raise ConvertError(f"{index}: weight_map is not a mapping of names to files")
            files = sorted({folder / f for f in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        self._where: dict[str, tuple[str, Path]] = {}  # ours -> (HF name, file)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for path in files:
            for hf_name, shape, dtype in _safetensors_header(path):
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                try:
                    name = keymap.from_hf_key(hf_name)
                except KeyError:
                    raise ConvertError(
                        f"{path}: unexpected tensor {hf_name!r} (not a Llama-3 parameter)"
                    ) from None
                if name in self._where:  # the last file would silently win
                    raise ConvertError(
                        f"{folder}: tensor {hf_name} is in both {self._where[name][1].name} "
                        f"and {path.name}; remove the file that should not be read"
                    )
                self._where[name] = (hf_name, path)
                self.shapes[name], self.dtypes[name] = shape, dtype
        tied = config.get("tie_word_embeddings", False)
        if tied and "output.weight" not in self.shapes and "tok_embeddings.weight" in self.shapes:
            self._where["output.weight"] = self._where["tok_embeddings.weight"]
            self.shapes["output.weight"] = self.shapes["tok_embeddings.weight"]
            self.dtypes["output.weight"] = self.dtypes["tok_embeddings.weight"]
        expected = param_shapes(self.args)
        check_names(list(self.shapes), expected, folder)
        for name, shape in self.shapes.items():
            if shape != expected[name]:
                raise ConvertError(
                    f"{self._where[name][1]}: {self._where[name][0]} has shape {shape}, but "
                    f"config.json implies {expected[name]} ({describe(self.args)})"
                )

    def load(self, name: str) -> torch.Tensor:
        hf_name, path = self._where[name]
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                tensor = f.get_tensor(hf_name)
        except Exception as e:  # safetensors raises its own error types
            raise ConvertError(
                f"cannot read {hf_name} from {path} ({first_line(e)}): {_DAMAGED}"
            ) from None
        if name == "output.weight" and hf_name.endswith("embed_tokens.weight"):
            return tensor  # tied embeddings
        return keymap.from_hf_tensor(hf_name, tensor, self.args)[1].contiguous()

    def close(self) -> None:
        pass


_DAMAGED = "not a whole safetensors file (truncated or damaged?); download or export it again"


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    if not zipfile.is_zipfile(path):  # torch's own error would advise saving it anew
        raise ConvertError(
            f"cannot read {path}: not a file of tensors as torch.save writes them (a zip "
            "archive; truncated or damaged?); download or export it again"
        )
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, pickle errors, ...
        raise ConvertError(
            f"cannot read {path} ({first_line(e)}): not a whole file of tensors as torch.save "
            "writes them (truncated, damaged, or holding other objects)"
        ) from None
    if not isinstance(sd, dict):
        raise ConvertError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise ConvertError(
                f"{path}: {key!r} holds a {type(value).__name__}, not a tensor; expected a "
                "dict of tensors (a consolidated.NN.pth as Meta saves it)"
            )
    return sd


def _safetensors_header(path: Path) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
    from safetensors import safe_open

    if not path.is_file():
        raise ConvertError(f"{path}: no such file (listed in model.safetensors.index.json)")
    try:
        with safe_open(str(path), framework="pt") as f:
            entries = [(k, f.get_slice(k)) for k in f.keys()]
            info = [(k, tuple(s.get_shape()), s.get_dtype()) for k, s in entries]
    except Exception as e:  # safetensors raises its own error types
        raise ConvertError(f"cannot read {path} ({first_line(e)}): {_DAMAGED}") from None
    for name, shape, dtype in info:
        if dtype not in ST_DTYPES:
            raise ConvertError(f"{path}: {name} has dtype {dtype}; expected F32, BF16 or F16")
        yield name, shape, ST_DTYPES[dtype]


def check_names(names: list[str], expected: dict[str, tuple[int, ...]], folder: Path) -> None:
    """Refuse tensors the architecture does not have, and missing ones."""
    unknown = [n for n in names if n not in expected]
    if unknown:
        raise ConvertError(
            f"{folder}: unexpected tensors for this architecture: {listing(unknown)}"
        )
    missing = [n for n in expected if n not in set(names)]
    if missing:
        raise ConvertError(f"{folder}: missing tensors: {listing(missing)}")


def detect_layout(folder: Path, requested: str = "auto") -> tuple[str, Path]:
    """('meta' | 'hf', folder holding the files); HF repos' `original/` is checked too."""
    if problem := folder_problem(folder):
        raise ConvertError(f"--input_dir {folder}: {problem}")

    def is_hf(p: Path) -> bool:
        return (p / "config.json").is_file() and any(p.glob("*.safetensors"))

    def is_meta(p: Path) -> bool:
        return (p / "params.json").is_file() and any(p.glob("consolidated.*.pth"))

    candidates = {"hf": [folder], "meta": [folder, folder / "original"]}
    order = ["hf", "meta"] if requested == "auto" else [requested]
    for layout in order:
        for path in candidates[layout]:
            if (is_hf if layout == "hf" else is_meta)(path):
                return layout, path
    found = listing(sorted(p.name for p in folder.iterdir()), most=8) or "nothing"
    want = {
        "hf": "config.json + *.safetensors (Hugging Face)",
        "meta": "params.json + consolidated.*.pth (Meta)",
    }
    raise ConvertError(
        f"{folder}: no Llama checkpoint found: expected "
        + " or ".join(want[layout] for layout in order)
        + f"; found: {found}"
    )
