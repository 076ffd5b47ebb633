#!/usr/bin/env python
"""Validation perplexity after one-shot pruning with no fine-tuning: a small byte-level Llama.

What is measured and how:

1. Corpus: every ``*.py`` under ``os.path.dirname(os.__file__)`` (the Python standard library's own
   source, ``site-packages`` excluded), sorted by path and concatenated as bytes; tokens are bytes
   (vocabulary 256). The last ``--heldout`` fraction of the files (default 5%) is the validation split.
2. Model: ``LlamaForCausalLM`` from a ``LlamaConfig`` (default hidden 320, 4 layers, 10 heads of 32,
   FFN 1280, untied LM head: 6.7 M parameters; ``--hidden 384 --layers 6 --heads 6 --ffn 1536`` is a
   14.4 M one), random init, trained for ``--train-minutes`` of wall time (or ``--train-steps`` steps:
   the same model on every machine) on random windows of the training split (AdamW, linear warm-up,
   then a cosine learning rate over the budget). The checkpoint is cached in ``$FXPRUNE_CACHE_DIR/lm`` (default
   ``~/.cache/fxprune/lm``) under a key of the config, the training settings and the corpus (its
   files, bytes and SHA-256), so a rerun skips training.
3. Evaluation: perplexity ``exp(mean NLL)`` of the next byte over ``--eval-windows`` windows of
   ``--seq-len`` bytes spread evenly over the validation split.
4. One-shot pruning with fxprune, per criterion (``magnitude``, ``activation``, ``wanda_sp``, ``flap``) and
   compensation (``none``, ``bias``, ``least_squares``): ``fxprune.compile(model, (input_ids,), config)``
   with local scope (every layer's heads and FFN channels are pruned to the ratio), ``prune()`` once,
   no training. Columns: each ratio of ``--ratios`` for heads + FFN channels, and ``--hidden-ratio``
   with the hidden size pruned too (a second pruner with ``prune_hidden_size: True`` at the same ratio; with
   the same compensation the two step together, so their layers are fitted in one sequence).
   The ``flap_loss`` rows are ``flap`` pruned from ``calibrate(batches, loss=...)`` with the batch's own next-byte
   NLL as the loss, so flap weighs output error by the loss gradient's second moment at each reading layer.
   Calibration: ``--calibration-windows`` random training windows. The statistics depend only on the
   dense model, the windows and which groups are pruned, so they are collected once per column kind
   (heads + FFN; + hidden) with ``pruning.calibrate(batches)`` (``gram=True`` with ``--compensation-inputs dense``) and handed to each fresh
   ``compile`` as ``calibrate()`` would leave them; one run per kind also calls ``calibrate()`` itself and
   its perplexity is checked to be the same. Every run compacts the model and compares the compact
   graph's logits with the masked model's on one validation batch; the ``--compact-ppl`` rows also
   report the compact model's own perplexity.
5. Peer: Torch-Pruning's ``MagnitudePruner`` with ``GroupMagnitudeImportance(p=2)`` (L2, mean over the
   group), local, heads removed whole (``num_heads``, ``prune_num_heads=True``, ``prune_head_dims=False``,
   as its LLM example does) with the same number of heads as fxprune removes; the LM head is ignored,
   and without the hidden size ``o_proj``/``down_proj`` are ignored too (the roots of the hidden group).
   An error is recorded in the table.
6. Calibration cost: wall time and peak RSS (``VmHWM`` reset before ``calibrate()``) of calibrating
   ``BertModel(BertConfig())`` and a Llama of hidden 1024 and 8 layers (random init) on
   ``--cost-sequences`` sequences of 128 tokens, with and without the Gram matrices least_squares needs.

Usage::

    python benchmarks/bench_retrain_free_lm.py --train-minutes 10 --hidden 320 --layers 4 --heads 10 --ffn 1280 \
        --seq-len 128 --batch 16 --out benchmarks/results_retrain_free_lm.md --json /tmp/fxlm/results.json

(these are the defaults; about 28 min on a 2-core machine shared with other jobs, 10 of them training, which a
rerun with the same settings loads from the cache instead)
"""

from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

import _measure  # noqa: E402
import transformers  # noqa: E402

import fxprune  # noqa: E402
from fxprune.calibrated import FlapPruner, one_input_per_channel  # noqa: E402

CRITERIA = ("magnitude", "activation", "wanda_sp", "flap")
LOSS_ROW = "flap_loss"  # flap on statistics from calibrate(loss=next-byte NLL): a default row
VARIANTS = ("flap_marginal_heads", "flap_dense_choice")  # opt-in rows (--criteria), pruners of this benchmark only
COMPENSATIONS = ("none", "bias", "least_squares")


@fxprune.register_pruners("flap_marginal_heads")
class FlapMarginalHeads(FlapPruner):
    """``flap`` scoring a consumer whose group channels own several of its inputs (the heads at ``o_proj``) by
    the fluctuation, and the others (FFN channels, the hidden size) by the re-fit residual as ``flap`` does:
    which of the two scores ranks heads better under least_squares (results_retrain_free_lm_draws.md)."""

    def residual_scored(self, member) -> bool:
        return one_input_per_channel(member.atoms)


