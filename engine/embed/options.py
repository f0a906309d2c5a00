"""The options of a corpus job (:class:`EmbedOptions`, the command's flags) and the names they take.
Standard library only: ``python -m engine.embed --help`` reads them without loading the engine."""
from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("parquet", "npy")
OUTPUT_DTYPES = ("float32", "float16")  # dtypes of the stored embeddings


@dataclass(frozen=True)
class EmbedOptions:
    """Options of :func:`embed_corpus` (the CLI's flags).

    What the output depends on, recorded in the manifest and required to match on ``resume``:
    ``format``, ``output_dtype`` (the stored embedding dtype), ``dtype`` (the compute dtype, ``auto``
    = float32 on CPU, bfloat16 on CUDA, recorded resolved), ``normalize`` (None: the engine's
    default), ``max_length`` (None: the engine's), ``instruction`` / ``prompt_name``, ``text_field``,
    ``id_field`` (None: ``id`` when the input has it, else line numbers), ``shard_size``.
    How it runs, free to change between runs: ``device``, ``batch_size``, ``max_batch_tokens``,
    ``workers``, ``ray`` (None: no Ray; "": ``ray.init()``'s default; else an address, ``auto`` for
    an existing cluster), ``gpus_per_worker``, ``threads`` (torch threads per worker), ``skip_bad``,
    ``quiet``, ``resume``, ``force``.
    """

    format: str = "parquet"
    output_dtype: str = "float32"
    dtype: str = "auto"
    normalize: bool | None = None
    max_length: int | None = None
    instruction: str | None = None
    prompt_name: str | None = None
    text_field: str = "text"
    id_field: str | None = None
    shard_size: int = 100_000
    device: str | None = None
    batch_size: int = 256
    max_batch_tokens: int = 16384
    workers: int | None = None
    ray: str | None = None
    gpus_per_worker: float = 1.0
    threads: int | None = None
    skip_bad: bool = False
    quiet: bool = False
    resume: bool = False
    force: bool = False

    @property
    def distributed(self) -> bool:
        return self.workers is not None or self.ray is not None
