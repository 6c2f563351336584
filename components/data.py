"""Text data for calibration and evaluation: one loader for every source.

Sources: ``builtin:pydoc-train`` / ``builtin:pydoc-eval`` (English prose that ships
with CPython, split deterministically by topic), ``builtin:lee-news`` (natural English
news prose a package ships; evaluation only, see ``PACKAGED_CORPORA``), a local ``.txt``/``.jsonl``/
``.parquet`` file, or ``hf:NAME[:CONFIG]`` (a Hugging Face dataset; needs the hub or
its cache). ``s3://`` objects are downloaded by the component layer before the stage
runs, so stage logic only ever sees local files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from llmpress.components.errors import UserError
from llmpress.components.packaged import packaged_file
from pydantic import BaseModel, ConfigDict, Field

# name -> (PyPI distribution, file inside it, one document per line). lee-news is the Lee
# background corpus (Lee, Pincombe & Welsh 2005: 299 ABC news articles, 59,890 words) as
# gensim's wheel ships it for its own tests; llmpress reads the file only (install gensim
# with --no-deps, never imported). It is news, not documentation: a held-out text in a
# domain llmpress never calibrates on (calibration defaults to builtin:pydoc-train).
PACKAGED_CORPORA: dict[str, tuple[str, str]] = {"lee-news": ("gensim", "gensim/test/test_data/lee_background.cor")}
BUILTIN_CORPORA = ("pydoc-train", "pydoc-eval")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


class DataSpec(BaseModel):
    """Where text comes from and how much of it a consumer takes."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="builtin:NAME, a local .txt/.jsonl/.parquet file, s3://, or hf:NAME")
    text_field: str = Field("text", description="column holding the text (jsonl/parquet/hf)")
    split: str = Field("train", description="dataset split (hf sources)")
    num_samples: int = Field(128, gt=0, le=100_000, description="calibration sequences / max evaluation windows")
    seq_len: int = Field(512, gt=0, le=131_072, description="tokens per sequence")
    seed: int = Field(0, ge=0, description="seed for sampling calibration windows")


def pydoc_corpus(split: str) -> str:
    """CPython's own documentation topics, 9 in 10 for training, 1 in 10 held out."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held_out = set(keys[::10])
    chosen = [k for k in keys if (k in held_out) == (split == "eval")]
    return "\n\n".join(topics[k] for k in chosen)


def check_source(spec: DataSpec, field: str = "data") -> None:
    """Refuse a builtin or local source that cannot be read, without reading it."""
    source = spec.source
    if source.startswith("builtin:"):
        if source.removeprefix("builtin:") not in (*BUILTIN_CORPORA, *PACKAGED_CORPORA):
            known = ", ".join(f"builtin:{c}" for c in (*BUILTIN_CORPORA, *PACKAGED_CORPORA))
            raise UserError.field(f"{field}.source", source, f"builtin corpora are {known}")
        if source.removeprefix("builtin:") in PACKAGED_CORPORA:
            packaged_corpus_file(source.removeprefix("builtin:"), field)
    elif not source.startswith(("hf:", "s3://")):
        path = Path(source)
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError.field(f"{field}.source", source, f"a local file must end in {', '.join(LOCAL_SUFFIXES)}")
        if not path.is_file():
            raise UserError.field(f"{field}.source", source, "file not found")


def packaged_corpus_file(name: str, field: str = "data") -> Path:
    """The file of ``builtin:NAME`` inside the installed package that ships it."""
    distribution, member = PACKAGED_CORPORA[name]
    return packaged_file(name, distribution, member, f"{field}.source", f"only its file {member} is read")


def load_texts(spec: DataSpec, field: str = "data") -> list[str]:
    """Read the documents of a source; a missing or unreadable source is a UserError."""
    check_source(spec, field)
    source = spec.source
    if source.removeprefix("builtin:") in PACKAGED_CORPORA:
        lines = packaged_corpus_file(source.removeprefix("builtin:"), field).read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip()]
    if source.startswith("builtin:"):
        return [pydoc_corpus(source.removeprefix("builtin:pydoc-"))]
    if source.startswith("hf:"):
        return _load_hf(source.removeprefix("hf:"), spec, field)
    if source.startswith("s3://"):
        raise UserError.field(f"{field}.source", source, "s3:// data must be downloaded before the stage runs (component layer)")
    return _load_file(Path(source), spec.text_field, field)


def _load_file(path: Path, text_field: str, field: str) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record: Any = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError.field(f"{field}.source", f"{path}:{number}", f"each line must be JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise UserError.field(f"{field}.text_field", text_field, f"{path}:{number} has no string field of that name")
            texts.append(record[text_field])
        return texts
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise UserError.field(f"{field}.text_field", text_field, f"columns of {path.name} are {', '.join(table.column_names)}")
    return [t for t in table.column(text_field).to_pylist() if isinstance(t, str)]


def _load_hf(name: str, spec: DataSpec, field: str) -> list[str]:
    import datasets

    dataset_name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset_name, config or None, split=spec.split)
    except Exception as err:  # the hub, the cache or the name: all user-fixable
        raise UserError.field(f"{field}.source", f"hf:{name}", f"could not load the dataset ({type(err).__name__}: {str(err)[:120]})") from None
    if spec.text_field not in ds.column_names:
        raise UserError.field(f"{field}.text_field", spec.text_field, f"columns are {', '.join(ds.column_names)}")
    return [t for t in ds[spec.text_field] if isinstance(t, str)]


def token_stream(texts: list[str], tokenizer: Any) -> list[int]:
    """All documents tokenized and joined, separated by the end-of-text token."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    return stream


def calibration_samples(spec: DataSpec, tokenizer: Any, texts: list[str], field: str = "data.calibration") -> list[list[int]]:
    """``num_samples`` windows of ``seq_len`` tokens at seeded random offsets."""
    stream = token_stream(texts, tokenizer)
    if len(stream) < spec.seq_len + 1:
        raise UserError.field(f"{field}.seq_len", spec.seq_len, f"the data holds only {len(stream)} tokens; use a shorter seq_len or more data")
    rng = random.Random(spec.seed)
    last = len(stream) - spec.seq_len
    return [stream[o : o + spec.seq_len] for o in (rng.randint(0, last) for _ in range(spec.num_samples))]


def describe(spec: DataSpec, local_path: str | Path | None = None) -> dict[str, Any]:
    """What a consumer of ``spec`` read, for the record: a name, a digest that changes
    when the content or the way it is sampled changes, the source and the sampling
    settings. The content is hashed from the builtin corpus or the file (``local_path``:
    where an ``s3://`` source was downloaded); a hub dataset is named, not hashed."""
    import hashlib

    source = spec.source
    content = hashlib.sha256()
    if source.startswith("builtin:"):
        content.update(pydoc_corpus(source.removeprefix("builtin:pydoc-")).encode())
        name = source.removeprefix("builtin:")
    elif source.startswith("hf:"):
        content.update(source.encode())  # the hub's own revision is not known here
        name = source.removeprefix("hf:").replace("/", "-")
    else:
        path = Path(local_path or source)
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                content.update(block)
        name = source.rstrip("/").rsplit("/", 1)[-1]
    sampling = spec.model_dump(exclude={"source"})
    digest = hashlib.sha256(content.hexdigest().encode() + json.dumps(sampling, sort_keys=True).encode()).hexdigest()[:16]
    hashed = None if source.startswith("hf:") else content.hexdigest()
    return {"name": name, "digest": digest, "source": source, "profile": {**sampling, "content_sha256": hashed}}