@fxprune.register_pruners("flap_dense_choice")
class FlapDenseChoice(FlapPruner):
    """``flap`` as it chose before the sequential fit chose heads and FFN channels again on the inputs the
    earlier layers' pruning leaves them: every channel chosen on ``calibrate()``'s (dense) statistics."""

    def reselects_on_pruned_inputs(self, member) -> bool:
        return False


@fxprune.register_pruners(LOSS_ROW)
class FlapWithLoss(FlapPruner):
    """``flap`` itself; its row is pruned from ``calibrate(batches, loss=next_byte_loss)``'s statistics, so the
    output error it scores is weighed by the loss gradient's second moment at each reading layer's output."""


VOCAB = 256  # byte-level tokens


# ------------------------------------------------------------------------------------------
# corpus
# ------------------------------------------------------------------------------------------
def load_corpus(heldout: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train bytes, validation bytes, description) of the standard library's ``*.py`` sources."""
    root = os.path.dirname(os.__file__)
    files = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    files = [f for f in files if not {"site-packages", "dist-packages"} & set(f.split(os.sep))]
    n_val = max(1, round(len(files) * heldout))

    def read(names):
        chunks = []
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                chunks.append(f.read())
        return b"".join(chunks)

    train, val = read(files[:-n_val]), read(files[-n_val:])
    desc = {"root": root, "python": platform.python_version(), "files": len(files), "train_files": len(files) - n_val,
            "val_files": n_val, "first_val_file": files[-n_val], "train_bytes": len(train), "val_bytes": len(val),
            "sha256": hashlib.sha256(train + val).hexdigest()[:16]}
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return as_tensor(train), as_tensor(val), desc


def random_windows(data: torch.Tensor, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq_len, (n,), generator=gen)
    return torch.stack([data[s:s + seq_len] for s in starts.tolist()]).long()


def even_windows(data: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    starts = np.linspace(0, len(data) - seq_len, n).astype(np.int64)
    return torch.stack([data[s:s + seq_len] for s in starts]).long()


# ------------------------------------------------------------------------------------------
# model, training, evaluation
# ------------------------------------------------------------------------------------------
def lm_config(args) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.ffn,
                                    num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                    num_key_value_heads=args.heads, max_position_embeddings=args.seq_len,
                                    tie_word_embeddings=False, use_cache=False,
                                    attention_bias=args.bias, mlp_bias=args.bias)


def logits_of(out) -> torch.Tensor:
    """The logits of a Hugging Face output or of a compact graph's (flattened) output."""
    if hasattr(out, "logits"):
        return out.logits
    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.dim() == 3)


def next_byte_nll(model, x: torch.Tensor) -> torch.Tensor:
    logits = logits_of(model(x))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="sum")


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int) -> float:
    total = sum(float(next_byte_nll(model, w)) for w in windows.split(batch))
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def cache_dir() -> str:
    base = os.environ.get("FXPRUNE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fxprune")
    return os.path.join(base, "lm")


def train_settings(args) -> dict:
    budget = {"steps": args.train_steps} if args.train_steps else {"minutes": args.train_minutes}
    return {**budget, "seq_len": args.seq_len, "batch": args.batch, "lr": args.lr,
            "min_lr_ratio": 0.1, "warmup_steps": 50, "weight_decay": 0.1, "betas": [0.9, 0.95], "clip": 1.0,
            "seed": args.seed}


