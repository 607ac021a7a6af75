"""mlx-edgelora vs `mlx_lm.lora` on the same model, data, sequence length and steps.

Model: the embedded SmolLM2-135M-Instruct Q4_1 GGUF converted once to an mlx-lm folder
(`load_model(None)`, then mlx-lm's `save_model` / `save_config` and the tokenizer's
`save_pretrained`): 8-bit embedding/LM head, 4-bit blocks, group 32, as in the GGUF.
Data: the prompt/completion lines of assets/sample_chat.jsonl. mlx-lm does not pack (one line = one
sequence, truncated at --max-seq-length), we do, so to compare equal work the lines are made
long: each line's prompt is several earlier Q/A pairs followed by a question, its completion
the answer, grown to 90-100% of the sequence length (chat-rendered token count). Both tools read
the same train.jsonl; only completions carry loss in both (`--mask-prompt` for mlx-lm).
Tokens/s below counts sequence tokens (everything the model processes): ours = max-seq-len
per step (packed rows), mlx-lm = the mean line length.

Each run is a fresh process running the tool's own main in-process (`--wrap`), printing
`mx.get_peak_memory()` and max RSS (`resource.getrusage`) at exit; peak is read the same way
for both, over the whole run (validation included).

Equal loss: the tools see the rows in a different order (we pack, mlx-lm shuffles lines), so
their training losses are not comparable step by step. Each saved adapter is therefore scored
afterwards by one evaluator, on the same held-out lines (exact masked CE over the completion
tokens, base model + adapter, full-vocabulary softmax). mlx-lm gets our default peak learning
rate (constant, Adam); ours runs its defaults (AdamW, warm-up then cosine decay).

    python bench/vs_mlx_lm.py --contexts 512 2048 --steps 3

Results are merged into bench/results/vs_mlx_lm.json by (seq, tool): a run of one context
keeps the others' rows. `--tools` picks a subset of the three runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from locked import run_locked

from mlx_edgelora.config import DEFAULT_LORA_KEYS, TrainConfig

HERE = Path(__file__).parent
RESULTS = HERE / "results"
WORK = Path(os.environ.get("BENCH_TMP", "/tmp")) / "edgelora-vs-mlx-lm"
KEYS = DEFAULT_LORA_KEYS  # the same 7 projections for both tools
OURS = "mlx-edgelora (defaults)"
TOOLS = {  # label -> (runner, output folder prefix, --grad-checkpoint)
    "mlx-lm": ("mlx_lm", "mlxlm", False),
    "mlx-lm --grad-checkpoint": ("mlx_lm", "mlxlmgc", True),
    OURS: ("ours", "ours", False),
}


# ------------------------------------------------------------------------------ preparation


def convert_model(folder: Path):
    """The embedded GGUF as an mlx-lm folder (kept quantized); returns the tokenizer."""
    from mlx_lm.utils import save_config, save_model

    from mlx_edgelora import load_model

    loaded = load_model(None)
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        save_model(folder, loaded.model)
        save_config(dict(loaded.config), folder / "config.json")
        loaded.tokenizer.save_pretrained(str(folder))
    return loaded.tokenizer


def _length(tokenizer, prompt: str, completion: str) -> int:
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return len(tokenizer.apply_chat_template(msgs, tokenize=True))


def long_lines(tokenizer, seq: int, n_lines: int) -> tuple[list[dict], list[int]]:
    """Prompt/completion lines of ~0.9*seq tokens, cycling through the sample records."""
    records = [json.loads(x) for x in (HERE.parent / "assets/sample_chat.jsonl").open()]
    records = [r for r in records if "prompt" in r]  # the 24 prompt/completion lines
    lines, lengths, i = [], [], 0
    for _ in range(n_lines):
        context: list[str] = []
        while True:
            r = records[i % len(records)]
            i += 1
            prompt = "\n\n".join(context + [r["prompt"]])
            n = _length(tokenizer, prompt, r["completion"])
            while n > seq and context:  # too long: drop the oldest pair (no truncation)
                context.pop(0)
                prompt = "\n\n".join(context + [r["prompt"]])
                n = _length(tokenizer, prompt, r["completion"])
            if n >= 0.9 * seq or len(context) > 4 * len(records):
                break
            context.append(f"Q: {r['prompt']}\nA: {r['completion']}")
        lines.append({"prompt": prompt, "completion": r["completion"]})
        lengths.append(n)
    return lines, lengths


def write_data(tokenizer, seq: int, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    train, lens = long_lines(tokenizer, seq, 12)
    valid, _ = long_lines(tokenizer, seq, 2)
    for name, rows in [("train", train), ("valid", valid)]:
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "train_lines": len(train),
        "mean_line_tokens": sum(lens) / len(lens),
        "max_line_tokens": max(lens),
    }


def heldout_loss(model: Path, adapter: Path | None, data: Path, seq: int) -> float:
    """Mean exact CE over the completion tokens of valid.jsonl, base model (+ adapter)."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from mlx_edgelora import quant
    from mlx_edgelora.data import load_documents
    from mlx_edgelora.generate import load_for_generation

    loaded = load_for_generation(str(model), None if adapter is None else str(adapter))
    quant.prepare_for_training(loaded.model)  # the backend's fast kernel
    total, count = 0.0, 0
    for ex in load_documents(str(data / "valid.jsonl"), loaded.tokenizer):
        tokens = np.array(ex.tokens[:seq])
        mask = np.array(ex.mask[:seq])[1:]
        logits = loaded.model(mx.array(tokens[None, :-1]))[0].astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, mx.array(tokens[1:]), reduction="none")
        total += float((ce * mx.array(mask)).sum())
        count += int(mask.sum())
    return total / count


