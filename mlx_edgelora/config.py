"""TrainConfig: every training option, its default and its help text, defined once.

The CLI parser is generated from the dataclass fields; precedence is CLI > YAML > default.
An unknown YAML key is an error that names the nearest valid key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

DEFAULT_LORA_KEYS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def _opt(default: Any, help: str, choices: list | None = None, **kw: Any) -> Any:
    """A dataclass field carrying its CLI help (and choices) in its metadata."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    # --- what to train on
    model: str | None = _opt(
        None,
        "mlx-lm model folder, Hugging Face repo id, .gguf file, or gemma3-270m "
        "(default: the embedded SmolLM2-135M-Instruct Q4_1)",
    )
    quantize: int | None = _opt(
        None, "quantize an unquantized model at load time to this many bits", choices=[4, 8]
    )
    data: str | None = _opt(
        None,
        "folder (searched recursively) or file of .txt/.md/.jsonl "
        "(default: the bundled sample folder)",
    )
    out: str = _opt("runs/adapter", "output folder for the adapter and checkpoints")
    # --- optimisation
    steps: int = _opt(40, "optimizer steps to run")
    epochs: float | None = _opt(
        None,
        "passes over the training rows; sets --steps to ceil(epochs x rows / (batch-size x "
        "grad-accum)), shown before the memory plan (default: use --steps)",
    )
    max_seq_len: int = _opt(256, "tokens per packed training sequence")
    batch_size: int = _opt(1, "sequences per micro-batch")
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step")
    lr: float = _opt(5e-4, "peak learning rate (AdamW, linear warm-up then cosine decay)")
    warmup: int = _opt(5, "warm-up steps of the learning-rate schedule")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of --lr")
    weight_decay: float = _opt(0.0, "AdamW weight decay on the LoRA weights")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this value (0 = off)")
    seed: int = _opt(0, "seed for LoRA init, data split and shuffling")
    # --- adapter: LoRA (default) or LARS
    adapter: str = _opt(
        "lora",
        "lora: a low-rank weight update x A B (mergeable, mlx-lm format); lars: a low-rank, "
        "input-dependent gate on each linear's input blocks (LARS; cannot be fused)",
        choices=["lora", "lars"],
    )
    rank: int = _opt(16, "LoRA rank (with --adapter lars: the gate's rank)")
    lora_scale: float = _opt(2.0, "LoRA scale (alpha / rank): the update is scale * x A B")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA input")
    lora_keys: list = _opt(
        DEFAULT_LORA_KEYS, "projections inside each block that get the adapter (dotted paths)"
    )
    num_layers: int = _opt(-1, "the adapter on the last N blocks (-1 = all blocks)")
    lars_block: int = _opt(
        32, "--adapter lars: input channels per gate (must divide every adapted input width)"
    )
    # --- data
    val_fraction: float = _opt(0.1, "fraction of documents held out for validation")
    test: bool = _opt(
        False,
        "after training, report the exact loss on --data's test.jsonl (mlx-lm layout: "
        "train/valid/test.jsonl; test is never trained on); with --resume of a finished run, "
        "only that",
    )
    # --- cadence and output
    eval_every: int = _opt(10, "validation loss/perplexity every N steps (and at the end)")
    eval_batches: int = _opt(8, "validation micro-batches per evaluation (-1 = all)")
    keep_best: bool = _opt(
        False,
        "save the adapter with the lowest (exact) validation loss as adapters.safetensors, "
        "its step in adapter_config.json, instead of the last one",
    )
    early_stop: int = _opt(
        0, "stop after N evaluations in a row without a lower validation loss (0 = off)"
    )
    save_every: int = _opt(10, "write a resumable checkpoint every N steps")
    report_to: str = _opt(
        "none",
        "also send metrics to wandb or tensorboard (optional packages; metrics.jsonl is "
        "always written)",
        choices=["none", "wandb", "tensorboard"],
    )
    resume: bool = _opt(False, "continue from the last checkpoint in --out")
    overwrite: bool = _opt(False, "allow writing into a non-empty --out that is not a resume")
    # --- several Macs (data parallel, launched with mlx.launch; see README)
    backend: str = _opt(
        "any",
        "distributed backend joining the ranks: ring (TCP over Ethernet or Thunderbolt, what "
        "mlx.launch starts by default), mpi (mpirun), jaccl (RDMA over Thunderbolt 5), or any "
        "(the first that works); a plain run is one rank whatever this says",
        choices=["any", "ring", "mpi", "jaccl"],
    )
    dist_timeout: float = _opt(
        600.0,
        "seconds a rank waits without progress on the others (one forward pass, or one "
        "segment's backward) before it removes its spill folders and exits with an error",
    )
    # --- memory engine (technique 2)
    engine: str = _opt(
        "segments",
        "segments: segment-wise forward, per-segment backward (low memory); "
        "graph: one autodiff graph (reference)",
        choices=["segments", "graph"],
    )
    checkpoint_every: int = _opt(1, "blocks (halves with --split-blocks) per checkpoint segment")
    split_blocks: bool = _opt(
        True,
        "a checkpoint boundary also between each block's attention and MLP halves: the "
        "recompute peak is the larger half's, not the whole block's, and a streamed segment "
        "loads only its half's weights (twice the boundaries, the same compute)",
    )
    activations: str = _opt(
        "disk",
        "where segment boundaries live between forward and backward: "
        "ram, or disk (spilled to --spill-dir, overlapping I/O with compute)",
        choices=["ram", "disk"],
    )
    spill_dir: str | None = _opt(
        None, "folder for spilled boundaries (default: a private temp folder beside --out)"
    )
    cache_policy: str = _opt(
        "none",
        "selective caching in --engine segments: none (keep only segment inputs; every block "
        "runs again in backward), last (the last segment is not checkpointed: it runs once, "
        "under autodiff with the loss head; saves 1/segments of the recompute, costs that "
        "segment's activations at the loss head's peak)",
        choices=["none", "last"],
    )
    keep_attention: bool = _opt(
        True,
        "keep each attention half's output and log-sum-exp from the forward with its "
        "boundary (RAM or disk, as --activations), so that the backward does not run the "
        "attention forward again (faster steps; costs one [tokens, q width] array per "
        "block in the boundary store, and one more while a half recomputes)",
    )
    attn_chunk: int = _opt(
        256,
        "query/key chunk of the chunked attention used in recompute, and the token chunk of "
        "the attention half's norm and q/k/v/o projections (0 = unchunked; a tile "
        "of heads x chunk x chunk floats: 256 halves 512's peak at the same speed)",
    )
    mlp_chunk: int = _opt(
        256,
        "token chunk of the MLP half (norm and MLP) in recompute (0 = unchunked; smaller = "
        "less memory)",
    )
    stream_weights: bool | None = _opt(
        None,
        "keep frozen block and embedding/head weights on disk and load each segment's only "
        "while it runs (default: on with --engine segments; costs a few ms per block read)",
    )
    stream_state: bool | None = _opt(
        None,
        "keep the LoRA weights, gradient sums and AdamW moments on disk per checkpoint unit, "
        "loaded only while the unit runs; the update is applied unit by unit with the same "
        "global-norm clipping (default: on with --stream-weights; costs a write and a read of "
        "the state per step)",
    )
    dtype: str = _opt(
        "auto",
        "dtype of the frozen float weights (resident and streamed), the segment boundaries "
        "(RAM and spill files) and the activations; norm statistics, softmax, the loss, the "
        "LoRA weights and the optimizer state stay float32. auto follows the model (bfloat16 "
        "for mlx-community INT4 folders, float32 for GGUF files) and on a CPU, whose "
        "half-precision matmuls have no BLAS, computes in float32 while storing in the "
        "model's dtype; bfloat16 or float16 computes in it everywhere (float16 refuses an "
        "overflow); float32 is the full-precision reference",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    # --- loss head (techniques 3 and 4)
    loss: str = _opt(
        "chunked",
        "full: all-vocabulary logits (reference); chunked: exact, vocabulary-chunked; "
        "subset: softmax over a k-token vocabulary subset that holds the targets (approximate)",
        choices=["full", "chunked", "subset"],
    )
    subset_k: int = _opt(1000, "vocabulary subset size for --loss subset")
    subset_fill: str = _opt(
        "predicted",
        "how --loss subset fills S beyond the targets: predicted = the tokens the model "
        "expects most this step (two no-gradient passes over the head); neighbours = "
        "the targets' nearest LM-head rows (the paper's; one-time table, less accurate); "
        "sampled = the predicted fill at each scoring pass, in between the cached most "
        "expected tokens plus --subset-samples importance-sampled negatives (sampled softmax "
        "with the log expected-count correction)",
        choices=["predicted", "neighbours", "sampled"],
    )
    subset_tail: bool = _opt(
        True,
        "with --subset-fill predicted: the tokens outside S count as one extra logit, so the "
        "loss value is exact and drifts less than the paper's renormalization (off); still an "
        "approximate gradient: 2.2 percent higher held-out loss than exact training on an "
        "outside FAQ set (issue 21)",
    )
    subset_refresh: int = _opt(
        1,
        "with --subset-fill predicted or sampled: run the scoring pass over the whole head "
        "only every N "
        "micro-batches and reuse its ranking and tail statistics in between (cheaper; those "
        "steps' training loss is approximate and logged as such; validation stays exact)",
    )
    subset_samples: int = _opt(
        0,
        "with --subset-fill sampled: how many of the k rows are drawn negatives "
        "(0 = k / 2); the rest are the targets and the cached most expected tokens",
    )
    vocab_chunk: int = _opt(8192, "vocabulary chunk for the chunked exact loss")
    # --- planning
    memory_budget_gb: float | None = _opt(
        None,
        "run the fastest configuration whose planned peak fits this many GB: the memory "
        "options you did not set (--activations, --stream-weights, --stream-state, "
        "--checkpoint-every, --split-blocks, chunk sizes, --cache-policy, --dtype) are chosen, "
        "the ones you set are kept; refuse to start if nothing fits (default: half of this "
        "machine's memory, and the default options are kept whenever they fit it)",
    )
    gpu_buffers: str = _opt(
        "auto",
        "on a GPU (Metal, CUDA), how much work MLX queues per command buffer: every array an "
        "op makes stays allocated until its buffer finishes on the GPU, above the memory "
        "plan (measured on CUDA: up to 3.6x the plan at 16K tokens). small: one op per "
        "buffer (MLX_MAX_OPS_PER_BUFFER=1, MLX_MAX_MB_PER_BUFFER=1; the plan held, steps ~3x "
        "slower there); mlx: MLX's own limits (fastest); auto: small when "
        "--memory-budget-gb is given, mlx otherwise. The CLI starts itself again with the "
        "limits; in Python set them before importing mlx. No effect on a CPU",
        choices=["auto", "small", "mlx"],
    )
    config: str | None = _opt(None, "YAML file whose keys mirror these flags")
    # Not an option: the names of the options the user set (CLI or YAML), which the planner
    # never changes. None (a TrainConfig built in Python): every option that differs from its
    # default counts as set.
    given: tuple | None = field(default=None, repr=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        if self.given is None:
            self.given = tuple(
                f.name
                for f in dataclasses.fields(self)
                if not f.metadata.get("internal") and getattr(self, f.name) != _default(f)
            )

    def validate(self) -> TrainConfig:
        """Check every value's type and range once, here, naming the flag and the fix.

        Types matter because YAML is loose: `overwrite: "false"` is a non-empty string, which
        Python would read as true (and delete a run); `rank: 4.5` or `steps: "abc"` would fail
        deep inside MLX; `lora_keys: a.b` would be split into characters.
        """
        for f in options():
            setattr(self, f.name, _checked(f, getattr(self, f.name)))
        self._check_ranges()
        if self.stream_weights is None:  # auto: streaming needs the segment engine
            self.stream_weights = self.engine == "segments"
        if self.stream_state is None:
            self.stream_state = bool(self.stream_weights) and self.engine == "segments"
        return self

    def _check_ranges(self) -> None:
        positive = ["steps", "max_seq_len", "batch_size", "grad_accum", "rank", "subset_k"]
        positive += ["lars_block", "subset_refresh"]
        for name in positive + ["checkpoint_every", "vocab_chunk"]:
            if getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} must be at least 1 (got {getattr(self, name)})")
        for name in ["attn_chunk", "mlp_chunk", "warmup", "eval_every", "save_every", "early_stop"]:
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must be >= 0 (got {getattr(self, name)})")
        for name, upper in [("val_fraction", "1)"), ("lora_dropout", "1)"), ("min_lr_ratio", "1]")]:
            v = getattr(self, name)
            if not (0 <= v < 1 or (upper == "1]" and v == 1)):
                raise UserError(f"--{_flag(name)} must be in [0, {upper} (got {v})")
        for name in ["lr", "weight_decay", "grad_clip", "memory_budget_gb", "dist_timeout"]:
            v = getattr(self, name)
            nonzero = ("lr", "memory_budget_gb", "dist_timeout")
            if v is not None and (v < 0 or (v == 0 and name in nonzero)):
                raise UserError(f"--{_flag(name)} must be positive (got {v})")
        if not self.lora_keys:
            raise UserError("--lora-keys must name at least one projection, e.g. self_attn.q_proj")
        if not self.out.strip():
            raise UserError("--out must name a folder (got an empty string)")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"--seed must be in [0, 2^32) (got {self.seed})")
        if self.num_layers == 0 or self.num_layers < -1:
            raise UserError(
                f"--num-layers must be -1 (all blocks) or at least 1 (got {self.num_layers})"
            )
        if self.eval_batches == 0 or self.eval_batches < -1:
            raise UserError(
                f"--eval-batches must be -1 (all) or at least 1 (got {self.eval_batches})"
            )
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"--epochs must be positive (got {self.epochs})")
        scored = self.loss == "subset" and self.subset_fill in ("predicted", "sampled")
        if self.subset_refresh > 1 and not scored:
            raise UserError(
                "--subset-refresh applies to --loss subset --subset-fill predicted or sampled "
                "only; drop it or set both"
            )
        if self.subset_samples < 0 or (
            self.subset_samples and self.subset_samples >= self.subset_k
        ):
            raise UserError(
                f"--subset-samples must be in [0, --subset-k) (got {self.subset_samples} with "
                f"--subset-k {self.subset_k}); 0 = half of k"
            )
        if self.subset_samples and (self.loss, self.subset_fill) != ("subset", "sampled"):
            raise UserError(
                "--subset-samples applies to --loss subset --subset-fill sampled only; "
                "drop it or set both"
            )
        if self.early_stop and not self.eval_every:
            raise UserError("--early-stop needs evaluations: set --eval-every N (N >= 1)")
        if (self.keep_best or self.early_stop) and self.val_fraction <= 0:
            raise UserError("--keep-best / --early-stop need validation data: --val-fraction > 0")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        del d["given"]
        return d

    def is_given(self, name: str) -> bool:
        """Did the user set option `name` (so that the planner must keep it)?"""
        return name in self.given

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def options() -> list[dataclasses.Field]:
    """TrainConfig's fields that are options (flags and YAML keys)."""
    return [f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")]


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _flag(name: str) -> str:
    return name.replace("_", "-")


_MAX_INT = 2**62  # beyond any real option; keeps step/seed arithmetic inside int64


def _checked(f: dataclasses.Field, v: Any) -> Any:
    """`v` as field `f`'s type (an int for a float field becomes a float; a numeric string,
    as PyYAML reads `1e-4`, becomes a number); else a one-line UserError."""
    typ, flag = _field_type(f), f"--{_flag(f.name)}"
    if v is None and "None" in str(f.type):
        return v
    if typ is bool:
        if not isinstance(v, bool):
            raise UserError(f"{flag} must be true or false, not {v!r} (write it without quotes)")
        return v
    if typ is list:
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            raise UserError(f"{flag} must be a list of names, e.g. [self_attn.q_proj] (got {v!r})")
        return list(v)
    if typ in (int, float):
        v = _number(v, typ, flag)
    elif not isinstance(v, str):
        raise UserError(f"{flag} must be text (got {v!r}); put it in quotes")
    choices = f.metadata.get("choices")
    if choices and v not in choices:
        raise UserError(f"{flag} must be one of {', '.join(map(str, choices))} (got {v!r})")
    return v


def _number(v: Any, typ: type, flag: str) -> int | float:
    if isinstance(v, str):
        try:
            v = typ(v.strip()) if typ is float or v.strip().lstrip("+-").isdigit() else float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{flag} must be a number (got {v!r})")
    if typ is int:
        if not isinstance(v, int) and not (math.isfinite(v) and v == int(v)):
            raise UserError(f"{flag} must be a whole number (got {v!r})")
        if abs(int(v)) > _MAX_INT:
            raise UserError(f"{flag} is out of range (got {v!r})")
        return int(v)
    try:
        v = float(v)  # an int beyond float's range overflows
    except OverflowError:
        v = math.inf
    if not math.isfinite(v):
        raise UserError(f"{flag} must be a finite number (got {v!r})")
    return v


def _field_type(f: dataclasses.Field) -> type:
    t = str(f.type)
    for name, typ in [("bool", bool), ("int", int), ("float", float), ("list", list)]:
        if t.startswith(name):
            return typ
    return str


def build_parser(prog: str = "python -m mlx_edgelora.train") -> argparse.ArgumentParser:
    """An argparse parser generated from TrainConfig; every default is None (= not given)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a quantized Llama, Qwen, Mistral or Gemma 3 with LoRA on your text.",
    )
    for f in options():
        typ, meta = _field_type(f), f.metadata
        default = _default(f)
        help_text = meta["help"]
        if "default:" not in help_text:  # a help text may describe its own (auto) default
            help_text += f" (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typ is list:
            kw["nargs"] = "+"
        else:
            kw["type"] = typ
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
        p.add_argument(f"--{_flag(f.name)}", **kw)
    return p


def load_yaml(path: str) -> dict:
    """Read a YAML config; unknown keys are errors naming the nearest valid key."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: config file not found; check the --config path")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of option: value at the top level")
    valid = {f.name for f in options()}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in valid:
            near = difflib.get_close_matches(name, sorted(valid), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise UserError(f"{path}: unknown option '{key}'{hint}")
        out[name] = value
    return out


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """CLI > YAML (--config) > defaults, then validated."""
    args = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    merged: dict = {}
    if args.get("config"):
        merged.update(load_yaml(args["config"]))
    merged.update(args)
    try:
        cfg = TrainConfig(**merged, given=tuple(sorted(merged)))
    except TypeError as e:
        raise UserError(f"bad configuration: {e}") from None
    return cfg.validate()