def train_or_load(args, train: torch.Tensor, corpus: dict) -> tuple[transformers.LlamaForCausalLM, dict]:
    """The trained model and its training record, from the cache when this exact run was done before."""
    config = lm_config(args)
    settings = train_settings(args)
    arch = {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
    key = hashlib.sha256(json.dumps({"config": arch, "train": settings, "corpus": corpus}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"llama-bytes-{key}.pt")
    if os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=False)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(saved["config"]))
        model.load_state_dict(saved["state_dict"])
        print(f"trained checkpoint loaded from {path}", flush=True)
        return model.eval(), {**saved["record"], "cache": path, "cached": True}

    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=tuple(settings["betas"]))
    budget = args.train_minutes * 60
    model.train()
    step, losses, t0 = 0, [], time.perf_counter()

    def done() -> float:
        """The fraction of the budget used: steps where a step count is given (the same model on every
        machine), else wall time."""
        return step / args.train_steps if args.train_steps else (time.perf_counter() - t0) / budget

    while (frac := done()) < 1:
        elapsed = time.perf_counter() - t0
        # warm-up by steps, then cosine over the fraction of the budget used, down to min_lr_ratio
        warm = min(1.0, (step + 1) / settings["warmup_steps"])
        cosine = settings["min_lr_ratio"] + (1 - settings["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = args.lr * warm * cosine
        x = random_windows(train, args.batch, args.seq_len, gen)
        loss = next_byte_nll(model, x) / (x.shape[0] * (x.shape[1] - 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["clip"])
        opt.step()
        losses.append(loss.detach().item())
        step += 1
        if step % 50 == 0:
            print(f"[train] step {step} {elapsed / 60:.1f} min loss {np.mean(losses[-50:]):.3f} "
                  f"lr {opt.param_groups[0]['lr']:.2e}", flush=True)
    model.eval()
    record = {"steps": step, "tokens": step * args.batch * args.seq_len, "seconds": time.perf_counter() - t0,
              "final_train_loss": float(np.mean(losses[-50:])) if losses else None, "settings": settings,
              "corpus": corpus}
    os.makedirs(cache_dir(), exist_ok=True)
    torch.save({"config": config.to_dict(), "state_dict": model.state_dict(), "record": record}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return model, {**record, "cache": path, "cached": False}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------
# fxprune
# ------------------------------------------------------------------------------------------
COMPENSATION_INPUTS = "pruned"  # set from --compensation-inputs


def fx_config(criterion: str, compensation: str, ratio: float, hidden: bool, round_to: int) -> dict:
    base = {"pruning_type": criterion, "compensation": compensation, "prune_domain": "local", "round_to": round_to,
            "compensation_inputs": COMPENSATION_INPUTS}
    if not hidden:
        return {**base, "target_sparsity": ratio}
    return {**base, "pruners": [{"target_sparsity": ratio}, {"target_sparsity": ratio, "prune_hidden_size": True}]}


def use_statistics(pruning, stats, batches) -> None:
    """Give a fresh pruning the statistics another ``calibrate()`` of the same dense model collected,
    as ``calibrate()`` leaves them (``pruning.calibration``, each pruner's, and the batches that
    compensation on pruned inputs runs again)."""
    pruning.calibration = stats
    pruning._calibration_batches = batches
    for pruner in pruning.pruners:
        pruner.calibration = stats


def cfg_uses_loss(cfg: dict) -> bool:
    return cfg.get("pruning_type") == LOSS_ROW


def next_byte_loss(out, x: torch.Tensor) -> torch.Tensor:
    """The mean next-byte NLL of a calibration batch: what ``calibrate(loss=...)`` backpropagates (the flap_loss rows)."""
    logits = logits_of(out)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), x[:, 1:].reshape(-1))


def group_widths(pruning, dense_cfg) -> dict:
    """Kept heads and FFN channels of layer 0 and the kept hidden size."""
    kept = {g.index: len(pruning.kept_channels[g.index]) for g in pruning.groups}
    sizes = {g.index: g.size for g in pruning.groups}
    heads = [kept[i] for i, n in sizes.items() if n == dense_cfg.num_attention_heads]
    ffn = [kept[i] for i, n in sizes.items() if n == dense_cfg.intermediate_size]
    hidden = [kept[g.index] for g in pruning.groups if g.normalized]
    return {"heads": heads[0] if heads else None, "ffn": ffn[0] if ffn else None,
            "hidden": hidden[0] if hidden else dense_cfg.hidden_size}


def fx_run(dense, example, cfg: dict, stats, val: torch.Tensor, args, compact_ppl: bool, own_calibration=None) -> dict:
    """Compile, prune once, evaluate the masked model, compact and compare; an error is recorded, not raised."""
    t0 = time.perf_counter()
    try:
        out = _fx_run(dense, example, cfg, stats, val, args, compact_ppl, own_calibration)
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    out["seconds"] = time.perf_counter() - t0
    return out


def _fx_run(dense, example, cfg, stats, val, args, compact_ppl, own_calibration) -> dict:
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = fxprune.compile(dense, example, cfg)
        if own_calibration is not None:
            tc = time.perf_counter()
            p.calibrate(own_calibration, progress=False, loss=next_byte_loss if cfg_uses_loss(cfg) else None)
            out["calibrate_s"] = time.perf_counter() - tc
        elif stats is not None:
            use_statistics(p, stats, args.calibration_batches)
        p.prune()
        out["ppl"] = perplexity(p.model, val, args.eval_batch)
        small = p.compact()
    with torch.no_grad():
        batch = val[:args.eval_batch]
        masked, compact = logits_of(p.model(batch)), logits_of(small(batch))
    out["compact_max_abs_diff"] = float((masked - compact).abs().max())
    out["compact_check_error"] = p.compact_error
    out["logit_scale"] = float(masked.abs().max())
    if compact_ppl:
        out["compact_ppl"] = perplexity(small, val, args.eval_batch)
    out["params"] = n_params(small)
    out.update(group_widths(p, dense.config))
    out["notes"] = sorted({n for pr in p.pruners for n in getattr(pr, "notes", [])})
    return out


# ------------------------------------------------------------------------------------------
# Torch-Pruning
# ------------------------------------------------------------------------------------------
def tp_run(dense, example, ratio: float, hidden: bool, heads_removed: int, val: torch.Tensor, args) -> dict:
    t0 = time.perf_counter()
    try:
        import torch_pruning as tp
    except ImportError as exc:
        return {"error": f"torch_pruning is not importable ({exc}); pip install torch-pruning==1.6.1"}
    out = {}
    stage = "build"
    try:
        model = copy.deepcopy(dense).eval()
        cfg = model.config
        num_heads, roots_of_hidden = {}, []
        for name, m in model.named_modules():
            if name.endswith("self_attn"):
                num_heads[m.q_proj] = cfg.num_attention_heads
                num_heads[m.k_proj] = cfg.num_key_value_heads
                num_heads[m.v_proj] = cfg.num_key_value_heads
                roots_of_hidden.append(m.o_proj)
            if name.endswith("mlp"):
                roots_of_hidden.append(m.down_proj)
        ignored = [model.lm_head] + ([] if hidden else roots_of_hidden)
        # Torch-Pruning removes ceil(ratio * heads) heads per layer: ask for the count fxprune removes
        head_ratio = max(0.0, (heads_removed - 1e-6) / cfg.num_attention_heads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MagnitudePruner(
                model, example_inputs=example[0], importance=tp.importance.GroupMagnitudeImportance(p=2),
                global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads,
                prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=head_ratio,
                output_transform=lambda o: o.logits)
            stage = "prune"
            pruner.step()
        stage = "update attention attributes"
        for name, m in model.named_modules():  # what its LLM example does after pruning
            if name.endswith("self_attn"):
                heads = m.q_proj.out_features // m.head_dim
                kv = m.k_proj.out_features // m.head_dim
                m.num_heads, m.num_key_value_heads, m.num_key_value_groups = heads, kv, heads // kv
        stage = "evaluate"
        out["ppl"] = perplexity(model, val, args.eval_batch)
        out["params"] = n_params(model)
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        out.update(heads=attn.q_proj.out_features // attn.head_dim, ffn=mlp.gate_proj.out_features,
                   hidden=model.model.embed_tokens.weight.shape[1])
    except Exception as exc:  # recorded in the table, not raised
        out["error"] = f"{stage}: {type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    out["seconds"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------
# calibration cost
# ------------------------------------------------------------------------------------------
def calibration_cost(name: str, compensation: str, sequences: int, seq_len: int = 128, batch: int = 8,
                     ratio: float = 0.5) -> dict:
    """Time and peak RSS of ``calibrate()`` (and the time of the pruning step) of one model and compensation.

    Run in a fresh process per measurement (``--cost-worker``), so the peak is not hidden by memory that an
    earlier measurement left to the allocator."""
    torch.manual_seed(0)
    model = COST_MODELS[name]().eval()
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (sequences, seq_len), generator=torch.Generator().manual_seed(0))
    out = {"model": name, "params": n_params(model), "compensation": compensation, "sequences": sequences,
           "seq_len": seq_len, "batch": batch}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = fxprune.compile(model, (ids[:1],), {"pruning_type": "flap", "compensation": compensation,
                                                    "target_sparsity": ratio, "prune_domain": "local"})
            _measure.mark_build_start(out)
            t0 = time.perf_counter()
            p.calibrate(list(ids.split(batch)), progress=False)
            out["calibrate_s"] = time.perf_counter() - t0
            out["calibrate_peak_mib"] = _measure._peak_rss_mib()
            unique = {id(s): s for s in p.calibration.layers.values()}.values()
            out["stats_mib"] = sum(t.numel() * t.element_size() for s in unique for t in s._tensors()) / 2 ** 20
            out["grams"] = sum(1 for s in unique if s.gram_sum is not None)
            _measure._reset_peak()  # the pruning step's own peak: the sequential fit's model copy and moments
            t0 = time.perf_counter()
            p.prune()
            out["prune_s"] = time.perf_counter() - t0
            out["prune_peak_mib"] = _measure._peak_rss_mib()
    except Exception as exc:  # recorded in the table, not raised
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def calibration_cost_in_worker(name: str, compensation: str, sequences: int, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--cost-worker", f"{name}:{compensation}",
           "--cost-sequences", str(sequences), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("COST_JSON "):
            return json.loads(line[len("COST_JSON "):])
    return {"model": name, "compensation": compensation, "params": 0,
            "error": f"worker exited with {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}


def bert_base():
    return transformers.BertModel(transformers.BertConfig())


def llama_1024x8():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
        use_cache=False))


COST_MODELS = {"BERT-base": bert_base, "Llama h1024 x8": llama_1024x8}


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def _cell(r: dict | None, key: str = "ppl") -> str:
    if r is None:
        return "–"
    if r.get("error"):
        return "error: " + r["error"].splitlines()[0][:160].replace("|", "\\|")
    return f"{r[key]:.3f}"


def _ppl(r: dict | None) -> float | None:
    return None if r is None or r.get("error") else r["ppl"]


def perplexity_table(dense_ppl: float, columns: list[str], rows: dict) -> str:
    lines = ["| criterion | compensation | dense | " + " | ".join(columns) + " |",
             "|---|---|---:|" + "---:|" * len(columns)]
    best = {c: min((v for v in (_ppl(cells.get(c)) for cells in rows.values()) if v is not None), default=None)
            for c in columns}
    for (criterion, compensation), cells in rows.items():
        txt = [f"**{_cell(cells.get(c))}**" if _ppl(cells.get(c)) == best[c] else _cell(cells.get(c)) for c in columns]
        lines.append(f"| {criterion} | {compensation} | {dense_ppl:.3f} | " + " | ".join(txt) + " |")
    return "\n".join(lines)


def widths_table(columns: list[str], rows: dict, dense_params: int, cfg) -> str:
    lines = ["| column | tool | heads per layer | FFN channels per layer | hidden | params M |", "|---|---|---:|---:|---:|---:|",
             f"| dense | – | {cfg.num_attention_heads} | {cfg.intermediate_size} | {cfg.hidden_size} | {dense_params / 1e6:.2f} |"]
    fx_key = ("flap", "least_squares") if ("flap", "least_squares") in rows else \
        next((k for k in rows if k[0] != "Torch-Pruning"), None)
    for c in columns:
        for tool, key in (("fxprune", fx_key), ("Torch-Pruning", ("Torch-Pruning", "magnitude"))):
            r = rows.get(key, {}).get(c)
            if r is None or r.get("error"):
                lines.append(f"| {c} | {tool} | – | – | – | – |")
            else:
                lines.append(f"| {c} | {tool} | {r['heads']} | {r['ffn']} | {r['hidden']} | {r['params'] / 1e6:.2f} |")
    return "\n".join(lines)


def check_lines(rows: dict, columns: list[str], dense_ppl: float, key=("flap", "least_squares")) -> list[str]:
    """Whether ``key`` (flap + least_squares, or its row calibrated with the loss) is the lowest of all rows but the
    other flap rows (the peer's too) in every column, and whether its perplexity rise over dense at the first ratio
    is at most a third of magnitude's."""
    name = f"{key[0]} + {key[1]}"
    target = rows.get(key)
    if target is None:
        return [f"- {name} was not run."]
    out = []
    for c in columns:
        valid = {k: _ppl(v.get(c)) for k, v in rows.items() if _ppl(v.get(c)) is not None
                 and (k == key or not k[0].startswith("flap"))}
        if key not in valid:
            out.append(f"- {c}: {name} failed.")
            continue
        best, t = min(valid, key=valid.get), valid[key]
        others = [v for k, v in valid.items() if k != key]
        if best == key:
            out.append(f"- {c}: {name} is the lowest: {t:.3f}"
                       + (f" (next lowest {min(others):.3f})." if others else "."))
        else:
            out.append(f"- {c}: {name} is NOT the lowest: {t:.3f} against {valid[best]:.3f} for "
                       f"{best[0]} + {best[1]} ({100 * (t / valid[best] - 1):+.1f}%).")
    first = columns[0]
    t = _ppl(target.get(first))
    for comp in COMPENSATIONS:
        m = _ppl(rows.get(("magnitude", comp), {}).get(first))
        if m is None or t is None:
            continue
        rise_t, rise_m = t - dense_ppl, m - dense_ppl
        if rise_m > 0:
            share = rise_t / rise_m
            verdict = "met" if share <= 1 / 3 else f"NOT met, {share / (1 / 3):.1f}x the allowed rise"
            out.append(f"- {first}: perplexity rise over dense, {name} {rise_t:+.3f} vs magnitude + {comp} "
                       f"{rise_m:+.3f}: {share:.2f} of it (target at most 1/3 against magnitude + none: {verdict})."
                       if comp == "none" else
                       f"- {first}: against magnitude + {comp} ({rise_m:+.3f}) the rise is {share:.2f} of it.")
        else:
            out.append(f"- {first}: magnitude + {comp} does not raise the perplexity ({rise_m:+.3f}); "
                       f"{name} {rise_t:+.3f}.")
    return out


def cost_table(rows: list[dict]) -> str:
    lines = ["| model | params M | compensation | Gram matrices | statistics MiB | calibrate s | RSS before MiB | "
             "peak RSS in calibrate MiB | increase MiB | prune() s | peak RSS in prune() MiB |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} | {r['compensation']} | error: {r['error'][:120]} "
                         "| | | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} | {r['compensation']} | {r['grams']} | "
                     f"{r['stats_mib']:.0f} | {r['calibrate_s']:.2f} | {r['rss_before_mib']:.0f} | "
                     f"{r['calibrate_peak_mib']:.0f} | {r['calibrate_peak_mib'] - r['rss_before_mib']:.0f} | "
                     f"{r['prune_s']:.2f} | {r.get('prune_peak_mib', float('nan')):.0f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    """The benchmark's arguments (other scripts build the same checkpoint settings from it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-minutes", type=float, default=10.0, help="wall-time budget of the dense training")
    ap.add_argument("--train-steps", type=int, default=None, help="a budget of training steps instead of minutes: "
                    "the same checkpoint on every machine (a time budget gives a faster machine more steps)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.35, 0.5], help="heads + FFN pruning ratios")
    ap.add_argument("--hidden-ratio", type=float, default=0.2, help="ratio of the column that prunes the hidden size "
                    "too (heads, FFN and hidden at this ratio); negative: no such column")
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA) + [LOSS_ROW],
                    choices=CRITERIA + (LOSS_ROW,) + VARIANTS)
    ap.add_argument("--compensations", nargs="+", default=list(COMPENSATIONS), choices=COMPENSATIONS)
    ap.add_argument("--out", default=None, help="markdown file to write")
    ap.add_argument("--json", default=None, help="also write every measurement as JSON here")
    ap.add_argument("--hidden", type=int, default=320)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=10)
    ap.add_argument("--ffn", type=int, default=1280)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="training batch (windows)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout", type=float, default=0.05, help="fraction of the files (the last ones) held out")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--calibration-windows", type=int, default=256,
                    help="256 x 128 bytes is 21 rows per FFN input of the 14.4 M config, over the 16 that flap's "
                    "re-fit residual asks (fxprune.calibrated.ROWS_PER_INPUT); 64 left every criterion higher")
    ap.add_argument("--calibration-batch", type=int, default=8)
    ap.add_argument("--calibration-seed", type=int, default=None, help="seed of the calibration windows' draw "
                    "(default: --seed + 1); changes the draw only, not the training or the checkpoint")
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--bias", action="store_true", help="Linear layers with biases (attention_bias, mlp_bias), so "
                    "bias compensation has somewhere to go")
    ap.add_argument("--compensation-inputs", choices=("pruned", "dense"), default="pruned",
                    help="least_squares / bias fit each layer on the inputs pruning leaves it, or on dense statistics")
    ap.add_argument("--compact-ppl", nargs="*", default=["flap:least_squares"],
                    help="criterion:compensation rows whose compact model's perplexity is evaluated too")
    ap.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--cost-sequences", type=int, default=32, help="0: skip the calibration-cost part")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cost-worker", default=None, help=argparse.SUPPRESS)  # MODEL:COMPENSATION, one measurement
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cost_worker:
        name, compensation = args.cost_worker.rsplit(":", 1)
        print("COST_JSON " + json.dumps(calibration_cost(name, compensation, args.cost_sequences)), flush=True)
        return

    command = _measure.command_line(sys.argv[0])
    start = time.perf_counter()
    train, val, corpus = load_corpus(args.heldout)
    print(f"corpus: {corpus}", flush=True)
    model, record = train_or_load(args, train, corpus)
    val_windows = even_windows(val, args.eval_windows, args.seq_len)
    if args.calibration_seed is None:
        args.calibration_seed = args.seed + 1
    calib = list(random_windows(train, args.calibration_windows, args.seq_len,
                                torch.Generator().manual_seed(args.calibration_seed)).split(args.calibration_batch))
    global COMPENSATION_INPUTS
    COMPENSATION_INPUTS, args.calibration_batches = args.compensation_inputs, calib
    example = (val_windows[:1],)
    dense_ppl = perplexity(model, val_windows, args.eval_batch)
    dense_params = n_params(model)
    print(f"dense: {dense_params / 1e6:.2f} M params, {record['steps']} steps, validation perplexity {dense_ppl:.3f}",
          flush=True)

    columns = {f"{r:.0%}": (r, False) for r in args.ratios}
    if args.hidden_ratio >= 0:
        columns[f"{args.hidden_ratio:.0%} + hidden"] = (args.hidden_ratio, True)
    compact_ppl = {tuple(s.split(":")) for s in args.compact_ppl}

    # calibration statistics, once per column kind (which groups are pruned decides where Grams are kept)
    stats, calib_s = {}, {}
    for loss in (False, True) if LOSS_ROW in args.criteria else (False,):
        for hidden in sorted({h for _, h in columns.values()}):
            ratio = next(r for r, h in columns.values() if h == hidden)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = fxprune.compile(model, example, fx_config("flap", "least_squares", ratio, hidden, args.round_to))
                t0 = time.perf_counter()
                p.calibrate(calib, progress=False, gram=True if args.compensation_inputs == "dense" else None,
                            loss=next_byte_loss if loss else None)
            calib_s[hidden, loss] = time.perf_counter() - t0
            stats[hidden, loss] = p.calibration
            kind = ("heads + FFN + hidden" if hidden else "heads + FFN") + (", with loss" if loss else "")
            print(f"calibration ({kind}): {calib_s[hidden, loss]:.1f} s", flush=True)
            del p

    rows: dict[tuple[str, str], dict[str, dict]] = {}
    checks = []
    for criterion in args.criteria:
        for compensation in args.compensations:
            key = (criterion, compensation)
            for col, (ratio, hidden) in columns.items():
                cfg = fx_config(criterion, compensation, ratio, hidden, args.round_to)
                needs = criterion != "magnitude" or compensation != "none"
                r = fx_run(model, example, cfg, stats[hidden, cfg_uses_loss(cfg)] if needs else None, val_windows, args,
                           key in compact_ppl)
                rows.setdefault(key, {})[col] = r
                if args.json:  # partial results survive an interrupted run
                    with open(args.json + ".partial", "w") as f:
                        json.dump({f"{a}/{b}": v for (a, b), v in rows.items()}, f, default=str)
                if r.get("error"):
                    print(f"[{col}] {criterion} {compensation} FAILED: {r['traceback']}", flush=True)
                    continue
                print(f"[{col}] {criterion:<10} {compensation:<13} ppl {r['ppl']:.3f} (dense {dense_ppl:.3f}) heads "
                      f"{r['heads']} ffn {r['ffn']} hidden {r['hidden']} params {r['params'] / 1e6:.2f} M compact diff "
                      f"{r['compact_max_abs_diff']:.1e}" + (f" compact ppl {r['compact_ppl']:.3f}" if 'compact_ppl' in r
                                                             else "") + f" [{r['seconds']:.1f} s]", flush=True)
    # the shared statistics equal what calibrate() collects itself: one run per column kind, recalibrated
    for col, (ratio, hidden) in columns.items():
        if hidden in {h for h, *_ in checks} or ("flap", "least_squares") not in rows:
            continue
        r = fx_run(model, example, fx_config("flap", "least_squares", ratio, hidden, args.round_to), None, val_windows,
                   args, False, own_calibration=calib)
        if r.get("error") or rows[("flap", "least_squares")][col].get("error"):
            continue
        checks.append((hidden, col, r["ppl"], rows[("flap", "least_squares")][col]["ppl"], r["calibrate_s"]))
        print(f"[{col}] flap least_squares with its own calibrate(): ppl {r['ppl']:.6f} vs shared statistics "
              f"{checks[-1][3]:.6f}", flush=True)

    if not args.no_peer:
        for col, (ratio, hidden) in columns.items():
            heads = next((v[col]["heads"] for v in rows.values() if v.get(col, {}).get("heads")), None)
            removed = math.floor(ratio * model.config.num_attention_heads + 1e-9) if heads is None else \
                model.config.num_attention_heads - heads
            r = tp_run(model, example, ratio, hidden, removed, val_windows, args)
            rows.setdefault(("Torch-Pruning", "magnitude"), {})[col] = r
            print(f"[{col}] torch-pruning: " + (f"ppl {r['ppl']:.3f} heads {r['heads']} ffn {r['ffn']} hidden "
                                                f"{r['hidden']}" if "error" not in r else f"ERROR {r['error']}"),
                  flush=True)
            if "traceback" in r:
                print(r["traceback"], flush=True)

    cost_rows = []
    if args.cost_sequences > 0:
        for name in COST_MODELS:
            for compensation in ("none", "least_squares"):
                cost_rows.append(calibration_cost_in_worker(name, compensation, args.cost_sequences, args.threads))
                r = cost_rows[-1]
                print(f"[cost] {name} {compensation}: " + (r["error"] if r.get("error") else
                      f"calibrate {r['calibrate_s']:.1f} s, peak RSS {r['calibrate_peak_mib']:.0f} MiB "
                      f"(before {r['rss_before_mib']:.0f}), statistics {r['stats_mib']:.0f} MiB, prune {r['prune_s']:.1f} s"),
                      flush=True)
    total = time.perf_counter() - start

    info = _measure.machine()
    try:
        info["torch-pruning"] = importlib.metadata.version("torch-pruning")
    except importlib.metadata.PackageNotFoundError:
        pass
    info["torch threads"] = torch.get_num_threads()
    cfg = model.config
    col_names = list(columns)
    fx_ok = [r for k, v in rows.items() if k[0] != "Torch-Pruning" for r in v.values() if not r.get("error")]
    fx_errors = [f"- {a} + {b}, {col}: {r['error']}" for (a, b), v in rows.items() if a != "Torch-Pruning"
                 for col, r in v.items() if r.get("error")]
    budget = f"{args.train_steps} steps" if args.train_steps else f"{args.train_minutes} min"
    details = [
        f"- corpus: {corpus['files']} `*.py` files under `{corpus['root']}` (Python {corpus['python']}, site-packages "
        f"excluded), sorted and concatenated as bytes; validation = the last {corpus['val_files']} files (from "
        f"`{corpus['first_val_file']}` on, {corpus['val_bytes'] / 1e6:.2f} MB), training = the other "
        f"{corpus['train_files']} ({corpus['train_bytes'] / 1e6:.1f} MB); SHA-256 {corpus['sha256']}",
        f"- model: `LlamaForCausalLM`, vocab {VOCAB} (bytes), hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_attention_heads} heads of {cfg.hidden_size // cfg.num_attention_heads}, FFN {cfg.intermediate_size}, "
        f"untied LM head{', biases in every Linear (attention_bias, mlp_bias)' if args.bias else ''}: "
        f"{dense_params / 1e6:.2f} M parameters",
        f"- training: {record['steps']} steps of {args.batch} random windows of {args.seq_len} bytes "
        f"({record['tokens'] / 1e6:.1f} M tokens) in {record['seconds'] / 60:.1f} min (budget {budget}), "
        f"AdamW lr {args.lr} (betas 0.9/0.95, weight decay 0.1 on matrices, clip 1.0), 50 warm-up steps then cosine "
        f"over the {'step' if args.train_steps else 'time'} budget to 10%; final training loss {record['final_train_loss']:.3f} nats/byte"
        + (f"; loaded from the cache `{record['cache']}`" if record.get("cached") else f"; cached as `{record['cache']}`"),
        f"- dense validation perplexity: **{dense_ppl:.3f}** ({math.log2(dense_ppl):.3f} bits/byte), on "
        f"{args.eval_windows} windows of {args.seq_len} bytes spread evenly over the validation split "
        f"({args.eval_windows * (args.seq_len - 1)} predicted bytes)",
        f"- calibration: {args.calibration_windows} random training windows of {args.seq_len} bytes (draw seed "
        f"{args.calibration_seed}) in batches of {args.calibration_batch}; `calibrate()` took "
        + ", ".join(f"{s:.1f} s ({'heads + FFN + hidden' if h else 'heads + FFN'}"
                    f"{', loss=next-byte NLL, for the ' + LOSS_ROW + ' rows' if loss else ''})"
                    for (h, loss), s in calib_s.items())
        + "; these statistics are shared by every run of the same column kind. Check: "
        + "; ".join(f"{col} flap + least_squares with its own `calibrate()` ({s:.1f} s) gives perplexity {a:.6f}, "
                    f"with the shared statistics {b:.6f}" for _, col, a, b, s in checks),
        f"- pruning: `fxprune.compile(model, (input_ids,), config)`, `prune()` once, no training; prune_domain local, "
        f"round_to {args.round_to}; a column's ratio is each layer's heads and FFN channels (fxprune removes "
        f"floor(ratio × count) of each group); '+ hidden' adds a second pruner with `prune_hidden_size: True` at the "
        "same ratio (the two step together: one compensation fits both pruners' layers); compensation_inputs " + ("pruned (least_squares and bias fitted on the inputs pruning leaves "
                                              "each layer)" if args.compensation_inputs == "pruned" else
                                              "dense (fitted on the dense model's statistics)"),
        "- compact: every run calls `pruning.compact()` (its own check on the example passed) and compares the compact "
        "graph's logits with the masked model's on one validation batch of "
        f"{args.eval_batch}: max abs difference "
        + f"{max(r['compact_max_abs_diff'] for r in fx_ok):.1e} "
        f"over all runs (logits up to "
        f"{max(r['logit_scale'] for r in fx_ok):.0f})",
        "- peer: Torch-Pruning `MagnitudePruner` + `GroupMagnitudeImportance(p=2)`, local, `num_heads` with "
        "`prune_num_heads=True, prune_head_dims=False`, the head count of fxprune's run (its own rounding is ceil), "
        "`ignored_layers` = LM head (+ every `o_proj`/`down_proj` where the hidden size is kept)",
    ]
    same = [c for c in CRITERIA if all(_ppl(rows.get((c, "bias"), {}).get(col)) is not None and
                                       _ppl(rows[(c, "bias")][col]) == _ppl(rows.get((c, "none"), {}).get(col))
                                       for col in col_names)]
    if same:
        details.append(f"- `bias` gives exactly the perplexity of `none` for {', '.join(same)}: Llama's Linear layers "
                       "have no bias, and fxprune does not add one (see the pruner notes), so the mean of the removed "
                       "inputs is not compensated; `least_squares` still re-fits the kept weights (without an intercept)")
    compact_lines = []
    for key in sorted(compact_ppl):
        for col, r in rows.get(key, {}).items():
            if "compact_ppl" in r:
                compact_lines.append(f"| {key[0]} + {key[1]} | {col} | {r['ppl']:.4f} | {r['compact_ppl']:.4f} | "
                                     f"{r['compact_max_abs_diff']:.1e} |")
    sections = [
        "### Targets\n\nEach flap row against the rows of the other criteria and the peer:\n\n"
        + "\n".join(check_lines(rows, col_names, dense_ppl)
                     + (check_lines(rows, col_names, dense_ppl, (LOSS_ROW, "least_squares"))
                        if (LOSS_ROW, "least_squares") in rows else [])),
        "### Widths and parameters\n\nEvery fxprune row of a column has these widths (local scope: each group loses "
        "the same count whatever the criterion); parameters of the compact model.\n\n" + widths_table(col_names, rows, dense_params, cfg),
        "### Compact model == masked model\n\n| run | column | masked ppl | compact ppl | max abs logit diff |\n"
        "|---|---|---:|---:|---:|\n" + "\n".join(compact_lines),
    ]
    if cost_rows:
        sections.append(
            f"### Calibration cost\n\n`calibrate()` on {args.cost_sequences} random sequences of 128 tokens in batches "
            "of 8 (random init; config flap, 50% local heads + FFN, compensation as given: least_squares collects the "
            "Gram matrices of the layers that read pruned channels). Peak RSS is VmHWM, reset just before "
            "`calibrate()`; 'statistics MiB' is the size of what `pruning.calibration` keeps.\n\n" + cost_table(cost_rows))
    notes = sorted({n for v in rows.values() for r in v.values() for n in r.get("notes", [])})
    if notes:
        sections.append("### Pruner notes\n\n" + "\n".join(f"- {n}" for n in notes))
    peer_errors = [f"- {col}: {r['error']}" for col, r in rows.get(("Torch-Pruning", "magnitude"), {}).items()
                   if r.get("error")]
    if fx_errors:
        sections.append("### fxprune errors\n\n" + "\n".join(fx_errors))
    if peer_errors:
        sections.append("### Torch-Pruning errors\n\n" + "\n".join(peer_errors))
    _measure.write_report(args.out, "## Retrain-free pruning: byte-level Llama on the standard library, one shot, "
                          "no fine-tuning", command, info, details, total,
                          "Validation perplexity (lower is better; bold: the lowest of the column):\n\n"
                          + perplexity_table(dense_ppl, col_names, rows), sections)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense_ppl": dense_ppl, "record": record, "rows": {f"{a}/{b}": v for (a, b), v in rows.items()},
                       "cost": cost_rows, "checks": checks, "calibrate_s": {str(k): v for k, v in calib_s.items()}},
                      f, indent=1, default=str)


if __name__ == "__main__":
    main()
