"""The demo's trainer process: a real optimizer step with torch on the tiny model, then an atomic checkpoint.

Step 0 is the initial model. Trainer step N (N >= 1) waits for the completions of orchestrator step
N-1 (``RUN/rollouts/step_{N-1}.jsonl``), takes one AdamW step of next-token loss on a minibatch of
them mixed with lines of local text (ending in EOS, so the model can learn to stop), and writes ``RUN/weights/step_N``
with :class:`weightwatch.trainer.CheckpointWriter` (config and tokenizer copied, so vLLM can reload it).

Run by ``weightwatch demo``; standalone: ``python -m weightwatch.demo.trainer_proc --run-dir RUN --model DIR``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import weightwatch
from weightwatch.demo.layout import RunLayout, read_rollouts
from weightwatch.trainer import CheckpointWriter

_log = logging.getLogger("weightwatch.demo.trainer")
#: Files of a model directory that are weights or our own markers, not config for vLLM.
_NOT_CONFIG = (".safetensors", ".bin", ".pt", ".index.json")


def config_files(model_dir: Path) -> list[Path]:
    """Config, generation config and tokenizer files vLLM needs next to the weights."""
    return sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith(".") and not p.name.endswith(_NOT_CONFIG))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m weightwatch.demo.trainer_proc", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True, help="the tiny model directory (config, tokenizer, weights)")
    p.add_argument("--metrics-port", type=int, default=9401)
    p.add_argument("--metrics-addr", default="127.0.0.1")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--slow-writes", type=float, default=0.0, metavar="MS", help="inject this delay before each STABLE marker")
    p.add_argument("--train-samples", type=int, default=8,
                   help="completions per optimizer step (a random minibatch of the batch: keeps a step well under a generation step on 2 cores)")
    p.add_argument("--corpus-lines", type=int, default=4, help="lines of local text mixed into each step")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this step (0: until stopped)")
    p.add_argument("--seed", type=int, default=0)
    return p


class Trainer:
    """One model, one optimizer; ``train_step`` takes texts and returns the loss."""

    def __init__(self, model_dir: Path, lr: float, seed: int):
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM

        torch.manual_seed(seed)
        torch.set_num_threads(1)  # the demo shares two cores with vLLM; one is plenty for this model
        # On a laptop the trainer shares the CPU with the server and the orchestrator; in a real deployment it
        # has its own GPUs. A lower priority keeps its optimizer steps from delaying the admin path.
        try:
            os.nice(10)
        except OSError:
            pass
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr)

    def train_step(self, texts: list[str]) -> float:
        torch = self.torch
        texts = [t for t in texts if t.strip()] or ["."]
        enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return float(out.loss.detach())

    def warm_up(self, texts: list[str]) -> None:
        """One forward and backward pass without an optimizer step: the first backward is several times
        slower than the rest (lazy kernels and allocations) and would otherwise show as a checkpoint wait."""
        enc = self.tok(texts or ["."], return_tensors="pt", padding=True, truncation=True, max_length=256)
        out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=enc["input_ids"])
        out.loss.backward()
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.model.state_dict()


def _corpus_lines() -> list[str]:
    try:
        from weightwatch.inference.tiny_model import corpus_text

        lines = [ln.strip() for ln in corpus_text().split(".") if len(ln.strip()) > 20]
    except Exception:  # noqa: BLE001 - the corpus is a nicety; completions alone still train
        lines = []
    return [ln + "." for ln in lines] or ["The trainer writes new weights."]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = RunLayout.create(args.run_dir)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    tele = weightwatch.setup(
        "weightwatch-demo-trainer", role="trainer", metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
        span_file=layout.spans("trainer"), log_file=layout.log("trainer"),
    )
    logging.getLogger("weightwatch.demo").setLevel(logging.INFO)
    try:
        trainer = Trainer(args.model, args.lr, args.seed)
        extras = config_files(args.model)
        writer = CheckpointWriter(layout.weights, keep_last=args.keep_last, inject_delay_ms=args.slow_writes)
        rng = random.Random(args.seed)
        corpus = _corpus_lines()
        eos = trainer.tok.eos_token or ""
        trainer.warm_up([ln + eos for ln in corpus[: args.corpus_lines]])
        writer.write(0, trainer.state_dict(), extra_files=extras)
        _log.info("trainer ready: metrics on :%s, wrote step 0", tele.metrics_port)
        step = 1
        while not stop.is_set() and (args.max_steps <= 0 or step <= args.max_steps):
            src = layout.rollout_file(step - 1)
            while not src.exists() and not stop.is_set():
                stop.wait(0.05)
            if stop.is_set():
                break
            rollouts = read_rollouts(src)
            picked = rng.sample(rollouts, min(args.train_samples, len(rollouts))) if args.train_samples > 0 else rollouts
            texts = [str(r.get("prompt", "")) + str(r.get("text", "")) for r in picked]
            texts += [ln + eos for ln in rng.sample(corpus, min(args.corpus_lines, len(corpus)))]
            t0 = time.perf_counter()
            loss = trainer.train_step(texts)
            train_ms = (time.perf_counter() - t0) * 1000
            path = writer.write(step, trainer.state_dict(), extra_files=extras)
            _log.info("trainer step=%d loss=%.4f train_ms=%.1f rollouts=%d ckpt=%s", step, loss, train_ms, len(rollouts), path)
            step += 1
    except KeyboardInterrupt:
        pass
    finally:
        tele.force_flush()
        weightwatch.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