# ----------------------------------------------------------------------------- the runners


def mlx_lm_argv(model: Path, data: Path, seq: int, steps: int, ckpt: bool, out: Path):
    cfg = out / "lora.yaml"
    out.mkdir(parents=True, exist_ok=True)
    cfg.write_text(
        json.dumps({"lora_parameters": {"keys": KEYS, "rank": 16, "scale": 2.0, "dropout": 0.0}})
    )  # JSON is YAML
    argv = [
        "--model",
        str(model),
        "--train",
        "--data",
        str(data),
        "--mask-prompt",
        "--num-layers",
        "-1",
        "--batch-size",
        "1",
        "--iters",
        str(steps),
        "--max-seq-length",
        str(seq),
        "--learning-rate",
        str(TrainConfig().lr),
        "--steps-per-report",
        "1",
        "--val-batches",
        "1",
        "--steps-per-eval",
        "1000",
        "--save-every",
        "1000",
        "--adapter-path",
        str(out / "adapter"),
        "-c",
        str(cfg),
    ]
    return argv + (["--grad-checkpoint"] if ckpt else [])


def ours_argv(model: Path, data: Path, seq: int, steps: int, out: Path):
    return [
        "--model",
        str(model),
        "--data",
        str(data / "train.jsonl"),
        "--out",
        str(out),
        "--overwrite",
        "--steps",
        str(steps),
        "--max-seq-len",
        str(seq),
    ]


def wrap(tool: str, argv: list[str]) -> None:
    """Run a tool's main in this process; print peak memory, max RSS and step records."""
    import mlx_edgelora  # noqa: F401,I001  (OpenBLAS before mlx; as our tool does)
    import mlx.core as mx

    records: list[dict] = []
    t0 = time.perf_counter()
    if tool == "mlx_lm":
        import mlx_lm.lora as ml
        from mlx_lm.tuner.callbacks import TrainingCallback

        class Capture(TrainingCallback):
            def on_train_loss_report(self, info: dict) -> None:
                records.append(dict(info))

        ml.get_reporting_callbacks = lambda *a, **k: Capture()  # run() builds its own
        sys.argv = ["mlx_lm.lora", *argv]
        ml.main()
    else:
        from mlx_edgelora.train import main

        if main(argv) != 0:
            sys.exit(1)
        out = Path(argv[argv.index("--out") + 1])
        records = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    print(
        json.dumps(
            {
                "peak_gb": mx.get_peak_memory() / 1024**3,
                "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
                "wall_s": time.perf_counter() - t0,
                "records": records,
            }
        ),
        flush=True,
    )


def run_wrapped(tool: str, argv: list[str], timeout: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--wrap", tool, *argv]
    load = [round(x, 2) for x in os.getloadavg()]
    p = run_locked(cmd, timeout)
    if p is None:
        return {"status": "timeout", "timeout_s": timeout, "loadavg": load}
    lines = [x for x in p.stdout.splitlines() if x.startswith('{"peak_gb"')]
    if p.returncode or not lines:
        return {"status": "error", "stderr_tail": (p.stderr + p.stdout)[-2000:], "loadavg": load}
    return {
        "status": "ok",
        "loadavg": load,
        "loadavg_after": list(os.getloadavg()),
        **json.loads(lines[-1]),
    }


def summarize(r: dict, tool: str, seq_tokens: float) -> dict:
    """Per-step seconds, sequence tokens/s and losses from the captured step records."""
    if r["status"] != "ok" or not r["records"]:
        return r
    recs = r.pop("records")
    if tool == "mlx_lm":
        step_s = [1 / x["iterations_per_second"] for x in recs]
        losses = [x["train_loss"] for x in recs]
    else:
        recs = [x for x in recs if "loss" in x]
        el = [x["elapsed_s"] for x in recs]
        step_s = [b - a for a, b in zip([0.0] + el[:-1], el)]
        losses = [x["loss"] for x in recs]
    r.update(
        step_s=[round(s, 2) for s in step_s],
        loss_first=round(losses[0], 4),
        loss_last=round(losses[-1], 4),
        seq_tokens_per_step=round(seq_tokens, 1),
        tokens_per_s=round(seq_tokens * len(step_s) / sum(step_s), 1),
    )
    return r


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--wrap":
        wrap(sys.argv[2], sys.argv[3:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--tools", nargs="+", choices=list(TOOLS), default=list(TOOLS))
    a = p.parse_args()
    import mlx_edgelora  # noqa: F401

    model = WORK / "smollm2-mlx"
    tok = convert_model(model)
    path = RESULTS / "vs_mlx_lm.json"
    results = json.loads(path.read_text()) if path.exists() else []
    for seq in a.contexts:
        data = WORK / f"data{seq}"
        info = write_data(tok, seq, data)
        base = round(heldout_loss(model, None, data, seq), 4)  # the untrained starting point
        for label in a.tools:
            tool, prefix, grad_ckpt = TOOLS[label]
            out = WORK / f"{prefix}{seq}"
            if tool == "ours":
                argv, adapter = ours_argv(model, data, seq, a.steps, out), out
            else:
                argv = mlx_lm_argv(model, data, seq, a.steps, grad_ckpt, out)
                adapter = out / "adapter"
            r = run_wrapped(tool, argv, a.timeout)
            tokens = seq if tool == "ours" else info["mean_line_tokens"]
            r = summarize(r, tool, tokens)
            if r["status"] == "ok":
                r["heldout_loss"] = round(heldout_loss(model, adapter, data, seq), 4)
            r.update(
                label=label,
                seq=seq,
                steps=a.steps,
                data=info,
                command=" ".join(["python bench/vs_mlx_lm.py --wrap", tool, *argv]),
            )
            results = [x for x in results if (x["seq"], x["label"]) != (seq, label)] + [r]
            for x in results:
                if x["seq"] == seq:
                    x["base_heldout_loss"] = base
            results.sort(key=lambda x: (x["seq"], list(TOOLS).index(x["label"])))
            print(
                seq,
                label,
                {
                    k: r.get(k)
                    for k in ("status", "peak_gb", "max_rss_gb", "tokens_per_s", "heldout_loss")
                },
                flush=True,
            )
            RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1))
    (RESULTS / "vs_mlx_lm.md").write_text(markdown(results))


def markdown(results: list[dict]) -> str:
    """One row per run; the last two columns compare each mlx-lm run with ours at that length."""
    lines = [
        "| seq | tool | steps | peak GB | max RSS GB | tokens/s | train loss first → last"
        " | held-out loss: base → after | peak ÷ ours | ours' speed ÷ this | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ours = {r["seq"]: r for r in results if r["label"] == OURS and r["status"] == "ok"}
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['seq']} | {r['label']} | {r['steps']} | {r['status']} |" + " |" * 7)
            continue
        o = ours.get(r["seq"])
        ratio = f"{r['peak_gb'] / o['peak_gb']:.1f}×" if o else "?"
        speed = f"{o['tokens_per_s'] / r['tokens_per_s']:.1f}×" if o else "?"
        held = r.get("heldout_loss")
        base = r.get("base_heldout_loss")
        lines.append(
            f"| {r['seq']} | {r['label']} | {r['steps']} | {r['peak_gb']:.3f}"
            f" | {r['max_rss_gb']:.3f} | {r['tokens_per_s']:.1f}"
            f" | {r['loss_first']:.3f} → {r['loss_last']:.3f}"
            f" | {'' if base is None else f'{base:.4f} → '}{'' if held is None else f'{held:.4f}'}"
            f" | {ratio} | {speed}"
            f" | {r['loadavg'][0]:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
